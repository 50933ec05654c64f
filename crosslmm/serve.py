"""`crosslmm-serve`: a CrossLMM checkpoint behind a small OpenAI-compatible server (FastAPI + uvicorn).

    crosslmm-serve [--host 127.0.0.1] [--port 8000] [--device auto] [--dtype auto] [options] MODEL

Endpoints: `/v1/chat/completions` (streaming as server-sent events or not), `/v1/models`, `/health`. The model and
processor are loaded with transformers' public API (`AutoModelForImageTextToText`/`AutoProcessor.from_pretrained`),
prompts are built with `processor.apply_chat_template` and answered with `model.generate` (`TextIteratorStreamer`
for streaming). By default the classes are this package's, registered through transformers' Auto registration API
(`crosslmm.auto.register_auto_classes`); with `--trust-remote-code` they are the checkpoint's own code files.

Videos are `{"type": "video_url", "video_url": {"url": ...}}` message parts, images `image_url` parts: an http(s)
URL, a base64 `data:` URL, or (only under folders the operator allows) a `file://` URL or a path. The server fetches
and decodes every medium itself, into a temporary file it deletes, and hands the processor that file: transformers'
own URL loading never sees a client's URL. What it fetches is bounded (`MediaPolicy`): no local files unless allowed,
no loopback/private/link-local/reserved addresses unless the host is named, timeouts, a byte cap. Frame options go in
the request's `chat_template_kwargs`: `num_frames` (default 32), or `fps` with `max_frames`, and
`start_time`/`end_time` (seconds).

Requests are accepted concurrently; media are fetched on threads of their own, and everything that touches the model
or processor (building the inputs, `generate`, decoding) runs on one worker thread, one request at a time.
"""

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import copy
import dataclasses
import hmac
import http.client
import ipaddress
import json
import logging
import math
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid

from crosslmm import log_to_stderr
from crosslmm.errors import UsageError, one_line


logger = logging.getLogger("crosslmm.serve")

MODEL_TYPE = "crosslmm"
DEFAULT_MAX_TOKENS = 1024  # an answer's length when the request sets none (less if the model's positions run out)
# Frame options a request may give in `chat_template_kwargs`, with what each must be.
FRAME_OPTIONS = {
    "num_frames": "a positive integer",
    "max_frames": "a positive integer",
    "fps": "a positive number",
    "start_time": "a number of seconds, 0 or more",
    "end_time": "a positive number of seconds",
}
CONTENT_TYPES = ("text", "image_url", "video_url")
CHAT_ROLES = ("system", "user", "assistant")
# OpenAI's chat completion fields: those honoured, those that change nothing here, and those this server cannot honour
# (refused when set, rather than answered as if they were not there). Any other field is a 422.
HONOURED = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "seed", "stop", "frequency_penalty", "n", "chat_template_kwargs", "chat_template",
}  # fmt: skip
NO_EFFECT = {
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "parallel_tool_calls",
}  # fmt: skip
UNSUPPORTED = {
    "audio", "function_call", "functions", "logit_bias", "logprobs", "modalities", "prediction", "presence_penalty",
    "reasoning_effort", "response_format", "tool_choice", "tools", "top_logprobs", "verbosity", "web_search_options",
}  # fmt: skip
# Values of UNSUPPORTED fields that ask for nothing beyond what the server does.
HARMLESS = {"modalities": [["text"]], "response_format": [{"type": "text"}], "tool_choice": ["none"]}
# What the processor and the reader raise for unusable input: a missing file (FileNotFoundError), a file that is not
# a video or is corrupt (VideoLoadError, a ValueError), a time window outside the video or a placeholder in the text
# (ValueError), an option of the wrong type (TypeError).
INPUT_ERRORS = (ValueError, TypeError, OSError, KeyError)
MAX_REDIRECTS = 5
CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------------------------
# Errors a client gets
# --------------------------------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the server will not serve: its HTTP status and the one line that says why."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


def error_body(message: str, status: int, param: str | None = None) -> dict:
    """An OpenAI-style error body (`openai` raises it as `BadRequestError` & co. with this message)."""
    kind = {401: "authentication_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# --------------------------------------------------------------------------------------------------------------------
# Request checks: everything that can be judged before a medium is fetched
# --------------------------------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _frame_option_problem(name: str, value) -> str | None:
    if value is None:
        return None
    if name in ("num_frames", "max_frames"):
        ok = _is_int(value) and value > 0
    elif name == "start_time":
        ok = _is_number(value) and value >= 0
    else:
        ok = _is_number(value) and value > 0
    return None if ok else f"chat_template_kwargs.{name} must be {FRAME_OPTIONS[name]}, got {value!r}."


def media_url(part: dict) -> str | None:
    """The URL of an `image_url`/`video_url` part (`{"url": ...}` as OpenAI sends it, or the bare string)."""
    url = part.get(part.get("type"))
    url = url.get("url") if isinstance(url, dict) else url
    return url if isinstance(url, str) and url else None


def _message_problem(index: int, message) -> str | None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        return f"{where} must be an object with 'role' and 'content'."
    if message.get("role") not in CHAT_ROLES:
        return f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {message.get('role')!r}."
    content = message.get("content")
    if content is None or isinstance(content, str):
        return None
    if not isinstance(content, list):
        return f"{where}.content must be a string or a list of content parts."
    for number, part in enumerate(content):
        at = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in CONTENT_TYPES:
            return f"{at}: CrossLMM takes content parts of type {', '.join(CONTENT_TYPES)}, got {kind!r}."
        if kind == "text":
            if not isinstance(part.get("text"), str):
                return f"{at}.text must be a string."
        elif media_url(part) is None:
            return (
                f'{at} needs "{kind}": {{"url": "..."}} (an http(s) URL, a data: URL, or a file the server may read).'
            )
    return None


def _unsupported(name: str, value) -> bool:
    return bool(value) and value not in HARMLESS.get(name, [])


SAMPLING_CHECKS = {
    "temperature": (lambda v: _is_number(v) and v >= 0, "a finite number, 0 or more"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "max_tokens": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "max_completion_tokens": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    # Given to generate as repetition_penalty = 1 + frequency_penalty, which must stay positive.
    "frequency_penalty": (lambda v: _is_number(v) and v > -1, "a finite number greater than -1"),
    # torch.manual_seed's range.
    "seed": (lambda v: _is_int(v) and -(2**63) <= v < 2**64, "an integer that fits in 64 bits"),
    "stop": (
        lambda v: (isinstance(v, str) and v) or (isinstance(v, list) and all(isinstance(s, str) and s for s in v)),
        "a non-empty string or a list of them",
    ),
    "n": (lambda v: v == 1 and _is_int(v), "1 (this server answers one choice per request)"),
    "stream": (lambda v: isinstance(v, bool), "true or false"),
    "stream_options": (
        lambda v: isinstance(v, dict) and isinstance(v.get("include_usage", False), bool),
        'an object like {"include_usage": true}',
    ),
    "model": (lambda v: isinstance(v, str), "a string"),
}


def request_problem(body: dict, served: str, trust_chat_template: bool = False) -> RequestError | None:
    """What makes a chat completion request unusable, or None.

    Checked before anything is fetched or runs: the fields, the messages' shape and content types, frame options,
    and the sampling options whose bad values would otherwise only fail inside `generate` (after a streaming answer
    has started).
    """
    unexpected = sorted(set(body) - HONOURED - NO_EFFECT - UNSUPPORTED)
    if unexpected:
        return RequestError(f"Unexpected fields in the request: {', '.join(unexpected)}.", 422)
    for name in sorted(UNSUPPORTED & set(body)):
        if _unsupported(name, body[name]):
            return RequestError(f"{name} is not supported by crosslmm-serve.", param=name)
    for name, (valid, expected) in SAMPLING_CHECKS.items():
        value = body.get(name)
        if value is not None and not valid(value):
            return RequestError(f"{name} must be {expected}, got {value!r}."[:300], param=name)
    if body.get("model") is not None and body["model"] != served:
        return RequestError(
            f"This server is pinned to {served}; the request asked for {body['model']!r}.", param="model"
        )
    if body.get("chat_template") is not None:
        if not trust_chat_template:
            return RequestError(
                "chat_template: this server uses the checkpoint's chat template; a request's own template is "
                "accepted only when the server is started with --trust-request-chat-template.",
                param="chat_template",
            )
        if not isinstance(body["chat_template"], str):
            return RequestError("chat_template must be a string (a Jinja template).", param="chat_template")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return RequestError("messages must be a non-empty list of chat messages.", param="messages")
    for index, message in enumerate(messages):
        problem = _message_problem(index, message)
        if problem:
            return RequestError(problem, param="messages")
    options = body.get("chat_template_kwargs") or {}
    if not isinstance(options, dict):
        return RequestError("chat_template_kwargs must be an object.", param="chat_template_kwargs")
    unknown = sorted(set(options) - set(FRAME_OPTIONS))
    if unknown:
        return RequestError(
            f"chat_template_kwargs: CrossLMM's template takes the frame options {', '.join(FRAME_OPTIONS)}, "
            f"got {', '.join(map(repr, unknown))}."[:300],
            param="chat_template_kwargs",
        )
    for name in FRAME_OPTIONS:
        problem = _frame_option_problem(name, options.get(name))
        if problem:
            return RequestError(problem, param="chat_template_kwargs")
    return None


# --------------------------------------------------------------------------------------------------------------------
# Media: what the server reads, and how
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    """What a client's media URLs may reach. The defaults read no local file and no non-public address."""

    allowed_local_paths: tuple[str, ...] = ()  # folders (resolved) whose files a client may name
    allowed_domains: tuple[str, ...] = ()  # when set, the only hosts fetched, at whatever address
    max_bytes: int = 256 << 20  # per medium, and 4/3 of it (base64) plus 1 MiB per request body
    timeout: float = 10.0  # seconds to connect, and between bytes received
    total_timeout: float = 120.0  # seconds for one whole download

    @property
    def max_body_bytes(self) -> int:
        return self.max_bytes * 4 // 3 + (1 << 20)


class FetchRefused(Exception):
    """Why a URL was not fetched, for the server's log; the client gets one generic line whatever the reason."""


def _source_name(url: str) -> str:
    """How messages name a medium: its URL or path, a `data:` URL by its media type and size only."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        media_type = header[len("data:") :].split(";")[0] or "no media type"
        return f"the data: URL ({media_type}, {len(payload)} characters)"
    return url if len(url) <= 200 else url[:200] + "..."


def _too_large(name: str, policy: MediaPolicy) -> RequestError:
    return RequestError(
        f"{name} is larger than this server's limit of {policy.max_bytes} bytes (--max-media-bytes).", 413
    )


def _write_data_url(url: str, out, policy: MediaPolicy):
    """Decode a `data:[<media type>][;base64],<data>` URL (RFC 2397) into the file `out`, a few MiB at a time; the
    size it would decode to is checked first."""
    name = _source_name(url)
    header, comma, payload = url.partition(",")
    if not comma:
        raise RequestError(f"{name} is malformed: no ',' separates its header from its data.")
    if not header.endswith(";base64"):
        data = urllib.parse.unquote_to_bytes(payload)
        if len(data) > policy.max_bytes:
            raise _too_large(name, policy)
        out.write(data)
        return
    if len(payload) // 4 * 3 - 3 > policy.max_bytes:
        raise _too_large(name, policy)
    step = CHUNK * 4  # a multiple of 4 characters decodes on its own
    try:
        for start in range(0, len(payload), step):
            out.write(base64.b64decode(payload[start : start + step], validate=True))
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"{name} does not hold valid base64 data ({error}).") from None


def _local_path(url: str, policy: MediaPolicy) -> str:
    """The real path of a `file://` URL or a plain path inside an allowed folder. One refusal whatever the file is,
    so that nothing about the disk (what exists, what is a video) reaches the client."""
    where = (
        " outside the folders it was started with (--allowed-local-media-path)" if policy.allowed_local_paths else ""
    )
    refusal = RequestError(f"{_source_name(url)}: this server reads no local files{where}.")
    if url.startswith("file:"):
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise refusal
        path = urllib.request.url2pathname(parts.path)
    else:
        path = url
    if not policy.allowed_local_paths or "\0" in path:
        raise refusal
    real = os.path.realpath(os.path.expanduser(path))
    if not any(os.path.commonpath([real, folder]) == folder for folder in policy.allowed_local_paths):
        raise refusal
    return real


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _connect(host: str, port: int, named: bool, policy: MediaPolicy) -> socket.socket:
    """A socket connected to `host`, at an address checked after DNS resolution (the connection goes to that very
    address, so a second lookup cannot swap it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise FetchRefused(f"{host} does not resolve: {error}") from None
    addresses = [info for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    if not named:
        private = [info[4][0] for info in addresses if not _is_public(info[4][0])]
        if private or not addresses:
            raise FetchRefused(f"{host} resolves to a non-public address ({', '.join(private)})")
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(policy.timeout)
        try:
            sock.connect(address)
            return sock
        except OSError:
            sock.close()
    raise FetchRefused(f"no address of {host} accepts connections")


def _download(url: str, out, policy: MediaPolicy):
    """GET an http(s) URL into `out`, following redirects one by one (each checked as the first URL is), within the
    policy's timeouts and byte cap."""
    deadline = time.monotonic() + policy.total_timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchRefused("bad port") from None
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise FetchRefused(f"not an http(s) URL: {url[:100]}")
        named = host in policy.allowed_domains
        if policy.allowed_domains and not named:
            raise FetchRefused(f"{host} is not among --allowed-media-domains")
        sock = _connect(host, port, named, policy)
        if parts.scheme == "https":
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            except (OSError, ssl.SSLError) as error:
                sock.close()
                raise FetchRefused(f"TLS with {host} failed: {error}") from None
        connection = http.client.HTTPConnection(host, port, timeout=policy.timeout)
        connection.sock = sock  # the checked address, already connected (and wrapped in TLS for https)
        try:
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            connection.request("GET", target, headers={"User-Agent": "crosslmm-serve", "Accept-Encoding": "identity"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise FetchRefused(f"HTTP {response.status}")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise _too_large(_source_name(url), policy)
            total = 0
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FetchRefused(f"not downloaded within {policy.total_timeout} s")
                sock.settimeout(min(policy.timeout, left))
                chunk = response.read1(CHUNK)
                if not chunk:
                    return
                total += len(chunk)
                if total > policy.max_bytes:
                    raise _too_large(_source_name(url), policy)
                out.write(chunk)
        except (OSError, http.client.HTTPException) as error:
            raise FetchRefused(f"{type(error).__name__}: {error}") from None
        finally:
            connection.close()
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")


@dataclasses.dataclass
class Medium:
    """A fetched medium: where the processor reads it (a path, or a PIL image) and what messages call it."""

    kind: str  # "video" or "image"
    name: str
    path: str | None = None
    image: object = None


def load_medium(url: str, kind: str, folder: str, policy: MediaPolicy) -> Medium:
    """Fetch or decode one `image_url`/`video_url` into `folder` (a temporary folder the caller deletes). Runs on a
    thread of its own: a download never holds up the event loop or the model."""
    name = _source_name(url)
    if url.startswith("data:") or "://" in url and not url.startswith("file:"):
        fd, path = tempfile.mkstemp(dir=folder)
        with os.fdopen(fd, "wb") as out:
            if url.startswith("data:"):
                _write_data_url(url, out, policy)
            else:
                try:
                    _download(url, out, policy)
                except FetchRefused as reason:
                    logger.warning(f"not fetched: {name}: {reason}")
                    raise RequestError(
                        f"could not fetch {name} (this server fetches media from public http(s) addresses, or the "
                        "hosts it was started with)."
                    ) from None
    else:
        path = _local_path(url, policy)
    if kind == "video":
        return Medium(kind, name, path=path)
    from PIL import Image

    try:
        with Image.open(path) as image:
            return Medium(kind, name, image=image.convert("RGB"))
    except FileNotFoundError:
        raise RequestError(f"Image file not found: {name}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RequestError(f"{name} is not an image Pillow can read ({one_line(error)}).") from None


# --------------------------------------------------------------------------------------------------------------------
# The model: one worker thread builds the inputs, generates and decodes
# --------------------------------------------------------------------------------------------------------------------


def load_model(
    model: str, device: str = "auto", dtype: str = "auto", attn_implementation=None, trust_remote_code=False
):
    """The checkpoint's model (eval mode) and processor, through transformers' Auto classes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = {"dtype": dtype, "device_map": device}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    loaded = AutoModelForImageTextToText.from_pretrained(model, trust_remote_code=trust_remote_code, **kwargs)
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
    return loaded.eval(), processor


class Stopped(Exception):
    """Generation was cut short because the server is shutting down."""


@dataclasses.dataclass
class Job:
    """One request's work for the model, built on the worker thread from the checked request and its media."""

    inputs: dict
    prompt_tokens: int
    generation_config: object
    seed: int | None


class Engine:
    """The one model and processor and the single thread that uses them, so that requests never overlap in them."""

    def __init__(self, model, processor):
        self.model, self.processor = model, processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.positions = model.config.get_text_config().max_position_embeddings
        self.tokens_per_frame = getattr(processor, "tokens_per_frame", 1)
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="crosslmm-generate")
        self.stopping = threading.Event()  # set at shutdown: generation in progress ends at its next token

    async def run(self, function, *args):
        return await asyncio.wrap_future(self.worker.submit(function, *args))

    def frames_problem(self, options: dict) -> RequestError | None:
        """A frame count the client asked for that could never fit the model's positions (checked before any video
        is decoded, so that a request cannot make the server decode thousands of frames for nothing)."""
        for name in ("num_frames", "max_frames"):
            frames = options.get(name)
            if frames is not None and frames * self.tokens_per_frame > self.positions:
                return RequestError(
                    f"chat_template_kwargs.{name}={frames}: {frames} frames take {frames * self.tokens_per_frame} "
                    f"tokens, more than this model's maximum context length of {self.positions} tokens.",
                    param="chat_template_kwargs",
                )
        return None

    def prepare(self, body: dict, media: list[Medium]) -> Job:
        """The model's inputs and generation config for a checked request (on the worker thread)."""
        images = [m.image for m in media if m.kind == "image"]
        videos = [m.path for m in media if m.kind == "video"]
        frame_options = {k: v for k, v in (body.get("chat_template_kwargs") or {}).items() if v is not None}
        try:
            text = self.processor.apply_chat_template(
                template_messages(body["messages"]),
                add_generation_prompt=True,
                tokenize=False,
                chat_template=body.get("chat_template"),
            )
            inputs = self.processor(
                text=[text], images=images or None, videos=videos or None, return_tensors="pt", **frame_options
            )
        except INPUT_ERRORS as error:
            message = one_line(error)
            for medium in media:  # name a medium as the client did, not by the server's temporary file
                if medium.path:
                    message = message.replace(medium.path, medium.name)
            raise RequestError(message[:1000]) from None
        except Exception as error:  # a request's chat template that fails to render (jinja2's errors)
            if body.get("chat_template") is None or "jinja2" not in type(error).__module__:
                raise
            raise RequestError(f"chat_template: {one_line(error)}"[:1000], param="chat_template") from None
        prompt_tokens = int(inputs["input_ids"].shape[1])
        return Job(inputs, prompt_tokens, self.generation_config(body, prompt_tokens), body.get("seed"))

    def generation_config(self, body: dict, prompt_tokens: int):
        """The checkpoint's generation config with the request's options (OpenAI's meanings), its length checked
        against the model's positions."""
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        room = self.positions - prompt_tokens
        if (asked or 1) > room:
            raise RequestError(
                f"This model's maximum context length is {self.positions} tokens. However, you requested "
                f"{prompt_tokens + (asked or 1)} tokens ({prompt_tokens} in the messages, {asked or 1} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages",
            )
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = asked or min(DEFAULT_MAX_TOKENS, room)
        temperature, top_p = body.get("temperature"), body.get("top_p")
        if temperature == 0:
            config.do_sample = False
        elif temperature is not None or top_p is not None:
            config.do_sample = True
        if temperature:
            config.temperature = float(temperature)
        if top_p is not None:
            config.top_p = float(top_p)
        if body.get("frequency_penalty") is not None:
            config.repetition_penalty = 1.0 + body["frequency_penalty"]
        stop = body.get("stop")
        if stop:
            config.stop_strings = [stop] if isinstance(stop, str) else stop
        return config

    def generate(self, job: Job, cancelled: threading.Event, streamer=None) -> dict:
        """Generate (on the worker thread); the answer's text, token counts and finish reason."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        engine = self

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return cancelled.is_set() or engine.stopping.is_set()

        try:
            if job.seed is not None:
                torch.manual_seed(job.seed)
            device, dtype = self.model.device, self.model.dtype
            inputs = {
                k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
                for k, v in job.inputs.items()
            }
            with torch.inference_mode():
                sequences = self.model.generate(
                    **inputs,
                    generation_config=job.generation_config,
                    tokenizer=self.tokenizer,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([Cancelled()]),
                )
        finally:
            if streamer is not None:
                streamer.on_finalized_text("", stream_end=True)  # a no-op if generate ended the stream itself
        if self.stopping.is_set():
            raise Stopped()
        new = sequences[0, job.prompt_tokens :].tolist()
        eos = job.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        hit_length = len(new) >= job.generation_config.max_new_tokens and (not new or new[-1] not in eos)
        return {
            "text": self.tokenizer.decode(new, skip_special_tokens=True),
            "finish_reason": "length" if hit_length else "stop",
            "usage": {
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": len(new),
                "total_tokens": job.prompt_tokens + len(new),
            },
        }


def template_messages(messages: list) -> list:
    """The request's messages as CrossLMM's chat template takes them: media parts become `video`/`image` blocks (the
    media themselves go to the processor, in the same order)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [
                {"type": "text", "text": part["text"]} if part["type"] == "text" else {"type": part["type"][:-4]}
                for part in content
            ]
        out.append({"role": message["role"], "content": "" if content is None else content})
    return out


def make_streamer(tokenizer):
    """A `TextIteratorStreamer` that holds back an incomplete last character: random or byte-level tokens need not
    end on a whole UTF-8 character, which decodes as U+FFFD until the next token completes it."""
    from transformers import TextIteratorStreamer

    class Streamer(TextIteratorStreamer):
        ended = False

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if self.ended:
                return
            self.ended = stream_end
            super().on_finalized_text(text.rstrip("\ufffd") if stream_end else text, stream_end)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------------------------
# The HTTP API
# --------------------------------------------------------------------------------------------------------------------


def create_app(
    engine: Engine, served: str, policy: MediaPolicy, api_key: str | None = None, trust_chat_template=False
):
    """The FastAPI app: `/v1/chat/completions`, `/v1/models`, `/health`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="crosslmm-serve", docs_url=None, redoc_url=None, openapi_url=None)
    fetchers = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="crosslmm-fetch")
    scratch = tempfile.TemporaryDirectory(prefix="crosslmm-serve-")
    app.router.on_shutdown.append(lambda: (fetchers.shutdown(wait=False, cancel_futures=True), scratch.cleanup()))

    def error(problem: RequestError) -> JSONResponse:
        return JSONResponse(error_body(problem.message, problem.status, problem.param), problem.status)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(RequestError("Incorrect or missing API key (Authorization: Bearer ...).", 401))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        owner = "local" if os.path.exists(served) else served.partition("/")[0]
        return {"object": "list", "data": [{"id": served, "object": "model", "created": 0, "owned_by": owner}]}

    async def read_body(request: Request) -> dict:
        """The JSON body, read up to the cap (a larger one is refused before it is all received)."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > policy.max_body_bytes:
            raise RequestError(
                f"The request body is larger than this server's limit of {policy.max_body_bytes} bytes.", 413
            )
        received = bytearray()
        async for chunk in request.stream():
            received += chunk
            if len(received) > policy.max_body_bytes:
                raise RequestError(
                    f"The request body is larger than this server's limit of {policy.max_body_bytes} bytes.", 413
                )
        try:
            body = json.loads(received)
        except (ValueError, RecursionError):
            raise RequestError("The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise RequestError("The request body must be a JSON object.")
        return body

    async def fetch_media(body: dict, folder: str) -> list[Medium]:
        loop = asyncio.get_running_loop()
        parts = [
            part
            for message in body["messages"]
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if part["type"] != "text"
        ]
        media = []
        for part in parts:
            kind = part["type"][:-4]
            media.append(await loop.run_in_executor(fetchers, load_medium, media_url(part), kind, folder, policy))
            part[part["type"]] = None  # a data: URL's text is no longer needed
        return media

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            body = await read_body(request)
            problem = request_problem(body, served, trust_chat_template) or engine.frames_problem(
                body.get("chat_template_kwargs") or {}
            )
            if problem:
                raise problem
            with tempfile.TemporaryDirectory(dir=scratch.name) as folder:
                media = await fetch_media(body, folder)
                job = await engine.run(engine.prepare, body, media)
        except RequestError as problem:
            logger.info(f"[{request_id}] refused: {problem.message}")
            return error(problem)
        if body.get("stream"):
            include_usage = (body.get("stream_options") or {}).get("include_usage", False)
            return StreamingResponse(stream(job, request_id, include_usage), media_type="text/event-stream")
        cancelled = threading.Event()
        try:
            answer = await engine.run(engine.generate, job, cancelled)
        except Stopped:
            return error(RequestError("The server is shutting down; the request was not answered.", 503))
        finally:
            cancelled.set()
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer["text"]},
                    "finish_reason": answer["finish_reason"],
                    "logprobs": None,
                }
            ],
            "usage": answer["usage"],
        }

    async def stream(job: Job, request_id: str, include_usage: bool):
        """Server-sent events: the role, the text as it comes, the finish reason (and the usage if asked), [DONE]."""
        created = int(time.time())

        def event(delta=None, finish_reason=None, usage=None) -> str:
            chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": served}
            chunk["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
            if usage is not None:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        cancelled = threading.Event()
        streamer = make_streamer(engine.tokenizer)
        answer = asyncio.ensure_future(engine.run(engine.generate, job, cancelled, streamer))
        answer.add_done_callback(lambda done: done.cancelled() or done.exception())  # read, if the client left
        try:
            yield event({"role": "assistant", "content": ""})
            while (text := await asyncio.to_thread(next, streamer, None)) is not None:
                if text:
                    yield event({"content": text})
            try:
                result = await answer
            except Stopped:
                message = "The server is shutting down; the answer was cut short."
                yield f"data: {json.dumps(error_body(message, 503))}\n\n"
                return
            except Exception:  # the headers are sent: the stream can only say so
                logger.exception(f"[{request_id}] generation failed")
                yield f"data: {json.dumps(error_body('Generation failed on the server.', 500))}\n\n"
                return
            yield event({}, result["finish_reason"])
            if include_usage:
                yield event(usage=result["usage"])
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # the client went away, or the answer is complete: the worker moves on

    return app


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="crosslmm-serve",
        description="Serve a CrossLMM checkpoint through an OpenAI-compatible API (/v1/chat/completions).",
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder or Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (default: auto, i.e. device_map='auto')"
    )
    parser.add_argument(
        "--dtype", default="auto", help="bfloat16, float16, float32 or auto, the checkpoint's (default: auto)"
    )
    parser.add_argument("--attn-implementation", default=None, help="sdpa, eager, flash_attention_2, ...")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the checkpoint's own model code instead of this package's",
    )
    security = parser.add_argument_group("what clients may make the server read (see the README's Security section)")
    security.add_argument(
        "--api-key",
        default=os.environ.get("CROSSLMM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $CROSSLMM_API_KEY, else no key)",
    )
    security.add_argument(
        "--allowed-local-media-path",
        action="append",
        default=[],
        metavar="DIR",
        help="let requests name files (file:// URLs or paths) inside DIR; repeatable (default: no local files)",
    )
    security.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=[],
        metavar="HOST",
        help="fetch http(s) media from these hosts only, at whatever address they resolve to, private ones included "
        "(default: any host at a public address)",
    )
    security.add_argument(
        "--max-media-bytes",
        type=int,
        default=256 << 20,
        help="largest medium fetched or decoded, in bytes (default: 256 MiB); a request body may be 4/3 of it + 1 MiB",
    )
    security.add_argument(
        "--media-timeout", type=float, default=10.0, help="seconds to connect and between bytes received (default: 10)"
    )
    security.add_argument(
        "--media-total-timeout", type=float, default=120.0, help="seconds for one whole download (default: 120)"
    )
    security.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept a request's own `chat_template` (default: refused with a 400)",
    )
    parser.add_argument("--log-level", default="warning", help="the server's log level (default: warning)")
    return parser.parse_args(argv)


def check_model(model: str, trust_remote_code: bool) -> str:
    """The checkpoint folder or Hub id, once its config says it is a CrossLMM checkpoint."""
    from transformers import AutoConfig

    path = os.path.expanduser(model)
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"{model} is not a checkpoint folder (no config.json in it)")
        model = path
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load the config of {model}: {one_line(error)}") from None
    if config.model_type != MODEL_TYPE:
        raise UsageError(f"{model} is a {config.model_type!r} checkpoint, not CrossLMM")
    return model


def media_policy(args: argparse.Namespace) -> MediaPolicy:
    """The command line's media options, checked."""
    folders = []
    for folder in args.allowed_local_media_path:
        if not os.path.isdir(folder):
            raise UsageError(f"--allowed-local-media-path {folder}: not a folder")
        folders.append(os.path.realpath(folder))
    for name, value in (("--max-media-bytes", args.max_media_bytes), ("--media-timeout", args.media_timeout)):
        if not value > 0:
            raise UsageError(f"{name} must be positive, got {value}")
    if not args.media_total_timeout > 0:
        raise UsageError(f"--media-total-timeout must be positive, got {args.media_total_timeout}")
    return MediaPolicy(
        allowed_local_paths=tuple(folders),
        allowed_domains=tuple(host.lower().strip("[]") for host in args.allowed_media_domains),
        max_bytes=args.max_media_bytes,
        timeout=args.media_timeout,
        total_timeout=args.media_total_timeout,
    )


def serve(args: argparse.Namespace):
    """Load the checkpoint and serve it until interrupted (SIGINT/SIGTERM: generation in progress stops at its next
    token, open streams end with an error event, and the process exits)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UsageError("serving needs FastAPI and uvicorn: pip install 'crosslmm[serve]'") from None
    if args.dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise UsageError(f"--dtype {args.dtype!r}: use bfloat16, float16, float32 or auto")
    policy = media_policy(args)
    try:
        log_to_stderr("crosslmm-serve: %(levelname)s: %(message)s", args.log_level)
    except ValueError:
        raise UsageError(f"--log-level {args.log_level!r}: use debug, info, warning, error or critical") from None
    if not args.trust_remote_code:
        from crosslmm.auto import register_auto_classes

        register_auto_classes()
    model = check_model(args.model, args.trust_remote_code)
    engine = Engine(*load_model(model, args.device, args.dtype, args.attn_implementation, args.trust_remote_code))
    app = create_app(engine, model, policy, args.api_key, args.trust_request_chat_template)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.stopping.set()  # ends generation in progress, so that its request can finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5
    )
    Server(config).run()
    engine.worker.shutdown(wait=True, cancel_futures=True)


def main(argv=None) -> int:
    """Console script `crosslmm-serve`: serves until interrupted; 2 (one error line on stderr) on bad input."""
    from crosslmm.versions import warn_if_untested

    warn_if_untested("crosslmm-serve")
    args = parse_args(argv)
    try:
        serve(args)
    except UsageError as error:
        print(f"crosslmm-serve: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


__all__ = ["Engine", "MediaPolicy", "create_app", "load_medium", "load_model", "main", "request_problem"]

if __name__ == "__main__":
    sys.exit(main())
