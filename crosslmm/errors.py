"""The package's one bad-input error, the one line every command reports an exception as, and the check every command
makes of a checkpoint argument.

Each command prints a `UsageError` after its own prefix (`crosslmm-answer: error: ...`, `crosslmm-serve: error: ...`)
and exits with its usage status, never with a traceback; `one_line` turns any other library's exception into a line
that fits there (or into a client's error message).
"""

import os
import re


class UsageError(Exception):
    """A bad input (an option, a file, a checkpoint, a question): reported as one line naming the problem."""


def one_line(error: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes or runs of whitespace; a KeyError's
    (whose message alone is just the key) and an empty message's type name in front."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    line = " ".join(text.splitlines()[0].split()) if text else ""
    if isinstance(error, KeyError) or not line:
        return f"{type(error).__name__}: {line}" if line else type(error).__name__
    return line


def check_checkpoint(model: str, option: str = "--model") -> str:
    """A checkpoint argument as a folder (with config.json), returned with `~` expanded, or else as a Hub id
    (`org/name` or `name`) left to `from_pretrained`; a path that names no folder is a UsageError that names the
    argument as the user gave it (`--model X`, or lmms-eval's `pretrained=X`)."""
    given = f"{option}{model}" if option.endswith("=") else f"{option} {model}"
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"{given} has no config.json: not a checkpoint folder")
        return path
    if os.path.exists(path):
        raise UsageError(f"{given} is a file; give a checkpoint folder or a Hub id")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"{given}: no such checkpoint folder")
    return model
