"""The model and processor and the one worker thread that uses them: a request's inputs built with the processor's
chat template, `generate` with the request's options, streaming through `TextIteratorStreamer`."""

import asyncio
import concurrent.futures
import copy
import dataclasses
import threading

from crosslmm.errors import one_line
from crosslmm.serve.checks import RequestError
from crosslmm.serve.media import Medium


DEFAULT_MAX_TOKENS = 1024  # an answer's length when the request sets none (less if the model's positions run out)
# What the processor and the reader raise for unusable input: a missing file (FileNotFoundError), a file that is not
# a video or is corrupt (VideoLoadError, a ValueError), a time window outside the video or a placeholder in the text
# (ValueError), an option of the wrong type (TypeError).
INPUT_ERRORS = (ValueError, TypeError, OSError, KeyError)


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
