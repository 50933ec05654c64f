"""`crosslmm-serve`: the package's OpenAI-compatible server with a tiny CrossLMM checkpoint, driven by the real
`openai` client and raw HTTP against servers started on 127.0.0.1 (free ports) in subprocesses and always stopped.

Two servers per module, started side by side: `server`, opened the way an operator opens it (the test folder's local
files, media from this machine's 127.0.0.1, requests' chat templates, small caps and timeouts), and `guarded`, with
the defaults and an API key."""

import base64
import concurrent.futures
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
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
MAX_MEDIA_BYTES = 200_000  # the open server's cap: the test video is 8 kB
MEDIA_TIMEOUT = 1.0  # the open server's connect/read timeout
MEDIA_TOTAL_TIMEOUT = 4.0  # the open server's limit on one download: /drip outlasts it
API_KEY = "test-key-0123"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(tmp: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}


class Server:
    def __init__(self, folder: Path, tmp: Path, *options, api_key="unused", name="server"):
        self.folder, self.port, self.log = folder, _free_port(), tmp / f"{name}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "crosslmm.serve", "--port", str(self.port), "--device", "cpu", *options]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [*command, str(folder)], stdout=log, stderr=subprocess.STDOUT, env=_env(tmp)
            )
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def wait_until_ready(self):
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"crosslmm-serve exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
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

    def refusal(self, content, **options) -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as raised:
            self.ask(content, **options)
        return raised.value

    def post(self, body: bytes, headers=None) -> tuple[int, dict]:
        """Raw HTTP: a body the `openai` client would not send (NaN, not JSON, ...)."""
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {self.client.api_key}",
            **(headers or {}),
        }
        request = urllib.request.Request(f"{self.url}/v1/chat/completions", body, headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)


class MediaHost(http.server.BaseHTTPRequestHandler):
    """The media server the tests fetch from (127.0.0.1): the video, redirects, a 404, a slow drip, too many bytes,
    a request that is never answered."""

    video = image = b""

    def do_GET(self):
        try:
            self._answer()
        except (BrokenPipeError, ConnectionResetError):
            # The server under test hangs up on /big and /drip on purpose. Left to socketserver, the traceback goes
            # to sys.stderr from this thread after the test has ended, into whichever test captures stderr next.
            pass

    def _answer(self):
        path, _, query = self.path.partition("?")
        if path == "/video.mp4":
            self._send(200, self.video)
        elif path == "/square.png":
            self._send(200, self.image)
        elif path == "/redirect":  # to the URL in the query
            self.send_response(302)
            self.send_header("Location", urllib.parse.unquote(query))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/big":  # no Content-Length: the cap is enforced as the bytes arrive
            self.send_response(200)
            self.end_headers()
            for _ in range(MAX_MEDIA_BYTES // 10_000 + 5):
                self.wfile.write(b"x" * 10_000)
        elif path == "/drip":  # a byte every 0.3 s for 6 s: never a read timeout, slow all the same
            self.send_response(200)
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.3)
        elif path == "/hang":
            time.sleep(MEDIA_TIMEOUT * 3)
        else:
            self._send(404, b"no")

    def _send(self, status, data):
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    folder = tiny_checkpoint(tmp / "checkpoint")
    media = tmp / "media"  # the folder the open server reads
    media.mkdir()
    video = tiny_video(media / "clip.mp4")
    not_a_video = media / "notes.mp4"
    not_a_video.write_text("not a video\n" * 100)
    outside = tiny_video(tmp / "outside.mp4")
    (media / "link.mp4").symlink_to(outside)
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 80, 20)).save(media / "square.png")
    return {
        "tmp": tmp,
        "media": media,
        "folder": folder,
        "video": video,
        "outside": outside,
        "truncated": truncate(video, media / "truncated.mp4", keep=0.5),
        "corrupt": corrupt(video, media / "corrupt.mp4"),
        "not_a_video": not_a_video,
        "image": media / "square.png",
        "tokens_per_frame": json.loads((folder / "config.json").read_text())["pool_size"] ** 2,
    }


@pytest.fixture(scope="module")
def media_host(files):
    MediaHost.video = files["video"].read_bytes()
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MediaHost)
    host.daemon_threads = True
    threading.Thread(target=host.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()


def _refusals(tmp: Path) -> dict:
    """Two checkpoints the command must refuse, each started in a process of its own: {folder: (process, phrase)}."""
    other = tmp / "qwen2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    expected = {
        tmp / "no-such-folder": "crosslmm-serve: error: cannot load the config of",
        other: "is a 'qwen2' checkpoint, not CrossLMM",
    }
    return {
        folder: (
            subprocess.Popen(
                [sys.executable, "-m", "crosslmm.serve", str(folder)], stderr=subprocess.PIPE, text=True, env=_env(tmp)
            ),
            phrase,
        )
        for folder, phrase in expected.items()
    }


def _own_code(folder: Path, tmp: Path) -> str:
    """`load_model` with the checkpoint's own code (this repository's model modules blocked): the classes' modules."""
    return run_isolated(
        f"""
        from crosslmm.serve import load_model

        model, processor = load_model({str(folder)!r}, device="cpu", trust_remote_code=True)
        print(type(model).__module__, type(processor).__module__)
        """,
        tmp,
        extra_env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},  # this checkout's crosslmm package
        blocked=SHIPPED_MODULES,  # the serving tool from the package, the model's code from the checkpoint
    )


@pytest.fixture(scope="module")
def processes(files):
    """Every fresh process the module needs, started side by side (most of each is starting Python and importing
    torch and transformers): the servers, the command's two refusals, a load with the checkpoint's own code."""
    tmp = files["tmp"]
    (tmp / "refusals").mkdir()
    (tmp / "own-code").mkdir()
    started = {
        "open": Server(
            files["folder"],
            tmp,
            *("--allowed-local-media-path", str(files["media"]), "--allowed-media-domains", "127.0.0.1"),
            *("--max-media-bytes", str(MAX_MEDIA_BYTES), "--media-timeout", str(MEDIA_TIMEOUT)),
            *("--media-total-timeout", str(MEDIA_TOTAL_TIMEOUT), "--trust-request-chat-template"),
            name="open",
        ),
        "guarded": Server(files["folder"], tmp, "--api-key", API_KEY, api_key=API_KEY, name="guarded"),
        "doomed": Server(files["folder"], tmp, name="doomed"),  # the SIGTERM test's, so no test has to run last
        "refusals": _refusals(tmp / "refusals"),
    }
    servers = [started[name] for name in ("open", "guarded", "doomed")]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started["own_code"] = pool.submit(_own_code, files["folder"], tmp / "own-code")
        try:
            for server in servers:
                server.wait_until_ready()
            yield started
        finally:
            for server in servers:
                server.stop()
            for process, _ in started["refusals"].values():
                process.kill() if process.poll() is None else None


@pytest.fixture(scope="module")
def servers(processes):
    return processes


@pytest.fixture(scope="module")
def server(servers):
    return servers["open"]


@pytest.fixture(scope="module")
def guarded(servers):
    return servers["guarded"]


def video(url) -> dict:
    return {"type": "video_url", "video_url": {"url": str(url)}}


def image(url) -> dict:
    return {"type": "image_url", "image_url": {"url": str(url)}}


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


def test_image_by_path_data_url_and_http(server, files, media_host):
    """An image is one frame's tokens, however it comes; a file that is not an image is named."""
    MediaHost.image = files["image"].read_bytes()
    sources = (files["image"], data_url(files["image"], "image/png"), f"{media_host}/square.png")
    prompt_tokens = {
        server.ask([image(source), {"type": "text", "text": "What is this?"}], max_tokens=1).usage.prompt_tokens
        for source in sources
    }
    text_only = server.ask("What is this?", max_tokens=1).usage.prompt_tokens
    assert prompt_tokens == {text_only + 1 + files["tokens_per_frame"]}  # + the "\n" after it
    error = server.refusal([image(files["not_a_video"])], max_tokens=1)
    assert error.status_code == 400 and "notes.mp4 is not an image" in error.body["message"]


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
        lambda f: {"content": question((f["media"] / "nowhere.mp4").as_uri())},
        400,
        ["Video file not found", "nowhere.mp4"],
    ),
    "missing file (path)": (
        lambda f: {"content": question(f["media"] / "nowhere.mp4")},
        400,
        ["Video file not found"],
    ),
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
    for source in (files["corrupt"], files["media"] / "nowhere.mp4"):
        with pytest.raises(openai.BadRequestError):
            server.ask(question(source), max_tokens=2)
    answer = server.ask(question(files["video"]), max_tokens=4)
    assert answer.choices[0].message.content
    with urllib.request.urlopen(f"{server.url}/health") as response:
        assert json.load(response) == {"status": "ok"}
    assert server.process.poll() is None


# --------------------------------------------------------------------------------------------------------------------
# Exposed: what a hostile client can and cannot make the server do
# --------------------------------------------------------------------------------------------------------------------


def _alike(errors: dict) -> set:
    """The refusals' messages with each one's own URL taken out: one element when they say the same thing."""
    return {error.body["message"].replace(str(source), "URL") for source, error in errors.items()}


def test_api_key_guards_the_api_but_not_health(guarded):
    assert [model.id for model in guarded.client.models.list().data] == [str(guarded.folder)]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        request = urllib.request.Request(f"{guarded.url}/v1/models", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=10)
        assert raised.value.code == 401 and "API key" in json.load(raised.value)["error"]["message"]
    stranger = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model=str(guarded.folder), messages=[{"role": "user", "content": "Hi"}])
    with urllib.request.urlopen(f"{guarded.url}/health", timeout=10) as response:
        assert json.load(response) == {"status": "ok"}


def test_by_default_no_local_file_is_read_and_every_refusal_reads_the_same(guarded, files):
    """A file that exists, one that does not, one that is not a video, a folder, /etc/shadow: the same 400, so that
    nothing about the server's disk leaks."""
    sources = [
        files["video"],
        files["video"].as_uri(),
        files["not_a_video"],
        files["media"] / "nowhere.mp4",
        files["media"],
        "/etc/shadow",
        "file:///etc/passwd",
    ]
    errors = {}
    for source in sources:
        for part in (video(source), image(source)):
            errors[source] = error = guarded.refusal([part], max_tokens=2)
            assert error.status_code == 400, error.message
    assert _alike(errors) == {"URL: this server reads no local files."}


def test_an_allowed_folder_is_the_only_one_read(server, files):
    """Outside the folder (a path, `..`, a symlink inside pointing out, /etc/shadow as an image): one refusal."""
    sources = [
        files["outside"],
        files["outside"].as_uri(),
        f"{files['media']}/../{files['outside'].name}",
        files["media"] / "link.mp4",
        "/etc/shadow",
    ]
    errors = {
        source: server.refusal([image(source) if source == "/etc/shadow" else video(source)]) for source in sources
    }
    assert {error.status_code for error in errors.values()} == {400}
    (message,) = _alike(errors)
    assert "reads no local files outside the folders" in message and "--allowed-local-media-path" in message


def test_private_addresses_are_refused_after_resolution(guarded):
    """Loopback (by number, by name, IPv6, IPv4 in IPv6), unspecified, private, link-local (cloud metadata): all one
    refusal, before anything connects."""
    port = guarded.port  # a port with a server behind it: as refused as any other
    sources = [
        f"http://127.0.0.1:{port}/health",
        f"http://localhost:{port}/v1/models",
        f"http://[::1]:{port}/health",
        f"http://[::ffff:127.0.0.1]:{port}/health",
        f"http://0.0.0.0:{port}/health",
        "http://10.0.0.1/video.mp4",
        "https://192.168.1.1/video.mp4",
        "http://169.254.169.254/latest/meta-data/",
        "ftp://example.com/video.mp4",
    ]
    errors = {source: guarded.refusal(question(source)) for source in sources}
    assert {error.status_code for error in errors.values()} == {400}
    (message,) = _alike(errors)
    assert message.startswith("could not fetch URL")


def test_fetch_failures_look_alike_and_redirects_are_checked(server, files, media_host):
    """A closed port, a 404, a host that never answers (the read timeout), a redirect loop and a redirect to a host
    the server was not opened to: one message, so that a client cannot scan ports; a redirect to an allowed host is
    followed."""
    host_port = urllib.parse.urlsplit(media_host).port
    elsewhere = urllib.parse.quote(f"http://localhost:{host_port}/video.mp4")
    sources = [
        f"http://127.0.0.1:{_free_port()}/video.mp4",
        f"{media_host}/missing.mp4",
        f"{media_host}/hang",
        f"{media_host}/loop",
        f"{media_host}/redirect?{elsewhere}",
    ]
    errors = {source: server.refusal(question(source), max_tokens=1) for source in sources}
    assert {error.status_code for error in errors.values()} == {400}
    (message,) = _alike(errors)
    assert message.startswith("could not fetch URL")

    fetched = server.ask(question(f"{media_host}/video.mp4"), max_tokens=1).usage.prompt_tokens
    redirected = server.ask(question(f"{media_host}/redirect?/video.mp4"), max_tokens=1).usage.prompt_tokens
    assert fetched == redirected == server.ask(question(files["video"]), max_tokens=1).usage.prompt_tokens


def test_own_url_and_slow_downloads_do_not_hold_up_the_server(server, media_host):
    """A video URL naming the server itself is fetched (it is open to 127.0.0.1) without deadlocking it; while a slow
    download runs, /health and a text question are answered; the download ends at the total timeout."""
    own = f"{server.url}/v1/models"
    started = time.monotonic()
    assert "is not a video" in server.refusal(question(own), max_tokens=1).body["message"]
    assert time.monotonic() - started < 20

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(server.refusal, question(f"{media_host}/drip"), max_tokens=1)
        time.sleep(0.5)
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as response:
            assert response.status == 200
        assert server.ask("Hi", max_tokens=2).choices[0].message.content is not None
        # Answered while the download still runs (it is refused at MEDIA_TOTAL_TIMEOUT): a server blocked by it
        # would answer only after, with the refusal already on its way.
        assert not slow.done()
        assert slow.result().body["message"].startswith(f"could not fetch {media_host}/drip")


def test_the_media_host_is_quiet_when_a_client_hangs_up(media_host, capsys):
    """The server under test hangs up on /drip; the host's traceback about it once landed in a later test's stderr."""
    with urllib.request.urlopen(f"{media_host}/drip", timeout=10) as response:
        response.read(1)
    time.sleep(1.5)  # several more writes into the closed connection
    assert capsys.readouterr().err == ""


def test_media_and_bodies_are_capped(server, media_host):
    too_big = "data:video/mp4;base64," + base64.b64encode(b"x" * (MAX_MEDIA_BYTES + 1000)).decode()
    for source in (too_big, f"{media_host}/big"):
        error = server.refusal(question(source), max_tokens=1)
        assert error.status_code == 413, error.message
        assert f"limit of {MAX_MEDIA_BYTES} bytes (--max-media-bytes)" in error.body["message"]
        assert len(error.body["message"]) < 300
    # A body announced larger than the cap is answered before it is sent.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        length = MAX_MEDIA_BYTES * 2 + (1 << 20)
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{".encode())
        reply = b""
        while b"}}" not in reply and (received := sock.recv(65536)):
            reply += received
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "request body is larger" in reply


def test_a_requests_chat_template_needs_the_operators_consent(server, guarded):
    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    error = guarded.refusal("Hi", max_tokens=1, extra_body={"chat_template": template})
    assert error.status_code == 400 and "--trust-request-chat-template" in error.body["message"]

    plain = server.ask("Hi there", max_tokens=1).usage.prompt_tokens
    own = server.ask("Hi there", max_tokens=1, extra_body={"chat_template": template}).usage.prompt_tokens
    assert own < plain
    error = server.refusal("Hi", max_tokens=1, extra_body={"chat_template": "{% for %}"})
    assert error.status_code == 400 and error.body["message"].startswith("chat_template:")


def test_no_input_a_client_chooses_gets_a_500(server, files):
    cases = [
        ({"max_tokens": 100_000}, "This model's maximum context length is 512 tokens"),
        ({"max_completion_tokens": 10**30}, "maximum context length is 512 tokens"),
        ({"extra_body": {"chat_template_kwargs": {"num_frames": 10**6}}}, "maximum context length of 512 tokens"),
        ({"extra_body": {"chat_template_kwargs": {"colour": 1}}}, "chat_template_kwargs"),
        ({"n": 2}, "n must be 1"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools is not supported"),
        ({"seed": 2**70}, "seed must be"),
    ]
    for options, phrase in cases:
        error = server.refusal(question(files["video"]), **options)
        assert error.status_code == 400 and phrase in error.body["message"], (options, error.body)
    model = json.dumps(str(server.folder))
    raw = [
        (b'{"model": %s, "messages": [{"role": "user", "content": "Hi"}], "temperature": Infinity}', "temperature"),
        (b'{"model": %s, "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', "temperature"),
        (b'{"model": %s, "messages": [{"role": "user", "content": "Hi"}], "top_p": -Infinity}', "top_p"),
        (b'{"model": %s, "messages": [{"role": "user", "content": "Hi"}], "frequency_penalty": 1e999}', "frequency"),
        (b"%s not JSON", "not valid JSON"),
        (b"[%s]", "must be a JSON object"),
        (b"[" * 100_000 + b"%s", "not valid JSON"),
    ]
    for body, phrase in raw:
        status, answer = server.post(body.replace(b"%s", model.encode()))
        assert status == 400 and phrase in answer["error"]["message"], (body[:80], answer)
    with urllib.request.urlopen(f"{server.url}/health") as response:
        assert response.status == 200


# --------------------------------------------------------------------------------------------------------------------
# The command line and the model manager
# --------------------------------------------------------------------------------------------------------------------


def test_command_line_refuses_what_it_cannot_serve(processes):
    for process, phrase in processes["refusals"].values():
        err = process.communicate(timeout=300)[1]
        assert process.returncode == 2, err
        assert phrase in err and "Traceback" not in err, err


def test_trust_remote_code_runs_the_checkpoints_own_code(processes):
    """With `--trust-remote-code` the server loads the model and processor classes from the checkpoint's files (this
    repository's modules are blocked in that process)."""
    model_module, processor_module = processes["own_code"].result(timeout=300).split()
    assert model_module.startswith("transformers_modules.") and model_module.endswith(".modeling_crosslmm")
    assert processor_module.startswith("transformers_modules.") and processor_module.endswith(".processing_crosslmm")


def test_an_untested_transformers_release_is_named_in_one_line_first(monkeypatch, capsys, tmp_path):
    import crosslmm.versions
    from crosslmm.serve import main

    monkeypatch.setitem(crosslmm.versions.TESTED, "transformers", ("4.0.0", "4.1.0"))
    monkeypatch.delenv("CROSSLMM_NO_VERSION_WARNING")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # main() registers the package's classes with the Auto classes, which would outlive the test and replace the
    # checkpoints' own code in later tests of this process.
    monkeypatch.setattr("crosslmm.auto.register_auto_classes", lambda: None)
    assert main([str(tmp_path / "no-such-folder")]) == 2
    first, *rest = capsys.readouterr().err.splitlines()
    assert first.startswith("crosslmm-serve: warning: transformers ") and "outside the releases" in first
    assert rest and rest[-1].startswith("crosslmm-serve: error: cannot load the config of")


@pytest.mark.parametrize(
    "option, message",
    [
        (["--log-level", "loud"], "--log-level 'loud': use debug, info, warning, error or critical"),
        (["--dtype", "int8"], "--dtype 'int8': use bfloat16, float16, float32 or auto"),
        (["--media-timeout", "0"], "--media-timeout must be positive, got 0.0"),
    ],
)
def test_bad_options_are_one_line_and_exit_2_before_the_model_loads(capsys, tmp_path, option, message):
    from crosslmm.serve import main

    assert main([*option, str(tmp_path / "no-such-folder")]) == 2
    assert capsys.readouterr().err == f"crosslmm-serve: error: {message}\n"


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


# --------------------------------------------------------------------------------------------------------------------
# SIGTERM with a request in flight (to a server of its own)
# --------------------------------------------------------------------------------------------------------------------


def test_sigterm_with_a_request_in_flight_ends_cleanly(servers):
    doomed = servers["doomed"]
    stream = doomed.ask("Tell me a long story.", max_tokens=450, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="shutting down"):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
                if len(received) == 2:
                    doomed.process.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal once it has shut down, so the process ends as SIGTERM ends a process.
    assert doomed.process.wait(timeout=30) == -signal.SIGTERM
    assert "Traceback" not in doomed.log.read_text()
