"""Fine-tuning CrossLMM: a data collator for video chat samples, the paper's two training stages and per-component
learning rates.

The paper (appendix A.1 and table 3) trains in two stages:

* Stage 1, vision-language pretraining: only the projector and the V2V branches of the DCALs learn; T2V is off
  (pretraining captions are too noisy for it) and the vision tower and the LLM are frozen. Table 3's "Projector & T2V
  Cross Attention" contradicts the text and the T2V ablation (table 2c); its 43M trainable parameters for CrossLMM-2B
  are close to the projector plus the DCALs' V2V attention (4.1M + 7 x 5.3M = 41M), without their feed-forward blocks.
* Stage 2, instruction tuning: everything learns, the vision tower at 2e-6 and the connector (projector and DCALs)
  and the LLM at 1e-5.

Parameters are assigned to the components by module names (`vision_tower`, `multi_modal_projector`,
`cross_attention_layers`, `language_model`, `lm_head`), so the grouping holds for models wrapped by PEFT, FSDP or
`torch.compile`, whose parameter names only gain prefixes.

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


# Components of CrossLMM and the module names that belong to each.
COMPONENT_MODULES = {
    "vision_tower": ("vision_tower",),
    "connector": ("multi_modal_projector", "cross_attention_layers"),
    "llm": ("language_model", "lm_head"),
}
V2V_MODULES = ("v2v_norm", "v2v_attn", "v2v_gate")

# Table 3 of the paper. Its text gives 1e-4 for pretraining; table 3 gives 1e-3, the usual rate for a LLaVA projector.
STAGE1_LEARNING_RATE = 1e-3
STAGE2_LEARNING_RATES = {"vision_tower": 2e-6, "connector": 1e-5, "llm": 1e-5}

# PEFT `target_modules` for LoRA on the LLM and the DCALs: every projection of the decoder layers' attention and MLP
# and of the DCALs' V2V/T2V attention and feed-forward block, matched by module name (PEFT full-matches a string).
LORA_TARGET_MODULES = (
    r".*\.(language_model\.layers|cross_attention_layers)\.\d+\.(self_attn|v2v_attn|t2v_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


def component_of(parameter_name: str) -> str:
    """The component ("vision_tower", "connector" or "llm") a parameter belongs to, from its module names."""
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


def _runs_in_crosslmm(parameter_name: str, config) -> bool:
    """False for the parts CrossLMM never runs, which get no gradient (and would stall DDP): of the vision tower, the
    post-layernorm, the head and the encoder layers after `vision_feature_layer`; the V2V branch of a DCAL after the
    last decoder layer (`config.v2v_layer_indices`)."""
    parts = parameter_name.split(".")
    if "cross_attention_layers" in parts and any(module in parts for module in V2V_MODULES):
        return int(parts[parts.index("cross_attention_layers") + 1]) in config.v2v_layer_indices
    if "vision_tower" not in parts:
        return True
    below = parts[parts.index("vision_tower") + 1 :]
    if below[0] == "embeddings":
        return True
    if below[:2] == ["encoder", "layers"]:
        return int(below[2]) < config.vision_layers_run
    return False


def _set_t2v(model: torch.nn.Module, enabled: bool):
    """Switch the T2V branch of every DCAL, and the config that saved checkpoints carry."""
    model.config.use_t2v = enabled
    for module in model.modules():
        if type(module).__name__ == "CrossLMMDualCrossAttentionLayer":
            module.use_t2v = enabled


def setup_stage1(model: torch.nn.Module, learning_rate: float = STAGE1_LEARNING_RATE) -> dict[str, float]:
    """Stage 1 (vision-language pretraining): train the projector and the DCALs' V2V branches, T2V off, everything
    else frozen. Returns the learning rates for `parameter_groups` / `CrossLMMTrainer`."""
    if not model.config.use_v2v:
        raise ValueError("Stage 1 trains the V2V branches, but this model has use_v2v=False.")
    _set_t2v(model, False)
    for name, param in model.named_parameters():
        parts = name.split(".")
        param.requires_grad = "multi_modal_projector" in parts or (
            "cross_attention_layers" in parts
            and any(module in parts for module in V2V_MODULES)
            and _runs_in_crosslmm(name, model.config)
        )
    return {"connector": learning_rate}


def setup_stage2(
    model: torch.nn.Module,
    vision_tower_lr: float = STAGE2_LEARNING_RATES["vision_tower"],
    connector_lr: float = STAGE2_LEARNING_RATES["connector"],
    llm_lr: float = STAGE2_LEARNING_RATES["llm"],
) -> dict[str, float]:
    """Stage 2 (instruction tuning): T2V on and every parameter CrossLMM runs trains. Returns the learning rates per
    component for `parameter_groups` / `CrossLMMTrainer`."""
    _set_t2v(model, True)
    for name, param in model.named_parameters():
        param.requires_grad = _runs_in_crosslmm(name, model.config)
    return {"vision_tower": vision_tower_lr, "connector": connector_lr, "llm": llm_lr}


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
