"""`crosslmm-train`: train CrossLMM on LLaVA-NeXT / LLaVA-Video data with transformers' `Trainer`.

    crosslmm-train --model CHECKPOINT --data mixture.yaml --video-folder videos --image-folder images \\
        --stage 2 --output_dir runs/stage2 [any TrainingArguments flag, e.g. --max_steps 100 --report_to wandb]

`--stage 1|2` picks the paper's stage (appendix A.1, table 3): what trains, the learning rates, the frames per video,
the global batch size and the usual LLaVA schedule (one epoch, cosine, 3 % warmup); every preset is only a default,
which the corresponding flag overrides. Every `TrainingArguments` field is a flag under its own name. Several GPUs:
`torchrun --nproc_per_node 8 -m crosslmm.train ...` (add `--deepspeed examples/deepspeed_zero3.json`) or
`accelerate launch --config_file examples/accelerate_fsdp.yaml -m crosslmm.train ...`.

A run survives being killed: checkpoints are written into a staging folder and renamed into place once complete (a
folder `checkpoint-N` is always whole), and starting the same command again resumes from the last one with the same
data order and step. Samples whose media are missing, corrupt or too short are skipped, logged and counted
(`skipped_samples` in the logs, a summary at the end and in `skipped_samples.json`). A bad configuration is one error
line and exit status 2 before any model loads. Every checkpoint, and the final model in the output folder, is a
CrossLMM folder with its code, processor and chat template that `from_pretrained(..., trust_remote_code=True)` and
`crosslmm-answer --model` load.
"""

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from crosslmm.data import (
    DataError,
    LengthGroupedSampler,
    TrainingCollator,
    VideoChatDataset,
    check_media,
    load_training_data,
    read_sources,
)
from crosslmm.training import (
    LORA_TARGET_MODULES,
    STAGE1_LEARNING_RATE,
    STAGE2_LEARNING_RATES,
    CrossLMMTrainer,
    setup_stage1,
    setup_stage2,
)


logger = logging.getLogger("crosslmm.train")

STAGING = ".staging"  # inside --output_dir: checkpoints are written here, then renamed into place
SKIPPED_FILE = "skipped_samples.json"
RUN_FILE = "crosslmm_train.json"

# Table 3 of the paper (CrossLMM-2B) and its text; the schedule is LLaVA's. Each value is a flag's default only.
STAGE_PRESETS = {
    1: {
        "learning_rate": STAGE1_LEARNING_RATE,  # projector and V2V; table 3 (its text says 1e-4)
        "num_frames": 32,  # "9 x 32" tokens
        "global_batch_size": 512,
        "per_device_train_batch_size": 8,
    },
    2: {
        "learning_rate": STAGE2_LEARNING_RATES["llm"],  # connector (projector, DCALs) and LLM
        "vision_tower_lr": STAGE2_LEARNING_RATES["vision_tower"],
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
    vision_tower_lr: float | None = field(
        default=None, metadata={"help": "stage 2: the vision tower's learning rate (default 2e-6)"}
    )
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


class UsageError(Exception):
    """A bad command line or configuration: one line on stderr, exit status 2."""


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
        raise UsageError(str(error).strip().splitlines()[0]) from None
    if not _given(argv, "output_dir"):
        raise UsageError("--output_dir is required: the folder for checkpoints, logs and the final model")

    if args.stage == 1 and args.lora:
        raise UsageError("--lora is for stage 2 (stage 1 trains the projector and the V2V branches in full)")
    if args.stage == 1 and args.vision_tower_lr is not None:
        raise UsageError("--vision_tower_lr is for stage 2 (stage 1 freezes the vision tower)")
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
# Skipped samples
# --------------------------------------------------------------------------------------------------------------------


class SkippedSamples:
    """Counts of the samples the dataset skipped, summed over processes at each log step and checkpoint, and the first
    `limit` of them described. Kept in each checkpoint, so that a resumed run goes on counting."""

    def __init__(self, limit: int = 1000):
        self.limit = limit
        self.reasons, self.files = Counter(), Counter()
        self.examples, self.pending = [], []

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def add(self, entries):
        self.pending.extend(entries)

    def sync(self, accelerator):
        """Gather what every process skipped since the last sync (a collective: call it on every process)."""
        entries = self.pending
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            entries = gather_object(entries)
        self.pending = []
        for entry in entries:
            self.reasons[entry["reason"]] += 1
            self.files[entry["file"]] += 1
            if len(self.examples) < self.limit:
                self.examples.append(entry)

    def state(self) -> dict:
        return {
            "total": self.total,
            "reasons": dict(self.reasons),
            "files": dict(self.files),
            "examples": self.examples,
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


# --------------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------------


def _fsync_tree(folder: Path):
    """Flush every file and folder under `folder` to disk, so that a renamed checkpoint survives a machine crash."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as file:
                os.fsync(file.fileno())
        _fsync_dir(root)


def _fsync_dir(folder):
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


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


def _remove_if_empty(folder: Path):
    try:
        folder.rmdir()
    except OSError:
        pass


WEIGHT_FILES = re.compile(r"^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


class CommandTrainer(CrossLMMTrainer):
    """`CrossLMMTrainer` with what `crosslmm-train` adds: its length-grouped sampler, skipped-sample counting, whole
    checkpoints (written to a staging folder, renamed into place when complete) and the run's own files in each."""

    def __init__(self, *args, lengths, skipped: SkippedSamples, run_info: dict, base_checkpoint: str, **kwargs):
        self.base_checkpoint = base_checkpoint  # where a LoRA run's frozen weights can be read back
        self.lengths = lengths
        self.skipped = skipped
        self.run_info = run_info
        self._staging_root = None
        super().__init__(*args, **kwargs)

    # ---- data ----

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
            self.skipped.sync(self.accelerator)
            logs["skipped_samples"] = self.skipped.total
        if "learning_rate" in logs and self.optimizer is not None:  # Trainer logs the first group's rate only
            for group in self.optimizer.param_groups:
                logs.setdefault(f"learning_rate_{group.get('name', 'group')}", group["lr"])
        return super().log(logs, *args, **kwargs)

    # ---- checkpoints: whole, with the model's code ----

    def _save(self, output_dir=None, state_dict=None):
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "peft_config"):
            super()._save(output_dir, state_dict)
            if self.args.should_save:
                _restore_code_files(Path(output_dir or self.args.output_dir), model)
            return
        self._save_lora(Path(output_dir or self.args.output_dir), model, state_dict)

    def _save_lora(self, folder: Path, model, state_dict):
        """A LoRA checkpoint: the merged CrossLMM (what from_pretrained and crosslmm-answer load) in the folder, the
        PEFT adapter and every trained tensor (what resuming loads) in its lora/ subfolder."""
        from safetensors.torch import save_file

        if not self.args.should_save:
            return
        if state_dict is None:
            state_dict = model.state_dict()
        trained = {name for name, param in model.named_parameters() if param.requires_grad}
        (folder / LORA_FOLDER).mkdir(parents=True, exist_ok=True)
        save_file(
            {name: state_dict[name].detach().cpu().contiguous() for name in sorted(trained)},
            folder / LORA_FOLDER / LORA_TRAINED,
            metadata={"format": "pt"},
        )
        model.save_pretrained(folder / LORA_FOLDER, state_dict=state_dict)
        base = model.get_base_model()
        expected = {
            key.removeprefix("base_model.model.")
            .replace(".base_layer.", ".")
            .replace(".modules_to_save.default.", ".")
            for key in model.state_dict()
            if ".lora_" not in key and ".original_module." not in key
        }
        text_config = base.config.get_text_config()
        tied = set(getattr(base, "_tied_weights_keys", None) or ()) if text_config.tie_word_embeddings else set()
        merged = merge_lora(
            state_dict,
            model.peft_config["default"],
            expected=sorted(expected - tied),
            frozen=lambda names: checkpoint_weights(self.base_checkpoint, names),
        )
        base.save_pretrained(folder, state_dict=merged)
        _restore_code_files(folder, base)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        torch.save(self.args, folder / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        unwrapped = self.accelerator.unwrap_model(self.model)
        trained_file = Path(resume_from_checkpoint) / LORA_FOLDER / LORA_TRAINED
        if model is not None or not hasattr(unwrapped, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        trained = load_file(trained_file)
        expected = {name for name, param in unwrapped.named_parameters() if param.requires_grad}
        if set(trained) != expected:
            raise ValueError(f"{trained_file} does not hold this run's trained tensors (another LoRA setting?)")
        unwrapped.load_state_dict(trained, strict=False)

    def _get_output_dir(self, trial):
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        self.skipped.sync(self.accelerator)
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / STAGING
        os.makedirs(staging / name, exist_ok=True)  # every process writes into it (optimizer shards, FSDP, ...)
        self._staging_root = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._write_run_files(staging / name)
            _fsync_tree(staging / name)
            target = run_dir / name
            if target.exists():  # left by an earlier run that did not resume from it
                shutil.rmtree(target)
            os.replace(staging / name, target)
            _fsync_dir(run_dir)
            _remove_if_empty(staging)
            logger.info("Checkpoint %s written.", target)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def _write_run_files(self, folder: Path):
        (folder / SKIPPED_FILE).write_text(json.dumps(self.skipped.state(), indent=1))
        (folder / RUN_FILE).write_text(json.dumps(self.run_info, indent=1))

    def save_model(self, output_dir=None, _internal_call=False):
        """The final model (called without a folder): written to the staging folder, then moved into --output_dir
        file by file, config.json last, replacing the weights of an earlier final model."""
        if _internal_call or (output_dir is not None and Path(output_dir) != Path(self.args.output_dir)):
            return super().save_model(output_dir, _internal_call)
        staging = Path(self.args.output_dir) / STAGING / "final"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        os.makedirs(staging, exist_ok=True)
        super().save_model(str(staging), _internal_call=True)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _fsync_tree(staging)
            root = Path(self.args.output_dir)
            new = {path.name for path in staging.iterdir()}
            for old in root.iterdir():  # weights of an earlier final model, which the new files would not replace
                if old.is_file() and WEIGHT_FILES.match(old.name) and old.name not in new:
                    old.unlink()
            for path in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
                target = root / path.name
                if target.is_dir() and not path.is_dir():
                    shutil.rmtree(target)
                elif path.is_dir() and target.exists():
                    shutil.rmtree(target)
                os.replace(path, target)
            _fsync_dir(root)
            shutil.rmtree(staging, ignore_errors=True)
            _remove_if_empty(staging.parent)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)


# --------------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------------


def _check_model(model: str) -> str:
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {model} has no config.json: not a checkpoint folder")
        return str(path)
    if path.exists():
        raise UsageError(f"--model {model} is a file; give a checkpoint folder or a Hub id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"--model folder not found: {model}")
    return model


def last_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint with the highest step that is whole (has its trainer state), if any."""
    if not output_dir.is_dir():
        return None
    steps = []
    for path in output_dir.iterdir():
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
        if match and path.is_dir() and (path / "trainer_state.json").is_file():
            steps.append((int(match.group(1)), path))
    return max(steps)[1] if steps else None


def _setup_logging(training_args: TrainingArguments):
    package = logging.getLogger("crosslmm")
    if not any(getattr(handler, "_crosslmm_train", False) for handler in package.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[crosslmm-train] %(levelname)s %(message)s"))
        handler._crosslmm_train = True
        package.addHandler(handler)
        package.propagate = False
    package.setLevel(logging.INFO if training_args.should_log else logging.WARNING)


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


def prepare(args: CrossLMMTrainArguments, training_args: TrainingArguments):
    """Everything that can be checked before the model loads: the checkpoint folder, the processor, the data.
    Returns (model path, config, processor, training data); UsageError on any problem."""
    from configuration_crosslmm import CrossLMMConfig

    model = _check_model(args.model)
    try:
        config = CrossLMMConfig.from_pretrained(model)
        processor = load_processor(model, config)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load --model {args.model}: {str(error).strip().splitlines()[0]}") from None
    if config.model_type != "crosslmm":
        raise UsageError(f"--model {args.model} is a {config.model_type!r} checkpoint, not a CrossLMM one")
    if processor.pool_size != config.pool_size:
        raise UsageError(
            f"--model {args.model}: processor pool_size {processor.pool_size} != config {config.pool_size}"
        )
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    try:
        sources = read_sources(args.data, args.video_folder, args.image_folder)
        data = load_training_data(sources, seed=seed)
        for warning in check_media(data):
            logger.warning(warning)
    except DataError as error:
        raise UsageError(str(error)) from None
    return model, config, processor, data


def train(args: CrossLMMTrainArguments, training_args: TrainingArguments, argv: list[str]):
    from modeling_crosslmm import CrossLMMForConditionalGeneration

    _setup_logging(training_args)
    output_dir = Path(training_args.output_dir)
    model_path, config, processor, data = prepare(args, training_args)

    resume = None
    if training_args.resume_from_checkpoint:
        resume = Path(training_args.resume_from_checkpoint)
        if not (resume / "trainer_state.json").is_file():
            raise UsageError(f"--resume_from_checkpoint {resume} is not a checkpoint folder (no trainer_state.json)")
    else:
        resume = last_checkpoint(output_dir)

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
        max_length=args.max_length,
    )
    lengths = dataset.lengths()
    fingerprint = hashlib.sha256(lengths.tobytes() + data.kinds.tobytes()).hexdigest()[:16]
    run_info = {
        "command": ["crosslmm-train", *argv],
        "stage": args.stage,
        "lora": args.lora,
        "samples": len(data),
        "data_fingerprint": fingerprint,
        "global_micro_batch": training_args.per_device_train_batch_size * max(1, training_args.world_size),
    }
    counts = data.counts()
    logger.info(
        "Data: %d samples (%d video, %d image, %d text-only) from %d file(s); %s per video.",
        len(data),
        counts["video"],
        counts["image"],
        counts["text"],
        len(data.sources),
        f"{args.fps} fps up to {dataset.frames_per_video} frames" if args.fps else f"{args.num_frames} frames",
    )

    skipped = SkippedSamples()
    if resume is not None:
        previous = _read_json(resume / RUN_FILE) or {}
        for key in ("stage", "lora"):
            if key in previous and previous[key] != run_info[key]:
                raise UsageError(
                    f"{resume} is a checkpoint of a run with --{key} {previous[key]}, this one has --{key} "
                    f"{run_info[key]}: give this run another --output_dir (or its own --resume_from_checkpoint)"
                )
        if previous.get("data_fingerprint", fingerprint) != fingerprint:
            logger.warning(
                "The data differ from those of %s (%s samples then, %d now): the resumed run will not see the "
                "order an uninterrupted run would have.",
                resume,
                previous.get("samples"),
                len(data),
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
        state = _read_json(resume / SKIPPED_FILE)
        if state:
            skipped.load(state)
        logger.info("Resuming from %s.", resume)
    if training_args.should_save and (output_dir / STAGING).exists():
        shutil.rmtree(output_dir / STAGING, ignore_errors=True)  # what a killed run was writing

    model = CrossLMMForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32)
    if args.stage == 1:
        learning_rates = setup_stage1(model, learning_rate=training_args.learning_rate)
    else:
        learning_rates = setup_stage2(
            model,
            vision_tower_lr=args.vision_tower_lr,
            connector_lr=training_args.learning_rate,
            llm_lr=training_args.learning_rate,
        )
    if args.lora:
        model, learning_rates = _apply_lora(model, args, learning_rates)
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
        learning_rates=learning_rates,
        lengths=lengths,
        skipped=skipped,
        run_info=run_info,
        base_checkpoint=model_path,
    )
    result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    if trainer.state.global_step < trainer.state.max_steps:  # stopped early: --enable_jit_checkpoint on SIGTERM
        skipped.sync(trainer.accelerator)
        logger.warning(
            "Training stopped at step %d of %d (last checkpoint: %s). %s Run the same command to resume.",
            trainer.state.global_step,
            trainer.state.max_steps,
            last_checkpoint(output_dir),
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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------------------------

GATES = ("v2v_gate", "t2v_gate", "mlp_gate")
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
        if name.rsplit(".", 1)[-1] in GATES:
            param.requires_grad = True
    return model, {"connector": learning_rates["connector"], "llm": learning_rates["llm"]}


def merge_lora(state_dict: dict, lora_config, expected=(), frozen=None) -> dict:
    """A plain CrossLMM state dict from a PEFT LoRA model's: each adapted weight plus scaling x B @ A, the trained
    copy of each `modules_to_save` module in place of the original, PEFT's prefixes and suffixes gone.

    DeepSpeed ZeRO-3 gathers only the trained tensors of a PEFT model: each of the `expected` plain names missing from
    `state_dict` (frozen weights, those LoRA adapts included) comes from `frozen(names)`, the starting checkpoint's.
    """
    adapter = "default"
    scaling = lora_config.lora_alpha / (math.sqrt(lora_config.r) if lora_config.use_rslora else lora_config.r)
    merged, deltas = {}, {}
    for key, value in state_dict.items():
        name = key.removeprefix("base_model.model.")
        if f".lora_A.{adapter}." in name:
            module = name.split(".lora_A.")[0]
            lora_b = state_dict[key.replace(f".lora_A.{adapter}.", f".lora_B.{adapter}.")]
            deltas[f"{module}.weight"] = scaling * (lora_b.detach().cpu().float() @ value.detach().cpu().float())
        elif ".lora_" in name or ".original_module." in name:
            continue
        else:
            name = name.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
            merged[name] = value.detach().cpu()
    missing = [name for name in expected if name not in merged]
    missing += [name for name in deltas if name not in merged and name not in missing]
    if missing:
        if frozen is None:
            raise ValueError(f"the state dict lacks {len(missing)} frozen weight(s), e.g. {missing[0]}")
        merged.update(frozen(missing))
    for name, delta in deltas.items():
        merged[name] = (merged[name].float() + delta).to(merged[name].dtype)
    return merged


def checkpoint_weights(model: str, names: list[str]) -> dict:
    """Tensors `names` of a checkpoint folder or Hub repository (already in the local cache: it was loaded)."""
    from safetensors import safe_open

    folder = Path(model)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model, allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
    index = folder / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    tensors, by_file = {}, {}
    for name in names:
        by_file.setdefault(files[name] if files else "model.safetensors", []).append(name)
    for file, wanted in by_file.items():
        with safe_open(folder / file, framework="pt") as weights:
            for name in wanted:
                tensors[name] = weights.get_tensor(name)
    return tensors


def main(argv=None) -> int:
    """Console script `crosslmm-train`: 0 when training finished, 2 (with one error line) on a bad configuration,
    143 when it stopped early after a checkpoint on SIGTERM (`--enable_jit_checkpoint`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, training_args = parse_args(argv)
        trainer = train(args, training_args, argv)
    except UsageError as error:
        if _is_main_process():
            print(f"crosslmm-train: error: {error}", file=sys.stderr)
        return 2
    return 0 if trainer is not None else 128 + signal.SIGTERM  # unfinished: as a process ended by SIGTERM


if __name__ == "__main__":
    sys.exit(main())
