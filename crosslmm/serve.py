"""`crosslmm-serve`: a CrossLMM checkpoint behind transformers' own OpenAI-compatible server.

    crosslmm-serve [--host 127.0.0.1] [--port 8000] [--device auto] [--dtype auto] MODEL

This runs `transformers serve` (`transformers.cli.serve.Serve`: `/v1/chat/completions` with streaming and sampling
options, `/v1/models`, `/health`, ...) pinned to one CrossLMM checkpoint. transformers' server cannot load a
remote-code model by itself: its model manager picks the class with `getattr(transformers, config.architectures[0])`
(never reading `auto_map`) and knows the modality of built-in classes only. So two of its parts are replaced by
subclasses while the server runs (`_crosslmm_parts`), everything else is transformers' own:

- `CrossLMMModelManager` loads the checkpoint with `AutoModelForImageTextToText` and reports it as an
  image-text-to-text model ("VLM"), so that `video_url` and `image_url` message parts reach the processor. By default
  the classes are this package's, registered through transformers' public Auto registration API
  (`crosslmm.auto.register_auto_classes`); with `--trust-remote-code` they are the checkpoint's own code files.
- `CrossLMMChatCompletionHandler` answers a request it cannot serve (a missing, unreadable or corrupt video, a bad
  frame or sampling option, a malformed message) with a 400 whose message names the problem, where transformers
  would answer 500; makes `temperature` > 0 or `top_p` sample (OpenAI's meaning; transformers only sets them on the
  checkpoint's generation config, which ignores them unless it samples already); and honours
  `max_completion_tokens` on every supported transformers release (5.17 ignores it).

Videos are `{"type": "video_url", "video_url": {"url": ...}}` message parts: a `file://` URL, a local path, an
http(s) URL or a base64 `data:` URL. Frame options go in the request's `chat_template_kwargs`: `num_frames` (the
server's default is 32), or `fps` with `max_frames`, and `start_time`/`end_time` (seconds).
"""

import argparse
import contextlib
import os
import sys
from unittest import mock

from transformers.cli.serving import chat_completion as _chat_completion
from transformers.cli.serving import model_manager as _model_manager
from transformers.cli.serving.utils import Modality
from transformers.utils.import_utils import is_serve_available


MODEL_TYPE = "crosslmm"
# Frame options a request may give in `chat_template_kwargs`, with what each must be.
FRAME_OPTIONS = {
    "num_frames": "a positive integer",
    "max_frames": "a positive integer",
    "fps": "a positive number",
    "start_time": "a number of seconds, 0 or more",
    "end_time": "a positive number of seconds",
}
CONTENT_TYPES = ("text", "image_url", "video_url")
ROLES = ("system", "user", "assistant")
# What the processor and the reader raise for unusable input: a missing file (FileNotFoundError) or URL (OSError), a
# file that is not a video or is corrupt (VideoLoadError, a ValueError), a time window outside the video or too many
# placeholders (ValueError), an option of the wrong type (TypeError).
INPUT_ERRORS = (ValueError, TypeError, OSError, KeyError)


def _error_response(status: int, message: str, param: str | None = None):
    """An OpenAI-style error body (`openai` raises it as `BadRequestError` & co. with this message)."""
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _frame_option_problem(name: str, value) -> str | None:
    if value is None:
        return None
    if name in ("num_frames", "max_frames"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    elif name == "start_time":
        ok = _is_number(value) and value >= 0
    else:
        ok = _is_number(value) and value > 0
    return None if ok else f"chat_template_kwargs.{name} must be {FRAME_OPTIONS[name]}, got {value!r}."


def _message_problem(index: int, message) -> str | None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        return f"{where} must be an object with 'role' and 'content'."
    if message.get("role") not in ROLES:
        return f"{where}.role must be one of {', '.join(ROLES)}, got {message.get('role')!r}."
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
            continue
        url = part.get(kind)
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            return f'{at} needs "{kind}": {{"url": "..."}} (a file:// URL, a path, an http(s) URL or a data: URL).'
    return None


def request_problem(body: dict) -> tuple[str, str] | None:
    """(message, parameter) naming what makes a chat completion request unusable for CrossLMM, or None.

    Checked before anything runs: the messages' shape and content types, frame options, and the sampling options whose
    bad values would otherwise only fail inside `generate` (after a streaming answer has started).
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list of chat messages.", "messages"
    for index, message in enumerate(messages):
        problem = _message_problem(index, message)
        if problem:
            return problem, "messages"
    options = body.get("chat_template_kwargs") or {}
    if not isinstance(options, dict):
        return "chat_template_kwargs must be an object.", "chat_template_kwargs"
    for name in FRAME_OPTIONS:
        problem = _frame_option_problem(name, options.get(name))
        if problem:
            return problem, "chat_template_kwargs"
    checks = {
        "temperature": (lambda v: _is_number(v) and v >= 0, "a number, 0 or more"),
        "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "max_tokens": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
        "max_completion_tokens": (
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
            "a positive integer",
        ),
        # transformers turns it into repetition_penalty = 1 + frequency_penalty, which must stay positive.
        "frequency_penalty": (lambda v: _is_number(v) and v > -1, "a number greater than -1"),
        "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        "stop": (
            lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
            "a string or a list of strings",
        ),
    }
    for name, (valid, expected) in checks.items():
        value = body.get(name)
        if value is not None and not valid(value):
            return f"{name} must be {expected}, got {value!r}.", name
    return None


def _one_line(error: BaseException) -> str:
    """An exception as the one line a client sees: its message (KeyError's repr stripped), without the traceback."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    text = " ".join(text.split())
    return text or type(error).__name__


class CrossLMMModelManager(_model_manager.ModelManager):
    """transformers' model manager, loading CrossLMM checkpoints.

    transformers 5.17-5.24 load the model class named by `getattr(transformers, config.architectures[0])` and detect
    the modality from built-in class names only; both fail for a model that is not part of transformers.
    """

    def _load_model(self, model_id_and_revision: str, tqdm_class=None, progress_callback=None, gguf_file=None):
        from transformers import AutoModelForImageTextToText

        model_id, revision = _split_revision(model_id_and_revision)
        if progress_callback is not None:
            progress_callback({"status": "loading", "model": model_id_and_revision, "stage": "model"})
        kwargs = {"revision": revision, "dtype": self.dtype, "device_map": self.device}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        if tqdm_class is not None:
            kwargs["tqdm_class"] = tqdm_class
        model = AutoModelForImageTextToText.from_pretrained(
            model_id, trust_remote_code=self.trust_remote_code, **kwargs
        )
        return model.eval()

    def get_gen_models(self, cache_dir=None) -> list:
        """`/v1/models` of transformers 5.17 lists the Hub cache's models with built-in architectures; list the served
        one instead, as 5.24 does for a server pinned to one model (5.24 no longer calls this)."""
        owner = "local" if os.path.exists(self.force_model) else self.force_model.partition("/")[0]
        return [{"id": self.force_model, "object": "model", "created": 0, "owned_by": owner}]

    @staticmethod
    def get_model_modality(model, processor=None):
        # An image-text-to-text model ("VLM") gets text, image_url and video_url parts. "MULTIMODAL" would also ask
        # the processor for the videos' audio tracks, which CrossLMM does not take.
        if "video" in getattr(model, "input_modalities", ()):
            return Modality.VLM
        return _model_manager.ModelManager.get_model_modality(model, processor=processor)


def _split_revision(name: str) -> tuple[str, str | None]:
    """transformers 5.17 names every model `id@revision` (`@main` for a local folder too); 5.24 keeps an existing
    local path as it is. Either way: the folder or Hub id, and the revision (None for a folder)."""
    if os.path.exists(name):
        return name, None
    model_id, _, revision = name.rpartition("@") if "@" in name else (name, "", "")
    if os.path.exists(model_id):
        return model_id, None
    return model_id, revision or None


class CrossLMMChatCompletionHandler(_chat_completion.ChatCompletionHandler):
    """transformers' `/v1/chat/completions` handler with CrossLMM's request checks and error answers."""

    async def handle_request(self, body: dict, request_id: str):
        if not isinstance(body, dict):
            return _error_response(400, "The request body must be a JSON object.")
        problem = request_problem(body)
        if problem is not None:
            return _error_response(400, *problem)
        from fastapi import HTTPException

        try:
            return await super().handle_request(body, request_id)
        except HTTPException as error:  # transformers' own checks (unexpected fields, another model asked for)
            return _error_response(error.status_code, _one_line(Exception(error.detail)))
        except INPUT_ERRORS as error:
            # Raised while reading the videos and building the prompt (or, without streaming, by `generate` for a
            # generation option it rejects): the request's fault, and nothing is left half-done.
            _model_manager.logger.warning(f"[Request {request_id}] rejected: {type(error).__name__}: {error}")
            return _error_response(400, _one_line(error))

    # Once the prompt is built, generation and decoding need the tokenizer only. transformers hands what it gets here
    # to `generate()` as its `tokenizer`, where a request's `stop` strings need a tokenizer's vocabulary (a processor
    # has none, and calling it tokenizes nothing: its first argument is images).
    def _streaming(self, request_id, model, processor, *args, **kwargs):
        return super()._streaming(request_id, model, getattr(processor, "tokenizer", processor), *args, **kwargs)

    async def _non_streaming(self, request_id, model, processor, *args, **kwargs):
        tokenizer = getattr(processor, "tokenizer", processor)
        return await super()._non_streaming(request_id, model, tokenizer, *args, **kwargs)

    def _build_generation_config(self, body: dict, model_generation_config, use_cb: bool = False):
        config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
        if body.get("max_completion_tokens") is not None:  # transformers 5.17 ignores this field
            config.max_new_tokens = int(body["max_completion_tokens"])
        temperature = body.get("temperature")
        if temperature == 0:
            config.do_sample = False
        elif temperature is not None or body.get("top_p") is not None:
            config.do_sample = True
        return config


@contextlib.contextmanager
def _crosslmm_parts():
    """While active, transformers' `Serve` builds its server with CrossLMM's model manager and chat handler (it
    imports both from these modules when it starts)."""
    with (
        mock.patch.object(_model_manager, "ModelManager", CrossLMMModelManager),
        mock.patch.object(_chat_completion, "ChatCompletionHandler", CrossLMMChatCompletionHandler),
    ):
        yield


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


class UsageError(Exception):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="crosslmm-serve",
        description="Serve a CrossLMM checkpoint with transformers' OpenAI-compatible server (/v1/chat/completions).",
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
    parser.add_argument("--log-level", default="warning", help="transformers' log level (default: warning)")
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
        raise UsageError(f"cannot load the config of {model}: {_one_line(error)}") from None
    if config.model_type != MODEL_TYPE:
        raise UsageError(
            f"{model} is a {config.model_type!r} checkpoint, not CrossLMM; serve it with `transformers serve`"
        )
    return model


def serve(args: argparse.Namespace):
    """Load the checkpoint and serve it until interrupted."""
    if not is_serve_available():
        raise UsageError("serving needs FastAPI, uvicorn and openai: pip install 'crosslmm[serve]'")
    if not args.trust_remote_code:
        from crosslmm.auto import register_auto_classes

        register_auto_classes()
    model = check_model(args.model, args.trust_remote_code)
    if args.dtype != "auto" and args.dtype not in ("bfloat16", "float16", "float32"):
        raise UsageError(f"--dtype {args.dtype!r}: use bfloat16, float16, float32 or auto")

    from transformers.cli.serve import Serve

    with _crosslmm_parts():
        Serve(
            force_model=model,
            host=args.host,
            port=args.port,
            device=args.device,
            dtype=args.dtype,
            attn_implementation=args.attn_implementation,
            trust_remote_code=args.trust_remote_code,
            log_level=args.log_level,
        )


def main(argv=None) -> int:
    """Console script `crosslmm-serve`: serves until interrupted; 2 (one error line on stderr) on bad input."""
    args = parse_args(argv)
    try:
        serve(args)
    except UsageError as error:
        print(f"crosslmm-serve: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


__all__ = ["CrossLMMChatCompletionHandler", "CrossLMMModelManager", "main", "request_problem"]

if __name__ == "__main__":
    sys.exit(main())
