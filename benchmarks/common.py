"""What the benchmarks share: CrossLMM and LLaVA-OneVision built from the same parts, prompts laid out the same way,
and the record (machine, command, date, versions) every result file carries."""

import datetime
import json
import math
import platform
import sys
from pathlib import Path

import torch
import transformers
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: the model's own files

from configuration_crosslmm import CrossLMMConfig  # noqa: E402
from modeling_crosslmm import CrossLMMForConditionalGeneration  # noqa: E402


SIGLIP_SO400M_384 = {  # as LLaVA-OneVision runs it: 26 of the 27 layers (its last layer is dropped), no head
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "vision_use_head": False,
}
QWEN25_1_5B = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 262144,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
QWEN25_7B = {
    **QWEN25_1_5B,
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}
# CPU sizes keep the real frame geometry (384 px, patch 14: 729 original tokens, 196 LLaVA-OV tokens per frame) and
# shrink the widths, so that the token counts, and hence the ratios between the models, stay those of the real ones.
SMALL_VISION = {
    **SIGLIP_SO400M_384,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
}
SMALL_TEXT = {
    **QWEN25_1_5B,
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
TINY_VISION = {
    **SMALL_VISION,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "image_size": 112,
    "patch_size": 14,
}
TINY_TEXT = {**SMALL_TEXT, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4}
SIZES = {
    "tiny": (TINY_VISION, TINY_TEXT),
    "small": (SMALL_VISION, SMALL_TEXT),
    "2b": (SIGLIP_SO400M_384, QWEN25_1_5B),
    "7b": (SIGLIP_SO400M_384, QWEN25_7B),
}
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 3, 4  # inside every size's vocabulary
TEXT_BEFORE, TEXT_AFTER = 16, 48  # 64 text tokens: a system/user preamble before the video, the question after it


def crosslmm_config(size, pool_size=3, v2v_scope="video", attn_implementation="sdpa", vision_batch_size=64):
    vision, text = SIZES[size]
    config = CrossLMMConfig(
        vision_config=vision,
        text_config=text,
        pool_size=pool_size,
        v2v_scope=v2v_scope,
        cross_attention_interval=4,
        vision_batch_size=vision_batch_size,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
    )
    config._attn_implementation = attn_implementation
    return config


def llava_config(size, attn_implementation="sdpa"):
    vision, text = SIZES[size]
    config = LlavaOnevisionConfig(
        vision_config=dict(vision),
        text_config=dict(text),
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    config._attn_implementation = attn_implementation
    return config


def build(config, device="cpu", dtype=torch.float32, seed=0):
    """Random-weight CrossLMM or LLaVA-OneVision (by config type) on `device` ("meta": shapes only), in eval mode."""
    cls = (
        CrossLMMForConditionalGeneration
        if isinstance(config, CrossLMMConfig)
        else LlavaOnevisionForConditionalGeneration
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config)
    return model.to(dtype).eval()


def video_tokens(config, num_frames):
    """Placeholder tokens one video of `num_frames` takes in the LLM input."""
    if isinstance(config, CrossLMMConfig):
        return num_frames * config.tokens_per_frame
    grid = config.vision_config.image_size // config.vision_config.patch_size
    return num_frames * math.ceil(grid / 2) ** 2 + 1  # LLaVA-OV: 2x2 bilinear pooling, one newline token per video


def frame_size(config):
    """Side of the frames each model takes: CrossLMM asks for exactly the patch grid (378 px for so400m/14),
    LLaVA-OneVision for the tower's nominal size (384 px; its patch convolution drops the last 6 px)."""
    return config.image_size if isinstance(config, CrossLMMConfig) else config.vision_config.image_size


def prompt_ids(config, num_frames, seed=0):
    """(1, L) ids: TEXT_BEFORE text tokens, the video's placeholders, TEXT_AFTER text tokens."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(100, 1000, (TEXT_BEFORE + TEXT_AFTER,), generator=generator)
    video = torch.full((video_tokens(config, num_frames),), VIDEO_TOKEN_ID)
    return torch.cat([text[:TEXT_BEFORE], video, text[TEXT_BEFORE:]])[None]


def environment():
    """Where and how a result was measured."""
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
        machine["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            machine["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "machine": machine,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
        },
    }


def print_table(rows, columns):
    """Rows (dicts) as a markdown table, in the given column order."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join(" --- " for _ in columns) + "|")
    for line in cells:
        print("| " + " | ".join(line) + " |")


def _cell(value):
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def write_json(path, results):
    with open(path, "w") as f:
        json.dump({**environment(), "results": results}, f, indent=2)
    print(f"\nwrote {path}")
