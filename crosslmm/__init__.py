"""The CrossLMM tools: everything that does not ship inside a checkpoint.

A checkpoint carries the model's own files (the repository root's `*_crosslmm.py`: configuration, modeling,
processing, video processing, pipeline), which this package imports by their plain names. The package holds what works
with checkpoints: `samples` (the sample and tiny model builders), `answer` (`crosslmm-answer`), `convert`
(`crosslmm-convert`), `training` (fine-tuning on transformers' Trainer), `serve` (`crosslmm-serve`, transformers'
OpenAI-compatible server) and `evaluation` (the `crosslmm` model of lmms-eval).
"""

import sys


def log(message: str):
    """A progress line on stderr, so that stdout holds only results."""
    print(message, file=sys.stderr, flush=True)
