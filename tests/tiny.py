"""Tiny random CrossLMM configurations and inputs shared by the tests (no downloads)."""

import torch

from configuration_crosslmm import CrossLMMConfig


IMAGE_TOKEN_ID = 150
VIDEO_TOKEN_ID = 151
IMAGE_SIZE = 28  # 7 x 7 patches of 4 px


def tiny_config(**overrides) -> CrossLMMConfig:
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": 4,
        "vision_use_head": False,
    }
    text = {
        "model_type": "qwen2",
        "vocab_size": 160,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    vision.update(overrides.pop("vision", {}))
    text.update(overrides.pop("text", {}))
    kwargs = dict(
        vision_config=vision,
        text_config=text,
        pool_size=2,
        cross_attention_interval=2,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_batch_size=3,
    )
    kwargs.update(overrides)
    return CrossLMMConfig(**kwargs)


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
            ids += [config.video_token_id] * (part[1] * config.pool_size**2)
        elif part[0] == "image":
            ids += [config.image_token_id] * config.pool_size**2
        else:
            ids += list(part)
    return torch.tensor([ids])


def reference_llm(model):
    """transformers' own Qwen2ForCausalLM holding CrossLMM's LLM weights."""
    from transformers import Qwen2ForCausalLM

    llm = Qwen2ForCausalLM(model.config.text_config).eval()
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    llm.load_state_dict(state)
    return llm
