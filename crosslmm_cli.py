"""`crosslmm-answer`: ask a CrossLMM checkpoint a question about a video, from the command line.

With no arguments it builds (once, into a cache folder) a small random-weight CrossLMM with a real byte-level BPE
tokenizer trained here, plus a sample video it encodes itself, and runs the whole path: decode frames, encode them,
prefill, generate. The building blocks (`build_tokenizer`, `build_sample_checkpoint`, `build_sample_video`) are also
what the tests use to get a realistic checkpoint without downloading anything.
"""

import argparse
import hashlib
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX


ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN]
TOKENIZER_VOCAB_SIZE = 768

# A short English corpus about videos and questions, enough for a few hundred BPE merges of everyday words.
SAMPLE_CORPUS = """\
You are a helpful assistant. Describe the video in detail. What happens in this video?
A red circle moves from the left of the frame to the right while a blue square rises from the bottom.
A green triangle spins slowly in the middle of the picture. The background is dark and the shapes are bright.
How many objects can you see? There are three objects: a circle, a square and a triangle.
What colour is the shape that moves fastest? The red circle moves fastest; it crosses the whole frame in two seconds.
Where is the blue square at the end of the video? At the end it is near the top of the frame.
The camera does not move. The light does not change. Nothing else appears in the scene.
A person walks into the room, sits down at a table, opens a book and starts to read.
A dog runs across the garden, jumps over a small fence and catches a ball in the air.
Two people talk in a kitchen while one of them cooks dinner and the other sets the table.
A car drives along a road by the sea at sunset; the sky turns orange, then purple, then dark.
Summarize the main events of the video in one sentence. Answer the question with a short phrase.
Is there any text on the screen? Which object appears first, and which one appears last?
Why does the man stop walking? Because the light turns red and he waits to cross the street.
What is the woman holding in her hand? She is holding a cup of coffee and a phone.
The children are playing football on the grass, and their parents are watching them from a bench.
First the water boils, then the cook adds the pasta, and after ten minutes the dinner is ready.
The video shows a long journey through the mountains, with snow, rivers, forests and small villages.
Please answer yes or no. Yes. No. I am not sure. It looks like a cat, but it could be a small dog.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 100 2024 12:30
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A small Qwen2-style byte-level BPE tokenizer, trained here on `SAMPLE_CORPUS` (deterministic, no download).

    It has the Qwen2 ChatML special tokens (`<|endoftext|>` is padding and end of sequence, `<|im_start|>`,
    `<|im_end|>`) and the `<image>`/`<video>` placeholders as added special tokens, so prompts, chat templates and
    placeholder expansion behave as with the real Qwen2.5 tokenizer, only with a vocabulary of a few hundred tokens.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SAMPLE_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN],
        model_max_length=32768,
        padding_side="left",  # batched generation: each row's answer follows its own prompt
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------------------------------------
# The sample checkpoint and video
# --------------------------------------------------------------------------------------------------------------------
# SigLIP-shaped: 384 px, patch 14, so each frame has the real 27 x 27 = 729 original visual tokens, only narrow and
# shallow. A Qwen2-shaped LLM of 8 layers with a DCAL after every 2nd, 3 x 3 pooled tokens per frame.
SAMPLE_VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "image_size": 384,
    "patch_size": 14,
    "vision_use_head": False,
}
SAMPLE_TEXT_CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    # Wide random weights: the untrained model's answer then changes with the video and the question, instead of one
    # token repeated whatever the input (the tests compare answers across inputs).
    "initializer_range": 0.3,
}
SAMPLE_GATE = 0.5  # opened gates, so that the DCALs take part as in a trained checkpoint


def build_sample_checkpoint(folder, vision: dict | None = None, text: dict | None = None, seed: int = 0, **overrides):
    """Save a random-weight CrossLMM plus its processor (the tokenizer of `build_tokenizer`) into `folder`, as a
    Hub repository would hold it: config, safetensors weights, processor files and the model code. Returns the folder.

    `vision`/`text` update `SAMPLE_VISION_CONFIG`/`SAMPLE_TEXT_CONFIG` and `overrides` the CrossLMM config fields, so
    tests can build smaller ones. The vocabulary is the tokenizer's.
    """
    from configuration_crosslmm import CrossLMMConfig
    from modeling_crosslmm import CrossLMMForConditionalGeneration
    from processing_crosslmm import CrossLMMImageProcessor, CrossLMMProcessor, CrossLMMVideoProcessor

    tokenizer = build_tokenizer()
    vision_config = {**SAMPLE_VISION_CONFIG, **(vision or {})}
    text_config = {**SAMPLE_TEXT_CONFIG, **(text or {}), "vocab_size": len(tokenizer)}
    config_kwargs = dict(
        pool_size=3,
        cross_attention_interval=2,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
    )
    config_kwargs.update(overrides)
    config = CrossLMMConfig(vision_config=vision_config, text_config=text_config, **config_kwargs)

    torch.manual_seed(seed)
    model = CrossLMMForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("v2v_gate", "t2v_gate", "mlp_gate"):
                param.fill_(SAMPLE_GATE)
    generation = model.generation_config
    generation.eos_token_id = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    generation.pad_token_id = tokenizer.pad_token_id

    size = {"height": config.image_size, "width": config.image_size}
    processor = CrossLMMProcessor(
        image_processor=CrossLMMImageProcessor(size=size),
        video_processor=CrossLMMVideoProcessor(size=size),
        tokenizer=tokenizer,
        pool_size=config.pool_size,
    )
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_sample_video(path, seconds: float = 4.0, fps: int = 24, width: int = 320, height: int = 240):
    """Encode a short, lossless H.264/MP4 clip with PyAV: a red disc crossing left to right, a blue square rising,
    and a green bar making half a turn around the centre, on a dark gradient. Returns the path."""
    import av

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.zeros((height, width, 3), dtype=np.uint8)
    background[..., 2] = (40 + 40 * ys / height).astype(np.uint8)
    num_frames = int(round(seconds * fps))
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        # Lossless (qp 0): the decoded frames are then exactly the drawn ones, wherever and however x264 runs (its
        # lossy output was seen to vary between runs), so the sample's answers are reproducible.
        stream = container.add_stream("libx264", rate=fps, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            t = i / max(num_frames - 1, 1)
            frame = background.copy()
            cx, cy = 30 + t * (width - 60), height / 3
            frame[(xs - cx) ** 2 + (ys - cy) ** 2 < 20**2] = (230, 40, 40)
            sx, sy = 2 * width / 3, (height - 30) - t * (height - 60)
            frame[(abs(xs - sx) < 18) & (abs(ys - sy) < 18)] = (40, 80, 230)
            angle = math.pi * t  # half a turn
            along = (xs - width / 2) * math.cos(angle) + (ys - height / 2) * math.sin(angle)
            across = -(xs - width / 2) * math.sin(angle) + (ys - height / 2) * math.cos(angle)
            frame[(abs(along) < 40) & (abs(across) < 5)] = (40, 200, 60)
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = i  # in 1/fps units
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def cache_folder() -> Path:
    """Where the sample checkpoint and video are built: $CROSSLMM_CACHE (else ~/.cache/crosslmm), in a subfolder
    named after the code that builds and runs them. A checkpoint folder carries its own copy of the model code, so
    after an upgrade a new sample is built instead of an old one silently running old code."""
    import configuration_crosslmm
    import modeling_crosslmm
    import pipeline_crosslmm
    import processing_crosslmm

    digest = hashlib.sha256()
    for module in (
        configuration_crosslmm,
        modeling_crosslmm,
        processing_crosslmm,
        pipeline_crosslmm,
        sys.modules[__name__],
    ):
        digest.update(Path(module.__file__).read_bytes())
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
    return _build_once(cache_folder() / "sample-checkpoint", build_sample_checkpoint)


def sample_video() -> Path:
    return _build_once(cache_folder() / "sample-video.mp4", build_sample_video)


# --------------------------------------------------------------------------------------------------------------------
# Timing one pipeline call
# --------------------------------------------------------------------------------------------------------------------
class StageTimer:
    """Splits one pipeline call into its stages, without changing what runs.

    Forward hooks on the model: its first call is the prefill, every later call one generated token. Inside the
    prefill, the model's `_encode_visual` (vision tower, pooler, projector) is timed on its own. Everything
    before the prefill is reading, sampling and resizing the frames, and tokenizing. On CUDA each mark waits for the
    device, so the times are the work's, not the kernel launches'.
    """

    def __init__(self, model):
        self.model = model
        self.sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        self.calls = []  # [start, end] of every forward of the model
        self.vision_seconds = 0.0
        self.prefill_inputs = None
        self.hooks = [
            model.register_forward_pre_hook(self._model_start, with_kwargs=True),
            model.register_forward_hook(self._model_end),
        ]
        encode = model.model._encode_visual

        def timed_encode(*args, **kwargs):
            start = self._now()
            result = encode(*args, **kwargs)
            self.vision_seconds += self._now() - start
            return result

        model.model._encode_visual = timed_encode  # on this instance only; removed again in `run`

    def _now(self):
        self.sync()
        return time.perf_counter()

    def _model_start(self, module, args, kwargs):
        if not self.calls:
            self.prefill_inputs = kwargs.get("input_ids")
        self.calls.append([self._now(), None])

    def _model_end(self, module, args, output):
        self.calls[-1][1] = self._now()

    def run(self, call):
        """Run `call()`; return its result and the stage times in seconds (plus the number of generated tokens)."""
        start = self._now()
        try:
            result = call()
        finally:
            for hook in self.hooks:
                hook.remove()
            del self.model.model._encode_visual
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
        }
        return result, times


# --------------------------------------------------------------------------------------------------------------------
# crosslmm-answer
# --------------------------------------------------------------------------------------------------------------------
DEFAULT_PROMPT = "What happens in this video?"
DEFAULT_NUM_FRAMES = 8


class UsageError(Exception):
    """A bad command-line input: reported as one line, exit code 2."""


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
        "--prompt", default=DEFAULT_PROMPT, help=f"question about the video (default: {DEFAULT_PROMPT!r})"
    )
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument(
        "--num-frames", type=_positive(int), help=f"frames sampled uniformly (default: {DEFAULT_NUM_FRAMES})"
    )
    sampling.add_argument("--fps", type=_positive(float), help="sample frames at this rate instead")
    parser.add_argument("--max-new-tokens", type=_positive(int), default=32, help="answer length limit (default: 32)")
    parser.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="weights and activations (default: bfloat16 on CUDA, float32 elsewhere)",
    )
    args = parser.parse_args(argv)
    if not args.prompt.strip():
        parser.error("--prompt is empty")
    if args.num_frames is None and args.fps is None:
        args.num_frames = DEFAULT_NUM_FRAMES
    return args


def _progress(message: str):
    print(message, file=sys.stderr, flush=True)


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


def _check_model(model: str) -> str:
    """A checkpoint folder (with config.json), or else a Hub id (`org/name`) left to `from_pretrained`."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"{model} has no config.json: not a checkpoint folder")
        return path
    if os.path.exists(path):
        raise UsageError(f"--model {model} is a file; give a checkpoint folder or a Hub id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"model folder not found: {model}")
    return model


def _resolve_device(device: str | None, dtype: str):
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a torch device (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for CUDA, but no CUDA device is available")
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return device, getattr(torch, dtype)


def _report(answer: str, times: dict, config, visual_tokens: int, random_weights: bool, device, dtype):
    grid, per_frame = config.patch_grid_size, config.tokens_per_frame
    frames = visual_tokens // per_frame
    onevision_per_frame = math.ceil(grid / 2) ** 2  # LLaVA-OneVision pools each frame's patch grid 2 x 2 (bilinear)
    onevision = frames * onevision_per_frame + 1  # plus one newline token per video

    print(f"Answer: {answer}")
    if random_weights:
        print("(Random weights: the sample checkpoint is untrained, so this answer is meaningless text. It shows that")
        print(" the whole path runs: decode -> vision tower -> pooling -> LLM with DCALs -> generate.)")
    print()
    print(f"Frames: {frames}, {config.image_size} px, {grid} x {grid} patches each")
    print(f"Visual tokens in the LLM's sequence: {visual_tokens} ({frames} frames x {per_frame} pooled)")
    print(
        f"LLaVA-OneVision for the same frames: {onevision} ({frames} x {onevision_per_frame} + 1 newline), "
        f"{onevision / visual_tokens:.1f}x as many"
    )
    print(
        f"Original visual tokens the DCALs attend to (after decoder layers {config.dcal_layer_indices}): "
        f"{frames * grid * grid} ({frames} x {grid * grid}), kept out of the self-attention KV cache"
    )
    steps = times["tokens"] - 1  # tokens after the first, which the prefill gives
    rate = f", {steps / times['generate']:.1f} tokens/s" if steps and times["generate"] > 0 else ""
    print(
        f"Times: decode frames {times['decode']:.3f} s | encode (vision tower, pooling) {times['encode']:.3f} s | "
        f"prefill {times['prefill']:.3f} s | generate {times['generate']:.3f} s ({times['tokens']} tokens{rate}) | "
        f"total {times['total']:.3f} s  [{device}, {str(dtype).removeprefix('torch.')}]"
    )


def answer(args: argparse.Namespace):
    """Check the inputs, build the samples if needed, load the pipeline, answer and report."""
    video = _check_video(args.video) if args.video is not None else None
    model = _check_model(args.model) if args.model is not None else None
    device, dtype = _resolve_device(args.device, args.dtype)
    if model is None:
        if not (cache_folder() / "sample-checkpoint").exists():
            _progress(f"Building the random-weight sample checkpoint in {cache_folder()} (once) ...")
        model = str(sample_checkpoint())
    if video is None:
        if not (cache_folder() / "sample-video.mp4").exists():
            _progress(f"Encoding the sample video in {cache_folder()} (once) ...")
        video = str(sample_video())

    from transformers import AutoConfig, pipeline

    _progress(f"Loading {model} on {device} ({str(dtype).removeprefix('torch.')}) ...")
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=True)
        if "video-text-to-text" not in (getattr(config, "custom_pipelines", None) or {}):
            raise UsageError(
                f"{model} is a {config.model_type!r} checkpoint, which has no video-text-to-text pipeline"
            )
        pipe = pipeline("video-text-to-text", model=model, trust_remote_code=True, device=device, dtype=dtype)
    except OSError as error:
        raise UsageError(f"cannot load model {model!r}: {str(error).strip().splitlines()[0]}") from None
    messages = [{"role": "user", "content": [{"type": "video", "path": video}, {"type": "text", "text": args.prompt}]}]
    sampling = {"num_frames": args.num_frames} if args.num_frames is not None else {"fps": args.fps}
    _progress(f"Reading {video} and answering ({sampling}, up to {args.max_new_tokens} new tokens) ...")
    timer = StageTimer(pipe.model)
    try:
        outputs, times = timer.run(
            lambda: pipe(text=messages, max_new_tokens=args.max_new_tokens, return_full_text=False, **sampling)
        )
    except ValueError as error:  # the processor names bad videos, time windows and placeholders
        raise UsageError(str(error).strip().splitlines()[0]) from None
    config = pipe.model.config
    ids = timer.prefill_inputs
    visual_tokens = int(((ids == config.video_token_id) | (ids == config.image_token_id)).sum())
    _report(outputs[0]["generated_text"], times, config, visual_tokens, args.model is None, device, dtype)


def main(argv=None) -> int:
    """Console script `crosslmm-answer`: 0 on success, 2 (with one error line on stderr) on bad input."""
    try:
        answer(parse_args(argv))
    except UsageError as error:
        print(f"crosslmm-answer: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
