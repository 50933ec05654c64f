"""`--model crosslmm` for lmms-eval (0.7.x), registered through its `lmms_eval.models` entry point group.

    pip install 'crosslmm[eval]'
    python -m lmms_eval --model crosslmm --model_args pretrained=PATH_OR_HUB_ID,num_frames=32 --tasks videomme \\
        --batch_size 1 --output_path results/ --log_samples

lmms-eval builds every model from its registry: the built-in ones plus the `ModelManifest`s that installed packages
declare under the entry point group `lmms_eval.models` (`crosslmm = crosslmm.lmms_eval_manifest:manifest` in
setup.cfg). The `crosslmm` manifest names two classes of this module, as lmms-eval's own models do:

- `CrossLMMChat` (the default, lmms-eval's "chat" protocol): each sample arrives as chat messages
  (`doc_to_messages`), with a video's `start_time`/`end_time` when the task gives them. Runs `generate_until` and
  `generate_until_multi_round`.
- `CrossLMMSimple` (`--force_simple`, lmms-eval's "simple" protocol): a prompt string plus `doc_to_visual`. Runs
  `generate_until`, `generate_until_multi_round` and `loglikelihood`, which the multiple-choice-by-likelihood tasks
  (`output_type: multiple_choice`, e.g. `perceptiontest_val_mcppl`) need: lmms-eval builds chat-protocol requests for
  generation tasks only.

Model arguments (`--model_args key=value,...`): `pretrained` (checkpoint folder or Hub id), frame sampling
`num_frames` / `fps` (with `max_frames`), `dtype` (auto, bfloat16, float16, float32), `device` (default: cuda when
available), `attn_implementation`, `batch_size` (or lmms-eval's `--batch_size`; batches are padded on the left),
`max_new_tokens` (when a task sets none) and `trust_remote_code` (run the checkpoint's own code instead of this
package's). A video's start/end time from the task (`video_start`/`video_end` of a `doc_to_visual` dict, or
`start_time`/`end_time` of a chat video part) becomes the processor's `start_time`/`end_time`: frames are sampled
inside that window.
"""

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from lmms_eval import utils as lmms_utils
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from tqdm import tqdm

from crosslmm import IMAGE_SUFFIXES
from crosslmm.errors import UsageError, check_checkpoint
from crosslmm.lmms_eval_manifest import MODEL_ID


DEFAULT_MAX_NEW_TOKENS = 256
PLACEHOLDERS = ("<video>", "<image>")


def doc_to_video(doc) -> list:
    """`doc_to_visual` for local video tasks: the sample's `video` (a path; relative paths are taken from the
    directory in $CROSSLMM_EVAL_VIDEO_DIR, else the working directory), with its `start_time`/`end_time` window
    when it has one."""
    path = os.path.join(os.environ.get("CROSSLMM_EVAL_VIDEO_DIR", ""), os.path.expanduser(doc["video"]))
    start, end = doc.get("start_time"), doc.get("end_time")
    if start is None and end is None:
        return [path]
    return [{"type": "video", "path": path, "video_start": start, "video_end": end}]


# --------------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Prompt:
    """One sample as CrossLMM's processor takes it: chat messages whose media parts are placeholders, the videos
    (paths or frame arrays) and images in placeholder order, and the time window of its videos."""

    messages: list
    videos: list = field(default_factory=list)
    images: list = field(default_factory=list)
    window: tuple = (None, None)

    def batch_key(self) -> str:
        return json.dumps(self.window)


def _clean_text(text: str) -> str:
    """A task's text without `<video>`/`<image>` markers, which the processor would count as placeholders."""
    cleaned = text
    for marker in PLACEHOLDERS:
        cleaned = cleaned.replace(marker, "")
    return cleaned.strip() if cleaned != text else text


def _media(visual, start=None, end=None):
    """("video" | "image", source, start, end) for one of lmms-eval's visuals: a path, a PIL image, an array of
    frames, a {"path"/"url"/"video": ..., "video_start", "video_end"} dict, or a chat protocol content part."""
    from PIL import Image

    kind = getattr(visual, "type", None)
    if kind is not None:  # a protocol content part (ChatVideoContent, ChatImageContent, ...)
        if kind == "text":
            raise TypeError("a text part is not a visual")
        return _media(visual.url, getattr(visual, "start_time", None), getattr(visual, "end_time", None))
    if isinstance(visual, dict):
        kind = visual.get("type", "video")
        source = visual.get("path") or visual.get("url") or visual.get("video") or visual.get("image")
        if start is None:
            start = visual.get("video_start", visual.get("start_time"))
        if end is None:
            end = visual.get("video_end", visual.get("end_time"))
        if kind == "audio":
            raise ValueError("CrossLMM takes no audio input.")
        return (*_media(source)[:2], start, end) if kind == "video" else _media(source)
    if isinstance(visual, Image.Image):
        return "image", visual.convert("RGB"), None, None
    if isinstance(visual, np.ndarray) and visual.ndim == 4:
        return "video", visual, start, end
    if isinstance(visual, (str, os.PathLike)):
        path = os.fspath(visual)
        if path.lower().endswith(IMAGE_SUFFIXES):
            return "image", Image.open(path).convert("RGB"), None, None
        return "video", path, start, end
    raise TypeError(f"CrossLMM cannot take a visual of type {type(visual).__name__}: {visual!r:.200}")


def _positive(name: str, value, kind: type):
    """A model argument as a positive int or finite float (lmms-eval passes numbers, or strings it could not parse),
    or a UsageError naming it: checked when the model is built, not when the first sample fails."""
    number = None
    if isinstance(value, float) and value.is_integer():  # lmms-eval reads "-5" as -5.0
        value = int(value)
    if not isinstance(value, bool):
        try:
            number = kind(value) if kind is float or isinstance(value, int) else int(str(value).strip())
        except (TypeError, ValueError, OverflowError):
            pass
    if number is None or not math.isfinite(number) or number <= 0:
        expected = "a positive integer" if kind is int else "a positive number"
        raise UsageError(f"crosslmm: {name} must be {expected}, got {value!r}")
    return number


def _checkpoint(pretrained) -> str:
    """`pretrained` checked as every command checks `--model` (a missing folder would otherwise be reported by the
    Hub client as an invalid repository id)."""
    try:
        return check_checkpoint(str(pretrained), "pretrained=")
    except UsageError as error:
        raise UsageError(f"crosslmm: {error}") from None


def _window(windows: list, where: str) -> tuple:
    windows = set(windows) or {(None, None)}
    if len(windows) > 1:
        raise ValueError(
            f"{where}: the videos of one sample must share one time window, got {sorted(windows, key=str)}"
        )
    (window,) = windows
    return tuple(None if t is None else float(t) for t in window)


def prompt_from_visuals(visuals, text: str) -> Prompt:
    """The simple protocol's sample: one user turn with the visuals, then the text."""
    parts, videos, images, windows = [], [], [], []
    for visual in visuals or []:
        kind, source, start, end = _media(visual)
        parts.append({"type": kind})
        (videos if kind == "video" else images).append(source)
        if kind == "video":
            windows.append((start, end))
    parts.append({"type": "text", "text": _clean_text(text)})
    return Prompt([{"role": "user", "content": parts}], videos, images, _window(windows, "a sample"))


def prompt_from_messages(raw_messages) -> Prompt:
    """The chat protocol's sample: lmms-eval's messages (`ChatMessages`), media parts in order."""
    chat = raw_messages if isinstance(raw_messages, ChatMessages) else ChatMessages(messages=raw_messages)
    messages, videos, images, windows = [], [], [], []
    for message in chat.messages:
        parts = []
        for content in message.content:
            if content.type == "text":
                parts.append({"type": "text", "text": _clean_text(content.text)})
                continue
            if content.type == "audio":
                raise ValueError("CrossLMM takes no audio input.")
            kind, source, start, end = _media(content)
            parts.append({"type": kind})
            (videos if kind == "video" else images).append(source)
            if kind == "video":
                windows.append((start, end))
        messages.append({"role": message.role, "content": parts})
    return Prompt(messages, videos, images, _window(windows, "a conversation"))


def _likelihood_response(loss: float, is_greedy: bool):
    """A loglikelihood result as lmms-eval's evaluator keeps it intact.

    lmms-eval 0.7.3 passes every response through `unwrap_generation_output`, which turns anything but text (or
    text with token counts) into its string: a (loss, is_greedy) pair becomes "(3.2, False)" and its own
    multiple_choice scoring then fails for every model (the built-in `dummy` model too). Wrapped in its
    `GenerationResult`, the pair passes through unchanged. Releases that keep pairs get them as they are.
    """
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output

    pair = (loss, is_greedy)
    if unwrap_generation_output(pair)[0] == pair:
        return pair
    return GenerationResult(text=pair)


def _batches(items: list, key, size: int):
    """Indices of `items` in batches of at most `size`, each batch of one `key`, in first-seen order."""
    groups = defaultdict(list)
    for index, item in enumerate(items):
        groups[key(item)].append(index)
    for indices in groups.values():
        for start in range(0, len(indices), size):
            yield indices[start : start + size]


def _cut_at_stop_strings(text: str, until) -> str:
    stops = [until] if isinstance(until, str) else [stop for stop in (until or []) if stop]
    cuts = [text.find(stop) for stop in stops if stop in text]
    return text[: min(cuts)] if cuts else text


# --------------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------------


class CrossLMMSimple(lmms):
    """CrossLMM for lmms-eval's simple protocol (a prompt string and `doc_to_visual`)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        dtype: str = "auto",
        device: str | None = None,
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        trust_remote_code: bool = False,
        max_batch_size: int | None = None,  # lmms-eval passes it; CrossLMM has no automatic batch size
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise UsageError(f"crosslmm: unknown model argument(s) {sorted(unknown)}")
        if str(batch_size).startswith("auto"):
            raise UsageError("crosslmm: give --batch_size as a number (no automatic batch size)")
        self.batch_size_per_gpu = _positive("batch_size", batch_size, int)
        self.video_options = {
            name: _positive(name, value, float if name == "fps" else int)
            for name, value in (("num_frames", num_frames), ("fps", fps), ("max_frames", max_frames))
            if value is not None
        }
        self.max_new_tokens = _positive("max_new_tokens", max_new_tokens, int)
        pretrained = _checkpoint(pretrained)

        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        if not trust_remote_code:
            from crosslmm.auto import register_auto_classes

            register_auto_classes()
        config = AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        if config.model_type != MODEL_ID:
            raise UsageError(f"crosslmm: {pretrained} is a {config.model_type!r} checkpoint, not CrossLMM")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise UsageError(f"crosslmm: dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
        kwargs = {"dtype": dtype if dtype == "auto" else getattr(torch, dtype), "trust_remote_code": trust_remote_code}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        self._model = AutoModelForImageTextToText.from_pretrained(pretrained, **kwargs).to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        self.processor.tokenizer.padding_side = "left"  # batched generation: each row's answer follows its prompt

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lmms-eval always passes its command line's `batch_size` (default 1) and `device` next to the model
        arguments; a value given in `--model_args` wins instead of clashing with them."""
        args = lmms_utils.simple_parse_args_string(arg_string)
        extra = {
            key: value for key, value in (additional_config or {}).items() if value is not None and key not in args
        }
        return cls(**args, **extra)

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    # ----------------------------------------------------------------------------------------------------------------
    # Running the model
    # ----------------------------------------------------------------------------------------------------------------

    def _inputs(self, prompts: list, add_generation_prompt: bool = True):
        """Tokenized, left-padded prompts with their frames, on the model's device (floating tensors in its dtype).
        All prompts share one time window (batches are grouped by it)."""
        texts = [
            self.processor.apply_chat_template(
                prompt.messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
            for prompt in prompts
        ]
        videos = [video for prompt in prompts for video in prompt.videos]
        images = [image for prompt in prompts for image in prompt.images]
        options = dict(self.video_options)
        start, end = prompts[0].window
        if start is not None:
            options["start_time"] = start
        if end is not None:
            options["end_time"] = end
        inputs = self.processor(
            text=texts,
            videos=videos or None,
            images=images or None,
            padding=True,
            return_tensors="pt",
            **(options if videos else {}),
        )
        dtype = self._model.dtype
        return {
            name: value.to(self._device, dtype=dtype) if value.is_floating_point() else value.to(self._device)
            for name, value in inputs.items()
        }

    def _generation_options(self, gen_kwargs: dict) -> dict:
        """lmms-eval's generation kwargs as `generate()` options: greedy unless temperature > 0 (as lmms-eval's own
        models read them)."""
        temperature = float(gen_kwargs.get("temperature") or 0)
        options = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "do_sample": temperature > 0,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if temperature > 0:
            options["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        until = gen_kwargs.get("until")
        if until:
            options["stop_strings"] = [until] if isinstance(until, str) else list(until)
            options["tokenizer"] = self.tokenizer
        return options

    @torch.no_grad()
    def _generate(self, prompts: list, gen_kwargs: dict) -> list:
        inputs = self._inputs(prompts)
        output = self._model.generate(**inputs, **self._generation_options(gen_kwargs))
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [_cut_at_stop_strings(answer, gen_kwargs.get("until")).strip() for answer in answers]

    def _generate_all(self, items: list) -> list:
        """Answers for (prompt, gen_kwargs) pairs, in batches of one time window and one set of generation kwargs."""
        answers = [None] * len(items)
        progress = tqdm(total=len(items), desc="CrossLMM responding", disable=self.rank != 0)
        key = lambda item: (item[0].batch_key(), json.dumps(item[1], sort_keys=True, default=str))  # noqa: E731
        for batch in _batches(items, key, self.batch_size):
            prompts = [items[index][0] for index in batch]
            for index, answer in zip(batch, self._generate(prompts, items[batch[0]][1])):
                answers[index] = answer
            progress.update(len(batch))
        progress.close()
        return answers

    # ----------------------------------------------------------------------------------------------------------------
    # lmms-eval's requests
    # ----------------------------------------------------------------------------------------------------------------

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def generate_until(self, requests) -> list:
        items = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self._doc(task, split, doc_id))
            items.append((prompt_from_visuals(visuals, context), dict(gen_kwargs or {})))
        answers = self._generate_all(items)
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("generate_until", (request.args[0], request.args[1]), answer)
        return answers

    def generate_until_multi_round(self, requests) -> list:
        """lmms-eval's simple multi-round protocol: round 0 answers the request's context; after each round the task's
        `doc_to_text(doc, round_idx=, previous_output=, previous_round_info=)` gives the next round's visuals and text
        (or ends the conversation), as lmms-eval's Qwen2.5-VL model runs it. Returns each sample's answers, in
        order."""
        results = []
        for request in tqdm(requests, desc="CrossLMM multi-round", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            gen_kwargs = dict(gen_kwargs or {})
            visuals, text, outputs, info, round_idx = doc_to_visual(doc), context, [], None, 0
            while True:
                outputs.append(self._generate([prompt_from_visuals(visuals, text)], gen_kwargs)[0])
                round_idx += 1
                visuals, text, terminal, returned, info = doc_to_text(
                    doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info
                )
                if returned is not None:
                    outputs = list(returned)
                if terminal:
                    break
            results.append(outputs)
        return results

    @torch.no_grad()
    def loglikelihood(self, requests) -> list:
        """For each request, the continuation's loss given the context (the mean over its tokens of -log p(token)),
        and whether greedy decoding would produce it.

        The loss, not the summed log-probability: it is what lmms-eval's own models (LLaVA, LLaVA-OneVision) return
        and what its multiple_choice scoring takes, picking the choice with the lowest value.

        The context is the user turn (visuals, then the task's text) of the chat template, followed by the assistant
        turn's start; the continuation is scored as the beginning of the assistant's answer (leading whitespace, which
        lmms-eval puts between context and continuation for plain-text prompts, is dropped). The prompt of each
        distinct (sample, context) is read and encoded once for all its continuations, which are scored in batches of
        `batch_size` rows padded on the right, so each row's positions are those of the unpadded row.
        """
        prompts, rows = {}, []
        for index, request in enumerate(requests):
            if len(request.args) == 2:  # lmms-eval's unconditional requests (acc_mutual_info): no sample, no visuals
                (context, continuation), visuals, key = request.args, [], ("", request.args[0])
            else:
                context, continuation, doc_to_visual, doc_id, task, split = request.args
                key = (task, split, doc_id, context)
                visuals = None if key in prompts else doc_to_visual(self._doc(task, split, doc_id))
            if key not in prompts:
                prompts[key] = prompt_from_visuals(visuals, context)
            rows.append((index, key, self.tokenizer(continuation.lstrip(), add_special_tokens=False)["input_ids"]))

        results = [None] * len(requests)
        by_prompt = defaultdict(list)
        for row in rows:
            by_prompt[row[1]].append(row)
        progress = tqdm(total=len(requests), desc="CrossLMM scoring", disable=self.rank != 0)
        for key, prompt_rows in by_prompt.items():
            inputs = self._inputs([prompts[key]])
            for start in range(0, len(prompt_rows), self.batch_size):
                batch = prompt_rows[start : start + self.batch_size]
                for (index, _, _), result in zip(batch, self._score(inputs, [row[2] for row in batch])):
                    results[index] = result
                progress.update(len(batch))
        progress.close()
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args[:2], result)
        return [_likelihood_response(*result) for result in results]

    def _score(self, inputs: dict, continuations: list) -> list:
        """(loss, is greedy) of each continuation after one prompt, all rows in one forward."""
        prompt_ids = inputs["input_ids"][0]
        length = prompt_ids.shape[0]
        width = length + max(len(ids) for ids in continuations)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(continuations), width), pad, dtype=prompt_ids.dtype, device=prompt_ids.device)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(continuations):
            input_ids[row, :length] = prompt_ids
            input_ids[row, length : length + len(ids)] = torch.tensor(ids, dtype=prompt_ids.dtype)
            attention_mask[row, : length + len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        for name, value in inputs.items():
            if name not in batch:  # frames: the prompt's own, once per row
                batch[name] = value.repeat(len(continuations), *([1] * (value.dim() - 1)))
        logits = self._model(**batch).logits.float()
        results = []
        for row, ids in enumerate(continuations):
            if not ids:
                results.append((0.0, True))
                continue
            predicted = torch.log_softmax(logits[row, length - 1 : length - 1 + len(ids)], dim=-1)
            target = torch.tensor(ids, device=predicted.device)
            loss = -predicted.gather(-1, target[:, None]).mean().item()
            results.append((loss, bool((predicted.argmax(-1) == target).all())))
        return results


class CrossLMMChat(CrossLMMSimple):
    """CrossLMM for lmms-eval's chat protocol (`doc_to_messages`), the default of `--model crosslmm`."""

    is_simple = False

    def generate_until(self, requests) -> list:
        items = []
        for request in requests:
            context, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
            messages = doc_to_messages(self._doc(task, split, doc_id))
            items.append((prompt_from_messages(messages), dict(gen_kwargs or {})))
        answers = self._generate_all(items)
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("generate_until", (request.args[0], request.args[2]), answer)
        return answers

    def generate_until_multi_round(self, requests) -> list:
        """lmms-eval's chat multi-round protocol: round 0 answers `doc_to_messages(doc)`; then
        `doc_to_messages(doc, round_idx=, previous_output=, previous_round_info=)` gives each next round's messages
        (or ends), as lmms-eval's vLLM chat model runs it. Returns each sample's answers, in order."""
        results = []
        for request in tqdm(requests, desc="CrossLMM multi-round", disable=self.rank != 0):
            context, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            gen_kwargs = dict(gen_kwargs or {})
            messages, outputs, info, round_idx = doc_to_messages(doc), [], None, 0
            while True:
                outputs.append(self._generate([prompt_from_messages(messages)], gen_kwargs)[0])
                round_idx += 1
                payload = doc_to_messages(
                    doc, round_idx=round_idx, previous_output=list(outputs), previous_round_info=info
                )
                if not (isinstance(payload, tuple) and len(payload) == 4):
                    break
                messages, terminal, _, info = payload
                if terminal:
                    break
            results.append(outputs)
        return results

    def loglikelihood(self, requests) -> list:
        raise NotImplementedError(
            "lmms-eval's chat protocol has no likelihood requests; run multiple-choice-by-likelihood tasks with "
            "--force_simple"
        )


__all__ = ["CrossLMMChat", "CrossLMMSimple", "doc_to_video", "prompt_from_messages", "prompt_from_visuals"]
