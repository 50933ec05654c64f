"""The tests' one way to run Python code in a fresh process that sees transformers but not this repository.

The repository is pip-installed (in editable mode for development), so its modules would be importable everywhere;
the finder below refuses every module the repository provides (its root modules and its packages, found in the
checkout, not listed by hand), proving that what loads comes from a saved folder through transformers'
dynamic-module loader.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
REPO_MODULES = sorted(
    {path.stem for path in ROOT.glob("*.py") if path.stem != "setup"}
    | {path.parent.name for path in ROOT.glob("*/__init__.py")}
)

PRELUDE = f"""
import importlib.abc, sys
class _BlockRepo(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {REPO_MODULES!r}:
            raise ImportError(f"{{name}} must come from the saved folder, not the repository")
sys.meta_path.insert(0, _BlockRepo())
"""


def run_isolated(code: str, workdir, extra_env=None, python=None, args=(), timeout=300) -> str:
    """Run `code` (dedented) with `python` (default: this interpreter) and `args` as its sys.argv[1:], in `workdir`,
    offline, with transformers' module cache and HF_HOME inside `workdir`. Returns stdout; fails with both outputs."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(Path(workdir) / "modules"),
        HF_HOME=str(Path(workdir) / "hf_home"),
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra_env or {})
    result = subprocess.run(
        [python or sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"isolated run failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout
