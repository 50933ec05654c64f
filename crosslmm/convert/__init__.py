"""`crosslmm-convert`: a CrossLMM checkpoint folder from checkpoints that exist, ready for `from_pretrained` and the
Hub.

Split along its seams: `sources` (format detection, key maps, tensors read lazily, the tokenizer), `plan` (the
CrossLMM config and a recipe for every target tensor), `write` (streamed shards, processor, generation config, code,
model card), `verify` (the new folder against the source, in a fresh process) and `cli` (the command).
"""

import logging

import torch

from crosslmm.errors import UsageError


logger = logging.getLogger("crosslmm.convert")  # progress lines: stderr, through `crosslmm.log_to_stderr`


class ConversionError(UsageError):
    """A source that cannot become a CrossLMM checkpoint, or an output that cannot be written; the message names
    what is wrong."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
