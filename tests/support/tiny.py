"""Tiny random CrossLMM models, inputs and checkpoint folders shared by the tests: the `tiny` size of
`crosslmm.samples` (no downloads)."""

import torch

from crosslmm.samples import build_sample_checkpoint, build_sample_video, crosslmm_config


IMAGE_SIZE = crosslmm_config("tiny").image_size  # 28 px: 7 x 7 patches of 4 px
# The tiny checkpoint's video: 8 frames a second for 1 s, 64 x 48 px.
VIDEO_SECONDS, VIDEO_FPS = 1.0, 8


def tiny_config(**overrides):
    """The tiny size's `CrossLMMConfig`; `vision`/`text` update its sub-configs, other keys its CrossLMM fields."""
    return crosslmm_config("tiny", **overrides)


def tiny_model(config=None, gates=0.0, seed=0, **overrides):
    from modeling_crosslmm import CrossLMMForConditionalGeneration

    torch.manual_seed(seed)
    config = config or tiny_config(**overrides)
    model = CrossLMMForConditionalGeneration(config).eval()
    set_gates(model, gates)
    return model


def set_gates(model, value, names=("v2v_gate", "t2v_gate", "mlp_gate")):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in names:
                param.fill_(value)


def frames(num_frames, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_frames, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)


def prompt(config, *parts):
    """Token ids from parts: ints are text tokens, ('video', T) and ('image',) expand to their placeholders."""
    ids = []
    for part in parts:
        if isinstance(part, int):
            ids.append(part)
        elif part[0] == "video":
            ids += [config.video_token_id] * (part[1] * config.tokens_per_frame)
        elif part[0] == "image":
            ids += [config.image_token_id] * config.tokens_per_frame
        else:
            ids += list(part)
    return torch.tensor([ids])


def count_encoded_frames(model):
    """A list that gets the number of frames of every vision-tower pass of `model` from now on."""
    encoded = []
    model.model.vision_tower.embeddings.register_forward_hook(lambda m, args, out: encoded.append(out.shape[0]))
    return encoded


def reference_llm(model):
    """transformers' own Qwen2ForCausalLM holding CrossLMM's LLM weights."""
    from transformers import Qwen2ForCausalLM

    llm = Qwen2ForCausalLM(model.config.text_config).eval()
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    llm.load_state_dict(state)
    return llm


def sample_inputs(config, seed=0):
    """One sample: text, a 2-frame video, text, an image, text."""
    ids = prompt(config, [1, 2], ("video", 2), [3], ("image",), [4, 5])
    return dict(input_ids=ids, pixel_values_videos=frames(2, seed=seed)[None], pixel_values=frames(1, seed=seed + 7))


def left_padded(rows):
    """(input_ids, attention_mask) of 1-D id tensors padded on the left, as for generation."""
    width = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


# Ragged on purpose: different frame counts, an image after the text of the first sample, left padding. Samples 0 and
# 2 share a frame count (one V2V call for both in "video" scope) and samples 0 and 2 see the same T2V memory length,
# with sample 1 between them (the gathered, non-consecutive rows of the cached memory).
VIDEO_FRAMES = (2, 3, 2)


def padded_batch(config):
    """Three samples of different lengths and frame counts, an image in the first, padded on the left."""
    rows = [
        prompt(config, [1, 2], ("video", 2), [3, 4, 5], ("image",), [6])[0],
        prompt(config, [7], ("video", 3), [8, 9])[0],
        prompt(config, [10, 11, 12], ("video", 2), [13, 14])[0],
    ]
    input_ids, attention_mask = left_padded(rows)
    videos = [frames(n, seed=i) for i, n in enumerate(VIDEO_FRAMES)]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values_videos": videos,
        "pixel_values": frames(1, seed=9),
    }


def tiny_checkpoint(folder):
    """A tiny checkpoint folder (model, processor, tokenizer, code), built as `crosslmm-answer` builds its sample."""
    return build_sample_checkpoint(folder, "tiny")


def tiny_video(path):
    return build_sample_video(path, seconds=VIDEO_SECONDS, fps=VIDEO_FPS, width=64, height=48)


def enable_checkpointing(model, **checkpointing_kwargs):
    """Activation checkpointing by the name this transformers release documents: activation_checkpointing_enable
    from 5.25 on (gradient_checkpointing_enable warns there and goes in v6), gradient_checkpointing_enable before."""
    if hasattr(model, "activation_checkpointing_enable"):
        return model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs or None)
    return model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs or None)
