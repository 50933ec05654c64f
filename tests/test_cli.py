"""crosslmm-answer: answers through the pipeline and reports tokens and times; bad inputs give one error line, exit 2;
with no arguments it builds the sample checkpoint and video once and answers."""

import re

import av
import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, BertConfig, BertModel

from chats import chat_inputs, video_question
from crosslmm import answer, samples
from crosslmm.answer import main


@pytest.fixture(scope="module")
def files(tiny_files):
    return tiny_files


def expected_answer(folder, video, prompt, num_frames, max_new_tokens):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = chat_inputs(processor, video_question(video, prompt), num_frames=num_frames)
    with torch.no_grad():
        new_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[
            0, inputs["input_ids"].shape[1] :
        ]
    return processor.decode(new_ids, skip_special_tokens=True), len(new_ids)


def test_answers_and_reports_tokens_and_times(files, capsys):
    folder, video = files
    argv = ["--model", str(folder), "--video", str(video), "--prompt", "What moves?", "--num-frames", "4"]
    assert main(argv + ["--max-new-tokens", "5", "--device", "cpu"]) == 0  # on the CPU, as the expected answer
    out = capsys.readouterr().out
    answer, generated = expected_answer(folder, video, "What moves?", num_frames=4, max_new_tokens=5)
    assert f"Answer: {answer}\n" in out
    assert "Random weights" not in out  # only said of the built-in sample checkpoint
    assert out.rstrip().endswith("[cpu, float32]")  # the device and the checkpoint's dtype (--dtype auto)
    # 4 frames of 28 px, a 7 x 7 patch grid pooled to 2 x 2; LLaVA-OneVision would pool it to 4 x 4 and add a newline.
    assert "Frames: 4, 28 px, 7 x 7 patches each" in out
    assert "Visual tokens in the LLM's sequence: 16 (4 frames x 4 pooled)" in out
    assert "LLaVA-OneVision for the same frames: 65 (4 x 16 + 1 newline)" in out
    assert "(after decoder layers [1, 3]): 196 (4 x 49)" in out
    times = re.search(
        r"decode frames ([\d.]+) s \| encode \(vision tower, pooling\) ([\d.]+) s \| prefill ([\d.]+) s \| "
        r"generate ([\d.]+) s \((\d+) tokens.*\| total ([\d.]+) s",
        out,
    )
    assert times, out
    decode, encode, prefill, generate, tokens, total = map(float, times.groups())
    assert tokens == generated  # one forward of the model per generated token
    assert min(decode, encode, prefill) > 0
    assert decode + encode + prefill + generate <= total + 0.002  # parts of the total (printed to the millisecond)

    assert main(["--model", str(folder), "--video", str(video), "--fps", "2", "--max-new-tokens", "1"]) == 0
    assert "Visual tokens in the LLM's sequence: 8 (2 frames x 4 pooled)" in capsys.readouterr().out


def bert_checkpoint(folder):
    config = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, vocab_size=10)
    BertModel(config).save_pretrained(folder / "bert")
    return folder / "bert"


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda d, v, t: ["--video", str(t / "missing.mp4")], "video file not found: .*missing.mp4"),
        (lambda d, v, t: ["--video", str(t)], "not a file"),
        (lambda d, v, t: ["--video", str(write(t / "notes.mp4", b"just some text\n" * 50))], "notes.mp4"),
        (lambda d, v, t: ["--video", str(write(t / "cut.mp4", v.read_bytes()[:2000]))], "cut.mp4"),
        (lambda d, v, t: ["--num-frames", "0"], "--num-frames: must be > 0"),
        (lambda d, v, t: ["--num-frames", "two"], "--num-frames: expected a positive int"),
        (lambda d, v, t: ["--fps", "-1"], "--fps: must be > 0"),
        (lambda d, v, t: ["--num-frames", "4", "--fps", "1"], "not allowed with argument"),
        (lambda d, v, t: ["--max-new-tokens", "0"], "--max-new-tokens: must be > 0"),
        (lambda d, v, t: ["--prompt", "  "], "--prompt is empty"),
        (lambda d, v, t: ["--model", str(t / "nowhere")], "nowhere: no such checkpoint folder"),
        (lambda d, v, t: ["--model", str(t)], "has no config.json"),
        (lambda d, v, t: ["--model", str(bert_checkpoint(t))], "'bert' checkpoint, which has no video-text-to-text"),
        (lambda d, v, t: ["--device", "toaster"], "--device 'toaster' is not a torch device"),
        (lambda d, v, t: ["--prompt", "Compare <video> with this one."], "video"),
    ],
)
def test_bad_inputs_give_one_error_line_and_exit_2(files, tmp_path, capsys, make_argv, message):
    folder, video = files
    argv = ["--model", str(folder), "--video", str(video), "--max-new-tokens", "1"] + make_argv(
        folder, video, tmp_path
    )
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("crosslmm-answer: error: ") and re.search(message, lines[-1]), captured.err
    assert "Traceback" not in captured.err
    assert sum("error:" in line.lower() for line in lines) == 1, captured.err  # the rest is progress


def test_no_arguments_builds_the_samples_once_and_answers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CROSSLMM_CACHE", str(tmp_path))
    assert main(["--max-new-tokens", "3"]) == 0  # everything else at its default
    captured = capsys.readouterr()
    assert "Building the random-weight sample checkpoint" in captured.err
    assert "Answer: " in captured.out and "Random weights" in captured.out
    assert "Frames: 8, 384 px, 27 x 27 patches each" in captured.out
    assert "Visual tokens in the LLM's sequence: 72 (8 frames x 9 pooled)" in captured.out
    assert "LLaVA-OneVision for the same frames: 1569 (8 x 196 + 1 newline), 21.8x as many" in captured.out

    checkpoint = answer.sample_checkpoint()
    assert checkpoint.parent.parent == tmp_path
    assert {"config.json", "model.safetensors", "pipeline_crosslmm.py", "tokenizer.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    # The cache key hashes the code files the checkpoint carries: exactly those transformers saved into it.
    assert {p.name for p in checkpoint.glob("*.py")} == {p.name for p in samples.shipped_code_files()}
    built = (checkpoint / "model.safetensors").stat().st_mtime_ns
    video = answer.sample_video()
    assert video.stat().st_size > 0
    assert answer.sample_checkpoint() == checkpoint
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == built  # reused, not rebuilt
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["sample-checkpoint", "sample-video.mp4"]


def test_tokenizer_and_sample_video_are_reproducible(tmp_path):
    """Built twice, the same: the sample checkpoint and its answers do not change from one run to the next."""
    first, second = samples.build_tokenizer(), samples.build_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert first.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]) == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert first.pad_token == first.eos_token == "<|endoftext|>" and first.padding_side == "left"
    text = "<|im_start|>user\n<video>\nWhat happens in this video? Ünïcödé 日本<|im_end|>\n"
    assert first.decode(first(text).input_ids) == text
    videos = [samples.build_sample_video(tmp_path / f"{i}.mp4", seconds=1.0) for i in range(2)]
    decoded = [[frame.to_ndarray(format="rgb24") for frame in av.open(str(video)).decode(video=0)] for video in videos]
    assert len(decoded[0]) == 24 and all(np.array_equal(a, b) for a, b in zip(*decoded))
