"""Fine-tuning CrossLMM on transformers' `Trainer`: the collator, the paper's two stages as data, per-component
learning rates, LoRA, and `CrossLMMTrainer`.

The paper (appendix A.1 and table 3) trains in two stages, `STAGES`:

* Stage 1, vision-language pretraining: only the projector and the V2V branches of the DCALs learn; T2V is off
  (pretraining captions are too noisy for it) and the vision tower and the LLM are frozen. Table 3's "Projector & T2V
  Cross Attention" contradicts the text and the T2V ablation (table 2c); its 43M trainable parameters for CrossLMM-2B
  are close to the projector plus the DCALs' V2V attention (4.1M + 7 x 5.3M = 41M), without their feed-forward blocks.
* Stage 2, instruction tuning: everything learns, the vision tower at 2e-6 and the connector (projector and DCALs)
  and the LLM at 1e-5.

`setup_training(model, stage)` does either, or anything between (a `Stage` with other fields: what `crosslmm-train`'s
flags ask for). Parameters are assigned to the components (`vision_tower`, `projector`, `dcals`, `llm`) by module
names (`vision_tower`, `multi_modal_projector`, `cross_attention_layers`, `language_model`, `lm_head`), so the
grouping holds for models wrapped by PEFT, FSDP or `torch.compile`, whose parameter names only gain prefixes.

The collator renders chat samples with the processor's chat template, lets the processor expand each `<video>` /
`<image>` placeholder and prepare the frames, and keeps labels only on the assistant turns (ChatML, as the Qwen2
LLM was trained with): the model learns to answer, not to repeat the question or the system prompt.
"""

import copy
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from crosslmm.errors import UsageError
from crosslmm.train.data import LengthGroupedSampler


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

    Returns the processor's model inputs plus `labels` from `assistant_labels`. Samples of `VideoChatDataset` also
    carry the samples it skipped ("skipped"): they reach the training process as the batch's "skipped_samples" list,
    which `CrossLMMTrainer` takes out before the forward.
    """

    processor: Any  # CrossLMMProcessor

    def __call__(self, samples: list[dict]) -> dict:
        texts = [self.processor.apply_chat_template(sample["messages"], tokenize=False) for sample in samples]
        videos = [video for sample in samples for video in sample.get("videos", ())]
        images = [image for sample in samples for image in sample.get("images", ())]
        batch = self.processor(
            text=texts, videos=videos or None, images=images or None, padding=True, return_tensors="pt"
        )
        batch["labels"] = assistant_labels(batch["input_ids"], batch.get("attention_mask"), self.processor.tokenizer)
        if any("skipped" in sample for sample in samples):
            batch = dict(batch)
            batch["skipped_samples"] = [entry for sample in samples for entry in sample["skipped"]]
        return batch


# --------------------------------------------------------------------------------------------------------------------
# What trains, at which rate: the components and the paper's stages
# --------------------------------------------------------------------------------------------------------------------

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

# PEFT `target_modules` for LoRA on the LLM and the DCALs: every projection of the decoder layers' attention and MLP
# and of the DCALs' V2V/T2V attention and feed-forward block, matched by module name (PEFT full-matches a string).
LORA_TARGET_MODULES = (
    r".*\.(language_model\.layers|cross_attention_layers)\.\d+\.(self_attn|v2v_attn|t2v_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


@dataclass(frozen=True)
class Stage:
    """What a run trains and how: one of the paper's stages (`STAGES`) or anything between. crosslmm-train's `--stage`
    picks one and its flags of the same names (`--use_t2v`, `--train_*`, `--*_lr`, ...) replace fields."""

    learning_rates: dict[str, float]  # the components that train, each at its rate
    use_t2v: bool = True  # the DCALs' T2V branches run (and train)
    use_v2v: bool | None = None  # the same for V2V; None: as the checkpoint has it
    train_gates: bool = True  # False: every DCAL gate keeps its checkpoint value
    dcal_branches_only: bool = False  # of the DCALs, only the attention branches that run train, not the MLP blocks
    # How the paper ran it (crosslmm-train's defaults): frames per video; samples per optimizer step, in all and per
    # device.
    num_frames: int = 64
    global_batch_size: int = 128
    per_device_train_batch_size: int = 1

    def __post_init__(self):
        unknown = set(self.learning_rates) - set(COMPONENT_MODULES)
        if unknown:
            raise ValueError(
                f"Unknown components {sorted(unknown)}; the components are {', '.join(COMPONENT_MODULES)}."
            )


# Table 3 of the paper (CrossLMM-2B) and its text. Stage 1's rate: table 3's 1e-3, the usual rate for a LLaVA projector
# (the text says 1e-4); its "9 x 32" tokens: 32 frames. Stage 2's "9 x (64~512)": the short end (--fps 1 --max_frames
# 512 for the long end).
STAGES = {
    1: Stage(
        {"projector": 1e-3, "dcals": 1e-3},
        use_t2v=False,
        dcal_branches_only=True,
        num_frames=32,
        global_batch_size=512,
        per_device_train_batch_size=8,
    ),
    2: Stage({"vision_tower": 2e-6, "projector": 1e-5, "dcals": 1e-5, "llm": 1e-5}),
}


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
    """Switch the T2V and V2V branches of every DCAL: they read the model's config, which saved checkpoints carry.
    Raises ValueError when both are off in a model with DCALs (they would have nothing to do)."""
    config = model.config
    if config.dcal_layer_indices and not (use_t2v or use_v2v):
        raise ValueError("use_t2v and use_v2v are both off: the DCALs would have nothing to do")
    config.use_t2v, config.use_v2v = bool(use_t2v), bool(use_v2v)


def setup_training(model: torch.nn.Module, stage: Stage) -> dict[str, float]:
    """Switch the DCAL branches as `stage` says, train the components it names (of them only what CrossLMM runs)
    and freeze the rest. Returns the learning rates of the components that train, for `parameter_groups` /
    `CrossLMMTrainer`."""
    set_branches(model, stage.use_t2v, model.config.use_v2v if stage.use_v2v is None else stage.use_v2v)
    for name, param in model.named_parameters():
        parts = name.split(".")
        trains = component_of(name) in stage.learning_rates and _runs_in_crosslmm(name, model.config)
        dcal = _dcal_module(parts)
        if dcal is not None and stage.dcal_branches_only and dcal[1] not in V2V_MODULES + T2V_MODULES:
            trains = False
        if parts[-1] in GATES and not stage.train_gates:
            trains = False
        param.requires_grad = trains
    return dict(stage.learning_rates)


# --------------------------------------------------------------------------------------------------------------------
# LoRA on the LLM and the DCALs
# --------------------------------------------------------------------------------------------------------------------

LORA_FOLDER = "lora"  # inside each checkpoint: the PEFT adapter, and every trained tensor for resuming
LORA_TRAINED = "trained.safetensors"


def apply_lora(model, learning_rates: dict, r: int, alpha: int, dropout: float, train_gates: bool = True):
    """LoRA adapters on every projection of the LLM's layers and the DCALs; the projector and the DCAL gates train
    in full (a T2V gate left at 0 would keep its branch shut); the vision tower is frozen. Returns the PEFT model and
    the learning rates of what trains."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=LORA_TARGET_MODULES,
        modules_to_save=["multi_modal_projector"],
    )
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in GATES and train_gates:
            param.requires_grad = True
    return model, {component: learning_rates[component] for component in ("projector", "dcals", "llm")}


def save_lora(folder: Path, peft_model, state_dict: dict, base_checkpoint: str):
    """A LoRA checkpoint: the merged CrossLMM (what from_pretrained and crosslmm-answer load) in `folder`, the PEFT
    adapter and every trained tensor (adapters, projector, DCAL gates: what resuming loads) in `folder/lora`.

    The merge is PEFT's `merge_and_unload` on a fresh copy of the starting checkpoint with the trained tensors loaded,
    never on the model in training (merging and unmerging in place would round its weights). It needs only the trained
    tensors, which is all DeepSpeed ZeRO-3 gathers of a PEFT model."""
    from peft import get_peft_model
    from safetensors.torch import save_file

    from modeling_crosslmm import CrossLMMForConditionalGeneration

    trained = {name: param for name, param in peft_model.named_parameters() if param.requires_grad}
    tensors = {name: state_dict[name].detach().cpu().contiguous() for name in sorted(trained)}
    (folder / LORA_FOLDER).mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / LORA_FOLDER / LORA_TRAINED, metadata={"format": "pt"})
    peft_model.save_pretrained(folder / LORA_FOLDER, state_dict=state_dict)  # PEFT keeps the adapter's tensors

    config = copy.deepcopy(peft_model.get_base_model().config)  # this run's settings (stage 2 turns T2V on)
    base = CrossLMMForConditionalGeneration.from_pretrained(base_checkpoint, config=config, dtype=torch.float32)
    fresh = get_peft_model(base, copy.deepcopy(peft_model.peft_config["default"]))
    unexpected = fresh.load_state_dict(tensors, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"trained tensors that the fresh LoRA model lacks, e.g. {unexpected[0]}")
    merged = fresh.merge_and_unload()
    merged.save_pretrained(folder)


def load_lora_trained(checkpoint: Path, peft_model):
    """Put a LoRA checkpoint's trained tensors (lora/trained.safetensors) back into the model in training."""
    from safetensors.torch import load_file

    path = checkpoint / LORA_FOLDER / LORA_TRAINED
    trained = load_file(path)
    expected = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    if set(trained) != expected:
        raise UsageError(f"{path} does not hold this run's trained tensors (another LoRA setting?)")
    peft_model.load_state_dict(trained, strict=False)


# --------------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------------


class SkippedSamples:
    """Counts of the samples the dataset skipped, summed over processes at each log step and checkpoint, and the first
    `limit` of them described."""

    def __init__(self, limit: int = 1000):
        self.limit = limit
        self.reasons, self.files = Counter(), Counter()
        self.examples, self.pending = [], []

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def add(self, entries):
        self.pending.extend(entries)

    def sync(self):
        """Gather what every process skipped since the last sync (a collective: call it on every process)."""
        from accelerate import PartialState
        from accelerate.utils import gather_object

        entries = gather_object(self.pending) if PartialState().num_processes > 1 else self.pending
        self.pending = []
        self._count(entries)

    def _count(self, entries):
        for entry in entries:
            self.reasons[entry["reason"]] += 1
            self.files[entry["file"]] += 1
            if len(self.examples) < self.limit:
                self.examples.append(entry)

    def state(self) -> dict:
        """The counts, this process's unsynced entries included (a checkpoint written between syncs, as
        --enable_jit_checkpoint's, would otherwise lose them on one process)."""
        counted = copy.deepcopy(self)
        counted._count(self.pending)
        return {
            "total": counted.total,
            "reasons": dict(counted.reasons),
            "files": dict(counted.files),
            "examples": counted.examples,
        }

    def load(self, state: dict):
        self.reasons, self.files = Counter(state["reasons"]), Counter(state["files"])
        self.examples = list(state["examples"])

    def summary(self) -> str:
        if not self.total:
            return "Skipped samples: none."
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.reasons.most_common())
        files = ", ".join(f"{name}: {count}" for name, count in self.files.most_common(5))
        return f"Skipped samples: {self.total} ({reasons}); by file: {files}."


def _restore_code_files(folder: Path, model):
    """FSDP2 turns the model's class into a subclass defined in torch, so `save_pretrained` copies torch's FSDP files
    as the model's code and names that class in config.json's auto_map. Put CrossLMM's code and class back."""
    from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files

    from modeling_crosslmm import CrossLMMForConditionalGeneration

    cls = CrossLMMForConditionalGeneration
    if type(model) is cls or not isinstance(model, cls) or not (folder / "config.json").is_file():
        return
    stray = Path(sys.modules[type(model).__module__].__file__)
    for path in [stray, *map(Path, get_relative_import_files(str(stray)))]:
        (folder / path.name).unlink(missing_ok=True)
    config = json.loads((folder / "config.json").read_text())
    custom_object_save(object.__new__(cls), folder, config=config)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


WEIGHT_FILES = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


class CrossLMMTrainer(Trainer):
    """`Trainer` whose optimizer gives each component its own learning rate, with what `crosslmm-train` needs: with
    `lengths`, the length-grouped sampler; the count of the samples the dataset skipped (`skipped`); checkpoints that
    `from_pretrained` loads (CrossLMM's code under FSDP2; a LoRA model merged onto `base_checkpoint`, the checkpoint
    it started from, with the adapter in `lora/`).

    The optimizer's groups are built from parameter names when it is created, that is after FSDP or DeepSpeed have
    wrapped the model, which is why this is a Trainer method and not an optimizer passed in from outside.
    """

    def __init__(self, *args, learning_rates: dict, lengths=None, skipped=None, base_checkpoint=None, **kwargs):
        self.learning_rates = dict(learning_rates)
        self.lengths = lengths
        self.skipped = SkippedSamples() if skipped is None else skipped
        self.base_checkpoint = base_checkpoint
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = parameter_groups(opt_model, self.learning_rates, self.args.weight_decay)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # No public hook takes a sampler: `get_train_dataloader` (the documented override) would have to rebuild
    # Trainer's whole DataLoader (workers, seeding, accelerate's preparation) around it. `_get_train_sampler(self,
    # train_dataset=None)` has had this signature, and is called only from `get_train_dataloader`, in transformers
    # 5.17 to 5.25 (checked on both).
    def _get_train_sampler(self, train_dataset=None):
        if self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        strategy = str(self.args.train_sampling_strategy)
        return LengthGroupedSampler(
            train_dataset if train_dataset is not None else self.train_dataset,
            self.lengths,
            batch_size=self.args.per_device_train_batch_size * max(1, self.args.world_size),
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            group_by_length=strategy == "group_by_length",
            shuffle=strategy != "sequential",
        )

    def training_step(self, model, inputs, *args, **kwargs):
        self.skipped.add(inputs.pop("skipped_samples", ()))
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs or "train_runtime" in logs:  # logged on every process: the sync's collective is safe
            self.skipped.sync()
            logs["skipped_samples"] = self.skipped.total
        if "learning_rate" in logs and self.optimizer is not None:  # Trainer logs the first group's rate only
            for group in self.optimizer.param_groups:
                logs.setdefault(f"learning_rate_{group.get('name', 'group')}", group["lr"])
        return super().log(logs, *args, **kwargs)

    def save_model(self, output_dir=None, *args, **kwargs):
        """Trainer's save, plus CrossLMM's code put back under FSDP2; a LoRA model is saved merged, with its adapter
        and trained tensors in `lora/`. Every process calls this (the weights may have to be gathered)."""
        folder = Path(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        if self.args.should_save and folder == Path(self.args.output_dir):
            for old in folder.glob("*"):  # an earlier final model's weights, which the new files might not replace
                if old.is_file() and WEIGHT_FILES.match(old.name):
                    old.unlink()
        if not hasattr(model, "peft_config") or self.base_checkpoint is None:
            super().save_model(output_dir, *args, **kwargs)
            if self.args.should_save:
                _restore_code_files(folder, model)
            return
        state_dict = self.accelerator.get_state_dict(self.model_wrapped)  # gathered from every process
        if self.args.should_save:
            save_lora(folder, model, state_dict, self.base_checkpoint)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
            torch.save(self.args, folder / "training_args.bin")

    # Resuming a LoRA run: Trainer would load the merged model.safetensors of the checkpoint into the PEFT model (not
    # one name matches: the whole file read into memory on every process for nothing) and could not restore the DCAL
    # gates, which train in full outside PEFT's adapter. `_load_from_checkpoint(self, resume_from_checkpoint,
    # model=None)` is the one place that loads weights on resuming, with this signature in transformers 5.17 to 5.25
    # (checked on both); FSDP and DeepSpeed resume from their own files (`model` given) and go to Trainer as before.
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        peft_model = self.accelerator.unwrap_model(self.model)
        if model is not None or not hasattr(peft_model, "peft_config") or self.base_checkpoint is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_lora_trained(Path(resume_from_checkpoint), peft_model)
