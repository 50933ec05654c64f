"""`crosslmm-serve`: transformers' OpenAI-compatible server with a tiny CrossLMM checkpoint, driven by the real
`openai` client against a server started on 127.0.0.1 (a free port) in a subprocess and always stopped."""

import base64
import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest

from isolated import SHIPPED_MODULES, run_isolated
from tiny import VIDEO_FPS, VIDEO_SECONDS, tiny_checkpoint, tiny_video
from video_processing_crosslmm import VideoLoadError, read_video
from videos import corrupt, truncate


STARTUP_SECONDS = 240
VIDEO_FRAMES = round(VIDEO_SECONDS * VIDEO_FPS)  # 8 frames, at 0, 0.125, ..., 0.875 s


def _serve_command() -> list[str]:
    script = Path(sys.executable).parent / "crosslmm-serve"
    if not script.exists():
        pytest.fail(f"{script} is missing: install the project (pip install -e '.[test]') to get its console scripts")
    return [str(script)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(tmp: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}


class Server:
    def __init__(self, folder: Path, tmp: Path):
        self.folder, self.port, self.log = folder, _free_port(), tmp / "server.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [*_serve_command(), "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", str(folder)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(tmp),
            )
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0, timeout=120
        )

    def wait_until_ready(self):
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"crosslmm-serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"crosslmm-serve did not answer /health within {STARTUP_SECONDS} s:\n{self.log.read_text()}")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def ask(self, content, **options):
        return self.client.chat.completions.create(
            model=str(self.folder), messages=[{"role": "user", "content": content}], **options
        )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    folder = tiny_checkpoint(tmp / "checkpoint")
    video = tiny_video(tmp / "clip.mp4")
    not_a_video = tmp / "notes.mp4"
    not_a_video.write_text("not a video\n" * 100)
    return {
        "tmp": tmp,
        "folder": folder,
        "video": video,
        "truncated": truncate(video, tmp / "truncated.mp4", keep=0.5),
        "corrupt": corrupt(video, tmp / "corrupt.mp4"),
        "not_a_video": not_a_video,
        "tokens_per_frame": json.loads((folder / "config.json").read_text())["pool_size"] ** 2,
    }


@pytest.fixture(scope="module")
def server(files):
    server = Server(files["folder"], files["tmp"])
    try:
        server.wait_until_ready()
        yield server
    finally:
        server.stop()


def video(url) -> dict:
    return {"type": "video_url", "video_url": {"url": str(url)}}


def data_url(path, media_type="video/mp4") -> str:
    return f"data:{media_type};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def question(source, text="What happens in this video?") -> list:
    return [video(source), {"type": "text", "text": text}]


# --------------------------------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------------------------------


def test_lists_the_served_model(server):
    assert [model.id for model in server.client.models.list().data] == [str(server.folder)]


def test_text_answer(server):
    answer = server.ask("Describe a sunset.", max_tokens=6)
    choice = answer.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= 6
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_streaming_gives_the_same_answer(server, files):
    content = question(files["video"].as_uri())
    whole = server.ask(content, max_tokens=8)
    chunks = list(server.ask(content, max_tokens=8, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert len(chunks) > 3  # the role, one chunk per token or so, the finish
    # The random weights answer in byte-level tokens that need not end on a whole UTF-8 character: the stream holds
    # back an incomplete last character, which the whole answer decodes as U+FFFD.
    assert text == whole.choices[0].message.content.rstrip("\ufffd")
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_video_by_file_url_path_and_data_url(server, files):
    answers = [
        server.ask(question(source), max_tokens=8)
        for source in (files["video"].as_uri(), str(files["video"]), data_url(files["video"]))
    ]
    texts = {answer.choices[0].message.content for answer in answers}
    prompt_tokens = {answer.usage.prompt_tokens for answer in answers}
    assert len(texts) == 1 and len(prompt_tokens) == 1, (texts, prompt_tokens)
    # The server asks for 32 frames by default; the clip has 8, so all of them are in the prompt.
    text_only = server.ask("What happens in this video?", max_tokens=1).usage.prompt_tokens
    assert prompt_tokens.pop() == text_only + 1 + VIDEO_FRAMES * files["tokens_per_frame"]  # + the "\n" after it


@pytest.mark.parametrize(
    "options, frames",
    [
        ({"num_frames": 1}, 1),
        ({"num_frames": 4}, 4),
        ({"fps": 2}, 2),  # 0 and 0.5 s
        ({"fps": 8, "max_frames": 3}, 3),
        ({"start_time": 0.5, "end_time": 1.0}, 4),  # the frames at 0.5, 0.625, 0.75, 0.875 s
        ({"num_frames": 2, "start_time": 0.5}, 2),
    ],
)
def test_frame_options_through_chat_template_kwargs(server, files, options, frames):
    def prompt_tokens(options):
        content = question(files["video"].as_uri())
        answer = server.ask(content, max_tokens=1, extra_body={"chat_template_kwargs": options})
        return answer.usage.prompt_tokens

    one_frame = prompt_tokens({"num_frames": 1})
    assert prompt_tokens(options) == one_frame + (frames - 1) * files["tokens_per_frame"]


def test_sampling_options(server):
    prompt = "Tell me about the river."
    greedy = server.ask(prompt, max_tokens=12).choices[0].message.content
    assert server.ask(prompt, max_tokens=12, temperature=0).choices[0].message.content == greedy

    short = server.ask(prompt, max_tokens=3)
    assert short.usage.completion_tokens <= 3
    assert short.choices[0].finish_reason == ("length" if short.usage.completion_tokens == 3 else "stop")
    assert server.ask(prompt, max_completion_tokens=3).choices[0].message.content == short.choices[0].message.content

    def sample(seed, **options):
        return server.ask(prompt, max_tokens=12, temperature=1.5, seed=seed, **options).choices[0].message.content

    assert sample(1) == sample(1)  # the seed makes sampling reproducible
    assert len({sample(seed) for seed in range(4)}) > 1  # and temperature > 0 does sample
    assert isinstance(sample(0, top_p=0.5, frequency_penalty=0.5), str)

    # `stop`: generation ends at the first stop string (which transformers' server keeps at the end of the answer).
    stop = greedy[len(greedy) // 2 :][:2]
    stopped = server.ask(prompt, max_tokens=12, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert greedy.startswith(stopped.message.content) and stop in stopped.message.content
    assert len(stopped.message.content) < len(greedy)


def test_concurrent_requests_all_get_their_answers(server, files):
    requests = [
        (question(files["video"].as_uri(), f"What happens? ({i})"), {"max_tokens": 6, "stream": i % 2 == 1})
        for i in range(4)
    ] + [(f"Say something about number {i}.", {"max_tokens": 6, "stream": i % 2 == 1}) for i in range(4)]

    def run(request):
        content, options = request
        if options["stream"]:
            chunks = server.ask(content, **options)
            return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        return server.ask(content, **options).choices[0].message.content

    one_by_one = [run(request) for request in requests]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(run, requests))
    assert together == one_by_one
    assert all(together)


# --------------------------------------------------------------------------------------------------------------------
# Bad input: a 4xx answer that names the problem, and the server keeps serving
# --------------------------------------------------------------------------------------------------------------------

BAD_REQUESTS = {
    "missing file (file URL)": (
        lambda f: {"content": question((f["tmp"] / "nowhere.mp4").as_uri())},
        400,
        ["Video file not found", "nowhere.mp4"],
    ),
    "missing file (path)": (lambda f: {"content": question(f["tmp"] / "nowhere.mp4")}, 400, ["Video file not found"]),
    "not a video": (lambda f: {"content": question(f["not_a_video"])}, 400, ["notes.mp4", "is not a video"]),
    "truncated video": (lambda f: {"content": question(f["truncated"])}, 400, ["truncated.mp4", "corrupt/truncated"]),
    "corrupt video": (lambda f: {"content": question(f["corrupt"])}, 400, ["corrupt.mp4"]),
    "data URL of no video": (
        lambda f: {"content": question(data_url(f["not_a_video"]))},
        400,
        ["the data: URL (video/mp4", "is not a video"],
    ),
    "data URL, bad base64": (
        lambda f: {"content": question("data:video/mp4;base64,AAAA!!!!")},
        400,
        ["does not hold valid base64 data"],
    ),
    "time window outside the video": (
        lambda f: {"content": question(f["video"]), "extra_body": {"chat_template_kwargs": {"start_time": 5}}},
        400,
        ["time window", "outside the video"],
    ),
    "empty time window": (
        lambda f: {
            "content": question(f["video"]),
            "extra_body": {"chat_template_kwargs": {"start_time": 0.5, "end_time": 0.5}},
        },
        400,
        ["time window", "empty"],
    ),
    "num_frames 0": (
        lambda f: {"content": question(f["video"]), "extra_body": {"chat_template_kwargs": {"num_frames": 0}}},
        400,
        ["chat_template_kwargs.num_frames must be a positive integer"],
    ),
    "num_frames not a number": (
        lambda f: {"content": question(f["video"]), "extra_body": {"chat_template_kwargs": {"num_frames": "many"}}},
        400,
        ["chat_template_kwargs.num_frames", "'many'"],
    ),
    "negative fps": (
        lambda f: {"content": question(f["video"]), "extra_body": {"chat_template_kwargs": {"fps": -1}}},
        400,
        ["chat_template_kwargs.fps must be a positive number"],
    ),
    "audio content": (
        lambda f: {"content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]},
        400,
        ["CrossLMM takes content parts of type text, image_url, video_url", "input_audio"],
    ),
    "video part without a URL": (
        lambda f: {"content": [{"type": "video_url", "video_url": {}}]},
        400,
        ['needs "video_url": {"url": "..."}'],
    ),
    "negative temperature": (lambda f: {"content": "Hi", "temperature": -1}, 400, ["temperature must be"]),
    "top_p above 1": (lambda f: {"content": "Hi", "top_p": 1.5}, 400, ["top_p must be a number in (0, 1]"]),
    "max_tokens 0": (lambda f: {"content": "Hi", "max_tokens": 0}, 400, ["max_tokens must be a positive integer"]),
    "another model": (lambda f: {"content": "Hi", "model": "someone/else"}, 400, ["pinned", "someone/else"]),
    "unknown field": (lambda f: {"content": "Hi", "extra_body": {"colour": "red"}}, 422, ["Unexpected fields"]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_a_4xx_naming_the_problem(server, files, case):
    make, status, phrases = BAD_REQUESTS[case]
    request = make(files)
    content = request.pop("content")
    model = request.pop("model", str(server.folder))
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as raised:
            answer = server.client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], stream=stream, **request
            )
            list(answer) if stream else None
        error = raised.value
        assert error.status_code == status, error.message
        message = error.body["message"]
        for phrase in phrases:
            assert phrase in message, message
        assert "Traceback" not in message and len(message) < 500
    assert server.process.poll() is None


def test_bad_messages(server):
    for messages, phrase in [
        ([], "messages must be a non-empty list"),
        ([{"role": "robot", "content": "Hi"}], "messages[0].role must be one of system, user, assistant"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text must be a string"),
    ]:
        with pytest.raises(openai.BadRequestError, match=re.escape(phrase)):
            server.client.chat.completions.create(model=str(server.folder), messages=messages)


def test_server_keeps_serving_after_bad_requests(server, files):
    for source in (files["corrupt"], files["tmp"] / "nowhere.mp4"):
        with pytest.raises(openai.BadRequestError):
            server.ask(question(source), max_tokens=2)
    answer = server.ask(question(files["video"]), max_tokens=4)
    assert answer.choices[0].message.content
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health") as response:
        assert json.load(response) == {"status": "ok"}
    assert server.process.poll() is None


# --------------------------------------------------------------------------------------------------------------------
# The command line and the model manager
# --------------------------------------------------------------------------------------------------------------------


def test_command_line_refuses_what_it_cannot_serve(files, tmp_path):
    """Two refusals, each in a process of its own (side by side: most of each is starting Python)."""
    other = tmp_path / "qwen2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    expected = {
        tmp_path / "no-such-folder": "crosslmm-serve: error: cannot load the config of",
        other: "is a 'qwen2' checkpoint, not CrossLMM",
    }
    processes = {
        folder: subprocess.Popen(
            [*_serve_command(), str(folder)], stderr=subprocess.PIPE, text=True, env=_env(tmp_path)
        )
        for folder in expected
    }
    for folder, process in processes.items():
        err = process.communicate(timeout=300)[1]
        assert process.returncode == 2, err
        assert expected[folder] in err and "Traceback" not in err, err


def test_trust_remote_code_runs_the_checkpoints_own_code(files, tmp_path):
    """With `--trust-remote-code` the manager loads the model and processor classes from the checkpoint's files (this
    repository's modules are blocked in that process), and reports a model that takes videos as image-text-to-text."""
    out = run_isolated(
        f"""
        from crosslmm.serve import CrossLMMModelManager
        from transformers.cli.serving.utils import Modality

        manager = CrossLMMModelManager(device="cpu", trust_remote_code=True, force_model={str(files["folder"])!r})
        (timed,) = manager.loaded_models.values()
        assert manager.get_model_modality(timed.model, timed.processor) == Modality.VLM
        print(type(timed.model).__module__, type(timed.processor).__module__)
        manager.shutdown()
        """,
        tmp_path,
        blocked=SHIPPED_MODULES,  # the serving tool from the package, the model's code from the checkpoint
    )
    model_module, processor_module = out.split()
    assert model_module.startswith("transformers_modules.") and model_module.endswith(".modeling_crosslmm")
    assert processor_module.startswith("transformers_modules.") and processor_module.endswith(".processing_crosslmm")


# --------------------------------------------------------------------------------------------------------------------
# The reader takes what OpenAI-style clients send
# --------------------------------------------------------------------------------------------------------------------


def test_reader_takes_data_and_file_urls(files):
    frames, metadata = read_video(str(files["video"]))
    for source in (
        data_url(files["video"]),
        "data:video/mp4," + urllib.parse.quote_from_bytes(files["video"].read_bytes()),  # percent-encoded, no base64
        files["video"].as_uri(),
    ):
        decoded, decoded_metadata = read_video(source)
        np.testing.assert_array_equal(decoded, frames)
        assert decoded_metadata.timestamps == metadata.timestamps
    _, metadata = read_video(data_url(files["video"]))
    assert metadata.source.startswith("the data: URL (video/mp4, ") and len(metadata.source) < 60


def test_reader_names_a_bad_data_url_without_its_contents(files):
    payload = base64.b64encode(files["not_a_video"].read_bytes()).decode()
    for source, phrase in [
        ("data:video/mp4;base64," + payload, "is not a video PyAV can read"),
        ("data:video/mp4;base64,%%%", "does not hold valid base64 data"),
        ("data:video/mp4;base64", "is malformed"),
    ]:
        with pytest.raises(VideoLoadError, match=phrase) as raised:
            read_video(source)
        assert payload[:40] not in str(raised.value)
    with pytest.raises(FileNotFoundError, match="Video file not found: file:///"):
        read_video((files["tmp"] / "nowhere.mp4").as_uri())
