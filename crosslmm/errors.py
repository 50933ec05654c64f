"""The package's one bad-input error and the one line every command reports an exception as.

Each command prints a `UsageError` after its own prefix (`crosslmm-answer: error: ...`, `crosslmm-serve: error: ...`)
and exits with its usage status, never with a traceback; `one_line` turns any other library's exception into a line
that fits there (or into a client's error message).
"""

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
