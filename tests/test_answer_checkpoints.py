"""crosslmm-answer and the checkpoint it is given: a broken one ends with one line naming it and the problem (exit
status 2, no traceback); an answer that would run past the model's positions is capped with a warning, a prompt that
fills them is refused; `--dtype auto` runs the checkpoint's dtype. Each checkpoint is the tiny sample, copied, then
changed."""

import argparse
import io
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2Config

from chats import chat_inputs, video_question
from crosslmm.answer import main


def copy_of(folder, tmp_path):
    copy = tmp_path / "checkpoint"
    shutil.copytree(folder, copy)
    return copy


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        elif isinstance(value, dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


QUESTION, NUM_FRAMES = "What moves?", 2


def run(checkpoint, video, capsys, *options, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    argv = ["--model", str(checkpoint), "--video", str(video), "--prompt", QUESTION, "--num-frames", str(NUM_FRAMES)]
    status = main([*argv, "--device", "cpu", *options])  # on the CPU, as the answers it is compared with
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.out, captured.err


# ---- broken checkpoints ------------------------------------------------------------------------------------------


def truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def shard_and_lose_one(folder):
    """Two shards and their index, as transformers writes a large checkpoint; then the second shard is lost."""
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2]}
    shards["model-00002-of-00002.safetensors"] = names[len(names) // 2 :]
    for shard, keys in shards.items():
        save_file({key: state[key] for key in keys}, folder / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {key: shard for shard, keys in shards.items() for key in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-00002-of-00002.safetensors").unlink()


def pickle_with_objects(folder):
    """A pytorch_model.bin as older training code saved it: the weights beside the run's arguments, an object
    torch.load(weights_only=True) refuses to unpickle."""
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-4)}, folder / "pytorch_model.bin")


def plain_qwen2_config(folder):
    config = Qwen2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    (folder / "config.json").write_text(config.to_json_string())


@pytest.mark.parametrize(
    "damage, problem",
    [
        (truncate_weights, r"model\.safetensors is not a readable safetensors file, truncated or damaged \(.+\)"),
        (lambda f: (f / "model.safetensors").write_bytes(b""), r"model\.safetensors is not a readable safetensors"),
        (shard_and_lose_one, r"index\.json names shard\(s\) that are missing: model-00002-of-00002\.safetensors$"),
        (
            lambda f: (f / "model.safetensors").unlink(),
            r"has a config\.json but no weights: none of model\.safetensors, model\.safetensors\.index\.json",
        ),
        (lambda f: edit_config(f, model_type="frobnicator", auto_map=None), "model type `frobnicator`"),
        (plain_qwen2_config, "is a 'qwen2' checkpoint, which has no video-text-to-text pipeline"),
        (pickle_with_objects, r"weights are a pickle \(pytorch_model\.bin\) that torch\.load\(weights_only=True\) "),
        (lambda f: (f / "config.json").write_text("{'not': json"), r"config\.json' is not a valid JSON file"),
    ],
    ids=["truncated", "empty", "missing-shard", "no-weights", "unknown-type", "qwen2", "pickle", "bad-json"],
)
def test_a_broken_checkpoint_ends_with_one_line_naming_it_and_the_problem(
    tiny_files, tmp_path, capsys, damage, problem
):
    folder, video = tiny_files
    checkpoint = copy_of(folder, tmp_path)
    damage(checkpoint)
    status = main(["--model", str(checkpoint), "--video", str(video), "--num-frames", "2", "--max-new-tokens", "1"])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and captured.err.strip().splitlines()[-1] == errors[0], captured.err  # the rest: progress
    assert errors[0].startswith("crosslmm-answer: error: ") and str(checkpoint) in errors[0]
    assert re.search(problem, errors[0]), errors[0]
    if damage is pickle_with_objects:  # says what to do about it
        assert "expects safetensors weights (model.safetensors): convert the checkpoint" in errors[0]


# ---- the model's positions ---------------------------------------------------------------------------------------


def prompt_length(folder, video):
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    return chat_inputs(processor, video_question(video, QUESTION), num_frames=NUM_FRAMES)["input_ids"].shape[1]


def test_an_answer_past_the_models_positions_is_capped_with_a_warning(tiny_files, tmp_path, capsys):
    folder, video = tiny_files
    length = prompt_length(folder, video)
    checkpoint = copy_of(folder, tmp_path)
    edit_config(checkpoint, text_config={"max_position_embeddings": length + 3})
    status, out, err = run(checkpoint, video, capsys, "--max-new-tokens", "10")
    assert status == 0, err
    assert (
        f"crosslmm-answer: warning: --max-new-tokens 10 capped at 3: the prompt takes {length} of the model's "
        f"{length + 3} positions (max_position_embeddings)\n" in err
    )
    tokens = int(re.search(r"generate [\d.]+ s \((\d+) tokens", out).group(1))
    assert tokens <= 3
    # The answer is the one generate gives with the capped length.
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = chat_inputs(processor, video_question(video, QUESTION), num_frames=NUM_FRAMES)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, length:]
    assert f"Answer: {processor.decode(expected, skip_special_tokens=True)}\n" in out
    assert tokens == len(expected)

    # Within the positions: no warning.
    status, out, err = run(checkpoint, video, capsys, "--max-new-tokens", "3")
    assert status == 0 and "warning" not in err


@pytest.mark.parametrize("room", [0, -5])
def test_a_prompt_that_fills_the_models_positions_is_refused(tiny_files, tmp_path, capsys, room):
    folder, video = tiny_files
    length = prompt_length(folder, video)
    checkpoint = copy_of(folder, tmp_path)
    edit_config(checkpoint, text_config={"max_position_embeddings": length + room})
    status, out, err = run(checkpoint, video, capsys, "--max-new-tokens", "4")
    assert status == 2 and out == ""
    assert err.strip().splitlines()[-1] == (
        f"crosslmm-answer: error: the prompt takes {length} tokens but the model holds {length + room} positions "
        "(max_position_embeddings), which leaves no room for an answer: use fewer frames or a shorter prompt"
    )


def test_a_conversation_that_outgrows_the_models_positions_ends(tiny_files, tmp_path, capsys, monkeypatch):
    folder, video = tiny_files
    length = prompt_length(folder, video)
    checkpoint = copy_of(folder, tmp_path)
    edit_config(checkpoint, text_config={"max_position_embeddings": length + 6})
    status, out, err = run(
        checkpoint,
        video,
        capsys,
        "-i",
        "--max-new-tokens",
        "2",
        stdin="And then?\nNever asked\n",
        monkeypatch=monkeypatch,
    )
    assert status == 2
    assert out.count("Answer: ") == 1  # the first question's
    error = err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"crosslmm-answer: error: the conversation takes (\d+) tokens but the model holds {length + 6} positions "
        r"\(max_position_embeddings\), which leaves no room for an answer: start a new conversation",
        error,
    ), error


# ---- --dtype auto ------------------------------------------------------------------------------------------------


def forget_dtype(checkpoint):
    """config.json without a saved dtype, at the top or in its sub-configs (as older checkpoints are)."""
    config = json.loads((checkpoint / "config.json").read_text())
    for part in (config, config["text_config"], config["vision_config"]):
        part.pop("dtype", None)
    (checkpoint / "config.json").write_text(json.dumps(config))


def saved_in(folder, tmp_path, dtype):
    """The tiny checkpoint saved again with its weights in `dtype` (config.json records it)."""
    checkpoint = copy_of(folder, tmp_path)
    AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True, dtype=dtype).save_pretrained(
        checkpoint
    )
    assert json.loads((checkpoint / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    return checkpoint


def test_dtype_auto_runs_the_checkpoints_dtype(tiny_files, tmp_path, capsys):
    folder, video = tiny_files
    checkpoint = saved_in(folder, tmp_path, torch.bfloat16)
    status, out, err = run(checkpoint, video, capsys, "--max-new-tokens", "3")  # --dtype auto is the default
    assert status == 0, err
    assert f"Loading {checkpoint} on cpu (bfloat16, the checkpoint's) ..." in err
    assert "[cpu, bfloat16]" in out
    # The answer is the one transformers' own dtype="auto" gives.
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True, dtype="auto").eval()
    assert model.dtype == torch.bfloat16
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    inputs = chat_inputs(processor, video_question(video, QUESTION), num_frames=NUM_FRAMES).to(dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert f"Answer: {processor.decode(expected, skip_special_tokens=True)}\n" in out

    # An explicit --dtype wins.
    status, out, err = run(checkpoint, video, capsys, "--max-new-tokens", "1", "--dtype", "float32")
    assert status == 0 and "[cpu, float32]" in out and "(float32) ..." in err

    # Without a saved dtype, the weights' dtype (transformers' dtype="auto").
    forget_dtype(checkpoint)
    status, out, err = run(checkpoint, video, capsys, "--max-new-tokens", "1")
    assert status == 0 and "(the weights' dtype) ..." in err and "[cpu, bfloat16]" in out


def test_dtype_auto_runs_a_float16_checkpoint_as_float32_on_a_cpu(tiny_files, tmp_path, capsys):
    folder, video = tiny_files
    checkpoint = saved_in(folder, tmp_path, torch.float16)
    status, out, err = run(checkpoint, video, capsys, "--max-new-tokens", "1")
    assert status == 0, err
    assert f"Loading {checkpoint} on cpu (float32: the checkpoint's float16 runs as float32 on a CPU) ..." in err
    assert "[cpu, float32]" in out
    # Also when only the weights say float16.
    forget_dtype(checkpoint)
    status, out, err = run(checkpoint, video, capsys, "--max-new-tokens", "1")
    assert status == 0 and "(the weights' dtype) ..." in err and "[cpu, float32]" in out
