"""Fine-tune a CrossLMM checkpoint on video question answering with transformers' Trainer.

With no `--model`, a tiny random CrossLMM (and its processor) is built locally (`crosslmm.samples`, size "tiny"), and
a handful of generated videos (a coloured square moving left or right) with questions about colour and direction make
the training set: it runs on a CPU in well under a minute and the loss falls. With `--model` (a folder or Hub
repository with a CrossLMM checkpoint) the same code fine-tunes a real model; bring your own samples in the same
format.

    python examples/finetune_tiny.py
    python examples/finetune_tiny.py --steps 40 --gradient-checkpointing
    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/finetune_tiny.py --model <checkpoint> --bf16
    torchrun --nproc_per_node 8 examples/finetune_tiny.py --model <checkpoint> --bf16 \
        --deepspeed examples/deepspeed_zero3.json
"""

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

from crosslmm.samples import build_sample_checkpoint, video_qa_samples
from crosslmm.train import STAGES, CrossLMMDataCollator, CrossLMMTrainer, setup_training


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="CrossLMM checkpoint (folder or Hub id); default: build a tiny random one")
    parser.add_argument("--output-dir", help="where Trainer writes (default: a temporary folder, deleted)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=5, help="log the training loss every this many steps")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (GPUs)")
    parser.add_argument("--deepspeed", help="DeepSpeed config file, e.g. examples/deepspeed_zero3.json")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> list[float]:
    """Fine-tune and return the logged training losses."""
    args = parse_args(argv)
    if args.output_dir:
        return fine_tune(args, Path(args.output_dir))
    with tempfile.TemporaryDirectory(prefix="crosslmm-finetune-") as scratch:  # nothing left behind
        return fine_tune(args, Path(scratch))


def fine_tune(args, output_dir: Path) -> list[float]:
    checkpoint = args.model or build_sample_checkpoint(output_dir / "tiny-checkpoint", "tiny", seed=args.seed)
    # Made before loading the model: under DeepSpeed ZeRO-3 this lets from_pretrained load each GPU's shard only.
    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        lr_scheduler_type="constant",
        logging_steps=args.log_every,
        remove_unused_columns=False,  # the collator needs "messages" and "videos"
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        bf16=args.bf16,
        deepspeed=args.deepspeed,  # its config has no optimizer: Trainer's, with the per-component groups, is used
    )
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    processor.video_processor.do_sample_frames = False  # the generated videos are already the frames to use
    if args.gradient_checkpointing:  # the decoder layers, the DCALs and the vision tower's layers
        # activation_checkpointing_enable from transformers 5.25 on; the old name warns there and goes in v6
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()

    # Stage 2 of the paper: everything CrossLMM runs trains, one learning rate per component. A real checkpoint gets
    # the paper's rates (STAGES[2]: 2e-6 for the vision tower, 1e-5 for the rest); a tiny random model needs larger
    # ones to move within a few steps.
    stage = STAGES[2]
    if not args.model:
        stage = replace(stage, learning_rates={"vision_tower": 2e-4, "projector": 1e-3, "dcals": 1e-3, "llm": 1e-3})
    learning_rates = setup_training(model, stage)
    trainer = CrossLMMTrainer(
        model=model,
        args=training_args,
        train_dataset=video_qa_samples(),
        data_collator=CrossLMMDataCollator(processor),
        learning_rates=learning_rates,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        print(f"training loss every {args.log_every} steps:", " ".join(f"{loss:.3f}" for loss in losses))
    return losses


if __name__ == "__main__":
    main()
