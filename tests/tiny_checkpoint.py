"""A tiny checkpoint folder (model, processor, tokenizer, code) and a tiny video, built as `crosslmm-answer` builds its
sample ones, only smaller, for the pipeline and command-line tests."""

from crosslmm_cli import build_sample_checkpoint, build_sample_video


# 56 px / patch 14: a 4 x 4 patch grid pooled to 3 x 3; 4 decoder layers with DCALs after layers 1 and 3.
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
}
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
VIDEO_SECONDS, VIDEO_FPS = 1.0, 8


def build_tiny_checkpoint(folder):
    return build_sample_checkpoint(folder, vision=TINY_VISION, text=TINY_TEXT, vision_batch_size=4)


def build_tiny_video(path):
    return build_sample_video(path, seconds=VIDEO_SECONDS, fps=VIDEO_FPS, width=64, height=48)
