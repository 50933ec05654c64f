"""Fine-tuning CrossLMM on transformers' `Trainer`, and the `crosslmm-train` command.

`data` reads LLaVA-NeXT / LLaVA-Video annotations into a dataset that decodes frames lazily, with its length-grouped
sampler; `trainer` holds the collator, the paper's two stages as data (`STAGES`), the per-component learning rates,
LoRA and `CrossLMMTrainer`; `command` is `crosslmm-train` (`python -m crosslmm.train`), built from both.
"""

from crosslmm.train.trainer import STAGES, CrossLMMDataCollator, CrossLMMTrainer, Stage, setup_training


__all__ = ["STAGES", "CrossLMMDataCollator", "CrossLMMTrainer", "Stage", "setup_training"]
