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
or processor (building the inputs, `generate`, decoding) runs on one worker thread, one request at a ti

The package: `checks` (what a request must be, judged before anything is fetched), `media` (what the server may read
and how it fetches it), `engine` (the model and its one worker thread), `app` (the HTTP API), `command` (the command
line).
"""

from crosslmm.serve.app import create_app
from crosslmm.serve.checks import request_problem
from crosslmm.serve.command import main
from crosslmm.serve.engine import Engine, load_model
from crosslmm.serve.media import MediaPolicy, load_medium


__all__ = ["Engine", "MediaPolicy", "create_app", "load_medium", "load_model", "main", "request_problem"]
