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
import shutil
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import HfArgumentParser, ProgressCallback, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from crosslmm import log_to_stderr
from crosslmm.errors import UsageError, check_checkpoint, one_line
from crosslmm.train.data import (
    DataError,
    TrainingData,
    VideoChatDataset,
    check_media,
    load_training_data,
    read_sources,
)
from crosslmm.train.trainer import (
    STAGES,
    CrossLMMDataCollator,
    CrossLMMTrainer,
    SkippedSamples,
    Stage,
    apply_lora,
    setup_training,
)
from crosslmm.versions import warn_if_untested


logger = logging.getLogger("crosslmm.train")

TRAINER_STATE_NAME = "trainer_state.json"  # what Trainer writes last into a checkpoint folder
SKIPPED_FILE = "skipped_samples.json"

# The usual LLaVA schedule and this command's TrainingArguments settings, for both stages (`STAGES` adds each stage's
# own). Each value is a flag's default only.
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


def stage_defaults(stage: Stage) -> dict:
    """The flags' defaults for a stage: a --train_* flag true for each component it trains, its projector's rate as
    --learning_rate (every component's but the vision tower's), its branches, frames and batches."""
    return {
        **COMMON_PRESET,
        **{flag: component in stage.learning_rates for component, flag in TRAIN_FLAGS.items()},
        "learning_rate": stage.learning_rates["projector"],
        "use_t2v": stage.use_t2v,
        "num_frames": stage.num_frames,
        "global_batch_size": stage.global_batch_size,
        "per_device_train_batch_size": stage.per_device_train_batch_size,
        "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    }


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
    return stage if stage in STAGES else 2  # the full parser reports a bad stage


def parse_args(argv: list[str]) -> tuple[CrossLMMTrainArguments, TrainingArguments]:
    """The flags, over the defaults of the stage `--stage` picks, checked (UsageError) and completed: gradient
    checkpointing on and --gradient_accumulation_steps from --global_batch_size unless given."""
    stage = _stage_of(argv)
    parser = _Parser((CrossLMMTrainArguments, TrainingArguments), prog="crosslmm-train", allow_abbrev=False)
    parser.description = __doc__.split("\n\n")[0]
    parser.set_defaults(**stage_defaults(STAGES[stage]))
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
    check_flags(args, training_args, argv)
    if not (_given(argv, "gradient_checkpointing") or _given(argv, "activation_checkpointing")):
        training_args.gradient_checkpointing = True  # the preset (newer transformers call it activation_checkpointing)
        if hasattr(training_args, "activation_checkpointing"):
            training_args.activation_checkpointing = True
    if _given(argv, "gradient_accumulation_steps") and _given(argv, "global_batch_size"):
        logger.warning("--gradient_accumulation_steps is given: --global_batch_size is ignored.")
    if not _given(argv, "gradient_accumulation_steps"):
        per_step = training_args.per_device_train_batch_size * max(1, training_args.world_size)
        steps = training_args.gradient_accumulation_steps = max(1, round(args.global_batch_size / per_step))
        if steps * per_step != args.global_batch_size:
            logger.warning(
                f"A global batch of {args.global_batch_size} is not a multiple of {per_step} (per-device batch x "
                f"processes): {steps * per_step} samples per step."
            )
    return args, training_args


def check_flags(args: CrossLMMTrainArguments, training_args: TrainingArguments, argv: list[str]):
    """UsageError for flags that contradict each other or what crosslmm-train supports."""
    if args.stage == 1 and args.lora:
        raise UsageError("--lora is for stage 2 (stage 1 trains the projector and the V2V branches in full)")
    for flag in TRAIN_FLAGS.values() if args.lora else ():
        if _given(argv, flag):
            raise UsageError(
                f"--{flag} does not go with --lora (LoRA adapters on the LLM and DCALs, the projector and the DCAL "
                "gates in full, the vision tower frozen)"
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


# --------------------------------------------------------------------------------------------------------------------
# The run's record, kept in each checkpoint's trainer_state.json, and the checkpoints
# --------------------------------------------------------------------------------------------------------------------


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


def model_identity(model: str) -> str:
    """--model as a run records it: a folder's absolute path (the same folder from any working directory), a Hub id."""
    path = Path(os.path.expanduser(model))
    return str(path.resolve()) if path.is_dir() else model


def resume_record(resume: Path, record: RunRecord):
    """Refuse a checkpoint of another run (another --model, --stage or --lora), warn about changed data or batches, and
    go on counting from the checkpoint's skipped samples."""
    stored = RunRecord.of_checkpoint(resume)
    previous, run_info = stored.get("run", {}), record.run
    for key in ("model", "stage", "lora"):
        if key in previous and previous[key] != run_info[key]:
            raise UsageError(
                f"{resume} is a checkpoint of a run with --{key} {previous[key]}, this one has --{key} "
                f"{run_info[key]}: give this run another --output_dir (or its own --resume_from_checkpoint)"
            )
    if previous.get("data_fingerprint", run_info["data_fingerprint"]) != run_info["data_fingerprint"]:
        logger.warning(
            f"The data differ from those of {resume} ({previous.get('samples')} samples then, {run_info['samples']} "
            "now): the resumed run will not see the order an uninterrupted run would have."
        )
    if previous.get("global_micro_batch", run_info["global_micro_batch"]) != run_info["global_micro_batch"]:
        logger.warning(
            f"{resume} was written with {previous['global_micro_batch']} samples per micro-step over all processes, "
            f"this run has {run_info['global_micro_batch']} (another number of processes or "
            "--per_device_train_batch_size): samples are grouped into batches differently from here on."
        )
    if stored.get("skipped"):
        record.skipped.load(stored["skipped"])


# --------------------------------------------------------------------------------------------------------------------
# The run, step by step
# --------------------------------------------------------------------------------------------------------------------


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


@dataclass
class Run:
    """What `prepare` checked and loaded before the model: the checkpoint, its processor, the data, and the `Stage`
    the flags ask for."""

    model_path: str
    config: object  # CrossLMMConfig
    processor: object  # CrossLMMProcessor
    data: TrainingData
    stage: Stage


def prepare(args: CrossLMMTrainArguments, training_args: TrainingArguments, argv: list[str]) -> Run:
    """Everything that can be checked before the model loads: the output folder, the checkpoint folder, the processor,
    the stage the flags ask for, then the data. UsageError on any problem."""
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
    stage = requested_stage(args, training_args, argv, config)  # a contradiction in the flags: before the data
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    try:
        sources = read_sources(args.data, args.video_folder, args.image_folder)
        data = load_training_data(sources, seed=seed)
        for warning in check_media(data):
            logger.warning(warning)
    except DataError as error:
        raise UsageError(str(error)) from None
    return Run(model, config, processor, data, stage)


def requested_stage(args: CrossLMMTrainArguments, training_args: TrainingArguments, argv: list[str], config) -> Stage:
    """--stage's preset with what the flags set: the DCAL branches (--use_t2v: the stage's unless given; --use_v2v: the
    checkpoint's unless given), what trains and each component's rate (its own flag, else the vision tower at stage
    2's 2e-6 and the rest at --learning_rate). Says so when the stage turns on T2V in a checkpoint saved without it."""
    use_v2v = config.use_v2v if args.use_v2v is None else args.use_v2v
    if config.dcal_layer_indices and not (args.use_t2v or use_v2v):
        raise UsageError("--use_t2v and --use_v2v are both false: the DCALs of --model would have nothing to do")
    if args.stage == 1 and not use_v2v and not args.use_t2v:
        raise UsageError("stage 1 trains the V2V branches, but --use_v2v is false (or --model has use_v2v false)")
    if args.use_t2v and not config.use_t2v and not _given(argv, "use_t2v"):
        logger.warning(
            f"--model has use_t2v false; stage {args.stage} turns T2V on (its T2V branches train): give --use_t2v "
            "false to keep it off."
        )
    defaults = {"vision_tower": STAGES[2].learning_rates["vision_tower"]}
    rates = {
        component: getattr(args, LR_FLAGS[component]) or defaults.get(component, training_args.learning_rate)
        for component, flag in TRAIN_FLAGS.items()
        if getattr(args, flag)
    }
    return replace(
        STAGES[args.stage], learning_rates=rates, use_t2v=args.use_t2v, use_v2v=use_v2v, train_gates=args.train_gates
    )


def checkpoint_to_resume(training_args: TrainingArguments) -> Path | None:
    """--resume_from_checkpoint if given (a whole checkpoint), else the output folder's last whole checkpoint, after
    removing the unfinished ones a killed run left."""
    output_dir = Path(training_args.output_dir)
    if training_args.should_save:
        for folder in remove_unfinished_checkpoints(output_dir):
            logger.warning("Removed %s: a save that was interrupted left it unfinished.", folder)
    if not training_args.resume_from_checkpoint:
        return last_whole_checkpoint(output_dir)
    resume = Path(training_args.resume_from_checkpoint)
    if not is_whole(resume):
        raise UsageError(f"--resume_from_checkpoint {resume} is not a whole checkpoint (no {TRAINER_STATE_NAME})")
    return resume


def build_dataset(args: CrossLMMTrainArguments, run: Run) -> VideoChatDataset:
    """The dataset, its frames sampled as the flags say, as is the processor saved with every checkpoint (so that it
    samples frames as training did)."""
    video_processor = run.processor.video_processor
    video_processor.num_frames = args.num_frames
    video_processor.fps = args.fps
    if args.max_frames is not None:
        video_processor.max_frames = args.max_frames
    max_length = args.max_length or run.config.text_config.max_position_embeddings
    dataset = VideoChatDataset(
        run.data,
        run.processor,
        num_frames=args.num_frames,
        fps=args.fps,
        max_frames=args.max_frames,
        min_frames=args.min_frames,
        max_length=max_length,
    )
    counts = run.data.counts()
    frames = f"{args.fps} fps up to {dataset.frames_per_video} frames" if args.fps else f"{args.num_frames} frames"
    limit = "" if args.max_length else " (the model's max_position_embeddings; --max_length sets another limit)"
    logger.info(
        f"Data: {len(run.data)} samples ({counts['video']} video, {counts['image']} image, {counts['text']} "
        f"text-only) from {len(run.data.sources)} file(s); {frames} per video; samples longer than {max_length} "
        f"tokens are skipped{limit}."
    )
    return dataset


def describe_run(
    args: CrossLMMTrainArguments,
    training_args: TrainingArguments,
    argv: list[str],
    run: Run,
    dataset: VideoChatDataset,
) -> dict:
    """The run's settings as its checkpoints record them (see `resume_record`)."""
    lengths = dataset.lengths()
    return {
        "command": ["crosslmm-train", *argv],
        "model": model_identity(args.model),
        "stage": args.stage,
        "lora": args.lora,
        "use_t2v": run.stage.use_t2v,
        "use_v2v": run.stage.use_v2v,
        "trains": {
            **{component: component in run.stage.learning_rates for component in TRAIN_FLAGS},
            "gates": run.stage.train_gates,
        },
        "samples": len(run.data),
        "data_fingerprint": hashlib.sha256(lengths.tobytes() + run.data.kinds.tobytes()).hexdigest()[:16],
        "global_micro_batch": training_args.per_device_train_batch_size * max(1, training_args.world_size),
    }


def load_model(args: CrossLMMTrainArguments, run: Run):
    """The model in float32 (mixed precision is Trainer's), set up for the run's stage, with LoRA adapters under
    --lora. Returns it and the learning rates of what trains."""
    from modeling_crosslmm import CrossLMMForConditionalGeneration

    model = CrossLMMForConditionalGeneration.from_pretrained(run.model_path, dtype=torch.float32)
    learning_rates = setup_training(model, run.stage)
    if args.lora:
        model, learning_rates = apply_lora(
            model, learning_rates, args.lora_r, args.lora_alpha, args.lora_dropout, args.train_gates
        )
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    rates = ", ".join(f"{name} {rate:g}" for name, rate in learning_rates.items())
    logger.info(f"Stage {args.stage}: {trainable:,} trainable parameters; learning rates {rates}.")
    return model, learning_rates


def build_trainer(
    model,
    learning_rates: dict,
    training_args: TrainingArguments,
    run: Run,
    dataset: VideoChatDataset,
    record: RunRecord,
) -> CrossLMMTrainer:
    """`CrossLMMTrainer` with the collator (its copy of the processor gets frames already sampled by the dataset and
    pads on the right), the run record, the samples' lengths for the sampler, the checkpoint a LoRA run merges onto."""
    collate_processor = copy.deepcopy(run.processor)
    collate_processor.video_processor.do_sample_frames = False
    collate_processor.tokenizer.padding_side = "right"
    return CrossLMMTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=CrossLMMDataCollator(collate_processor),
        processing_class=run.processor,
        callbacks=[record],
        learning_rates=learning_rates,
        lengths=dataset.lengths(),
        skipped=record.skipped,
        base_checkpoint=run.model_path,
    )


def run_training(trainer: CrossLMMTrainer, resume: Path | None):
    """Trainer's loop; returns its result, or None when it stopped early (SIGTERM with --enable_jit_checkpoint)."""
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    except BaseException:
        progress = trainer.pop_callback(ProgressCallback)  # its bar would be drawn again after the error line
        if progress is not None and progress.training_bar is not None:
            progress.training_bar.close()
        raise
    if trainer.state.global_step < trainer.state.max_steps:
        trainer.skipped.sync()
        state, last = trainer.state, last_whole_checkpoint(Path(trainer.args.output_dir))
        logger.warning(
            f"Training stopped at step {state.global_step} of {state.max_steps} (last checkpoint: {last}). "
            f"{trainer.skipped.summary()} Run the same command to resume."
        )
        return None
    return result


def finish(trainer: CrossLMMTrainer, result):
    """The final model in the output folder, the run's metrics and state, and the skipped samples' summary."""
    trainer.save_model()
    metrics = {**result.metrics, "skipped_samples": trainer.skipped.total}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    if trainer.args.should_save:
        (Path(trainer.args.output_dir) / SKIPPED_FILE).write_text(json.dumps(trainer.skipped.state(), indent=1))
    (logger.warning if trainer.skipped.total else logger.info)(trainer.skipped.summary())


def train(args: CrossLMMTrainArguments, training_args: TrainingArguments, argv: list[str]):
    """The run: checks and data, the checkpoint to resume, the model, Trainer's loop, the final model. Returns the
    trainer, or None when it stopped early."""
    from accelerate import PartialState

    log_to_stderr(
        "[crosslmm-train] %(levelname)s %(message)s", logging.INFO if training_args.should_log else logging.WARNING
    )
    run = prepare(args, training_args, argv)
    resume = checkpoint_to_resume(training_args)
    dataset = build_dataset(args, run)
    record = RunRecord(describe_run(args, training_args, argv, run, dataset), SkippedSamples())
    if resume is not None:
        resume_record(resume, record)
        logger.info("Resuming from %s.", resume)
    PartialState().wait_for_everyone()  # no process looks for checkpoints while unfinished ones are removed
    model, learning_rates = load_model(args, run)
    record.run["learning_rates"] = learning_rates
    trainer = build_trainer(model, learning_rates, training_args, run, dataset, record)
    result = run_training(trainer, resume)
    if result is None:
        return None
    finish(trainer, result)
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
