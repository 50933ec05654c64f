"""crosslmm-answer --interactive: follow-up questions read from stdin reuse the encoded video and the conversation's
cache (the vision tower runs for the first question only) and answer exactly as the whole conversation does from
scratch; the end of the input, an empty line or `exit` end the session with status 0."""

import io
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from chats import chat_inputs, video_question
from crosslmm import answer
from crosslmm.answer import main


NUM_FRAMES, MAX_NEW_TOKENS = 4, 6


@pytest.fixture(scope="module")
def reference(tiny_files):
    """The tiny checkpoint's model and processor, loaded as users do, to answer from scratch."""
    folder, _ = tiny_files
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def from_scratch(reference, video, turns):
    """(the answer to the last question of `turns`, the conversation's prompt ids): `turns` are (question, answer)
    pairs, the last answer None; the whole conversation with its video goes through `generate`, greedy, without any
    cache from before."""
    model, processor = reference
    messages = video_question(video, turns[0][0])
    for i, (question, reply) in enumerate(turns):
        if i:
            messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        if reply is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    inputs = chat_inputs(processor, messages, num_frames=NUM_FRAMES)
    with torch.no_grad():
        sequences = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    prompt = inputs["input_ids"][0]
    return processor.decode(sequences[0, len(prompt) :], skip_special_tokens=True), prompt


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def ask(tiny_files, monkeypatch, capsys):
    """Run `crosslmm-answer -i` on the tiny checkpoint with `stdin` as its input; (status, stdout, stderr, events):
    the events are the runs of the vision tower's modules and the start and end of each follow-up question, in
    order."""
    folder, video = tiny_files
    events = []
    load, follow_up = answer.load_pipeline, answer.Conversation.ask_follow_up

    def load_and_watch(*args, **kwargs):
        pipe = load(*args, **kwargs)
        for module in pipe.model.model.vision_tower.modules():  # the model may call the tower's parts directly
            module.register_forward_hook(lambda *_: events.append("vision tower"))
        return pipe

    def watched_follow_up(self, question):
        events.append(f"follow-up {question!r}")
        try:
            return follow_up(self, question)
        finally:
            events.append("follow-up done")

    monkeypatch.setattr(answer, "load_pipeline", load_and_watch)
    monkeypatch.setattr(answer.Conversation, "ask_follow_up", watched_follow_up)

    def run(stdin, *options):
        events.clear()
        monkeypatch.setattr("sys.stdin", stdin if isinstance(stdin, io.StringIO) else io.StringIO(stdin))
        argv = ["--model", str(folder), "--video", str(video), "--num-frames", str(NUM_FRAMES), "--device", "cpu"]
        status = main([*argv, "--max-new-tokens", str(MAX_NEW_TOKENS), "-i", *options])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return status, captured.out, captured.err, list(events)

    return run


def answers_in_order(out, answers):
    """Each of `answers` is printed as an `Answer: ` line (its text may span lines), in this order."""
    at = 0
    for text in answers:
        at = out.index(f"Answer: {text}\n", at) + 1
    assert out.count("Answer: ") == len(answers), out


def test_follow_ups_reuse_the_encoded_video_and_answer_as_the_whole_conversation_from_scratch(
    ask, reference, tiny_files
):
    _, video = tiny_files
    questions = ["What moves?", "And then?", "What colour is it?"]
    status, out, err, events = ask("\n".join(questions[1:]) + "\n", "--prompt", questions[0])
    assert status == 0, err

    # The vision tower ran for the first question only: never during a follow-up.
    first_follow_up = events.index(f"follow-up {questions[1]!r}")
    assert first_follow_up > 0 and set(events[:first_follow_up]) == {"vision tower"}
    assert events[first_follow_up:] == [
        f"follow-up {questions[1]!r}",
        "follow-up done",
        f"follow-up {questions[2]!r}",
        "follow-up done",
    ]
    note = "(The vision tower did not run: the video's encoding and the conversation came from the cache.)"
    assert out.count(note) == 2

    # Each answer is what the whole conversation so far answers from scratch, frames and all.
    turns, answers, prompts = [], [], []
    for question in questions:
        reply, prompt = from_scratch(reference, video, [*turns, (question, None)])
        turns.append((question, reply))
        answers.append(reply)
        prompts.append(prompt)
    answers_in_order(out, answers)

    # Each follow-up prefilled only what the cache did not hold, and the cache held the video's tokens.
    reused = [tuple(map(int, m)) for m in re.findall(r"\((\d+) new tokens after (\d+) cached\)", out)]
    assert len(reused) == 2
    config = reference[0].config
    for (new, cached), prompt in zip(reused, prompts[1:]):
        assert new + cached == len(prompt)
        assert cached > int((prompt == config.video_token_id).nonzero().max())
        assert new < len(prompt) - len(prompts[0]) + MAX_NEW_TOKENS  # the new turn, perhaps part of the last answer
    times = re.findall(
        r"Times: prefill ([\d.]+) s \(.*\| generate ([\d.]+) s \((\d+) tokens.*\| total ([\d.]+) s", out
    )
    assert len(times) == 2 and all(int(tokens) <= MAX_NEW_TOKENS for _, _, tokens, _ in times)


def test_the_first_question_from_stdin_and_the_ways_a_session_ends(ask, reference, tiny_files):
    _, video = tiny_files
    first, _ = from_scratch(reference, video, [("What moves?", None)])

    # No --prompt: the first line of stdin is the first question; `exit` ends before the line after it.
    status, out, err, events = ask("What moves?\nexit\nNever asked\n")
    assert status == 0 and "error" not in err.lower(), err
    answers_in_order(out, [first])
    assert not any(event.startswith("follow-up") for event in events)

    # The end of the input right after the first answer; an empty line; nothing at all.
    for stdin in ["", "\nNever asked\n"]:
        status, out, err, _ = ask(stdin, "--prompt", "What moves?")
        assert status == 0 and "error" not in err.lower(), err
        answers_in_order(out, [first])
    status, out, err, events = ask("")
    assert status == 0 and out == "" and "vision tower" not in events and "error" not in err.lower()

    # On a terminal each question is asked for with "> " on stderr, and the end of the input ends the line.
    status, out, err, _ = ask(Terminal("What moves?\n"))
    assert status == 0
    answers_in_order(out, [first])
    assert err.count("> ") == 2 and err.endswith("> \n")


def test_questions_that_are_not_text_are_refused_in_one_line(ask, reference, tiny_files, tmp_path):
    """Bytes that are not UTF-8 reach Python as lone surrogates (stdin and argv decode with surrogateescape); the
    tokenizer would fail on them with a TypeError traceback."""
    _, video = tiny_files
    status, out, err, _ = ask("\udcff\udcfe\x00bin\n")
    assert status == 2 and out == ""
    assert err.strip().splitlines()[-1] == "crosslmm-answer: error: the question read from stdin is not UTF-8 text"

    status, out, err, _ = ask("\udcffbin\nAnd then?\n", "--prompt", "What moves?")
    assert status == 0
    assert [line for line in err.splitlines() if "error" in line.lower()] == [
        "crosslmm-answer: error: the question read from stdin is not UTF-8 text; ask it again"
    ]
    first, _ = from_scratch(reference, video, [("What moves?", None)])
    second, _ = from_scratch(reference, video, [("What moves?", first), ("And then?", None)])
    answers_in_order(out, [first, second])

    # The real bytes, through the console script's stdin and argv.
    folder, video = tiny_files
    command = [
        sys.executable,
        "-m",
        "crosslmm.answer",
        "--model",
        str(folder),
        "--video",
        str(video),
        "--device",
        "cpu",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*command, "-i"], input=b"\xff\xfe\x00\x01bin\n", capture_output=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stderr.decode().strip().splitlines()[-1] == (
        "crosslmm-answer: error: the question read from stdin is not UTF-8 text"
    ), done.stderr.decode()
    done = subprocess.run(
        [*command, "--prompt", b"\xff".decode(errors="surrogateescape")], capture_output=True, env=env
    )
    assert done.returncode == 2 and done.stderr.decode().strip() == (
        "crosslmm-answer: error: --prompt is not UTF-8 text (see crosslmm-answer --help)"
    )


def test_a_follow_up_with_a_placeholder_is_refused_and_the_session_goes_on(ask, reference, tiny_files):
    _, video = tiny_files
    status, out, err, _ = ask("Compare <video> with this.\nAnd then?\n", "--prompt", "What moves?")
    assert status == 0
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert errors == [
        "crosslmm-answer: error: a follow-up question cannot hold a <video> placeholder: the conversation is about "
        "the one video given with --video"
    ]
    first, _ = from_scratch(reference, video, [("What moves?", None)])
    second, _ = from_scratch(reference, video, [("What moves?", first), ("And then?", None)])
    answers_in_order(out, [first, second])
