"""`--model crosslmm` for lmms-eval.

The first test runs the real `python -m lmms_eval` command in lmms-eval's own environment (`$CROSSLMM_EVAL_PYTHON`,
which `.ci/run` builds and sets) on local tasks this test writes: a JSON file of samples over videos it encodes,
Video-MME's own prompt and scoring functions, and a multiple-choice-by-likelihood task. The other tests drive the model
class directly and run where lmms-eval is importable (`.ci/run` runs this file in that environment too).
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from crosslmm.errors import UsageError
from tiny import tiny_checkpoint, tiny_video
from videos import encode_video


EVAL_PYTHON = os.environ.get("CROSSLMM_EVAL_PYTHON")
OPTIONS = ["A. one", "B. two", "C. three", "D. four"]

GENERATION_TASK = """\
task: crosslmm_local_videomme
dataset_path: json
dataset_kwargs:
  data_files:
    test: samples.json
test_split: test
output_type: generate_until
doc_to_visual: !function crosslmm.evaluation.doc_to_video
doc_to_text: !function lmms_eval.tasks.videomme.utils.videomme_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
process_results: !function lmms_eval.tasks.videomme.utils.videomme_process_results
metric_list:
  - metric: videomme_perception_score
    aggregation: !function lmms_eval.tasks.videomme.utils.videomme_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer with the option's letter from the given choices directly."
"""

LIKELIHOOD_TASK = """\
task: crosslmm_local_mcppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: samples.json
test_split: test
output_type: multiple_choice
doc_to_visual: !function crosslmm.evaluation.doc_to_video
doc_to_text: question
doc_to_choice: options
doc_to_target: answer_index
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def sample_docs() -> list:
    """Four Video-MME-style samples over two videos; the last asks about the window 0.5-1.0 s of its video."""
    docs = []
    for i in range(4):
        docs.append(
            {
                "video": f"clip{i % 2}.mp4",
                "videoID": f"clip{i % 2}",
                "question_id": f"q{i}",
                "duration": "short",
                "domain": "Knowledge",
                "sub_category": "Humanity & History",
                "task_type": "Counting Problem",
                "question": f"How many shapes move in the video? ({i})",
                "options": OPTIONS,
                "answer": "ABCD"[i],
                "answer_index": i,
                "start_time": 0.5 if i == 3 else None,
                "end_time": 1.0 if i == 3 else None,
            }
        )
    return docs


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """A checkpoint, two videos, samples.json and the two task YAMLs, as a user would lay out a local task."""
    root = tmp_path_factory.mktemp("evaluation")
    folder = tiny_checkpoint(root / "checkpoint")
    tasks = root / "tasks"
    tasks.mkdir()
    tiny_video(tasks / "clip0.mp4")  # 8 frames at 8 fps
    encode_video(tasks / "clip1.mp4", num_frames=12, fps=6)
    (tasks / "samples.json").write_text(json.dumps(sample_docs(), indent=1))
    (tasks / "local_videomme.yaml").write_text(GENERATION_TASK)
    (tasks / "local_mcppl.yaml").write_text(LIKELIHOOD_TASK)
    return {"root": root, "folder": folder, "tasks": tasks}


# --------------------------------------------------------------------------------------------------------------------
# The real command
# --------------------------------------------------------------------------------------------------------------------


def run_lmms_eval(local_task, output: Path, tasks: str, *extra, model_args: str = "num_frames=4"):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(local_task["root"] / "hf_home"),
        "CROSSLMM_EVAL_VIDEO_DIR": str(local_task["tasks"]),
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("PYTHONPATH", None)
    command = [
        EVAL_PYTHON,
        "-m",
        "lmms_eval",
        "--model",
        "crosslmm",
        "--model_args",
        f"pretrained={local_task['folder']},{model_args}",
        "--tasks",
        tasks,
        "--include_path",
        str(local_task["tasks"]),
        "--output_path",
        str(output),
        "--log_samples",
        *extra,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=local_task["root"])
    log = f"$ {' '.join(command)}\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    assert result.returncode == 0, log
    (results_file,) = output.glob("*/*_results.json")
    samples = {
        path.name.split("_samples_")[1].removesuffix(".jsonl"): [json.loads(line) for line in path.open()]
        for path in output.glob("*/*_samples_*.jsonl")
    }
    return json.loads(results_file.read_text()), samples, log


@pytest.mark.skipif(not EVAL_PYTHON, reason="CROSSLMM_EVAL_PYTHON is not set (.ci/run builds lmms-eval's environment)")
def test_lmms_eval_command_runs_crosslmm_on_local_tasks(local_task, tmp_path):
    # The default, lmms-eval's chat protocol, on the Video-MME-style generation task, in batches of 2.
    results, samples, log = run_lmms_eval(
        local_task, tmp_path / "chat", "crosslmm_local_videomme", "--batch_size", "2"
    )
    assert results["config"]["model_backend"] == "crosslmm.evaluation.CrossLMMChat (chat)", log
    score = results["results"]["crosslmm_local_videomme"]["videomme_perception_score,none"]
    assert 0 <= score <= 100 and results["n-samples"]["crosslmm_local_videomme"]["effective"] == 4
    chat_samples = sorted(samples["crosslmm_local_videomme"], key=lambda sample: sample["doc_id"])
    assert [sample["target"] for sample in chat_samples] == list("ABCD")
    for sample in chat_samples:
        assert "Answer with the option's letter from the given choices directly." in sample["input"]
        assert isinstance(sample["filtered_resps"], str)
        scored = sample["videomme_perception_score"]
        assert scored["score"] == float(scored["pred_answer"].lower() == scored["answer"].lower())
    assert score == 100 * sum(sample["videomme_perception_score"]["score"] for sample in chat_samples) / 4

    # The simple protocol (--force_simple) runs both tasks: generation, and multiple choice by likelihood. batch_size
    # in --model_args wins over the command line's.
    results, samples, log = run_lmms_eval(
        local_task,
        tmp_path / "simple",
        "crosslmm_local_videomme,crosslmm_local_mcppl",
        "--force_simple",
        "--batch_size",
        "1",
        model_args="num_frames=4,batch_size=2",
    )
    assert results["config"]["model_backend"] == "crosslmm.evaluation.CrossLMMSimple (simple)", log
    simple_samples = sorted(samples["crosslmm_local_videomme"], key=lambda sample: sample["doc_id"])
    # Both protocols build the same prompts: the same answers.
    assert [s["filtered_resps"] for s in simple_samples] == [s["filtered_resps"] for s in chat_samples]
    accuracy = results["results"]["crosslmm_local_mcppl"]["acc,none"]
    likelihood_samples = sorted(samples["crosslmm_local_mcppl"], key=lambda sample: sample["doc_id"])
    correct = 0
    for sample in likelihood_samples:
        losses = [float(loss) for loss, _ in sample["filtered_resps"]]
        assert len(losses) == len(OPTIONS) and all(loss > 0 for loss in losses)
        assert sample["acc"] == float(losses.index(min(losses)) == int(sample["target"]))
        correct += sample["acc"]
    assert accuracy == pytest.approx(correct / 4)


# --------------------------------------------------------------------------------------------------------------------
# The model class, driven directly
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluation():
    return pytest.importorskip("crosslmm.evaluation", reason="lmms-eval is not installed here (.ci/run tests it)")


@pytest.fixture(scope="module")
def lm(evaluation, local_task):
    """The simple-protocol model, over the local task's samples (the checkpoint's own code: this process's Auto classes
    stay as the other tests expect them)."""
    model = evaluation.CrossLMMSimple.create_from_arg_string(
        f"pretrained={local_task['folder']},num_frames=4,trust_remote_code=true,batch_size=2",
        {"batch_size": 1, "max_batch_size": None, "device": "cpu"},
    )
    model.task_dict = {"local": {"test": sample_docs()}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CROSSLMM_EVAL_VIDEO_DIR", str(local_task["tasks"]))
        yield model


def request(*args, kind="generate_until"):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "local", "doc_id": 0, "repeats": 1})


def test_model_arguments(evaluation, lm, local_task):
    assert lm.batch_size == 2  # --model_args beats the command line's default
    assert lm.video_options == {"num_frames": 4}
    assert type(lm.model).__module__.startswith("transformers_modules.")
    with pytest.raises(UsageError, match="unknown model argument"):
        evaluation.CrossLMMSimple(pretrained=str(local_task["folder"]), frames=8)
    with pytest.raises(UsageError, match="no automatic batch size"):
        evaluation.CrossLMMSimple(pretrained=str(local_task["folder"]), batch_size="auto")


@pytest.mark.parametrize(
    "arguments, message",
    [
        ("num_frames=0", "num_frames must be a positive integer, got 0"),
        ("num_frames=-5", "num_frames must be a positive integer, got -5"),
        ("num_frames=abc", "num_frames must be a positive integer, got 'abc'"),
        ("num_frames=2.5", "num_frames must be a positive integer, got 2.5"),
        ("fps=nan", "fps must be a positive number, got nan"),
        ("fps=inf", "fps must be a positive number, got inf"),
        ("max_frames=0", "max_frames must be a positive integer, got 0"),
        ("max_new_tokens=-1", "max_new_tokens must be a positive integer, got -1"),
        ("batch_size=0", "batch_size must be a positive integer, got 0"),
    ],
)
def test_bad_model_arguments_are_named_before_anything_loads(evaluation, local_task, arguments, message):
    """Through lmms-eval's own parsing of `--model_args`; refused before the checkpoint is read (a missing folder
    would otherwise be reported by the Hub client as an invalid repository id)."""
    with pytest.raises(UsageError, match=f"^crosslmm: {re.escape(message)}$"):
        evaluation.CrossLMMSimple.create_from_arg_string(
            f"pretrained={local_task['folder']},{arguments}", {"device": "cpu"}
        )


@pytest.mark.parametrize("where", ["missing/folder/x", "./missing", "~/missing-crosslmm"])
def test_a_missing_checkpoint_folder_is_named(evaluation, where):
    with pytest.raises(UsageError, match=f"^crosslmm: pretrained={re.escape(where)}: no such checkpoint folder$"):
        evaluation.CrossLMMSimple(pretrained=where)


def test_registered_through_the_entry_point(evaluation):
    from lmms_eval.models import get_model

    assert get_model("crosslmm") is evaluation.CrossLMMChat and not evaluation.CrossLMMChat.is_simple
    simple = get_model("crosslmm", force_simple=True)
    assert simple is evaluation.CrossLMMSimple and simple.is_simple


def test_prompts_from_both_protocols(evaluation, local_task):
    video = str(local_task["tasks"] / "clip0.mp4")
    simple = evaluation.prompt_from_visuals(
        [{"type": "video", "path": video, "video_start": 0.5, "video_end": 1}], "<video>\nWhat happens?"
    )
    chat = evaluation.prompt_from_messages(
        [
            {
                "role": "user",
                "content": [
                    {"type": "video", "url": video, "start_time": 0.5, "end_time": 1.0},
                    {"type": "text", "text": "What happens?"},
                ],
            }
        ]
    )
    expected = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    for prompt in (simple, chat):
        assert prompt.messages == expected and prompt.videos == [video] and prompt.window == (0.5, 1.0)
    with pytest.raises(ValueError, match="no audio"):
        evaluation.prompt_from_visuals([{"type": "audio", "path": "a.wav"}], "Hi")
    with pytest.raises(ValueError, match="share one time window"):
        evaluation.prompt_from_visuals([video, {"type": "video", "path": video, "video_start": 1}], "Hi")


def test_time_window_reaches_the_processor(evaluation, lm, local_task):
    video = str(local_task["tasks"] / "clip0.mp4")  # 8 frames over 1 s
    window = lm._inputs(
        [evaluation.prompt_from_visuals([{"path": video, "video_start": 0.5, "video_end": 1.0}], "Hi")]
    )
    every_frame = lm.processor(text=["<video>"], videos=[video], num_frames=8, return_tensors="pt")
    # num_frames=4 inside 0.5-1.0 s: the frames at 0.5, 0.625, 0.75 and 0.875 s, the last 4 of the 8.
    torch.testing.assert_close(window["pixel_values_videos"][0], every_frame["pixel_values_videos"][0, 4:])
    whole = lm._inputs([evaluation.prompt_from_visuals([video], "Hi")])
    assert not torch.equal(whole["pixel_values_videos"], window["pixel_values_videos"])


def test_generate_until_batches_like_one_by_one(evaluation, lm):
    gen_kwargs = {"max_new_tokens": 5, "temperature": 0, "until": ["\n\n"]}
    requests = [
        request(f"Question {i}: what happens?", dict(gen_kwargs), evaluation.doc_to_video, i, "local", "test")
        for i in range(4)
    ]
    batched = lm.generate_until(requests)
    lm.batch_size_per_gpu = 1
    try:
        one_by_one = lm.generate_until(requests)
    finally:
        lm.batch_size_per_gpu = 2
    assert batched == one_by_one and all(isinstance(answer, str) for answer in batched)

    # The same answer as the checkpoint's processor and generate() give for the same chat.
    doc = lm.task_dict["local"]["test"][0]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "path": evaluation.doc_to_video(doc)[0]},
                {"type": "text", "text": "Question 0: what happens?"},
            ],
        }
    ]
    inputs = lm.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", num_frames=4
    )
    output = lm.model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = lm.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert batched[0] == expected.split("\n\n")[0].strip()


def test_loglikelihood_is_the_continuations_loss(evaluation, lm):
    requests = [
        request(
            "How many shapes move?", f" {option}", evaluation.doc_to_video, 0, "local", "test", kind="loglikelihood"
        )
        for option in OPTIONS
    ] + [request("", " B. two", kind="loglikelihood")]  # lmms-eval's unconditional form: no sample
    responses = lm.loglikelihood(requests)
    pairs = [response.text if hasattr(response, "text") else response for response in responses]

    # By hand: the chat prompt, then the continuation's tokens, one row each, unpadded.
    doc = lm.task_dict["local"]["test"][0]
    for index, (loss, greedy) in enumerate(pairs):
        context, continuation = requests[index].args[:2]
        visuals = evaluation.doc_to_video(doc) if context else []
        inputs = lm._inputs([evaluation.prompt_from_visuals(visuals, context)])
        ids = lm.tokenizer(continuation.strip(), add_special_tokens=False)["input_ids"]
        full = torch.cat([inputs["input_ids"], torch.tensor([ids])], dim=1)
        with torch.no_grad():
            logits = lm.model(**{**inputs, "input_ids": full, "attention_mask": torch.ones_like(full)}).logits
        length = inputs["input_ids"].shape[1]
        logprobs = torch.log_softmax(logits[0, length - 1 : -1].float(), dim=-1)[range(len(ids)), ids]
        assert loss == pytest.approx(-logprobs.mean().item(), abs=1e-4)
        expected_greedy = bool((logits[0, length - 1 : -1].argmax(-1) == torch.tensor(ids)).all())
        assert greedy == expected_greedy

    # The batch size does not change the scores.
    lm.batch_size_per_gpu = 1
    try:
        one_by_one = lm.loglikelihood(requests)
    finally:
        lm.batch_size_per_gpu = 2
    for a, b in zip(responses, one_by_one):
        a, b = (getattr(x, "text", x) for x in (a, b))
        assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]


def test_multi_round(evaluation, lm):
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((round_idx, list(previous_output)))
        terminal = round_idx >= 2
        return evaluation.doc_to_video(doc), f"And then? ({round_idx})", terminal, previous_output, None

    gen_kwargs = {"max_new_tokens": 3, "temperature": 0}
    (answers,) = lm.generate_until_multi_round(
        [request("What happens?", gen_kwargs, evaluation.doc_to_video, doc_to_text, 1, "local", "test")]
    )
    assert len(answers) == 2 and [round_idx for round_idx, _ in seen] == [1, 2]
    assert seen[1][1] == answers  # each round sees the answers before it

    chat = evaluation.CrossLMMChat.__new__(evaluation.CrossLMMChat)
    chat.__dict__.update(lm.__dict__)
    rounds = []

    def doc_to_messages(doc, round_idx=None, previous_output=None, previous_round_info=None):
        video = {"type": "video", "url": evaluation.doc_to_video(doc)[0]}
        messages = [{"role": "user", "content": [video, {"type": "text", "text": f"Round {round_idx or 0}"}]}]
        if round_idx is None:
            return messages
        rounds.append(list(previous_output))
        return messages, round_idx >= 3, previous_output, None

    (answers,) = chat.generate_until_multi_round(
        [request("", doc_to_messages, gen_kwargs, 1, "local", "test", kind="generate_until_multi_round")]
    )
    assert len(answers) == 3 and rounds[-1] == answers
    (single,) = chat.generate_until([request("", lambda doc: doc_to_messages(doc), gen_kwargs, 1, "local", "test")])
    assert single == answers[0]
