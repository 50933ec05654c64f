"""Planning a conversion: the CrossLMM config, and a recipe for every target tensor (copied from a source key or
initialised), every source tensor placed or dropped for a reason."""

import re
import zlib
from dataclasses import dataclass, field

import torch
from transformers import Qwen2Config

from configuration_crosslmm import CrossLMMConfig
from crosslmm.convert import ConversionError, logger
from crosslmm.convert.sources import ConversionSource, WeightSource, rename
from modeling_crosslmm import CrossLMMForConditionalGeneration


# Source tensors with no place in CrossLMM, dropped on purpose (the run lists them with these reasons).
DROPPED_SOURCE_KEYS = [
    (r"^(?:model\.)?image_newline$", "LLaVA-OneVision's AnyRes row separator (CrossLMM has no AnyRes tiling)"),
    (r"rotary_emb\.inv_freq$", "rotary frequencies (recomputed from the config)"),
    (r"^text_model\.|^logit_scale$|^logit_bias$", "SigLIP's text tower and contrastive logit scale/bias"),
]
MAX_LISTED = 20  # keys named per kind of problem; a wrong config would otherwise list every tensor


# --------------------------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """How to make one CrossLMM tensor: copied from a source key (rows appended when the vocabulary grows), or
    initialised (`zeros`, `ones`, `fill` with `value`, `normal` with `std`)."""

    source: WeightSource | None = None
    key: str | None = None
    init: str | None = None
    std: float = 0.0
    value: float = 0.0
    extra_rows: int = 0

    def make(self, target_key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        if self.source is not None:
            tensor = self.source.read(self.key)
            if self.extra_rows:  # new token rows start at the mean of the old ones
                mean = tensor.float().mean(0, keepdim=True).to(tensor.dtype)
                tensor = torch.cat([tensor, mean.expand(self.extra_rows, -1)])
            return tensor
        if self.init == "zeros":
            return torch.zeros(shape)
        if self.init == "ones":
            return torch.ones(shape)
        if self.init == "fill":
            return torch.full(shape, self.value)
        # Seeded per key, so that a tensor's values do not depend on the shard layout.
        generator = torch.Generator().manual_seed(seed + zlib.crc32(target_key.encode()))
        return torch.randn(shape, generator=generator) * self.std


@dataclass
class Plan:
    """Every CrossLMM tensor with its recipe, the source keys dropped on purpose, and what went wrong."""

    recipes: dict[str, Recipe] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> reason
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------------
# The CrossLMM config and the tensors it needs
# --------------------------------------------------------------------------------------------------------------------


def build_config(source: ConversionSource, tokenizer, args, dtype: torch.dtype) -> CrossLMMConfig:
    """The CrossLMM config of the source's parts, the tokenizer's placeholders and the command's DCAL options (a
    trained source's DCAL layout wins)."""
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    text_config = Qwen2Config(**source.text_config.to_dict())
    text_config.vocab_size = max(text_config.vocab_size, image_token_id + 1, video_token_id + 1)
    text_config.tie_word_embeddings = source.tie_word_embeddings
    dcal_layers = None
    if source.kind == "crosslmm_llava_next":  # where the trained DCALs are, from their keys
        targets = [rename(key, key_map) or "" for weights, key_map in source.weights for key in weights.keys()]
        dcal_layers = sorted({int(t.split(".")[2]) for t in targets if t.startswith("model.cross_attention_layers.")})
    try:
        config = CrossLMMConfig(
            vision_config=source.vision_config.to_dict(),
            text_config=text_config.to_dict(),
            pool_size=args.pool_size,
            cross_attention_interval=args.cross_attention_interval,
            cross_attention_layers=dcal_layers,
            v2v_scope=args.v2v_scope,
            vision_feature_layer=source.vision_feature_layer,
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            tie_word_embeddings=source.tie_word_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    except ValueError as error:
        raise ConversionError(f"The source does not make a valid CrossLMM config: {error}") from error
    if dcal_layers and dcal_layers == list(range(dcal_layers[0], text_config.num_hidden_layers, dcal_layers[0] + 1)):
        config.cross_attention_layers, config.cross_attention_interval = None, dcal_layers[0] + 1  # a regular layout
    config.dtype = str(dtype).removeprefix("torch.")
    return config


def expected_tensors(config: CrossLMMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a CrossLMM with this config saves, with its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = CrossLMMForConditionalGeneration(config)
    tied = set(model._tied_weights_keys) if config.tie_word_embeddings else set()
    return {key: tuple(t.shape) for key, t in model.state_dict().items() if key not in tied}


# --------------------------------------------------------------------------------------------------------------------
# Every target tensor gets a recipe, every source tensor a place or a reason to drop it
# --------------------------------------------------------------------------------------------------------------------


def plan_conversion(source: ConversionSource, config: CrossLMMConfig, dcal_init: str, gate_init: float = 0.0) -> Plan:
    plan = Plan()
    expected = expected_tensors(config)
    for weights, key_map in source.weights:
        for key in weights.keys():
            reason = _drop_reason(key, source, config)
            if reason:
                plan.dropped[key] = reason
                continue
            target = rename(key, key_map)
            if target is not None and target in plan.recipes:
                plan.unexpected.append(f"{key} (a second source for {target})")
            elif target in expected:
                plan.recipes[target] = Recipe(source=weights, key=key)
            elif target is not None and (reason := _drop_reason(target, source, config)):
                plan.dropped[key] = reason
            else:
                plan.unexpected.append(key)

    std = config.text_config.initializer_range
    for target in expected:
        if target not in plan.recipes:
            recipe = _new_tensor(target, config, source, plan, dcal_init, std, gate_init)
            if recipe is not None:
                plan.recipes[target] = recipe

    for target, recipe in plan.recipes.items():
        if recipe.source is None:
            continue
        shape = recipe.source.shape(recipe.key)
        want = expected[target]
        if target.endswith(("embed_tokens.weight", "lm_head.weight")) and len(shape) == 2 and shape[1:] == want[1:]:
            recipe.extra_rows = max(want[0] - shape[0], 0)  # placeholders added to the tokenizer
            shape = (shape[0] + recipe.extra_rows, *shape[1:])
        if shape != want:
            plan.mismatched.append(f"{recipe.key} -> {target}: source {shape}, CrossLMM {want}")
    missing = [key for key in expected if key not in plan.recipes]
    problems = []
    for title, keys in (
        ("missing (no source tensor)", missing),
        ("unexpected (no place in CrossLMM)", plan.unexpected),
        ("shape-mismatched", plan.mismatched),
    ):
        if keys:
            listed = keys[:MAX_LISTED] + ([f"... and {len(keys) - MAX_LISTED} more"] if len(keys) > MAX_LISTED else [])
            problems.append(f"{len(keys)} {title}:\n  " + "\n  ".join(listed))
    if problems:
        hint = " (a trained CrossLMM with other DCAL names needs --key-map)" if plan.unexpected else ""
        raise ConversionError(f"The source does not fit CrossLMM{hint}.\n" + "\n".join(problems))
    plan.recipes = {key: plan.recipes[key] for key in expected}  # the model's order: layers stay together
    return plan


def _drop_reason(key: str, source: ConversionSource, config: CrossLMMConfig) -> str | None:
    """Why a (source or renamed) key has no place in CrossLMM on purpose; None if it should have one."""
    for pattern, reason in DROPPED_SOURCE_KEYS:
        if re.search(pattern, key):
            return reason
    if key.startswith("model.vision_tower.head.") and not config.vision_config.vision_use_head:
        return "SigLIP's attention-pooling head (CrossLMM uses the patch tokens)"
    match = re.match(r"model\.vision_tower\.encoder\.layers\.(\d+)\.", key)
    if match and source.vision_layers_kept is not None and int(match.group(1)) >= source.vision_layers_kept:
        return "SigLIP's last encoder layer (CrossLMM, as LLaVA-OneVision, reads the penultimate layer)"
    if key == "lm_head.weight" and config.tie_word_embeddings:
        return "tied to embed_tokens"
    return None


def _new_tensor(
    target: str, config, source: ConversionSource, plan: Plan, dcal_init: str, std: float, gate_init: float = 0.0
) -> Recipe | None:
    """Recipes for the tensors no source has: the DCALs (and, from parts, the projector). The gates start at
    `gate_init`: the paper's 0 leaves the converted model the source's, but its DCAL attention gets no gradient until
    a gate has moved (d out / d attention = tanh(gate) = 0); an opened gate trains it from the first step."""
    match = re.match(r"model\.cross_attention_layers\.(\d+)\.(.+)$", target)
    if match and source.kind != "crosslmm_llava_next":
        layer, name = match.groups()
        if name.endswith("_gate"):
            return Recipe(init="fill", value=gate_init)  # at 0 (tanh(0) = 0) the DCAL adds nothing until trained
        if name.endswith("norm.weight"):
            return Recipe(init="ones")
        if name.startswith("mlp.") and dcal_init == "copy":
            return plan.recipes.get(f"model.language_model.layers.{layer}.{name}")
        return Recipe(init="normal", std=std)
    if target.startswith("model.multi_modal_projector.") and source.kind == "parts":
        return Recipe(init="zeros") if target.endswith(".bias") else Recipe(init="normal", std=std)
    return None


def report_plan(plan: Plan, source: ConversionSource, num_parameters: int):
    """What the run will do: the source format, the tensors copied, new and dropped (with the reasons)."""
    copied = sum(r.source is not None for r in plan.recipes.values())
    logger.info(
        f"Source format: {source.kind}; {num_parameters / 1e6:,.1f}M parameters; {copied} tensors copied, "
        f"{len(plan.recipes) - copied} new, {len(plan.dropped)} dropped on purpose."
    )
    by_reason: dict[str, list[str]] = {}
    for key, reason in plan.dropped.items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        logger.info(f"Dropped ({reason}): {', '.join(keys)}")
