import os


# Set before anything imports huggingface_hub or torch, which read them once, on import.
# Nothing in the tests downloads: models, tokenizers and videos are built by the tests, the Hub is a local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One CPU thread, here and in every process the tests start (they inherit the environment): the tiny models' operations
# are too small to gain from a second thread, and on a shared 2-core machine waiting threads spin; test_modeling,
# test_backends and test_training took half the time with one (two runs each, 2026-11-28).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The commands' one-line warning for a transformers release newer than the tested ones stays out of the stderr that the
# tests compare line by line, so that a new release fails the suite only where it breaks something
# (tests/test_public_api.py tests the warning itself).
os.environ["CROSSLMM_NO_VERSION_WARNING"] = "1"

from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from chats import image_question, video_question  # noqa: E402
from isolated import load_as_users_do  # noqa: E402
from tiny import sample_inputs, tiny_checkpoint, tiny_model, tiny_video  # noqa: E402


MAX_NEW_TOKENS = 6  # what the pipeline tests generate


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """A tiny checkpoint folder (model, processor, tokenizer, code, as crosslmm-answer builds its sample) and a tiny
    video, built once for the tests that use a checkpoint as users do."""
    root = tmp_path_factory.mktemp("tiny")
    return tiny_checkpoint(root / "ckpt"), tiny_video(root / "clip.mp4")


@pytest.fixture(scope="session")
def fresh_process(tiny_files, tmp_path_factory):
    """One fresh process without this repository (tests/support/isolated.py) loads what the tests saved, as users do:
    - `model`: a tiny model saved with save_pretrained, through the Auto classes, with its logits on `inputs`
      (test_remote_code.py);
    - `processor`: the tiny checkpoint's processor through the Auto classes, on a chat about the tiny video
      (test_processing.py);
    - `pipeline`: both pipeline tasks on the tiny checkpoint, both input forms (test_pipeline.py).
    One process for all three: a fresh Python takes seconds to import torch and transformers."""
    checkpoint, video = tiny_files
    workdir = tmp_path_factory.mktemp("fresh-process")
    model_folder = workdir / "crosslmm-tiny"
    model = tiny_model(gates=0.4)
    model.save_pretrained(model_folder)
    torch.save(sample_inputs(model.config, seed=0), workdir / "model-inputs.pt")
    image = workdir / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(image)
    request = {
        "model": {"folder": str(model_folder), "inputs": str(workdir / "model-inputs.pt")},
        "processor": {"folder": str(checkpoint), "conversation": video_question(video, "Why?"), "num_frames": 4},
        "pipeline": {
            "folder": str(checkpoint),
            "video": str(video),
            "image": str(image),
            "chat": video_question(video),
            "image_chat": image_question(image),
            "max_new_tokens": MAX_NEW_TOKENS,
        },
    }
    report = load_as_users_do(request, workdir)
    return SimpleNamespace(workdir=workdir, request=request, report=report, model_folder=model_folder, image=image)
