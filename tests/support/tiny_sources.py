"""Tiny random source checkpoints for convert_checkpoint.py, in every layout it reads, built here (no downloads).

- `llava_onevision_folder`: transformers' LlavaOnevisionForConditionalGeneration + the shared test tokenizer.
- `llava_next_folder`: the same weights under LLaVA-NeXT's original names with a LLaVA-NeXT-like config.json (Qwen2
  fields at the top, `mm_vision_tower` naming a SigLIP config folder) and a tokenizer without <image>/<video>, as
  LLaVA-NeXT's Qwen2 tokenizer; optional DCAL tensors make it a "CrossLMM trained in LLaVA-NeXT".
- `siglip_folder` / `qwen2_folder`: a SigLIP or SigLIP2 dual encoder and a Qwen2 LLM, for --vision/--text.
"""

import json

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Siglip2Config,
    Siglip2Model,
    SiglipConfig,
    SiglipModel,
)

from crosslmm.samples import build_tokenizer, geometry


# The tiny size of crosslmm.samples, with the shared tokenizer's vocabulary.
VISION = geometry("tiny")["vision_config"]
TEXT = {**geometry("tiny")["text_config"], "vocab_size": len(build_tokenizer())}


def llava_onevision_model(seed=0, vision=None, **text_overrides) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = LlavaOnevisionConfig(
        vision_config={**VISION, **(vision or {})},
        text_config={**TEXT, **text_overrides},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=text_overrides.get("tie_word_embeddings", False),
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with torch.no_grad():  # random, not the near-zero init, so that a wrong key shows in the outputs
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


def llava_onevision_folder(folder, **text_overrides):
    model = llava_onevision_model(**text_overrides)
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


def placeholder_free_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen2's ChatML specials but no <image>/<video>, like LLaVA-NeXT's."""
    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]", "describe", "the", "video", "in", "detail", "."]
    words += [f"w{i}" for i in range(64 - len(words))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def llava_next_folder(folder, dcal_tensors=None, vocab_size=64):
    """LLaVA-NeXT's layout of a tiny LLaVA-OneVision whose vocabulary is exactly the tokenizer's (so that adding
    <image>/<video> must grow the embeddings)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = llava_onevision_model(seed=1, vocab_size=vocab_size)
    state = model.state_dict()
    renamed = {}
    for key, tensor in state.items():
        if key.startswith("model.vision_tower."):
            key = "model.vision_tower.vision_tower.vision_model." + key[len("model.vision_tower.") :]
        elif key.startswith("model.multi_modal_projector.linear_"):
            index = {"1": "0", "2": "2"}[key[len("model.multi_modal_projector.linear_")]]
            key = f"model.mm_projector.{index}." + key.rsplit(".", 1)[1]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model.") :]
        renamed[key] = tensor.contiguous()
    renamed.update(dcal_tensors or {})
    half = len(renamed) // 2  # two shards with an index, as real LLaVA-NeXT checkpoints
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, shard_keys in shards.items():
        save_file({k: renamed[k] for k in shard_keys}, folder / name, metadata={"format": "pt"})
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    tower = folder.parent / f"{folder.name}-siglip"
    SiglipConfig(vision_config={k: v for k, v in VISION.items() if k != "model_type"}).save_pretrained(tower)
    text = model.config.text_config
    config = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava",
        **{
            k: getattr(text, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
                "rms_norm_eps",
                "max_position_embeddings",
                "tie_word_embeddings",
                "hidden_act",
            )
        },
        "rope_theta": text.rope_parameters["rope_theta"],
        "mm_vision_tower": str(tower),
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": VISION["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres_max_9",
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    placeholder_free_tokenizer().save_pretrained(folder)
    return model


def siglip_folder(folder, siglip2=False):
    """A SigLIP (or SigLIP2) dual encoder whose vision tower has 3 layers: the conversion keeps 2."""
    torch.manual_seed(2)
    vision = {k: v for k, v in VISION.items() if k not in ("model_type", "vision_use_head")}
    vision["num_hidden_layers"] = 3
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100)
    if siglip2:  # NaFlex: the patch grid comes from num_patches
        vision = {k: v for k, v in vision.items() if k != "image_size"} | {"num_patches": 49}
        model = Siglip2Model(Siglip2Config(vision_config=vision, text_config=text))
    else:
        model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder


def qwen2_folder(folder, **overrides):
    torch.manual_seed(3)
    text = {k: v for k, v in TEXT.items() if k != "model_type"}
    model = Qwen2ForCausalLM(Qwen2Config(**{**text, **overrides}))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder
