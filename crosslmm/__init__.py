"""The CrossLMM tools: everything that does not ship inside a checkpoint.

A checkpoint carries the model's own files (the repository root's `*_crosslmm.py`: configuration, modeling,
processing, video processing, pipeline), which this package imports by their plain names. The package holds what works
with checkpoints: `samples` (the sample and tiny model builders), `answer` (`crosslmm-answer`), `convert`
(`crosslmm-convert`), `train` (fine-tuning on transformers' Trainer: data, trainer, `crosslmm-train`), `serve`
(`crosslmm-serve`, an OpenAI-compatible server on FastAPI) and `evaluation` (the `crosslmm` model of lmms-eval).
`errors` holds the one bad-input error every command reports in one line; `versions` the releases CI tested.

Logging: every module logs to `logging.getLogger("crosslmm.<module>")` (the logger transformers'
`logging.get_logger` gives for that name too); a command's `main` calls `log_to_stderr` once, so that its progress
lines and warnings reach stderr (never stdout, which holds only results) in the command's own format.
"""

import logging
import sys


# File suffixes read as images; any other file is a video (training data, lmms-eval's visuals).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class StderrHandler(logging.Handler):
    """Writes each record to `sys.stderr` as it is at that moment (a test's capture, the converter's line-tracking
    stream), where `logging.StreamHandler` would keep the stream it was made with."""

    def emit(self, record: logging.LogRecord):
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def log_to_stderr(format: str = "%(message)s", level: str | int = logging.INFO):
    """Send the package's log records ("crosslmm" and below) at `level` and above to stderr in `format`, replacing
    what an earlier call set up (one process may run several commands: the tests do)."""
    package = logging.getLogger("crosslmm")
    package.setLevel(level.upper() if isinstance(level, str) else level)  # ValueError for a level logging lacks
    for handler in [h for h in package.handlers if isinstance(h, StderrHandler)]:
        package.removeHandler(handler)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter(format))
    package.addHandler(handler)
