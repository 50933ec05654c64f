"""`crosslmm-train` on the tiny LLaVA-format dataset of tests/support/llava_data.py: both stages through the
command, the loss falling, skipped samples counted, Hub-ready checkpoints, a killed run resuming to the same weights,
checkpoints whole or absent, LoRA, bad configurations failing before the model loads, and FSDP2 on two CPU
processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from crosslmm.train.command import TRAIN_FLAGS, main, parse_args
from crosslmm.train.trainer import STAGES
from llava_data import answer_main, dataset_fixture, tiny_checkpoint_fixture  # noqa: F401  (pytest fixtures)


ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).with_name("crosslmm-train")
# A virtual environment that sees the package through the system's site-packages has no console script of its own.
CONSOLE = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "crosslmm.train"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread per process: on a small machine shared with other work, two threads per tiny matrix product are
    many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def command(checkpoint, data, output_dir, *extra, steps=10):
    """A short stage-2 run: 20 samples in batches of 4, so 10 steps are 2 epochs and every sample (the bad ones too)
    is met exactly twice; rates a tiny random model learns from within a few steps."""
    return [
        *("--model", str(checkpoint), "--data", str(data["yaml"])),
        *("--video-folder", str(data["videos"]), "--image-folder", str(data["images"])),
        *("--output_dir", str(output_dir), "--max_steps", str(steps), "--save_steps", "5"),
        *("--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"),
        *("--num_frames", "4", "--min_frames", "2", "--learning_rate", "1e-3", "--vision_tower_lr", "2e-4"),
        *("--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1"),
        *("--dataloader_num_workers", "0", "--use_cpu", "--seed", "3"),
        *extra,
    ]


def losses(output_dir):
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


@pytest.fixture(scope="module")
def stage2_run(tiny_checkpoint, dataset, tmp_path_factory):
    """The uninterrupted stage-2 run, in this process: what the other tests compare with."""
    output_dir = tmp_path_factory.mktemp("stage2")
    assert main(command(tiny_checkpoint, dataset, output_dir)) == 0
    return output_dir


# ---- both stages ---------------------------------------------------------------------------------------------------


def test_stage2_lowers_the_loss_counts_skipped_samples_and_saves_hub_ready_checkpoints(stage2_run, dataset, capsys):
    values = losses(stage2_run)
    assert len(values) == 10 and values[-1] < 0.6 * values[0], values
    # Each bad sample was met twice (two epochs); the summary reaches the logs, the metrics and a file.
    skipped = json.loads((stage2_run / "skipped_samples.json").read_text())
    assert skipped["reasons"] == {"missing": 2, "corrupt": 2, "too short": 2} and skipped["total"] == 6
    assert {entry["id"] for entry in skipped["examples"]} == {"missing", "corrupt", "short"}
    state = json.loads((stage2_run / "trainer_state.json").read_text())
    assert state["log_history"][-2]["skipped_samples"] == 6
    assert json.loads((stage2_run / "train_results.json").read_text())["skipped_samples"] == 6

    checkpoints = sorted(path.name for path in stage2_run.iterdir() if path.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-10", "checkpoint-5"] and not (stage2_run / ".staging").exists()
    for folder in (stage2_run / "checkpoint-10", stage2_run):  # the last checkpoint and the final model
        for name in (
            "modeling_crosslmm.py",
            "configuration_crosslmm.py",
            "processing_crosslmm.py",
            "pipeline_crosslmm.py",
            "chat_template.jinja",
            "tokenizer.json",
            "processor_config.json",
        ):
            assert (folder / name).is_file(), (folder, name)
        video_processor = json.loads((folder / "video_preprocessor_config.json").read_text())
        assert video_processor["num_frames"] == 4 and video_processor["do_sample_frames"]  # sampled as trained
    final = weights(stage2_run)
    assert all(torch.equal(final[name], value) for name, value in weights(stage2_run / "checkpoint-10").items())
    model = AutoModelForImageTextToText.from_pretrained(stage2_run / "checkpoint-10", trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules") and model.config.use_t2v
    torch.testing.assert_close(model.lm_head.weight.detach(), final["model.language_model.embed_tokens.weight"])
    capsys.readouterr()
    video = dataset["videos"] / "clips/blue-right.mp4"
    code = answer_main(["--model", str(stage2_run / "checkpoint-5"), "--video", str(video), "--max-new-tokens", "3"])
    assert code == 0 and "Answer:" in capsys.readouterr().out


def test_stage1_trains_only_the_projector_and_v2v_and_turns_t2v_off(tiny_checkpoint, dataset, tmp_path):
    argv = command(tiny_checkpoint, dataset, tmp_path, "--stage", "1", "--learning_rate", "3e-2", steps=6)
    argv.remove("--vision_tower_lr")
    argv.remove("2e-4")
    assert main(argv) == 0
    values = losses(tmp_path)
    assert values[-1] < values[0], values
    before, after = weights(tiny_checkpoint), weights(tmp_path)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(
        name.startswith("model.multi_modal_projector.")
        or (".cross_attention_layers." in name and any(part in name for part in ("v2v_attn", "v2v_norm", "v2v_gate")))
        for name in changed
    ), sorted(changed)
    assert any(".v2v_attn." in name for name in changed)
    assert not json.loads((tmp_path / "config.json").read_text())["use_t2v"]


# ---- flags over the stage presets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_each_stage_of_stages_is_the_default_of_the_flags(stage, tmp_path):
    """The command's defaults come from the one table of the paper's stages (STAGES), nowhere else."""
    argv = ["--model", "m", "--data", "d.json", "--output_dir", str(tmp_path), "--stage", str(stage)]
    args, training_args = parse_args(argv)
    preset = STAGES[stage]
    assert {component for component, flag in TRAIN_FLAGS.items() if getattr(args, flag)} == set(preset.learning_rates)
    assert (args.use_t2v, args.num_frames, args.global_batch_size) == (
        preset.use_t2v,
        preset.num_frames,
        preset.global_batch_size,
    )
    assert training_args.per_device_train_batch_size == preset.per_device_train_batch_size
    assert training_args.learning_rate == preset.learning_rates["projector"]
    assert training_args.gradient_accumulation_steps * preset.per_device_train_batch_size == preset.global_batch_size
    assert args.train_gates and args.use_v2v is None  # the gates train; V2V as the checkpoint has it


def without_t2v(checkpoint, folder) -> Path:
    """A copy of `checkpoint` whose config says use_t2v false (as a stage-1 run saves it)."""
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "use_t2v": False}))
    return folder


def run_record(output_dir) -> dict:
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return state["stateful_callbacks"]["RunRecord"]["attributes"]["run"]


def changed(before, after) -> set:
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_stage2_keeps_t2v_off_with_use_t2v_false_and_the_flags_choose_what_trains_at_which_rate(
    tiny_checkpoint, dataset, tmp_path
):
    """Table 2c's "T2V in neither stage": stage 2 on a use_t2v=false checkpoint with --use_t2v false; the gates and
    the vision tower frozen by flags; a learning rate per component, each as the logs and the run record say."""
    start = without_t2v(tiny_checkpoint, tmp_path / "start")
    rates = ["--projector_lr", "1e-3", "--dcal_lr", "2e-3", "--llm_lr", "3e-3"]
    argv = command(start, dataset, tmp_path / "run", "--use_t2v", "false", "--train_gates", "false", *rates, steps=3)
    argv += ["--train_vision_tower", "false"]
    del argv[argv.index("--vision_tower_lr") : argv.index("--vision_tower_lr") + 2]
    assert main(argv) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["use_t2v"] is False and config["use_v2v"] is True
    moved = changed(weights(start), weights(tmp_path / "run"))
    assert not any(".t2v_" in name or name.endswith("_gate") or ".vision_tower." in name for name in moved), moved
    assert any(".v2v_attn." in name for name in moved) and any(".language_model." in name for name in moved)
    assert any("multi_modal_projector" in name for name in moved) and any(".mlp." in name for name in moved)
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    logged = next(entry for entry in state["log_history"] if "learning_rate_llm" in entry)
    assert (logged["learning_rate_projector"], logged["learning_rate_dcals"], logged["learning_rate_llm"]) == (
        1e-3,
        2e-3,
        3e-3,
    )
    assert "learning_rate_vision_tower" not in logged
    record = run_record(tmp_path / "run")
    assert (record["use_t2v"], record["use_v2v"]) == (False, True)
    assert record["trains"] == {"vision_tower": False, "projector": True, "dcals": True, "llm": True, "gates": False}
    assert record["learning_rates"] == {"projector": 1e-3, "dcals": 2e-3, "llm": 3e-3}


def test_stage2_turns_t2v_on_in_a_checkpoint_without_it_by_default_and_says_so(tiny_checkpoint, dataset, tmp_path):
    start = without_t2v(tiny_checkpoint, tmp_path / "start")
    argv = command(start, dataset, tmp_path / "run", steps=2)
    process = console_script(argv)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "--model has use_t2v false; stage 2 turns T2V on" in err and "--use_t2v false" in err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["use_t2v"] is True
    assert any(".t2v_attn." in name for name in changed(weights(start), weights(tmp_path / "run")))
    assert run_record(tmp_path / "run")["use_t2v"] is True


def test_use_v2v_false_neither_runs_nor_trains_v2v(tiny_checkpoint, dataset, tmp_path):
    assert main(command(tiny_checkpoint, dataset, tmp_path, "--use_v2v", "false", steps=2)) == 0
    assert json.loads((tmp_path / "config.json").read_text())["use_v2v"] is False
    moved = changed(weights(tiny_checkpoint), weights(tmp_path))
    assert not any(".v2v_" in name for name in moved) and any(".t2v_attn." in name for name in moved)
    assert run_record(tmp_path)["use_v2v"] is False


def test_stage1_with_use_t2v_trains_the_t2v_branches_too(tiny_checkpoint, dataset, tmp_path):
    """Table 2c's "T2V in pretraining": stage 1 with --use_t2v true trains the projector and both attention branches
    of the DCALs, not their feed-forward blocks, and saves use_t2v true."""
    argv = command(tiny_checkpoint, dataset, tmp_path, "--stage", "1", "--use_t2v", "true", steps=2)
    del argv[argv.index("--vision_tower_lr") : argv.index("--vision_tower_lr") + 2]
    assert main(argv) == 0
    moved = changed(weights(tiny_checkpoint), weights(tmp_path))
    assert any(".t2v_attn." in name for name in moved) and any(".v2v_attn." in name for name in moved)
    assert all(
        name.startswith("model.multi_modal_projector.") or any(part in name for part in (".v2v_", ".t2v_"))
        for name in moved
    ), sorted(moved)
    assert json.loads((tmp_path / "config.json").read_text())["use_t2v"] is True
    assert run_record(tmp_path)["trains"]["llm"] is False


# ---- a run that is killed ------------------------------------------------------------------------------------------


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(stage2_run, tiny_checkpoint, dataset, tmp_path):
    """The console script in a real process, with a DataLoader worker, killed (SIGKILL to its process group: the
    process and its worker, as a node failure would) once its first checkpoint is in place; the same command then
    resumes from that checkpoint and ends with the same weights as the run that was never interrupted."""
    argv = command(tiny_checkpoint, dataset, tmp_path / "run")
    argv[argv.index("--dataloader_num_workers") + 1] = "1"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*CONSOLE, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    first = tmp_path / "run" / "checkpoint-5"
    deadline = time.monotonic() + 120
    while not (first / "trainer_state.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    output = process.communicate()[0].decode(errors="replace")
    assert first.is_dir(), output[-3000:]
    assert not (tmp_path / "run" / "checkpoint-10").exists(), "the run ended before it could be killed"
    assert (first / "trainer_state.json").is_file() and (first / "optimizer.pt").is_file()

    assert main(argv) == 0  # the same command again: resumes from checkpoint-5
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    resumed_losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert resumed_losses == losses(stage2_run)  # steps 1-5 from the checkpoint's history, 6-10 recomputed
    expected, resumed = weights(stage2_run), weights(tmp_path / "run")
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
    skipped = json.loads((tmp_path / "run" / "skipped_samples.json").read_text())
    assert skipped["reasons"] == {"missing": 2, "corrupt": 2, "too short": 2}  # counted across the kill, once each


def test_sigterm_with_jit_checkpointing_saves_and_stops_without_a_final_model(tiny_checkpoint, dataset, tmp_path):
    """transformers' --enable_jit_checkpoint: SIGTERM (a preemption) -> a checkpoint a few seconds later, exit 143."""
    argv = command(tiny_checkpoint, dataset, tmp_path, "--enable_jit_checkpoint", steps=100000)
    argv[argv.index("--save_steps") + 1] = "100000"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*CONSOLE, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:  # training has begun once a loss is logged
        lines.append(line)
        if "'loss'" in line:
            break
    process.send_signal(signal.SIGTERM)
    output = "".join(lines) + process.communicate(timeout=120)[0]
    assert process.returncode == 143, output[-3000:]
    (checkpoint,) = tmp_path.glob("checkpoint-*")
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "model.safetensors").is_file()
    assert not (tmp_path / "config.json").exists()  # no final model from an unfinished run
    assert "Run the same command to resume" in output


def test_fsdp_without_a_full_state_dict_is_refused(tiny_checkpoint, dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")  # accelerate's default for FSDP2: a sharded state dict
    monkeypatch.delenv("FSDP_STATE_DICT_TYPE", raising=False)
    assert main(command(tiny_checkpoint, dataset, tmp_path)) == 2
    assert "set fsdp_state_dict_type: FULL_STATE_DICT" in capsys.readouterr().err


def test_a_checkpoint_of_another_stage_is_not_resumed(stage2_run, tiny_checkpoint, dataset, capsys):
    argv = command(tiny_checkpoint, dataset, stage2_run, "--stage", "1")
    del argv[argv.index("--vision_tower_lr") : argv.index("--vision_tower_lr") + 2]
    assert main(argv) == 2
    assert "checkpoint of a run with --stage 2, this one has --stage 1" in capsys.readouterr().err


def test_a_checkpoint_is_whole_or_unfinished_and_an_unfinished_one_is_never_resumed(
    tiny_checkpoint, dataset, tmp_path, monkeypatch
):
    """Trainer writes trainer_state.json last: a save that fails half-way (here: after the weights, while the
    processor is written) leaves a folder without it, which the next run removes before resuming from the previous
    whole checkpoint."""
    from processing_crosslmm import CrossLMMProcessor

    argv = command(tiny_checkpoint, dataset, tmp_path, "--save_steps", "1", steps=3)
    save = CrossLMMProcessor.save_pretrained
    calls = []

    def failing_save(self, folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            raise RuntimeError("the save broke off")
        return save(self, folder, *args, **kwargs)

    monkeypatch.setattr(CrossLMMProcessor, "save_pretrained", failing_save)
    with pytest.raises(RuntimeError, match="the save broke off"):
        main(argv)
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").is_file()
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()  # the half-written one
    assert not (tmp_path / "checkpoint-2" / "trainer_state.json").exists()
    monkeypatch.setattr(CrossLMMProcessor, "save_pretrained", save)
    assert main(argv) == 0
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert len([entry for entry in state["log_history"] if "loss" in entry]) == 3
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()  # written again, whole


def test_a_checkpoint_of_another_model_is_not_resumed(stage2_run, tiny_checkpoint, dataset, tmp_path, capsys):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_checkpoint, other)
    assert main(command(other, dataset, stage2_run)) == 2
    error = capsys.readouterr().err
    assert f"checkpoint of a run with --model {Path(tiny_checkpoint).resolve()}, this one has --model {other}" in error


# ---- LoRA ----------------------------------------------------------------------------------------------------------


def test_lora_checkpoints_load_merged_and_resume(tiny_checkpoint, dataset, tmp_path):
    from peft import PeftModel

    argv = command(tiny_checkpoint, dataset, tmp_path, "--lora", "--lora_r", "4", "--lora_alpha", "8", steps=2)
    argv[argv.index("--save_steps") + 1] = "1"
    assert main(argv) == 0
    checkpoint = tmp_path / "checkpoint-2"
    merged = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).eval()
    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    adapted = PeftModel.from_pretrained(base, checkpoint / "lora").eval()
    trained = load_file(checkpoint / "lora" / "trained.safetensors")
    assert any("lora_A" in name for name in trained) and any(name.endswith("t2v_gate") for name in trained)
    assert not adapted.load_state_dict(trained, strict=False).unexpected_keys
    ids = torch.tensor([[5, 6] + [merged.config.video_token_id] * 8 + [7, 8, 9]])
    size = merged.config.image_size
    frames = torch.randn(1, 2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapted(input_ids=ids, pixel_values_videos=frames).logits
        merged_logits = merged(input_ids=ids, pixel_values_videos=frames).logits
        torch.testing.assert_close(merged_logits, expected, rtol=1e-4, atol=1e-4)  # W + s B A, rounded once
    before = weights(tiny_checkpoint)
    assert torch.equal(
        weights(checkpoint)["model.vision_tower.embeddings.patch_embedding.weight"],
        before["model.vision_tower.embeddings.patch_embedding.weight"],
    )  # the tower stays frozen

    argv[argv.index("--max_steps") + 1] = "3"
    assert main(argv) == 0  # resumes from checkpoint-2 (its trained tensors), one more step
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    resumed = load_file(tmp_path / "checkpoint-3" / "lora" / "trained.safetensors")
    assert not all(torch.equal(resumed[name], trained[name]) for name in trained)


def test_lora_merge_needs_only_the_trained_tensors(tiny_checkpoint, tmp_path):
    """DeepSpeed ZeRO-3 hands a PEFT model's save only its trained tensors: the merged model is PEFT's
    merge_and_unload of the starting checkpoint with them loaded, the same weights as merging the model in training."""
    from peft import LoraConfig, get_peft_model

    from crosslmm.train.trainer import LORA_TARGET_MODULES, save_lora

    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES, init_lora_weights=False)
    model = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, trust_remote_code=True), config
    )
    full = model.state_dict()
    trained_only = {name: full[name] for name, param in model.named_parameters() if param.requires_grad}
    save_lora(tmp_path, model, trained_only, str(tiny_checkpoint))
    expected = model.merge_and_unload().state_dict()
    merged = weights(tmp_path)
    assert sorted(merged) == sorted(weights(tiny_checkpoint))
    for name, value in merged.items():
        assert torch.equal(value, expected[name]), name
    assert set(load_file(tmp_path / "lora" / "trained.safetensors")) == set(trained_only)


# ---- bad configurations --------------------------------------------------------------------------------------------


def train_nothing(argv):
    del argv[argv.index("--vision_tower_lr") : argv.index("--vision_tower_lr") + 2]
    for flag in TRAIN_FLAGS.values():
        argv += [f"--{flag}", "false"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a, d, t: a.remove("--output_dir") or a.remove(str(t)), "--output_dir is required"),
        (lambda a, d, t: a.__setitem__(a.index("--model") + 1, str(t / "nothing")), "nothing: no such checkpoint"),
        (lambda a, d, t: a.__setitem__(a.index("--data") + 1, str(t / "no.json")), "data file not found"),
        (lambda a, d, t: a.__setitem__(a.index("--data") + 1, str(d["empty"])), "no samples in"),
        (lambda a, d, t: a.__setitem__(a.index("--data") + 1, str(d["no_reply"])), "has no reply"),
        (lambda a, d, t: a.__setitem__(a.index("--data") + 1, str(d["mismatch"])), r"placeholder\(s\) but 1 video"),
        (lambda a, d, t: a.__setitem__(a.index("--video-folder") + 1, str(t)), "none of the .* checked exist"),
        (lambda a, d, t: a.extend(["--stage", "3"]), "invalid choice: 3"),
        (lambda a, d, t: a.extend(["--stage", "1"]), "--vision_tower_lr is for stage 2"),
        (lambda a, d, t: a.extend(["--lora", "--stage", "1"]), "--lora is for stage 2"),
        (lambda a, d, t: a.extend(["--no_such_flag", "1"]), "no_such_flag"),
        (lambda a, d, t: a.extend(["--num_frames", "0"]), "--num_frames must be at least 1"),
        (lambda a, d, t: a.extend(["--train_dcals", "false", "--dcal_lr", "1"]), "--dcal_lr is given but --train_dc"),
        (lambda a, d, t: a.extend(["--llm_lr", "0"]), "--llm_lr must be positive"),
        (lambda a, d, t: train_nothing(a), "nothing trains"),
        (lambda a, d, t: a.extend(["--use_t2v", "false", "--use_v2v", "false"]), "are both false"),
        (lambda a, d, t: a.extend(["--lora", "--train_llm", "false"]), "--train_llm does not go with --lora"),
    ],
)
def test_a_bad_configuration_is_one_line_and_exit_2_before_the_model_loads(
    tiny_checkpoint,
    dataset,
    tmp_path,
    monkeypatch,
    capsys,
    change,
    message,
):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    from modeling_crosslmm import CrossLMMForConditionalGeneration

    monkeypatch.setattr(CrossLMMForConditionalGeneration, "from_pretrained", no_model)
    files = {"empty": [], "no_reply": [{"conversations": [{"from": "human", "value": "Hi"}]}]}
    files["mismatch"] = [
        {
            "video": "clips/red-left.mp4",
            "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
        }
    ]
    data = dict(dataset)
    for name, samples in files.items():
        data[name] = tmp_path / f"{name}.json"
        data[name].write_text(json.dumps(samples))
    argv = command(tiny_checkpoint, dataset, tmp_path)
    change(argv, data, tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crosslmm-train: error: "), captured.err
    assert __import__("re").search(message, lines[0]), lines[0]


def console_script(argv):
    """`python -m crosslmm.train ARGV` in its own process, this checkout's code first on the path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.Popen(
        [sys.executable, "-m", "crosslmm.train", *map(str, argv)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def hostile_inputs(dataset, folder):
    """(name, command-line change, expected error) for inputs a hostile or broken data pipeline hands over."""
    deep = 100_000
    (folder / "deep.json").write_text("[" * deep + "]" * deep)
    (folder / "deep.jsonl").write_text('{"a": 1}\n' + "[" * deep + "]" * deep + "\n")
    (folder / "deep.yaml").write_text("datasets: " + "[" * deep + "]" * deep + "\n")
    (folder / "latin1.jsonl").write_bytes(
        '{"conversations": [{"from": "human", "value": "caf\xe9"}]}\n'.encode("latin-1")
    )
    (folder / "latin1.yaml").write_bytes(f"# caf\xe9\ndatasets:\n  - json_path: {dataset['json']}\n".encode("latin-1"))
    (folder / "a-file").write_text("")
    return [
        ("deep.json", ("--data", folder / "deep.json"), "deep.json: nested too deeply to read"),
        ("deep.jsonl", ("--data", folder / "deep.jsonl"), "deep.jsonl:2: nested too deeply to read"),
        ("deep.yaml", ("--data", folder / "deep.yaml"), "deep.yaml: nested too deeply to read"),
        ("latin1.jsonl", ("--data", folder / "latin1.jsonl"), "latin1.jsonl: not UTF-8 text"),
        ("latin1.yaml", ("--data", folder / "latin1.yaml"), "latin1.yaml: not UTF-8 text"),
        ("output under a file", ("--output_dir", folder / "a-file" / "run"), "cannot be written: Not a directory"),
    ]


def test_hostile_inputs_are_one_line_and_exit_2_through_the_console_script(tiny_checkpoint, dataset, tmp_path):
    """Run side by side (each is a fresh Python process): deep nesting, text that is not UTF-8, an output folder that
    cannot be made; each ends in one line naming the file, no traceback."""
    runs = []
    for name, (flag, value), message in hostile_inputs(dataset, tmp_path):
        argv = command(tiny_checkpoint, dataset, tmp_path / "out")
        argv[argv.index(flag) + 1] = str(value)
        runs.append((name, message, console_script(argv)))
    for name, message, process in runs:
        _, err = process.communicate(timeout=240)
        lines = err.strip().splitlines()
        assert process.returncode == 2 and len(lines) == 1, (name, err[-3000:])
        assert lines[0].startswith("crosslmm-train: error: ") and message in lines[0], (name, lines[0])


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: room for one checkpoint of the tiny model (4 MB) but not two. Needs root (mount)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(folder)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_is_one_line_naming_it_and_keeps_the_last_whole_checkpoint(tiny_checkpoint, dataset, small_disk):
    """A real ENOSPC: the second checkpoint does not fit on the disk. One line naming the disk and the checkpoint kept,
    the unfinished one removed (its space is what the next try needs); with room again, the same command resumes."""
    output = small_disk / "run"
    argv = command(tiny_checkpoint, dataset, output, "--save_steps", "1", "--save_total_limit", "2", steps=3)
    process = console_script(argv)
    _, err = process.communicate(timeout=240)
    last = err.strip().splitlines()[-1]
    assert process.returncode == 2, err[-3000:]
    assert last.startswith(f"crosslmm-train: error: no space left on the disk mounted at {small_disk} "), last
    assert f"the last whole checkpoint, {output / 'checkpoint-1'}, is kept" in last and "Traceback" not in err
    assert (output / "checkpoint-1" / "trainer_state.json").is_file() and not (output / "checkpoint-2").exists()

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    process = console_script(argv)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 0, err[-3000:]
    assert "Resuming from" in err and json.loads((output / "trainer_state.json").read_text())["global_step"] == 3


# ---- FSDP2 on two CPU processes ------------------------------------------------------------------------------------


WORKER = ROOT / "tests" / "support" / "train_worker.py"
ACCELERATE_FSDP = [sys.executable, "-m", "accelerate.commands.launch"] + [
    *("--config_file", str(ROOT / "examples" / "accelerate_fsdp.yaml")),
    *("--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"),
]


FSDP_RUNS = {
    # Every micro-batch has a video or an image: both processes run the same modules.
    "visual": ["red-left-colour", "green-right-way", "blue-left-colour", "image-red"],
    # The second process's first micro-batch is text only.
    "text-only": ["red-left-colour", "text-0", "blue-left-colour", "green-right-way"],
}


@pytest.fixture(scope="module")
def fsdp_runs(tiny_checkpoint, dataset, tmp_path_factory):
    """Train on each sample list of FSDP_RUNS in two FSDP2 processes with batches of 1 (a global batch of 2: process
    r takes sample 2k + r), both runs in one launch, and in this process with batches of 2. SGD: Adam turns the
    rounding noise of gradients that are zero in exact arithmetic into full steps."""
    folder = tmp_path_factory.mktemp("fsdp")
    records = {record["id"]: record for record in json.loads(dataset["json"].read_text())}
    records.update({line["id"]: line for line in map(json.loads, dataset["jsonl"].read_text().splitlines())})
    common = {}
    for name, samples in FSDP_RUNS.items():
        (folder / f"{name}.json").write_text(json.dumps([records[sample] for sample in samples]))
        common[name] = [
            *("--model", str(tiny_checkpoint), "--data", str(folder / f"{name}.json")),
            *("--video-folder", str(dataset["videos"]), "--image-folder", str(dataset["images"])),
            *("--max_steps", "2", "--save_steps", "2", "--gradient_accumulation_steps", "1", "--num_frames", "4"),
            *("--optim", "sgd", "--learning_rate", "0.5", "--vision_tower_lr", "0.1"),
            *("--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1"),
            *("--dataloader_num_workers", "0", "--use_cpu", "--train_sampling_strategy", "sequential"),
        ]
    launch = [*ACCELERATE_FSDP, str(WORKER)]
    for number, name in enumerate(FSDP_RUNS):
        launch += ["--then"] * (number > 0) + common[name]
        launch += ["--output_dir", str(folder / name / "fsdp"), "--per_device_train_batch_size", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    for name in FSDP_RUNS:
        single = folder / name / "one"
        assert main([*common[name], "--output_dir", str(single), "--per_device_train_batch_size", "2"]) == 0
    return folder, result


def assert_same_training(folder, result, name):
    sharded, single = folder / name / "fsdp", folder / name / "one"
    log = result.stdout[-3000:] + result.stderr[-6000:]
    assert (sharded / "trainer_state.json").is_file(), log
    assert losses(sharded) == pytest.approx(losses(single), rel=1e-5)
    expected, weights_of_sharded = weights(single / "checkpoint-2"), weights(sharded / "checkpoint-2")
    for key, value in expected.items():
        torch.testing.assert_close(weights_of_sharded[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # Hub-ready although FSDP2 swapped the model's class: CrossLMM's code and auto_map, not torch's FSDP files.
    assert not list((sharded / "checkpoint-2").glob("_fsdp*.py"))
    config = json.loads((sharded / "checkpoint-2" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_crosslmm.CrossLMMForConditionalGeneration"
    assert (sharded / "checkpoint-2" / "pytorch_model_fsdp.bin").is_file()  # FSDP's own state, for resuming
    AutoModelForImageTextToText.from_pretrained(sharded / "checkpoint-2", trust_remote_code=True)


def test_fsdp2_on_two_cpu_processes_equals_one_process(fsdp_runs):
    assert_same_training(*fsdp_runs, "visual")


def test_fsdp2_with_a_text_only_micro_batch_on_one_process(fsdp_runs):
    folder, result = fsdp_runs
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training(folder, result, "text-only")
