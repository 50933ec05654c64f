"""Fine-tuning CrossLMM: a data collator for video chat samples, the paper's two training stages and per-component
learning rates.

The paper (appendix A.1 and table 3) trains in two stages:

* Stage 1, vision-language pretraining: only the projector and the V2V branches of the DCALs learn; T2V is off
  (pretraining captions are too noisy for it) and the vision tower and the LLM are frozen. Table 3's "Projector & T2V
  Cross Attention" contradicts the text and the T2V ablation (table 2c); its 43M trainable parameters for CrossLMM-2B
  are close to the projector plus the DCALs' V2V attention (4.1M + 7 x 5.3M = 41M), without their feed-forward blocks.
* Stage 2, instruction tuning: everything learns, the vision tower at 2e-6 and the connector (projector and DCALs)
  and the LLM at 1e-5.

`setup_training` does either, or anything between (what `crosslmm-train`'s flags ask for): which components train, at
which rates, with the DCAL gates trained or frozen.

Parameters are assigned to the components (`vision_tower`, `projector`, `dcals`, `llm`) by module names
(`vision_tower`, `multi_modal_projector`, `cross_attention_layers`, `language_model`, `lm_head`), so the grouping holds
for models wrapped by PEFT, FSDP or `torch.compile`, whose parameter names only gain prefixes.

The collator renders chat samples with the processor's chat template, lets the processor expand each `<video>` /
`<image>` placeholder and prepare the frames, and keeps labels only on the assistant turns (ChatML, as the Qwen2
LLM was trained with): the model learns to answer, not to repeat the question or the system prompt.
"""

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer


IGNORE_INDEX = -100  # label of positions the loss skips (transformers' and PyTorch's convention)
ASSISTANT_HEADER = "<|im_start|>assistant\n"  # ChatML: what opens an assistant turn
TURN_END = "<|im_end|>"  # ChatML: what closes every turn


def assistant_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tokenizer) -> torch.Tensor:
    """Labels that keep only the assistant turns of ChatML token ids: each turn's text and its closing `<|im_end|>`
    (so the model learns to stop), not the `<|im_start|>assistant\n` header; everything else is IGNORE_INDEX.

    Raises for a row with no assistant token, whose loss would be NaN (a division by zero tokens).
    """
    header = tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
    turn_end = tokenizer.convert_tokens_to_ids(TURN_END)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, ids in enumerate(input_ids.tolist()):
        length = int(attention_mask[row].sum()) if attention_mask is not None else len(ids)
        position = 0
        while position < len(ids):
            if ids[position : position + len(header)] != header:
                position += 1
                continue
            start = position + len(header)
            end = ids.index(turn_end, start) + 1 if turn_end in ids[start:] else len(ids)
            labels[row, start:end] = input_ids[row, start:end]
            position = end
        if attention_mask is not None:  # padding is never an answer, wherever the padding side
            labels[row][attention_mask[row] == 0] = IGNORE_INDEX
        if not (labels[row] != IGNORE_INDEX).any():
            raise ValueError(
                f"Sample {row} has no assistant turn to learn from ({length} tokens, none after "
                f"{ASSISTANT_HEADER!r}): every label would be {IGNORE_INDEX} and its loss NaN. Give each sample an "
                f"assistant message."
            )
    return labels


@dataclass
class CrossLMMDataCollator:
    """Batches video chat samples for `Trainer`: a sample is
    `{"messages": [...], "videos": [frames, ...], "images": [image, ...]}` with the messages in the processor's chat
    format (`{"type": "video"}` / `{"type": "image"}` content items mark where each video/image goes, in order) and
    each video as its frames, as the processor takes them. "videos" and "images" are optional.

    Returns the processor's model inputs plus `labels` from `assistant_labels`.
    """

    processor: Any  # CrossLMMProcessor

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        texts = [self.processor.apply_chat_template(sample["messages"], tokenize=False) for sample in samples]
        videos = [video for sample in samples for video in sample.get("videos", ())]
        images = [image for sample in samples for image in sample.get("images", ())]
        batch = self.processor(
            text=texts, videos=videos or None, images=images or None, padding=True, return_tensors="pt"
        )
        batch["labels"] = assistant_labels(batch["input_ids"], batch.get("attention_mask"), self.processor.tokenizer)
        return batch


# Components of CrossLMM and the module names that belong to each; each has its own learning rate.
COMPONENT_MODULES = {
    "vision_tower": ("vision_tower",),
    "projector": ("multi_modal_projector",),
    "dcals": ("cross_attention_layers",),
    "llm": ("language_model", "lm_head"),
}
V2V_MODULES = ("v2v_norm", "v2v_attn", "v2v_gate")
T2V_MODULES = ("t2v_norm", "t2v_attn", "t2v_gate")
MLP_MODULES = ("mlp_norm", "mlp", "mlp_gate")
GATES = ("v2v_gate", "t2v_gate", "mlp_gate")  # tanh(gate) scales each DCAL branch; tanh(0) = 0 shuts it

# Table 3 of the paper. Its text gives 1e-4 for pretraining; table 3 gives 1e-3, the usual rate for a LLaVA projector.
STAGE1_LEARNING_RATE = 1e-3
STAGE2_LEARNING_RATES = {"vision_tower": 2e-6, "projector": 1e-5, "dcals": 1e-5, "llm": 1e-5}

# PEFT `target_modules` for LoRA on the LLM and the DCALs: every projection of the decoder layers' attention and MLP
# and of the DCALs' V2V/T2V attention and feed-forward block, matched by module name (PEFT full-matches a string).
LORA_TARGET_MODULES = (
    r".*\.(language_model\.layers|cross_attention_layers)\.\d+\.(self_attn|v2v_attn|t2v_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


def component_of(parameter_name: str) -> str:
    """The component ("vision_tower", "projector", "dcals" or "llm") a parameter belongs to, from its module names."""
    parts = parameter_name.split(".")
    for component, modules in COMPONENT_MODULES.items():
        if any(module in parts for module in modules):
            return component
    raise ValueError(f"Parameter {parameter_name!r} belongs to no CrossLMM component {tuple(COMPONENT_MODULES)}.")


def parameter_groups(model: torch.nn.Module, learning_rates: dict[str, float], weight_decay: float = 0.0):
    """Optimizer parameter groups, one per component with trainable parameters, each at its own learning rate.

    Norm weights, biases and the DCAL gates (1-D parameters) get no weight decay. Raises if a trainable parameter's
    component has no learning rate, so that nothing trains at a rate nobody chose.
    """
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = component_of(name)
        if component not in learning_rates:
            raise ValueError(
                f"Parameter {name!r} is trainable but its component {component!r} has no learning rate in "
                f"{learning_rates}."
            )
        decay = weight_decay if param.ndim >= 2 else 0.0
        key = (component, decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": learning_rates[component], "weight_decay": decay, "name": component}
        groups[key]["params"].append(param)
    return list(groups.values())


def _dcal_module(parts: list[str]) -> tuple[int, str] | None:
    """(layer index, module name) of a DCAL parameter's name split at dots, None for any other parameter."""
    if "cross_attention_layers" not in parts:
        return None
    at = parts.index("cross_attention_layers")
    return int(parts[at + 1]), parts[at + 2]


def _runs_in_crosslmm(parameter_name: str, config) -> bool:
    """False for the parts CrossLMM never runs, which get no gradient (and would stall DDP): of the vision tower, the
    post-layernorm, the head and the encoder layers after `vision_feature_layer`; a DCAL's V2V branch after the last
    decoder layer or with `use_v2v` off (`config.v2v_layer_indices`), its T2V branch with `use_t2v` off, and its
    feed-forward block where neither branch runs."""
    parts = parameter_name.split(".")
    dcal = _dcal_module(parts)
    if dcal is not None:
        layer, module = dcal
        v2v, t2v = layer in config.v2v_layer_indices, bool(config.use_t2v)
        return {V2V_MODULES: v2v, T2V_MODULES: t2v, MLP_MODULES: v2v or t2v}[
            next(group for group in (V2V_MODULES, T2V_MODULES, MLP_MODULES) if module in group)
        ]
    if "vision_tower" not in parts:
        return True
    below = parts[parts.index("vision_tower") + 1 :]
    if below[0] == "embeddings":
        return True
    if below[:2] == ["encoder", "layers"]:
        return int(below[2]) < config.vision_layers_run
    return False


def set_branches(model: torch.nn.Module, use_t2v: bool, use_v2v: bool):
    """Switch the T2V and V2V branches of every DCAL, and the config that saved checkpoints carry. Raises ValueError
    when both are off in a model with DCALs (they would have nothing to do)."""
    config = model.config
    if config.dcal_layer_indices and not (use_t2v or use_v2v):
        raise ValueError("use_t2v and use_v2v are both off: the DCALs would have nothing to do")
    config.use_t2v, config.use_v2v = bool(use_t2v), bool(use_v2v)
    for module in model.modules():
        if type(module).__name__ == "CrossLMMDualCrossAttentionLayer":
            module.use_t2v = config.use_t2v
            module.use_v2v = module.layer_idx in config.v2v_layer_indices


def _set_t2v(model: torch.nn.Module, enabled: bool):
    set_branches(model, enabled, model.config.use_v2v)


def setup_training(
    model: torch.nn.Module,
    learning_rates: dict[str, float],
    dcal_branches_only: bool = False,
    train_gates: bool = True,
) -> dict[str, float]:
    """Train the components that `learning_rates` names (at those rates), of them only what CrossLMM runs, and freeze
    the rest. `dcal_branches_only`: of the DCALs, only their attention branches in use (stage 1), not their
    feed-forward blocks. `train_gates=False` keeps every DCAL gate at its checkpoint value. Returns the learning rates
    of the components that train, for `parameter_groups` / `CrossLMMTrainer`."""
    unknown = set(learning_rates) - set(COMPONENT_MODULES)
    if unknown:
        raise ValueError(f"Unknown components {sorted(unknown)}; the components are {', '.join(COMPONENT_MODULES)}.")
    for name, param in model.named_parameters():
        parts = name.split(".")
        trains = component_of(name) in learning_rates and _runs_in_crosslmm(name, model.config)
        dcal = _dcal_module(parts)
        if dcal is not None and dcal_branches_only and dcal[1] not in V2V_MODULES + T2V_MODULES:
            trains = False
        if parts[-1] in GATES and not train_gates:
            trains = False
        param.requires_grad = trains
    return dict(learning_rates)


def setup_stage1(model: torch.nn.Module, learning_rate: float = STAGE1_LEARNING_RATE) -> dict[str, float]:
    """Stage 1 (vision-language pretraining): train the projector and the DCALs' V2V branches, T2V off, everything
    else frozen. Returns the learning rates for `parameter_groups` / `CrossLMMTrainer`."""
    if not model.config.use_v2v:
        raise ValueError("Stage 1 trains the V2V branches, but this model has use_v2v=False.")
    _set_t2v(model, False)
    return setup_training(model, {"projector": learning_rate, "dcals": learning_rate}, dcal_branches_only=True)


def setup_stage2(
    model: torch.nn.Module,
    vision_tower_lr: float = STAGE2_LEARNING_RATES["vision_tower"],
    connector_lr: float = STAGE2_LEARNING_RATES["projector"],
    llm_lr: float = STAGE2_LEARNING_RATES["llm"],
) -> dict[str, float]:
    """Stage 2 (instruction tuning): T2V on and every parameter CrossLMM runs trains; `connector_lr` is the projector's
    and the DCALs'. Returns the learning rates per component for `parameter_groups` / `CrossLMMTrainer`."""
    _set_t2v(model, True)
    rates = {"vision_tower": vision_tower_lr, "projector": connector_lr, "dcals": connector_lr, "llm": llm_lr}
    return setup_training(model, rates)


class CrossLMMTrainer(Trainer):
    """`Trainer` whose optimizer gives each component its own learning rate.

    The groups are built from parameter names when the optimizer is created, that is after FSDP or DeepSpeed have
    wrapped the model, which is why this is a Trainer method and not an optimizer passed in from outside.
    """

    def __init__(self, *args, learning_rates: dict[str, float], **kwargs):
        self.learning_rates = dict(learning_rates)
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = parameter_groups(opt_model, self.learning_rates, self.args.weight_decay)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer
