"""`crosslmm-answer`: ask a CrossLMM checkpoint a question about a video, from the command line.

With no arguments it builds (once, into a cache folder) the random-weight sample checkpoint and the sample video of
`crosslmm.samples`, and runs the whole path: decode frames, encode them, prefill, generate. It reports the answer,
the visual tokens the LLM sees against what LLaVA-OneVision would spend, and the time of each stage. With
`--interactive` it then answers follow-up questions read from stdin, reusing the encoded video and the conversation's
cache.
"""

import argparse
import hashlib
import json
import logging
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import StoppingCriteria, StoppingCriteriaList

from crosslmm import log_to_stderr, samples
from crosslmm.errors import UsageError, check_checkpoint, one_line


logger = logging.getLogger("crosslmm.answer")


# --------------------------------------------------------------------------------------------------------------------
# The sample checkpoint and video, built once
# --------------------------------------------------------------------------------------------------------------------


def cache_folder() -> Path:
    """Where the sample checkpoint and video are built: $CROSSLMM_CACHE (else ~/.cache/crosslmm), in a subfolder
    named after the code that builds them and the code the checkpoint carries. A checkpoint folder runs its own copy of
    the model code, so after an upgrade a new sample is built instead of an old one silently running old code."""
    digest = hashlib.sha256()
    for path in [*samples.shipped_code_files(), Path(samples.__file__)]:
        digest.update(path.read_bytes())
    root = Path(os.environ.get("CROSSLMM_CACHE") or Path.home() / ".cache" / "crosslmm")
    return root / f"sample-{digest.hexdigest()[:12]}"


def _build_once(target: Path, build) -> Path:
    """Build `target` (a folder or file) with `build(path)` unless it exists. The build goes to a scratch path renamed
    into place at the end, so an interrupted build never leaves a half-written sample behind."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        built = build(scratch / target.name)
        if not target.exists():  # another process may have finished the same build meanwhile
            os.replace(built, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def sample_checkpoint() -> Path:
    return _build_once(cache_folder() / "sample-checkpoint", samples.build_sample_checkpoint)


def sample_video() -> Path:
    return _build_once(cache_folder() / "sample-video.mp4", samples.build_sample_video)


# --------------------------------------------------------------------------------------------------------------------
# Timing one generation
# --------------------------------------------------------------------------------------------------------------------


class StageTimer:
    """Splits one pipeline or `generate` call into its stages with forward hooks on the model's modules, without
    changing what runs.

    The model's first forward is the prefill, every later one a generated token. Inside the prefill, the visual
    encoding (vision tower, pooler, projector) runs from the tower's patch embedding to the projector's output; it is
    timed on its own, and its runs are counted. Everything before the prefill is reading, sampling and resizing the
    frames, and tokenizing. On CUDA each mark waits for the device, so the times are the work's, not the kernel
    launches'. The prefill's inputs (what the processor made) are kept in `prefill_inputs`, the token ids of every
    forward in `fed` (what the self-attention cache holds afterwards), the last forward's output (and so the cache)
    in `output`. `on_prefill(kwargs)`, if given, sees the prefill's inputs before it runs and may stop the call by
    raising.
    """

    def __init__(self, model, on_prefill=None):
        self.sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        self.on_prefill = on_prefill
        self.calls = []  # [start, end] of every forward of the model
        self.vision_seconds = 0.0
        self.vision_runs = 0
        self._vision_start = None
        self.prefill_inputs = None
        self.fed = []
        self.output = None
        tower, projector = model.model.vision_tower, model.model.multi_modal_projector
        self.hooks = [
            model.register_forward_pre_hook(self._model_start, with_kwargs=True),
            model.register_forward_hook(self._model_end),
            tower.embeddings.register_forward_pre_hook(self._vision_start_hook),
            projector.register_forward_hook(self._vision_end_hook),
        ]

    def _now(self):
        self.sync()
        return time.perf_counter()

    def _model_start(self, module, args, kwargs):
        if not self.calls:
            if self.on_prefill is not None:
                self.on_prefill(kwargs)
            self.prefill_inputs = dict(kwargs)
        if kwargs.get("input_ids") is not None:
            self.fed.append(kwargs["input_ids"])
        self.calls.append([self._now(), None])

    def _model_end(self, module, args, output):
        self.calls[-1][1] = self._now()
        self.output = output

    def _vision_start_hook(self, module, args):
        if self._vision_start is None:  # the first chunk of frames: the tower runs them in `vision_batch_size` chunks
            self.vision_runs += 1
            self._vision_start = self._now()

    def _vision_end_hook(self, module, args, output):
        self.vision_seconds += self._now() - self._vision_start
        self._vision_start = None

    def run(self, call):
        """Run `call()`; return its result and the stage times in seconds (plus the number of generated tokens and
        of the vision tower's runs)."""
        start = self._now()
        try:
            result = call()
        finally:
            for hook in self.hooks:
                hook.remove()
        end = self._now()
        if not self.calls:
            raise RuntimeError("The pipeline finished without running the model.")
        (prefill_start, prefill_end), last_end = self.calls[0], self.calls[-1][1]
        times = {
            "decode": prefill_start - start,
            "encode": self.vision_seconds,
            "prefill": prefill_end - prefill_start - self.vision_seconds,
            "generate": last_end - prefill_end,
            "total": end - start,
            # The prefill gives the first token, each later forward one more.
            "tokens": len(self.calls),
            "vision_runs": self.vision_runs,
        }
        return result, times


# --------------------------------------------------------------------------------------------------------------------
# Errors and limits
# --------------------------------------------------------------------------------------------------------------------


class QuestionError(UsageError):
    """A follow-up question that cannot be asked: reported as one line, and the conversation goes on."""


def _position_room(
    prompt_length: int,
    max_new_tokens: int,
    limit: int | None,
    prompt: str = "the prompt",
    advice: str = "use fewer frames or a shorter prompt",
) -> int:
    """How many new tokens a prompt of `prompt_length` tokens leaves room for, at most `max_new_tokens`.

    A model holds `limit` positions (its LLM's `max_position_embeddings`). When the prompt alone takes all of them this
    refuses (`UsageError`); when the prompt plus `max_new_tokens` would not fit it caps the answer at what is left,
    with a one-line warning. Past the limit the model would run on positions it was never trained on, for as long as
    `max_new_tokens` asks."""
    if limit is None:
        return max_new_tokens
    if prompt_length >= limit:
        raise UsageError(
            f"{prompt} takes {prompt_length} tokens but the model holds {limit} positions "
            f"(max_position_embeddings), which leaves no room for an answer: {advice}"
        )
    room = limit - prompt_length
    if max_new_tokens > room:
        logger.warning(
            f"crosslmm-answer: warning: --max-new-tokens {max_new_tokens} capped at {room}: {prompt} takes "
            f"{prompt_length} of the model's {limit} positions (max_position_embeddings)"
        )
        return room
    return max_new_tokens


class _StopAtLength(StoppingCriteria):
    """The sequence ends once it holds `length` tokens; `length` None never stops. Set from the prefill's hook, when
    the prompt's length is known."""

    def __init__(self):
        super().__init__()
        self.length = None

    def __call__(self, input_ids, scores, **kwargs):
        done = self.length is not None and input_ids.shape[-1] >= self.length
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


# --------------------------------------------------------------------------------------------------------------------
# Loading a checkpoint
# --------------------------------------------------------------------------------------------------------------------

TASK = "video-text-to-text"
# What transformers loads from a checkpoint folder, in its order of preference.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# What loading a checkpoint raises for files it cannot use: missing or unreadable files (OSError), configs and files
# transformers does not understand (ValueError, KeyError, TypeError), weights that do not fit the config or a device
# (RuntimeError), checkpoint code needing a package that is not installed (ImportError), damaged safetensors files
# (SafetensorError) and pickles that torch.load(weights_only=True) refuses (UnpicklingError).
LOAD_ERRORS = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    RuntimeError,
    ImportError,
    pickle.UnpicklingError,
    SafetensorError,
)


def _check_weights(folder: str):
    """Cheap checks of a checkpoint folder's weights before loading them: a weights file is there, every shard its
    index names is there, and every safetensors file opens (its header parses and the file covers the tensors it
    lists: a truncated file does not)."""
    path = Path(folder)
    present = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not present:
        raise UsageError(f"{folder} has a config.json but no weights: none of {', '.join(WEIGHT_FILES)}")
    name = present[0]
    files = [path / name]
    if name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(files[0].read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{files[0]} is not a weights index (a JSON object with a weight_map)") from None
        missing = [shard for shard in shards if not (path / shard).is_file()]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise UsageError(f"{files[0]} names shard(s) that are missing: {', '.join(missing[:3])}{more}")
        files = [path / shard for shard in shards]
    for file in files:
        if file.name.endswith(".safetensors"):
            try:
                with safe_open(str(file), framework="pt") as weights:
                    weights.keys()
            except (SafetensorError, OSError) as error:
                message = f"{file} is not a readable safetensors file, truncated or damaged ({error})"
                raise UsageError(message) from None


def _load_failure(model: str, error: BaseException) -> UsageError:
    """The one line that reports a checkpoint that failed to load: its name and what was wrong."""
    chain, cause = [], error
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    refused = [cause for cause in chain if isinstance(cause, pickle.UnpicklingError)]
    if refused:
        detail = one_line(refused[-1]).removeprefix("Weights only load failed. ").split(". Please use")[0]
        return UsageError(
            f"cannot load model {model!r}: its weights are a pickle (pytorch_model.bin) that "
            f"torch.load(weights_only=True) refuses, as it holds more than tensors ({detail}); crosslmm-answer "
            "expects safetensors weights (model.safetensors): convert the checkpoint, unpickling it only if you trust "
            "its source"
        )
    line = one_line(error)
    if len(line) > 160 and ". " in line:  # transformers' messages run on with advice: their first sentence
        line = line.split(". ")[0] + "."
    return UsageError(f"cannot load model {model!r}: {line}")


def _resolve_device(device: str | None):
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a torch device (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for CUDA, but no CUDA device is available")
    return device


def _resolve_dtype(choice: str, config, device):
    """(the `dtype` for `from_pretrained`, what to call it). `auto` is the checkpoint's dtype as saved in its
    config.json, on any device, except that float16 runs as float32 on a CPU (most CPUs have no float16 matrix
    multiply: it runs many times slower than float32 there). A config without a saved dtype leaves the choice to
    transformers' `dtype="auto"` (the weights' dtype)."""
    if choice != "auto":
        return getattr(torch, choice), choice
    saved = getattr(config, "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    if not isinstance(saved, torch.dtype):
        return "auto", "the weights' dtype"
    name = str(saved).removeprefix("torch.")
    if saved == torch.float16 and device.type == "cpu":
        return torch.float32, "float32: the checkpoint's float16 runs as float32 on a CPU"
    return saved, f"{name}, the checkpoint's"


def load_pipeline(model: str, device, dtype_choice: str):
    """The checkpoint's video-text-to-text pipeline on `device`. A checkpoint that is not CrossLMM, or whose files
    cannot be loaded, ends in one `UsageError` line naming it and the problem."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, pipeline
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=True)
    except LOAD_ERRORS as error:
        raise _load_failure(model, error) from None
    task = (getattr(config, "custom_pipelines", None) or {}).get(TASK)
    if task is None:
        raise UsageError(f"{model} is a {config.model_type!r} checkpoint, which has no {TASK} pipeline")
    if os.path.isdir(model):
        _check_weights(model)
    dtype, dtype_words = _resolve_dtype(dtype_choice, config, device)
    logger.info(f"Loading {model} on {device} ({dtype_words}) ...")
    try:
        # The checkpoint's own pipeline class, as pipeline() finds it through the config's custom_pipelines. The model
        # is loaded here rather than by pipeline(), which would report a failure as a traceback inside its message.
        pipeline_class = get_class_from_dynamic_module(task["impl"], model)
        network = AutoModelForImageTextToText.from_pretrained(model, trust_remote_code=True, dtype=dtype)
        if dtype_choice == "auto" and network.dtype == torch.float16 and device.type == "cpu":
            network = network.float()
        processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
        return pipeline(TASK, model=network, processor=processor, device=device, pipeline_class=pipeline_class)
    except LOAD_ERRORS as error:
        raise _load_failure(model, error) from None


# --------------------------------------------------------------------------------------------------------------------
# A conversation about one video
# --------------------------------------------------------------------------------------------------------------------


def _cache_of(output):
    """(the name, the cache) of a forward's output: `cache` from transformers 5.24, `past_key_values` before. The same
    name is `generate`'s argument for a cache to continue from."""
    for name in ("cache", "past_key_values"):
        cache = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if cache is not None:
            return name, cache
    raise RuntimeError("The model returned no cache to continue the conversation from.")


class Conversation:
    """A video, the turns about it so far, and the model's cache after the last answer.

    The first question goes through the pipeline, which decodes the frames, runs the vision tower and generates. Each
    follow-up is the whole conversation so far rendered with the processor's chat template (the user turn with the
    video and the first question, each answer, the new question) and continues from the last turn's cache: the DCALs'
    visual memory of the video and the self-attention cache of every token before. Only the tokens the cache does not
    hold are prefilled; the vision tower does not run again, and the answer is the one the whole conversation gives
    from scratch. The cache holds the tokens the model was fed (the prompt, then each generated token but the last);
    where the rendered conversation's tokens part from them (an answer's text may tokenize otherwise than it was
    generated), the cache is cropped to the tokens they share, which always include the video.
    """

    def __init__(self, pipe, video: str, sampling: dict, max_new_tokens: int):
        self.pipe, self.model, self.processor = pipe, pipe.model, pipe.processor
        self.video, self.sampling, self.max_new_tokens = video, sampling, max_new_tokens
        self.limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        self.messages = []
        self.cache_name, self.cache = None, None
        self.cached_ids = None  # the token ids the cache holds, in order
        self.video_tokens = 0

    def ask_first(self, question: str):
        """Answer the first question through the pipeline: (answer, stage times, the prefill's inputs)."""
        messages = [
            {"role": "user", "content": [{"type": "video", "path": self.video}, {"type": "text", "text": question}]}
        ]
        stop = _StopAtLength()

        def fit(kwargs):  # the prompt is built: refuse it, or cap the answer, if it would not fit the model
            length = kwargs["input_ids"].shape[-1]
            if _position_room(length, self.max_new_tokens, self.limit) < self.max_new_tokens:
                stop.length = self.limit

        timer = StageTimer(self.model, on_prefill=fit)
        try:
            outputs, times = timer.run(
                lambda: self.pipe(
                    text=messages,
                    max_new_tokens=self.max_new_tokens,
                    return_full_text=False,
                    stopping_criteria=StoppingCriteriaList([stop]),
                    **self.sampling,
                )
            )
        except ValueError as error:  # the processor names bad videos, time windows and placeholders
            raise UsageError(one_line(error)) from None
        answer = outputs[0]["generated_text"]
        ids = timer.prefill_inputs["input_ids"]
        self.video_tokens = int((ids == self.model.config.video_token_id).sum())
        self._remember(messages, answer, timer, kept=None)
        return answer, times, timer.prefill_inputs

    def ask_follow_up(self, question: str):
        """Answer a follow-up question from the cache: (answer, times with `cached` and `new` prompt tokens)."""
        for token in (self.processor.video_token, self.processor.image_token):
            if token in question:
                raise QuestionError(
                    f"a follow-up question cannot hold a {token} placeholder: the conversation is about the one "
                    "video given with --video"
                )
        messages = self.messages + [{"role": "user", "content": [{"type": "text", "text": question}]}]
        ids = self._conversation_ids(messages)
        max_new_tokens = _position_room(
            len(ids), self.max_new_tokens, self.limit, "the conversation", "start a new conversation"
        )
        reused = self._reuse_cache(ids)
        inputs = ids[None].to(self.model.device)
        timer = StageTimer(self.model)
        with torch.inference_mode():
            sequences, times = timer.run(
                lambda: self.model.generate(
                    input_ids=inputs,
                    attention_mask=torch.ones_like(inputs),
                    max_new_tokens=max_new_tokens,
                    **{self.cache_name: self.cache},
                )
            )
        answer = self.processor.decode(sequences[0, len(ids) :], skip_special_tokens=True)
        self._remember(messages, answer, timer, kept=ids[:reused])
        times.update(cached=reused, new=len(ids) - reused)
        return answer, times

    def _conversation_ids(self, messages) -> torch.Tensor:
        """The token ids of the whole conversation, as the processor makes them: the chat template's text with its
        <video> placeholder expanded to the video's tokens, tokenized."""
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        video, image = self.processor.video_token, self.processor.image_token
        if text.count(video) != 1 or image in text:
            raise UsageError(
                f"the conversation's text holds {text.count(video)} {video} and {text.count(image)} {image} "
                f"placeholder(s) (an answer spelled one out), where its one video has one: it cannot go on"
            )
        text = text.replace(video, video * self.video_tokens)
        return self.processor.tokenizer(text, return_tensors="pt")["input_ids"][0]

    def _reuse_cache(self, ids: torch.Tensor) -> int:
        """Crop the cache to the tokens it shares with the conversation's `ids` (leaving at least one to prefill) and
        return how many it keeps; they must include every visual token, whose encoding the cache holds."""
        cached = self.cached_ids
        shared = min(len(cached), len(ids) - 1)
        differ = (cached[:shared] != ids[:shared]).nonzero()
        kept = int(differ[0]) if len(differ) else shared
        config = self.model.config
        visual = ((ids == config.video_token_id) | (ids == config.image_token_id)).nonzero()
        if len(visual) and int(visual[-1]) >= kept:
            raise RuntimeError(
                f"The conversation's tokens part from the cached ones at {kept}, before the video's last token."
            )
        if kept < len(cached):
            self.cache.crop(kept - len(cached))  # a negative count: the tokens to drop, on every transformers 5.x
        return kept

    def _remember(self, messages, answer: str, timer: StageTimer, kept):
        """The conversation with this answer, and the cache after it with the token ids it holds."""
        self.messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        fed = torch.cat([ids.reshape(-1) for ids in timer.fed]).cpu()
        self.cached_ids = fed if kept is None else torch.cat([kept, fed])
        self.cache_name, self.cache = _cache_of(timer.output)
        if self.cache.get_seq_length() != len(self.cached_ids):
            raise RuntimeError(
                f"The cache holds {self.cache.get_seq_length()} tokens, but the model was fed {len(self.cached_ids)}."
            )


# --------------------------------------------------------------------------------------------------------------------
# crosslmm-answer
# --------------------------------------------------------------------------------------------------------------------
DEFAULT_PROMPT = "What happens in this video?"
DEFAULT_NUM_FRAMES = 8
END_WORDS = ("exit", "quit")


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see crosslmm-answer --help)")


def _positive(kind):
    def parse(value):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {value!r}") from None
        if not number > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value!r}")
        return number

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = _ArgumentParser(
        prog="crosslmm-answer",
        description="Answer a question about a video with a CrossLMM checkpoint. With no arguments: a small "
        "random-weight sample checkpoint (built once) on a sample video, to show the whole path and its costs.",
    )
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: the built-in random sample checkpoint)")
    parser.add_argument("--video", help="video file (default: the built-in sample video)")
    parser.add_argument(
        "--prompt",
        help=f"question about the video (default: {DEFAULT_PROMPT!r}; with --interactive, the first line of stdin)",
    )
    parser.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="then read follow-up questions from stdin, one a line, until an empty line, 'exit' or end of input; "
        "each reuses the encoded video and the conversation's cache (the vision tower runs once)",
    )
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument(
        "--num-frames", type=_positive(int), help=f"frames sampled uniformly (default: {DEFAULT_NUM_FRAMES})"
    )
    sampling.add_argument("--fps", type=_positive(float), help="sample frames at this rate instead")
    parser.add_argument(
        "--max-new-tokens",
        type=_positive(int),
        default=32,
        help="answer length limit (default: 32); capped, with a warning, where the model's positions end",
    )
    parser.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights and activations (default: auto, the checkpoint's dtype as saved in its config.json; a float16 "
        "checkpoint runs as float32 on a CPU)",
    )
    args = parser.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty")
    if args.prompt is not None and not _is_text(args.prompt):
        parser.error("--prompt is not UTF-8 text")
    if args.prompt is None and not args.interactive:
        args.prompt = DEFAULT_PROMPT
    if args.num_frames is None and args.fps is None:
        args.num_frames = DEFAULT_NUM_FRAMES
    return args


def _check_video(path: str) -> str:
    """Fail before loading the model, naming the file, when it is missing or holds no video stream; the processor
    reports what goes wrong while decoding (corrupt or truncated data, no decodable frame)."""
    import av

    if not os.path.exists(path):
        raise UsageError(f"video file not found: {path}")
    if not os.path.isfile(path):
        raise UsageError(f"not a file: {path}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise UsageError(f"no video stream in {path}")
    except av.FFmpegError as error:
        raise UsageError(f"{path} is not a readable video ({error.strerror or error})") from None
    return path


def _is_text(text: str) -> bool:
    """False for what Python decoded from bytes that are not UTF-8 (stdin and argv keep them as lone surrogates, which
    the tokenizer rejects with a TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_question() -> str | None:
    """The next question from stdin (after a `> ` prompt on stderr when stdin is a terminal); None at the end of the
    input, an empty line, `exit` or `quit`. A line that is not UTF-8 text is a QuestionError."""
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 arrive as surrogates, whatever the locale
        sys.stdin.reconfigure(errors="surrogateescape")
    terminal = sys.stdin.isatty()
    if terminal:
        print("> ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line and terminal:
        print(file=sys.stderr)
    question = line.strip()
    if not question or question.lower() in END_WORDS:
        return None
    if not _is_text(question):
        raise QuestionError("the question read from stdin is not UTF-8 text; ask it again")
    return question


def _visual_inputs(inputs: dict, config) -> tuple[int, int, int]:
    """(frames, frame size in px, visual tokens) of the one video of a prefill, read from what the processor made:
    its frames from `pixel_values_videos` (or `video_num_frames`), its tokens from the placeholders in `input_ids`."""
    pixels = inputs["pixel_values_videos"]
    counts = inputs.get("video_num_frames")
    frames = int(counts[0]) if counts is not None else len(pixels[0])
    ids = inputs["input_ids"]
    tokens = int(((ids == config.video_token_id) | (ids == config.image_token_id)).sum())
    return frames, int(pixels[0].shape[-1]), tokens


def _rate(times: dict) -> str:
    steps = times["tokens"] - 1  # tokens after the first, which the prefill gives
    return f", {steps / times['generate']:.1f} tokens/s" if steps and times["generate"] > 0 else ""


def _where(device, dtype) -> str:
    return f"[{device}, {str(dtype).removeprefix('torch.')}]"


def _report(answer: str, times: dict, config, inputs: dict, random_weights: bool, device, dtype):
    frames, size, visual_tokens = _visual_inputs(inputs, config)
    grid, per_frame = config.patch_grid_size, config.tokens_per_frame
    onevision = samples.llava_onevision_video_tokens(frames, grid)
    onevision_per_frame = samples.llava_onevision_tokens_per_frame(grid)

    print(f"Answer: {answer}")
    if random_weights:
        print("(Random weights: the sample checkpoint is untrained, so this answer is meaningless text. It shows that")
        print(" the whole path runs: decode -> vision tower -> pooling -> LLM with DCALs -> generate.)")
    print()
    print(f"Frames: {frames}, {size} px, {grid} x {grid} patches each")
    print(f"Visual tokens in the LLM's sequence: {visual_tokens} ({frames} frames x {per_frame} pooled)")
    print(
        f"LLaVA-OneVision for the same frames: {onevision} ({frames} x {onevision_per_frame} + 1 newline), "
        f"{onevision / visual_tokens:.1f}x as many"
    )
    print(
        f"Original visual tokens the DCALs attend to (after decoder layers {config.dcal_layer_indices}): "
        f"{frames * grid * grid} ({frames} x {grid * grid}), kept out of the self-attention KV cache"
    )
    print(
        f"Times: decode frames {times['decode']:.3f} s | encode (vision tower, pooling) {times['encode']:.3f} s | "
        f"prefill {times['prefill']:.3f} s | generate {times['generate']:.3f} s ({times['tokens']} tokens"
        f"{_rate(times)}) | total {times['total']:.3f} s  {_where(device, dtype)}",
        flush=True,
    )


def _report_follow_up(answer: str, times: dict, device, dtype):
    print(f"Answer: {answer}")
    print(
        f"Times: prefill {times['prefill']:.3f} s ({times['new']} new tokens after {times['cached']} cached) | "
        f"generate {times['generate']:.3f} s ({times['tokens']} tokens{_rate(times)}) | total {times['total']:.3f} s  "
        f"{_where(device, dtype)}"
    )
    if times["vision_runs"]:
        print(f"(The vision tower ran {times['vision_runs']} time(s).)")
    else:
        print("(The vision tower did not run: the video's encoding and the conversation came from the cache.)")
    sys.stdout.flush()


def answer(args: argparse.Namespace):
    """Check the inputs, build the samples if needed, load the pipeline, answer and report; with --interactive,
    answer follow-up questions from stdin until it ends."""
    video = _check_video(args.video) if args.video is not None else None
    model = check_checkpoint(args.model) if args.model is not None else None
    device = _resolve_device(args.device)
    if model is None:
        if not (cache_folder() / "sample-checkpoint").exists():
            logger.info(f"Building the random-weight sample checkpoint in {cache_folder()} (once) ...")
        model = str(sample_checkpoint())
    if video is None:
        if not (cache_folder() / "sample-video.mp4").exists():
            logger.info(f"Encoding the sample video in {cache_folder()} (once) ...")
        video = str(sample_video())

    pipe = load_pipeline(model, device, args.dtype)
    dtype, config = pipe.model.dtype, pipe.model.config
    sampling = {"num_frames": args.num_frames} if args.num_frames is not None else {"fps": args.fps}
    conversation = Conversation(pipe, video, sampling, args.max_new_tokens)
    try:
        question = args.prompt if args.prompt is not None else _read_question()
    except QuestionError as error:
        raise UsageError(str(error).removesuffix("; ask it again")) from None
    if question is None:
        return
    logger.info(f"Reading {video} and answering ({sampling}, up to {args.max_new_tokens} new tokens) ...")
    first, times, inputs = conversation.ask_first(question)
    _report(first, times, config, inputs, args.model is None, device, dtype)
    if not args.interactive:
        return
    while True:
        try:
            question = _read_question()
            if question is None:
                break
            print()
            reply, times = conversation.ask_follow_up(question)
        except QuestionError as error:
            print(f"crosslmm-answer: error: {error}", file=sys.stderr, flush=True)
            continue
        _report_follow_up(reply, times, device, dtype)


def main(argv=None) -> int:
    """Console script `crosslmm-answer`: 0 on success, 2 (with one error line on stderr) on bad input, 130 when
    interrupted."""
    log_to_stderr()
    try:
        answer(parse_args(argv))
    except UsageError as error:
        print(f"crosslmm-answer: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
