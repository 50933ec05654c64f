"""The tests' one way to run Python code in a fresh process that sees transformers but not this repository.

The repository is pip-installed (in editable mode for development), so its modules would be importable everywhere;
the finder below refuses every module the repository provides (its root modules and its packages, found in the
checkout, not listed by hand), proving that what loads comes from a saved folder through transformers'
dynamic-module loader.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
REPO_MODULES = sorted(
    {path.stem for path in ROOT.glob("*.py") if path.stem != "setup"}
    | {path.parent.name for path in ROOT.glob("*/__init__.py")}
)

# What a checkpoint carries: the model's own files. A tool of the `crosslmm` package may run beside them (`blocked=`).
SHIPPED_MODULES = sorted(path.stem for path in ROOT.glob("*_crosslmm.py"))

PRELUDE = """
import importlib.abc, sys
class _BlockRepo(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} must come from the saved folder, not the repository")
sys.meta_path.insert(0, _BlockRepo())
"""


def run_isolated(code: str, workdir, extra_env=None, python=None, args=(), timeout=300, blocked=REPO_MODULES) -> str:
    """Run `code` (dedented) with `python` (default: this interpreter) and `args` as its sys.argv[1:], in `workdir`,
    offline, with transformers' module cache and HF_HOME inside `workdir`, the repository's `blocked` modules
    refused. Returns stdout; fails with both outputs."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(Path(workdir) / "modules"),
        HF_HOME=str(Path(workdir) / "hf_home"),
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra_env or {})
    result = subprocess.run(
        [python or sys.executable, "-c", PRELUDE.format(blocked=blocked) + textwrap.dedent(code), *map(str, args)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"isolated run failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


# What users do with a checkpoint folder, without this repository: `load_as_users_do` runs the parts of a request
# (each optional) in one fresh process and returns what they report; tensors are written next to the request.
LOAD_AS_USERS_DO = """
import json, sys
import torch, transformers
from transformers import (
    AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
    AutoVideoProcessor, pipeline,
)

request = json.load(open(sys.argv[1]))
report = {"transformers": transformers.__version__}

if "model" in request:  # the Auto classes, and logits on saved inputs
    folder = request["model"]["folder"]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.save(model(**torch.load(request["model"]["inputs"], weights_only=True)).logits, "model-logits.pt")
    report["model"] = {
        "module": type(model).__module__,
        "AutoModel": type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__,
        "AutoModelForCausalLM": type(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)).__name__,
        "model_type": AutoConfig.from_pretrained(folder, trust_remote_code=True).model_type,
    }

if "processor" in request:  # the Auto classes, and a chat through apply_chat_template
    folder = request["processor"]["folder"]
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor.apply_chat_template(
        request["processor"]["conversation"], tokenize=True, return_dict=True, add_generation_prompt=True,
        processor_kwargs={"num_frames": request["processor"]["num_frames"]}, return_tensors="pt",
    )
    torch.save(dict(inputs), "processor-inputs.pt")
    report["processor"] = {
        "class": type(processor).__name__,
        "module": type(processor).__module__,
        "pool_size": processor.pool_size,
        "height": processor.video_processor.size["height"],
        "AutoVideoProcessor": type(AutoVideoProcessor.from_pretrained(folder, trust_remote_code=True)).__name__,
        "AutoImageProcessor": type(AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)).__name__,
    }

if "pipeline" in request:  # both tasks, both input forms
    job = request["pipeline"]
    options = dict(max_new_tokens=job["max_new_tokens"], return_full_text=False)
    videos = pipeline("video-text-to-text", model=job["folder"], trust_remote_code=True)
    images = pipeline("image-text-to-text", model=job["folder"], trust_remote_code=True)
    answers = {
        "chat": videos(job["chat"], num_frames=4, **options),
        "text": videos(text="<video>\\nWhat?", videos=job["video"], num_frames=3, **options),
        "image": images(images=job["image"], text="<image>\\nDescribe.", **options),
        "image_chat": images(job["image_chat"], **options),
    }
    report["pipeline"] = {
        "class": type(videos).__name__,
        "module": type(videos).__module__,
        # The config registers one custom task, so pipeline() infers it.
        "inferred": type(pipeline(model=job["folder"], trust_remote_code=True)) is type(videos),
        "answers": {key: [row["generated_text"] for row in rows] for key, rows in answers.items()},
    }

print(json.dumps(report))
"""


def load_as_users_do(request: dict, workdir, python=None) -> dict:
    """Run `LOAD_AS_USERS_DO` on `request` in a fresh process (`run_isolated`) in `workdir`; its report."""
    path = Path(workdir) / "request.json"
    path.write_text(json.dumps(request))
    output = run_isolated(LOAD_AS_USERS_DO, workdir, python=python, args=[path])
    return json.loads(output.strip().splitlines()[-1])
