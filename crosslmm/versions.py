"""The releases of transformers this version of CrossLMM was tested on, and a one-line warning outside them.

setup.cfg admits `transformers>=5.17,<6` and the package uses transformers' public API only, so a newer 5.x release
should work; `.ci/run` tests the oldest admitted release and the newest one pip resolves. A command started on a
release newer than the newest one tested here still runs (refusing would stop users on a release that most likely
works), but says so in one line first, so that a failure further on is not a mystery.
"""

import os
import sys

from packaging.version import Version


# (oldest, newest) release of each project that CI has run the whole suite on.
TESTED = {"transformers": ("5.17.0", "5.25.0")}


def untested_release(package: str = "transformers") -> str | None:
    """A one-line warning if the installed `package` is outside its tested range, else None."""
    from importlib.metadata import version

    installed = Version(version(package))
    oldest, newest = (Version(v) for v in TESTED[package])
    if oldest <= installed and installed.release[:2] <= newest.release[:2]:
        return None
    return (
        f"warning: {package} {installed} is outside the releases this version of crosslmm was tested on "
        f"({oldest.base_version}-{newest.major}.{newest.minor}.x); if something fails, "
        f"`pip install '{package}>={oldest.base_version},<{newest.major}.{newest.minor + 1}'`"
    )


def warn_if_untested(command: str, package: str = "transformers"):
    """Print `untested_release`'s warning on stderr, prefixed with the command's name, unless
    $CROSSLMM_NO_VERSION_WARNING is set (a release the user has checked; the test suite, whose commands' stderr is
    compared line by line, sets it)."""
    if os.environ.get("CROSSLMM_NO_VERSION_WARNING"):
        return
    warning = untested_release(package)
    if warning:
        print(f"{command}: {warning}", file=sys.stderr, flush=True)
