"""The one home of CrossLMM's sample and tiny builders, so that nothing needs a download to get a realistic model.

- `build_tokenizer`: a small Qwen2-style byte-level BPE tokenizer trained here, with the ChatML and placeholder tokens.
- `GEOMETRIES`: the named model shapes (`tiny`, `sample`, `small`, `0.5b`, `2b`, `7b`) and `crosslmm_config` to make a
  `CrossLMMConfig` of one; `llava_onevision_video_tokens`: what LLaVA-OneVision spends on the same frames.
- `processor_for_config` (at home in `crosslmm.convert.write`, which the converter writes its processors with): the
  processor for a config (frame size and pooled tokens per frame from the config).
- `build_sample_checkpoint` / `build_sample_video`: a random-weight checkpoint folder as a Hub repository holds it, and
  a short clip encoded with PyAV; `moving_square` / `video_qa_samples`: generated videos and chat samples to train on.
- `shipped_code_files`: the code files a checkpoint carries, found as transformers finds them when it saves one.

`crosslmm-answer`, the tests, the examples and the benchmarks all take their models from here.
"""

import copy
import math
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX

from configuration_crosslmm import DEFAULT_TEXT_CONFIG, DEFAULT_VISION_CONFIG, CrossLMMConfig
from crosslmm.convert.write import processor_for_config


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------

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
# Geometries: CrossLMMConfig arguments of each named size
# --------------------------------------------------------------------------------------------------------------------

# CrossLMM-2B: SigLIP-so400m/14 at 384 px (26 layers, as LLaVA-OneVision keeps them) and Qwen2.5-1.5B-Instruct, the
# config's defaults. The 7B and 0.5B LLMs are those of llava-onevision-qwen2-7b and -0.5b.
QWEN2_7B = {
    **DEFAULT_TEXT_CONFIG,
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}
QWEN2_0_5B = {
    **DEFAULT_TEXT_CONFIG,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
}
GEOMETRIES = {
    # The tests' model: 28 px frames in 4 px patches (a 7 x 7 grid), pooled 2 x 2; a 4-layer LLM with a DCAL after
    # layers 1 and 3; the vision tower encodes 3 frames at a time, so that chunking shows with short videos.
    "tiny": {
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 28,
            "patch_size": 4,
            "vision_use_head": False,
        },
        "text_config": {
            "model_type": "qwen2",
            "vocab_size": 160,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
        },
        "pool_size": 2,
        "cross_attention_interval": 2,
        "image_token_id": 150,
        "video_token_id": 151,
        "vision_batch_size": 3,
    },
    # `crosslmm-answer`'s sample: SigLIP-shaped (384 px, patch 14: the real 27 x 27 = 729 original visual tokens per
    # frame), only narrow and shallow; a Qwen2-shaped LLM of 8 layers with a DCAL after every 2nd, 3 x 3 pooled tokens
    # per frame.
    "sample": {
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 384,
            "patch_size": 14,
            "vision_use_head": False,
        },
        "text_config": {
            "model_type": "qwen2",
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": True,
        },
        "pool_size": 3,
        "cross_attention_interval": 2,
    },
    # The benchmarks' CPU size: the real frame geometry (384 px, patch 14: 729 original tokens and 196 LLaVA-OneVision
    # tokens per frame) with narrow layers, so that token counts, and the ratios between models, are the real ones.
    "small": {
        "vision_config": {
            **DEFAULT_VISION_CONFIG,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
        },
        "text_config": {
            **DEFAULT_TEXT_CONFIG,
            "vocab_size": 4096,
            "hidden_size": 256,
            "intermediate_size": 1024,
            "num_hidden_layers": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    },
    "0.5b": {"vision_config": DEFAULT_VISION_CONFIG, "text_config": QWEN2_0_5B},
    "2b": {"vision_config": DEFAULT_VISION_CONFIG, "text_config": DEFAULT_TEXT_CONFIG},
    "7b": {"vision_config": DEFAULT_VISION_CONFIG, "text_config": QWEN2_7B},
}


def geometry(name: str) -> dict:
    """A copy of the CrossLMMConfig arguments of the size `name` (one of `GEOMETRIES`)."""
    if name not in GEOMETRIES:
        raise ValueError(f"Unknown model size {name!r}; the sizes are {', '.join(GEOMETRIES)}.")
    return copy.deepcopy(GEOMETRIES[name])


def crosslmm_config(name: str, vision: dict | None = None, text: dict | None = None, **fields) -> CrossLMMConfig:
    """The `CrossLMMConfig` of the size `name`: `vision`/`text` update its sub-configs, `fields` its own fields."""
    kwargs = geometry(name)
    kwargs["vision_config"].update(vision or {})
    kwargs["text_config"].update(text or {})
    kwargs.update(fields)
    return CrossLMMConfig(**kwargs)


def llava_onevision_tokens_per_frame(grid: int) -> int:
    """LLM tokens LLaVA-OneVision spends on a video frame whose patch grid side is `grid`: it pools the grid 2 x 2
    (bilinear, rounding up)."""
    return math.ceil(grid / 2) ** 2


def llava_onevision_video_tokens(num_frames: int, grid: int) -> int:
    """LLM tokens LLaVA-OneVision spends on a video of `num_frames` such frames: one newline token ends the video."""
    return num_frames * llava_onevision_tokens_per_frame(grid) + 1


# --------------------------------------------------------------------------------------------------------------------
# The sample checkpoint and video
# --------------------------------------------------------------------------------------------------------------------

SAMPLE_GATE = 0.5  # opened gates, so that the DCALs take part as in a trained checkpoint
# Wide random weights: the untrained model's answer then changes with the video and the question, instead of one token
# repeated whatever the input (the tests compare answers across inputs).
SAMPLE_INITIALIZER_RANGE = 0.3


def build_sample_checkpoint(
    folder,
    size: str = "sample",
    seed: int = 0,
    text: dict | None = None,
    gate_init: float = SAMPLE_GATE,
    **config_kwargs,
):
    """Save a random-weight CrossLMM of the size `size` plus its processor (the tokenizer of `build_tokenizer`) into
    `folder`, as a Hub repository would hold it: config, safetensors weights, processor files and the model code.
    Returns the folder. `text` and `config_kwargs` go to `crosslmm_config`; the vocabulary is the tokenizer's.
    `gate_init`: every DCAL gate's value (0 is the paper's, and `crosslmm-convert`'s default, initialisation: the
    DCALs then add nothing and their attention gets no gradient until a gate moves)."""
    from modeling_crosslmm import CrossLMMForConditionalGeneration

    tokenizer = build_tokenizer()
    text = {"vocab_size": len(tokenizer), "initializer_range": SAMPLE_INITIALIZER_RANGE, **(text or {})}
    config_kwargs = {
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "video_token_id": tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        **config_kwargs,
    }
    config = crosslmm_config(size, text=text, **config_kwargs)

    torch.manual_seed(seed)
    model = CrossLMMForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("v2v_gate", "t2v_gate", "mlp_gate"):
                param.fill_(gate_init)
    generation = model.generation_config
    generation.eos_token_id = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    generation.pad_token_id = tokenizer.pad_token_id

    folder = Path(folder)
    model.save_pretrained(folder)
    processor_for_config(config, tokenizer).save_pretrained(folder)
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


# --------------------------------------------------------------------------------------------------------------------
# Generated training data
# --------------------------------------------------------------------------------------------------------------------

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230)}


def moving_square(colour: str, direction: str, num_frames: int = 4, size: int = 64) -> np.ndarray:
    """(frames, H, W, 3) uint8 video of a square of `colour` crossing the frame to the `direction` ("left"/"right")."""
    video = np.full((num_frames, size, size, 3), 20, dtype=np.uint8)
    side = size // 4
    for t in range(num_frames):
        progress = t / (num_frames - 1)
        x = round(progress * (size - side)) if direction == "right" else round((1 - progress) * (size - side))
        video[t, size // 2 - side // 2 : size // 2 + side // 2, x : x + side] = COLOURS[colour]
    return video


def video_qa_samples() -> list[dict]:
    """Chat samples in the format `crosslmm.train.CrossLMMDataCollator` takes: a square of each colour moving
    each way, each video with a question about its colour and one about its direction (12 samples)."""
    samples = []
    for colour in COLOURS:
        for direction in ("left", "right"):
            video = moving_square(colour, direction)
            for question, answer in (
                ("What colour is the square?", f"The square is {colour}."),
                ("Which way does the square move?", f"It moves to the {direction}."),
            ):
                messages = [
                    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ]
                samples.append({"messages": messages, "videos": [video]})
    return samples


# --------------------------------------------------------------------------------------------------------------------
# The code a checkpoint carries
# --------------------------------------------------------------------------------------------------------------------


def shipped_code_files() -> list[Path]:
    """The code files a checkpoint carries: the modules of what it saves (the model and the processor) and the files
    they import relatively, followed as transformers' `custom_object_save` follows them on `save_pretrained`."""
    from transformers.dynamic_module_utils import get_relative_import_files

    import modeling_crosslmm
    import processing_crosslmm

    files = set()
    for module in (modeling_crosslmm, processing_crosslmm):
        files.add(Path(module.__file__).resolve())
        files.update(Path(name).resolve() for name in get_relative_import_files(module.__file__))
    return sorted(files)
