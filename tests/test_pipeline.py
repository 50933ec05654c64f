"""pipeline("video-text-to-text") through the config's custom_pipelines, and transformers' image-text-to-text, on a
tiny checkpoint folder: both input forms, batches, generation and sampling options, streaming; every answer checked
against model.generate on the processor's inputs."""

import json
import threading
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer, pipeline

from chats import chat_inputs, image_question, video_question
from tiny import VIDEO_FPS, VIDEO_SECONDS


MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def files(tiny_files):
    return tiny_files


@pytest.fixture(scope="module")
def reference(files):
    """The checkpoint's own model and processor, outside any pipeline."""
    folder, _ = files
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)


@pytest.fixture(scope="module")
def pipe(files):
    return pipeline("video-text-to-text", model=str(files[0]), trust_remote_code=True)


def generate_answers(reference, inputs, **kwargs):
    """New text per row of model.generate on processor inputs, greedy, as the pipeline decodes it."""
    model, processor = reference
    with torch.no_grad():
        sequences = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, **kwargs)
    return processor.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_checkpoint_folder_registers_and_carries_the_pipeline(files, reference, tmp_path):
    folder, _ = files
    assert (folder / "pipeline_crosslmm.py").is_file()
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"] == {
        "video-text-to-text": {
            "impl": "pipeline_crosslmm.CrossLMMVideoTextToTextPipeline",
            "pt": ["AutoModelForImageTextToText"],
            "type": "multimodal",
        }
    }
    # A model loaded from the folder (its code from transformers' module cache) and saved or pushed on its own
    # carries the file too; the Hub calls of push_to_hub are intercepted.
    model = reference[0]
    model.save_pretrained(tmp_path / "model-only")
    assert (tmp_path / "model-only" / "pipeline_crosslmm.py").is_file()
    pushed = []
    with (
        mock.patch.object(HfApi, "create_repo", lambda self, repo_id, **kwargs: SimpleNamespace(repo_id=repo_id)),
        mock.patch.object(
            HfApi, "create_commit", lambda self, repo_id, operations, **kwargs: pushed.extend(operations)
        ),
    ):
        model.push_to_hub("someone/crosslmm-tiny")
    assert {"pipeline_crosslmm.py", "config.json", "model.safetensors"} <= {op.path_in_repo for op in pushed}


def test_fresh_process_without_the_repository(fresh_process, reference):
    """The `pipeline` part of the fresh process (conftest.py): the tiny checkpoint's pipelines, from its own code."""
    job = fresh_process.request["pipeline"]
    video, image, max_new_tokens = job["video"], job["image"], job["max_new_tokens"]
    _, processor = reference
    expected = {
        "chat": generate_answers(reference, chat_inputs(reference[1], video_question(video), num_frames=4)),
        "text": generate_answers(
            reference, processor(text="<video>\nWhat?", videos=video, num_frames=3, return_tensors="pt")
        ),
        "image": generate_answers(reference, processor(text="<image>\nDescribe.", images=image, return_tensors="pt")),
        "image_chat": generate_answers(reference, chat_inputs(reference[1], image_question(image))),
    }
    assert max_new_tokens == MAX_NEW_TOKENS  # what generate_answers generates
    report = fresh_process.report["pipeline"]
    assert report["class"] == "CrossLMMVideoTextToTextPipeline"
    assert report["module"].startswith("transformers_modules"), report["module"]
    assert report["inferred"]  # pipeline() without a task infers the one custom task the config registers
    assert report["answers"] == expected


def test_model_in_memory(files, reference):
    import pipeline_crosslmm  # noqa: F401  (importing the module registers the task, if no checkpoint did yet)

    model, processor = reference
    _, video = files
    in_memory = pipeline("video-text-to-text", model=model, processor=processor)
    assert type(in_memory).__name__ == "CrossLMMVideoTextToTextPipeline"
    answer = generate_answers(reference, chat_inputs(reference[1], video_question(video), num_frames=2))
    assert in_memory(video_question(video), num_frames=2, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False) == [
        {"input_text": video_question(video), "generated_text": answer[0]}
    ]


def test_chat_and_text_forms_match_generate(files, reference, pipe):
    folder, video = files
    messages = video_question(video)
    answer = generate_answers(reference, chat_inputs(reference[1], messages, num_frames=4))[0]
    assert pipe(messages, num_frames=4, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False) == [
        {"input_text": messages, "generated_text": answer}
    ]
    # return_full_text (the default): the chat continued with the assistant's message.
    full = pipe(text=messages, num_frames=4, max_new_tokens=MAX_NEW_TOKENS)[0]["generated_text"]
    assert full == messages + [{"role": "assistant", "content": answer}]

    prompt = "<video>\nWhat?"
    processor = reference[1]
    answer = generate_answers(reference, processor(text=prompt, videos=str(video), num_frames=3, return_tensors="pt"))
    assert pipe(text=prompt, videos=str(video), num_frames=3, max_new_tokens=MAX_NEW_TOKENS)[0] == {
        "input_text": prompt,
        "generated_text": prompt + answer[0],
    }
    frames = np.random.default_rng(1).integers(0, 256, (5, 40, 60, 3), dtype=np.uint8)
    answer = generate_answers(reference, processor(text=prompt, videos=frames, return_tensors="pt"))
    assert pipe(text=prompt, videos=frames, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)[0] == {
        "input_text": prompt,
        "generated_text": answer[0],
    }


def test_batches_match_single_answers(files, reference, pipe):
    _, video = files
    frames = np.random.default_rng(2).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    prompts = ["<video>\nWhat?", "Look at this video, then answer.\n<video>\nHow many shapes are there?"]
    videos = [str(video), frames]
    singles = [
        pipe(text=p, videos=v, num_frames=4, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)[0]
        for p, v in zip(prompts, videos)
    ]
    batched = pipe(text=prompts, videos=videos, num_frames=4, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert batched == singles
    assert singles[0]["generated_text"] != singles[1]["generated_text"]  # so that the comparison means something

    chats = [video_question(video), video_question(video, "Which shape moves fastest, and where does it end up?")]
    singles = [pipe(c, num_frames=4, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)[0] for c in chats]
    assert singles[0]["generated_text"] != singles[1]["generated_text"]
    assert pipe(chats, batch_size=2, num_frames=4, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False) == [
        [single] for single in singles
    ]


def video_tokens(pipe, result):
    return int((result[0]["generated_token_ids"] == pipe.model.config.video_token_id).sum())


def test_generation_and_frame_sampling_options(files, reference, pipe):
    _, video = files
    messages = video_question(video)
    per_frame = pipe.model.config.tokens_per_frame
    prompt_length = chat_inputs(reference[1], messages, num_frames=2)["input_ids"].shape[1]

    for options in ({"min_new_tokens": 3}, {"generate_kwargs": {"min_new_tokens": 3}}):
        result = pipe(messages, num_frames=2, max_new_tokens=3, return_tensors=True, **options)
        assert len(result[0]["generated_token_ids"]) == prompt_length + 3
    assert video_tokens(pipe, result) == 2 * per_frame
    # fps sampling, in both input forms and through processor_kwargs.
    expected_frames = int(VIDEO_SECONDS * 2)
    assert (
        video_tokens(pipe, pipe(messages, fps=2, max_new_tokens=1, return_tensors=True)) == expected_frames * per_frame
    )
    result = pipe(
        text="<video>\nWhat?", videos=str(video), processor_kwargs={"fps": 2}, max_new_tokens=1, return_tensors=True
    )
    assert video_tokens(pipe, result) == expected_frames * per_frame
    assert video_tokens(pipe, pipe(messages, num_frames=3, max_new_tokens=1, return_tensors=True)) == 3 * per_frame
    assert VIDEO_FPS * VIDEO_SECONDS > 3  # so the counts above come from sampling, not from the video's length

    # Generation options reach generate, loose or in generate_kwargs: beam search, checked against generate.
    answers = generate_answers(reference, chat_inputs(reference[1], messages, num_frames=2), num_beams=2)
    assert answers != generate_answers(reference, chat_inputs(reference[1], messages, num_frames=2))  # not greedy's
    for options in ({"num_beams": 2}, {"generate_kwargs": {"num_beams": 2}}):
        results = pipe(messages, num_frames=2, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False, **options)
        assert [r["generated_text"] for r in results] == answers


def test_streaming_matches_generate(files, reference, pipe):
    _, video = files
    model, processor = reference
    inputs = chat_inputs(reference[1], video_question(video), num_frames=4)
    answer = generate_answers(reference, inputs)[0]

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    kwargs = dict(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, streamer=streamer)
    thread = threading.Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == answer

    streamer = TextIteratorStreamer(pipe.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    results = {}
    thread = threading.Thread(
        target=lambda: results.update(
            out=pipe(
                video_question(video),
                num_frames=4,
                max_new_tokens=MAX_NEW_TOKENS,
                return_full_text=False,
                generate_kwargs={"streamer": streamer},
            )
        )
    )
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == answer == results["out"][0]["generated_text"]


def test_bad_inputs_name_the_problem(files, pipe):
    _, video = files
    with pytest.raises(ValueError, match="No prompt given"):
        pipe(videos=str(video))
    with pytest.raises(ValueError, match="video"):
        pipe(text="No placeholder here.", videos=str(video), num_frames=2)
    with pytest.raises(ValueError, match="num_frames"):
        pipe(video_question(video), num_frames=0)
