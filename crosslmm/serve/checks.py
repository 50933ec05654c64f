"""What a chat completion request must be, judged before any medium is fetched or the model runs: the errors a
client gets (`RequestError`, as OpenAI-style bodies) and the checks of fields, messages and options."""

import math


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


class RequestError(Exception):
    """A request the server will not serve: its HTTP status and the one line that says why."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


def error_body(message: str, status: int, param: str | None = None) -> dict:
    """An OpenAI-style error body (`openai` raises it as `BadRequestError` & co. with this message)."""
    kind = {401: "authentication_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


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
