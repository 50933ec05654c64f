"""Run Python code in a fresh process that sees transformers but not this repository's modules.

The repository is pip-installed in editable mode, so its modules would be importable everywhere; the finder below
refuses them, proving that what loads comes from the saved folder through transformers' dynamic-module loader.
"""

import os
import subprocess
import sys
import textwrap


REPO_MODULES = (
    "configuration_crosslmm",
    "modeling_crosslmm",
    "processing_crosslmm",
    "video_processing_crosslmm",
    "pipeline_crosslmm",
    "convert_checkpoint",
    "crosslmm_cli",
    "crosslmm",
    "tiny",
)

PRELUDE = f"""
import importlib.abc, sys
class _BlockRepo(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in {REPO_MODULES!r}:
            raise ImportError(f"{{name}} must come from the saved folder, not the repository")
sys.meta_path.insert(0, _BlockRepo())
sys.path = [p for p in sys.path if p not in ("", ".")]
"""


def run_isolated(code: str, workdir, extra_env=None, timeout=300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(workdir / "modules"),
        HF_HOME=str(workdir / "hf_home"),
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra_env or {})
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"isolated run failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout
