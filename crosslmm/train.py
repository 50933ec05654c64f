"""`crosslmm-train`: train CrossLMM on LLaVA-NeXT / LLaVA-Video data with transformers' `Trainer`.

    crosslmm-train --model CHECKPOINT --data mixture.yaml --video-folder videos --image-folder images \\
        --stage 2 --output_dir runs/stage2 [any TrainingArguments flag, e.g. --max_steps 100 --report_to wandb]

`--stage 1|2` picks the paper's stage (appendix A.1, table 3): which DCAL branches run, what trains, the learning
rates, the frames per video, the global batch size and the usual LLaVA schedule (one epoch, cosine, 3 % warmup); every
preset is only a default, which the corresponding flag overrides: `--use_t2v` / `--use_v2v`, `--train_vision_tower` /
`--train_projector` / `--train_dcals` / `--train_llm` / `--train_gates`, `--vision_tower_lr` / `--projector_lr` /
`--dcal_lr` / `--llm_lr` (e.g. the T2V ablations of table 2c: `--stage 1 --use_t2v true`, `--stage 2 --use_t2v
false`). What a run used is in its config (use_t2v, use_v2v) and its run record (trainer_state.json). Every
`TrainingArguments` field is a flag under its own name. Several GPUs:
`torchrun --nproc_per_node 8 -m crosslmm.train ...` (add `--deepspeed examples/deepspeed_zero3.json`) or
`accelerate launch --config_file examples/accelerate_fsdp.yaml -m crosslmm.train ...`.

A run survives being killed: Trainer writes a checkpoint's trainer_state.json after everything else, so a folder
`checkpoint-N` without it is unfinished (it is removed when the run starts again), and starting the same command again
resumes from the last whole one with the same data order and step. Samples whose media are missing, corrupt or too
short, or that are longer than `--max_length` tokens (the model's positions by default), are skipped, logged and
counted (`skipped_samples` in the logs, a summary at the end and in `skipped_samples.json`). A bad configuration is one
error line and exit status 2 before any model loads; so is a full disk, keeping the last whole checkpoint. Every
checkpoint, and the final model in the output folder, is a CrossLMM folder with its code, processor and chat template
that `from_pretrained(..., trust_remote_code=True)` and `crosslmm-answer --model` load.
"""

import argparse
import copy
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, ProgressCallback, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from crosslmm import log_to_stderr
from crosslmm.data import (
    DataError,
    LengthGroupedSampler,
    TrainingCollator,
    VideoChatDataset,
    check_media,
    load_training_data,
    read_sources,
)
from crosslmm.errors import UsageError, check_checkpoint, one_line
from crosslmm.training import (
    GATES,
    LORA_TARGET_MODULES,
    STAGE1_LEARNING_RATE,
    STAGE2_LEARNING_RATES,
    CrossLMMTrainer,
    set_branches,
    setup_training,
)
from crosslmm.versions import warn_if_untested


logger = logging.getLogger("crosslmm.train")

TRAINER_STATE_NAME = "trainer_state.json"  # what Trainer writes last into a checkpoint folder
SKIPPED_FILE = "skipped_samples.json"

# Table 3 of the paper (CrossLMM-2B) and its text; the schedule is LLaVA's. Each value is a flag's default only.
STAGE_PRESETS = {
    1: {
        "learning_rate": STAGE1_LEARNING_RATE,  # projector and V2V; table 3 (its text says 1e-4)
        "use_t2v": False,  # pretraining captions are too noisy for T2V (section 3.3, table 2c)
        "train_vision_tower": False,
        "train_llm": False,
        "num_frames": 32,  # "9 x 32" tokens
        "global_batch_size": 512,
        "per_device_train_batch_size": 8,
    },
    2: {
        "learning_rate": STAGE2_LEARNING_RATES["llm"],  # connector (projector, DCALs) and LLM
        "use_t2v": True,
        "train_vision_tower": True,
        "train_llm": True,
        "num_frames": 64,  # "9 x (64~512)" tokens: the short end; --fps 1 --max_frames 512 for the long end
        "global_batch_size": 128,
        "per_device_train_batch_size": 1,
    },
}
COMMON_PRESET = {
    "num_train_epochs": 1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "weight_decay": 0.0,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,  # a 7B checkpoint with its optimizer state is about 100 GB
    "dataloader_num_workers": 4,
    "train_sampling_strategy": "group_by_length",
    "remove_unused_columns": False,  # the collator needs the samples' messages and frames
}


@dataclass
class CrossLMMTrainArguments:
    """crosslmm-train's own flags (the TrainingArguments flags follow them)."""

    model: str = field(metadata={"help": "CrossLMM checkpoint to start from: a folder or a Hub id"})
    data: list[str] = field(
        metadata={"help": "LLaVA-format samples: .json / .jsonl files or LLaVA-NeXT .yaml mixtures (one or more)"}
    )
    video_folder: str | None = field(default=None, metadata={"help": "folder that relative video paths start from"})
    image_folder: str | None = field(default=None, metadata={"help": "folder that relative image paths start from"})
    stage: int = field(
        default=2,
        metadata={
            "help": "the paper's stage: 1 pretraining (projector + V2V), 2 instruction tuning (all)",
            "choices": [1, 2],
        },
    )
    num_frames: int | None = field(
        default=None, metadata={"help": "frames sampled uniformly per video (stage 1: 32, stage 2: 64)"}
    )
    fps: float | None = field(default=None, metadata={"help": "sample frames at this rate instead of --num_frames"})
    max_frames: int | None = field(default=None, metadata={"help": "cap on the frames --fps samples (default 256)"})
    min_frames: int = field(default=1, metadata={"help": "skip videos that give fewer frames than this"})
    max_length: int | None = field(
        default=None, metadata={"help": "skip samples longer than this many tokens (visual tokens included)"}
    )
    use_t2v: bool = field(
        default=True,
        metadata={
            "help": "run and train the DCALs' T2V branches (stage 1: false, stage 2: true, as the paper's stages; "
            "a run that turns on T2V in a checkpoint saved without it says so)"
        },
    )
    use_v2v: bool | None = field(
        default=None, metadata={"help": "run and train the DCALs' V2V branches (default: the checkpoint's use_v2v)"}
    )
    train_vision_tower: bool = field(default=True, metadata={"help": "train the vision tower (stage 1: false)"})
    train_projector: bool = field(default=True, metadata={"help": "train the projector"})
    train_dcals: bool = field(
        default=True,
        metadata={
            "help": "train the DCALs: in stage 1 their attention branches that run (V2V; T2V with --use_t2v true), "
            "in stage 2 all of them"
        },
    )
    train_llm: bool = field(default=True, metadata={"help": "train the LLM (stage 1: false)"})
    train_gates: bool = field(
        default=True, metadata={"help": "train the DCAL gates (false: frozen at the checkpoint's values)"}
    )
    vision_tower_lr: float | None = field(
        default=None, metadata={"help": "the vision tower's learning rate (default 2e-6)"}
    )
    projector_lr: float | None = field(default=None, metadata={"help": "the projector's (default --learning_rate)"})
    dcal_lr: float | None = field(default=None, metadata={"help": "the DCALs' (default --learning_rate)"})
    llm_lr: float | None = field(default=None, metadata={"help": "the LLM's (default --learning_rate)"})
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "samples per optimizer step over all processes (stage 1: 512, stage 2: 128); sets "
            "--gradient_accumulation_steps unless that is given"
        },
    )
    lora: bool = field(default=False, metadata={"help": "stage 2 with LoRA on the LLM and the DCALs"})
    lora_r: int = field(default=128, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})


# Each component's --train_* and learning rate flag.
TRAIN_FLAGS = {
    "vision_tower": "train_vision_tower",
    "projector": "train_projector",
    "dcals": "train_dcals",
    "llm": "train_llm",
}
LR_FLAGS = {"vision_tower": "vision_tower_lr", "projector": "projector_lr", "dcals": "dcal_lr", "llm": "llm_lr"}


class _Parser(HfArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see crosslmm-train --help)")


def _given(argv: list[str], name: str) -> bool:
    """Whether a flag appears on the command line (under its name or with dashes)."""
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(arg in flags or arg.split("=", 1)[0] in flags for arg in argv)


def _stage_of(argv: list[str]) -> int:
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--stage", type=int, default=2)
    try:
        stage = peek.parse_known_args(argv)[0].stage
    except SystemExit:
        return 2
    return stage if stage in STAGE_PRESETS else 2  # the full parser reports a bad stage


def parse_args(argv: list[str]) -> tuple[CrossLMMTrainArguments, TrainingArguments]:
    stage = _stage_of(argv)
    parser = _Parser((CrossLMMTrainArguments, TrainingArguments), prog="crosslmm-train", allow_abbrev=False)
    parser.description = __doc__.split("\n\n")[0]
    preset = {**COMMON_PRESET, **STAGE_PRESETS[stage]}
    preset["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    parser.set_defaults(**preset)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        default = "FULL_STATE_DICT" if os.environ.get("FSDP_VERSION", "1") == "1" else "SHARDED_STATE_DICT"
        if os.environ.get("FSDP_STATE_DICT_TYPE", default).upper() != "FULL_STATE_DICT":
            raise UsageError(
                "FSDP with a sharded state dict writes checkpoints that from_pretrained cannot load, and no final "
                "model: set fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config (as "
                "examples/accelerate_fsdp.yaml does)"
            )
    try:
        args, training_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:  # TrainingArguments' own checks, unknown flags
        raise UsageError(one_line(error)) from None
    if not _given(argv, "output_dir"):
        raise UsageError("--output_dir is required: the folder for checkpoints, logs and the final model")

    if args.stage == 1 and args.lora:
        raise UsageError("--lora is for stage 2 (stage 1 trains the projector and the V2V branches in full)")
    if args.lora:
        for flag in TRAIN_FLAGS.values():
            if _given(argv, flag):
                raise UsageError(
                    f"--{flag} does not go with --lora (LoRA adapters on the LLM and DCALs, the projector "
                    "and the DCAL gates in full, the vision tower frozen)"
                )
    if args.stage == 1 and args.vision_tower_lr is not None and not args.train_vision_tower:
        raise UsageError(
            "--vision_tower_lr is for stage 2 (stage 1 freezes the vision tower; --train_vision_tower true trains it)"
        )
    for component, flag in TRAIN_FLAGS.items():
        rate = getattr(args, LR_FLAGS[component])
        if rate is not None and not getattr(args, flag) and not args.lora:
            raise UsageError(f"--{LR_FLAGS[component]} is given but --{flag} is false")
        if rate is not None and not rate > 0:
            raise UsageError(f"--{LR_FLAGS[component]} must be positive, got {rate}")
    if not args.lora and not any(getattr(args, flag) for flag in TRAIN_FLAGS.values()):
        raise UsageError("nothing trains: every --train_* flag is false")
    if training_args.remove_unused_columns:
        raise UsageError("--remove_unused_columns must be False: the collator reads the samples' messages and frames")
    if training_args.train_sampling_strategy == "batch_rebalance":
        raise UsageError("--train_sampling_strategy batch_rebalance is not supported; use group_by_length")
    if str(training_args.eval_strategy) not in ("no", "IntervalStrategy.NO"):
        raise UsageError("crosslmm-train has no evaluation data: leave --eval_strategy at no")
    for name in ("num_frames", "max_frames", "min_frames", "max_length", "global_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    if args.fps is not None and not args.fps > 0:
        raise UsageError(f"--fps must be positive, got {args.fps}")
    if not (_given(argv, "gradient_checkpointing") or _given(argv, "activation_checkpointing")):
        training_args.gradient_checkpointing = True  # the preset (newer transformers call it activation_checkpointing)
        if hasattr(training_args, "activation_checkpointing"):
            training_args.activation_checkpointing = True
    if _given(argv, "gradient_accumulation_steps") and _given(argv, "global_batch_size"):
        logger.warning("--gradient_accumulation_steps is given: --global_batch_size is ignored.")
    if not _given(argv, "gradient_accumulation_steps"):
        per_step = training_args.per_device_train_batch_size * max(1, training_args.world_size)
        training_args.gradient_accumulation_steps = max(1, round(args.global_batch_size / per_step))
        if training_args.gradient_accumulation_steps * per_step != args.global_batch_size:
            logger.warning(
                "A global batch of %d is not a multiple of %d (per-device batch x processes): %d samples per step.",
                args.global_batch_size,
                per_step,
                training_args.gradient_accumulation_steps * per_step,
            )
    return args, training_args


# --------------------------------------------------------------------------------------------------------------------
# Skipped samples and the run's record, kept in each checkpoint's trainer_state.json
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


class RunRecord(TrainerCallback, ExportableState):
    """What a checkpoint must carry besides Trainer's own state: the run's settings (so that a resumed run can refuse
    another model, stage or LoRA setting) and the skipped-sample counts (so that it goes on counting).

    Trainer writes `state()` into trainer_state.json, the last file of a checkpoint, so the record is whole exactly
    when the checkpoint is. The counts are summed over processes before each checkpoint (`on_step_end`, on every
    process)."""

    def __init__(self, run: dict, skipped: SkippedSamples):
        self.run, self.skipped = run, skipped

    def state(self) -> dict:
        return {"args": {}, "attributes": {"run": self.run, "skipped": self.skipped.state()}}

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> dict:
        """The record a checkpoint holds ({} for a checkpoint written without one)."""
        stored = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME)).stateful_callbacks
        return (stored or {}).get(cls.__name__, {}).get("attributes", {})

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.skipped.sync()


# --------------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------------


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


def is_whole(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json after everything else of a checkpoint: a folder without it is unfinished."""
    return (checkpoint / TRAINER_STATE_NAME).is_file()


def remove_unfinished_checkpoints(output_dir: Path) -> list[Path]:
    """Delete the checkpoint folders a killed or failed save left unfinished; returns them."""
    unfinished = [
        path
        for path in (output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if output_dir.is_dir() else ())
        if path.is_dir() and not is_whole(path)
    ]
    for path in unfinished:
        shutil.rmtree(path, ignore_errors=True)
    return unfinished


def last_whole_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint with the highest step that is whole, if any."""
    whole = [path for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.is_dir() and is_whole(path)]
    return max(whole, key=lambda path: int(path.name.rsplit("-", 1)[1])) if whole else None


WEIGHT_FILES = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


class CommandTrainer(CrossLMMTrainer):
    """`CrossLMMTrainer` with what `crosslmm-train` adds: its length-grouped sampler, skipped-sample counting,
    Hub-ready checkpoints (CrossLMM's code under FSDP2; a LoRA run's merged model, with the adapter in `lora/`)."""

    def __init__(self, *args, lengths, skipped: SkippedSamples, base_checkpoint: str, **kwargs):
        self.base_checkpoint = base_checkpoint  # what a LoRA run's merged model is built on
        self.lengths = lengths
        self.skipped = skipped
        super().__init__(*args, **kwargs)

    # ---- data ----

    # No public hook takes a sampler: `get_train_dataloader` (the documented override) would have to rebuild
    # Trainer's whole DataLoader (workers, seeding, accelerate's preparation) around it. `_get_train_sampler(self,
    # train_dataset=None)` has had this signature, and is called only from `get_train_dataloader`, in transformers
    # 5.17 to 5.25 (checked on both).
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        strategy = str(self.args.train_sampling_strategy)
        return LengthGroupedSampler(
            dataset,
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

    # ---- saving: what from_pretrained and crosslmm-answer load ----

    def save_model(self, output_dir=None, *args, **kwargs):
        """Trainer's save, plus CrossLMM's code put back under FSDP2; a LoRA model is saved merged, with its adapter
        and trained tensors in `lora/`. Every process calls this (the weights may have to be gathered)."""
        folder = Path(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        if self.args.should_save and folder == Path(self.args.output_dir):
            for old in folder.glob("*"):  # an earlier final model's weights, which the new files might not replace
                if old.is_file() and WEIGHT_FILES.match(old.name):
                    old.unlink()
        if not hasattr(model, "peft_config"):
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
        if model is not None or not hasattr(peft_model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_lora_trained(Path(resume_from_checkpoint), peft_model)


# --------------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------------


def _setup_logging(training_args: TrainingArguments):
    level = logging.INFO if training_args.should_log else logging.WARNING
    log_to_stderr("[crosslmm-train] %(levelname)s %(message)s", level)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def load_processor(model: str, config):
    """The checkpoint's processor, built from this installation's classes (as the model is), so that the code the
    checkpoints carry is the code that trained them."""
    from transformers import AutoTokenizer

    from processing_crosslmm import CrossLMMImageProcessor, CrossLMMProcessor
    from video_processing_crosslmm import CrossLMMVideoProcessor

    settings, _ = CrossLMMProcessor.get_processor_dict(model)
    return CrossLMMProcessor(
        image_processor=CrossLMMImageProcessor.from_pretrained(model),
        video_processor=CrossLMMVideoProcessor.from_pretrained(model),
        tokenizer=AutoTokenizer.from_pretrained(model, trust_remote_code=True),
        chat_template=settings.get("chat_template"),
        pool_size=settings.get("pool_size", config.pool_size),
    )


def check_output_dir(output_dir: Path):
    """Create --output_dir and write into it once, so that a folder that cannot be written is one line now, not a
    traceback at the first checkpoint."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".crosslmm-train-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"--output_dir {output_dir} cannot be written: {error.strerror or error}") from None


def prepare(args: CrossLMMTrainArguments, training_args: TrainingArguments, argv: list[str]):
    """Everything that can be checked before the model loads: the output folder, the checkpoint folder, the processor,
    the DCAL branches the flags ask for, then the data. Returns (model path, config, processor, branches, training
    data); UsageError on any problem."""
    from configuration_crosslmm import CrossLMMConfig

    if training_args.should_save:
        check_output_dir(Path(training_args.output_dir))
    model = check_checkpoint(args.model)
    try:
        config = CrossLMMConfig.from_pretrained(model)
        processor = load_processor(model, config)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load --model {args.model}: {one_line(error)}") from None
    if config.model_type != "crosslmm":
        raise UsageError(f"--model {args.model} is a {config.model_type!r} checkpoint, not a CrossLMM one")
    if processor.pool_size != config.pool_size:
        raise UsageError(
            f"--model {args.model}: processor pool_size {processor.pool_size} != config {config.pool_size}"
        )
    branches = dcal_branches(args, argv, config)  # a contradiction in the flags, before the data's warnings
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    try:
        sources = read_sources(args.data, args.video_folder, args.image_folder)
        data = load_training_data(sources, seed=seed)
        for warning in check_media(data):
            logger.warning(warning)
    except DataError as error:
        raise UsageError(str(error)) from None
    return model, config, processor, branches, data


def dcal_branches(args: CrossLMMTrainArguments, argv: list[str], config) -> dict:
    """The DCAL branches this run runs and trains: --use_t2v (its stage's preset unless given), --use_v2v (the
    checkpoint's unless given). Says so when the stage's preset turns on T2V in a checkpoint saved without it."""
    use_v2v = config.use_v2v if args.use_v2v is None else args.use_v2v
    if config.dcal_layer_indices and not (args.use_t2v or use_v2v):
        raise UsageError("--use_t2v and --use_v2v are both false: the DCALs of --model would have nothing to do")
    if args.stage == 1 and not use_v2v and not args.use_t2v:
        raise UsageError("stage 1 trains the V2V branches, but --use_v2v is false (or --model has use_v2v false)")
    if args.use_t2v and not config.use_t2v and not _given(argv, "use_t2v"):
        logger.warning(
            "--model has use_t2v false; stage %d turns T2V on (its T2V branches train): give --use_t2v false to keep "
            "it off.",
            args.stage,
        )
    return {"use_t2v": args.use_t2v, "use_v2v": use_v2v}


def component_rates(args: CrossLMMTrainArguments, training_args: TrainingArguments) -> dict[str, float]:
    """The learning rate of each component that trains: its own flag, else --learning_rate (the vision tower: 2e-6)."""
    defaults = {"vision_tower": STAGE2_LEARNING_RATES["vision_tower"]}
    return {
        component: getattr(args, LR_FLAGS[component]) or defaults.get(component, training_args.learning_rate)
        for component, flag in TRAIN_FLAGS.items()
        if getattr(args, flag)
    }


def model_identity(model: str) -> str:
    """--model as a run records it: a folder's absolute path (the same folder from any working directory), a Hub id."""
    path = Path(os.path.expanduser(model))
    return str(path.resolve()) if path.is_dir() else model


def check_resumable(resume: Path, run_info: dict):
    """Refuse a checkpoint of another run (another --model, --stage or --lora), warn about changed data or batches."""
    previous = RunRecord.of_checkpoint(resume).get("run", {})
    for key in ("model", "stage", "lora"):
        if key in previous and previous[key] != run_info[key]:
            raise UsageError(
                f"{resume} is a checkpoint of a run with --{key} {previous[key]}, this one has --{key} "
                f"{run_info[key]}: give this run another --output_dir (or its own --resume_from_checkpoint)"
            )
    if previous.get("data_fingerprint", run_info["data_fingerprint"]) != run_info["data_fingerprint"]:
        logger.warning(
            "The data differ from those of %s (%s samples then, %d now): the resumed run will not see the "
            "order an uninterrupted run would have.",
            resume,
            previous.get("samples"),
            run_info["samples"],
        )
    if previous.get("global_micro_batch", run_info["global_micro_batch"]) != run_info["global_micro_batch"]:
        logger.warning(
            "%s was written with %s samples per micro-step over all processes, this run has %d (another "
            "number of processes or --per_device_train_batch_size): samples are grouped into batches "
            "differently from here on.",
            resume,
            previous["global_micro_batch"],
            run_info["global_micro_batch"],
        )


def train(args: CrossLMMTrainArguments, training_args: TrainingArguments, argv: list[str]):
    from accelerate import PartialState

    from modeling_crosslmm import CrossLMMForConditionalGeneration

    _setup_logging(training_args)
    output_dir = Path(training_args.output_dir)
    model_path, config, processor, branches, data = prepare(args, training_args, argv)
    max_length = args.max_length or config.text_config.max_position_embeddings

    if training_args.should_save:
        for folder in remove_unfinished_checkpoints(output_dir):
            logger.warning("Removed %s: a save that was interrupted left it unfinished.", folder)
    if training_args.resume_from_checkpoint:
        resume = Path(training_args.resume_from_checkpoint)
        if not is_whole(resume):
            raise UsageError(f"--resume_from_checkpoint {resume} is not a whole checkpoint (no {TRAINER_STATE_NAME})")
    else:
        resume = last_whole_checkpoint(output_dir)

    # The processor saved with every checkpoint samples frames as training did; the collator's copy gets frames
    # already sampled (by the dataset) and pads on the right.
    video_processor = processor.video_processor
    video_processor.num_frames = args.num_frames
    video_processor.fps = args.fps
    if args.max_frames is not None:
        video_processor.max_frames = args.max_frames
    collate_processor = copy.deepcopy(processor)
    collate_processor.video_processor.do_sample_frames = False
    collate_processor.tokenizer.padding_side = "right"
    dataset = VideoChatDataset(
        data,
        processor,
        num_frames=args.num_frames,
        fps=args.fps,
        max_frames=args.max_frames,
        min_frames=args.min_frames,
        max_length=max_length,
    )
    lengths = dataset.lengths()
    fingerprint = hashlib.sha256(lengths.tobytes() + data.kinds.tobytes()).hexdigest()[:16]
    run_info = {
        "command": ["crosslmm-train", *argv],
        "model": model_identity(args.model),
        "stage": args.stage,
        "lora": args.lora,
        **branches,
        "trains": {
            **{component: getattr(args, flag) for component, flag in TRAIN_FLAGS.items()},
            "gates": args.train_gates,
        },
        "samples": len(data),
        "data_fingerprint": fingerprint,
        "global_micro_batch": training_args.per_device_train_batch_size * max(1, training_args.world_size),
    }
    counts = data.counts()
    logger.info(
        "Data: %d samples (%d video, %d image, %d text-only) from %d file(s); %s per video; samples longer than %d "
        "tokens are skipped%s.",
        len(data),
        counts["video"],
        counts["image"],
        counts["text"],
        len(data.sources),
        f"{args.fps} fps up to {dataset.frames_per_video} frames" if args.fps else f"{args.num_frames} frames",
        max_length,
        "" if args.max_length else " (the model's max_position_embeddings; --max_length sets another limit)",
    )

    skipped = SkippedSamples()
    if resume is not None:
        check_resumable(resume, run_info)
        state = RunRecord.of_checkpoint(resume).get("skipped")
        if state:
            skipped.load(state)
        logger.info("Resuming from %s.", resume)
    PartialState().wait_for_everyone()  # no process looks for checkpoints while unfinished ones are removed

    model = CrossLMMForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32)
    set_branches(model, use_t2v=branches["use_t2v"], use_v2v=branches["use_v2v"])
    learning_rates = setup_training(
        model,
        component_rates(args, training_args),
        dcal_branches_only=args.stage == 1,
        train_gates=args.train_gates,
    )
    if args.lora:
        model, learning_rates = _apply_lora(model, args, learning_rates)
    run_info["learning_rates"] = learning_rates
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    logger.info(
        "Stage %d: %s trainable parameters; learning rates %s.",
        args.stage,
        f"{trainable:,}",
        ", ".join(f"{name} {rate:g}" for name, rate in learning_rates.items()),
    )

    trainer = CommandTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=TrainingCollator(collate_processor),
        processing_class=processor,
        callbacks=[RunRecord(run_info, skipped)],
        learning_rates=learning_rates,
        lengths=lengths,
        skipped=skipped,
        base_checkpoint=model_path,
    )
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    except BaseException:
        progress = trainer.pop_callback(ProgressCallback)  # its bar would be drawn again after the error line
        if progress is not None and progress.training_bar is not None:
            progress.training_bar.close()
        raise
    if trainer.state.global_step < trainer.state.max_steps:  # stopped early: --enable_jit_checkpoint on SIGTERM
        skipped.sync()
        logger.warning(
            "Training stopped at step %d of %d (last checkpoint: %s). %s Run the same command to resume.",
            trainer.state.global_step,
            trainer.state.max_steps,
            last_whole_checkpoint(output_dir),
            skipped.summary(),
        )
        return None
    trainer.save_model()
    metrics = {**result.metrics, "skipped_samples": skipped.total}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if training_args.should_save:
        (output_dir / SKIPPED_FILE).write_text(json.dumps(skipped.state(), indent=1))
    (logger.warning if skipped.total else logger.info)(skipped.summary())
    return trainer


FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_is_full(folder: Path) -> bool:
    """Whether 1 MiB more can be written into `folder` (what tells a failed save on a full disk from a bug)."""
    probe = folder / f".crosslmm-train-space-{os.getpid()}"
    try:
        with open(probe, "wb") as file:
            file.write(bytes(2**20))
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        return error.errno in FULL
    finally:
        probe.unlink(missing_ok=True)
    return False


def disk_full_message(output_dir: Path, error: Exception) -> str:
    """One line for a save the disk had no room for: which disk, how much is free, what is left to resume from."""
    mount = output_dir.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    try:
        free = f"{shutil.disk_usage(mount).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    last = last_whole_checkpoint(output_dir) if output_dir.is_dir() else None
    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    kept = f"the last whole checkpoint, {last}, is kept" if last else "no whole checkpoint was written yet"
    return (
        f"no space left on the disk mounted at {mount} ({free}) while saving into {output_dir}{where}: {kept}; "
        "free some space and run the same command to resume"
    )


# --------------------------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------------------------

LORA_FOLDER = "lora"  # inside each checkpoint: the PEFT adapter, and every trained tensor for resuming
LORA_TRAINED = "trained.safetensors"


def _apply_lora(model, args: CrossLMMTrainArguments, learning_rates: dict):
    """LoRA adapters on every projection of the LLM's layers and the DCALs; the projector and the DCAL gates train
    in full (a T2V gate left at 0 would keep its branch shut); the vision tower is frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=LORA_TARGET_MODULES,
        modules_to_save=["multi_modal_projector"],
    )
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in GATES and args.train_gates:
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


def main(argv=None) -> int:
    """Console script `crosslmm-train`: 0 when training finished, 2 (with one error line) on a bad configuration or a
    full disk, 143 when it stopped early after a checkpoint on SIGTERM (`--enable_jit_checkpoint`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warn_if_untested("crosslmm-train")
    argv = sys.argv[1:] if argv is None else list(argv)
    output_dir = None
    try:
        args, training_args = parse_args(argv)
        output_dir = Path(training_args.output_dir)
        trainer = train(args, training_args, argv)
    except UsageError as error:
        if _is_main_process():
            print(f"crosslmm-train: error: {error}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if output_dir is None or not (getattr(error, "errno", None) in FULL or disk_is_full(output_dir)):
            raise
        if _is_main_process():
            remove_unfinished_checkpoints(output_dir)  # the space it took is what the next try needs
            print(f"\ncrosslmm-train: error: {disk_full_message(output_dir, error)}", file=sys.stderr)
        return 2
    return 0 if trainer is not None else 128 + signal.SIGTERM  # unfinished: as a process ended by SIGTERM


if __name__ == "__main__":
    sys.exit(main())
