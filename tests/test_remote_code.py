"""save_pretrained -> from_pretrained(trust_remote_code=True) in a fresh process, without this repository."""

import json

import torch

from modeling_crosslmm import CrossLMMForConditionalGeneration
from tiny import tiny_model


def test_saved_folder_loads_through_auto_classes_with_identical_logits(fresh_process):
    """The `model` part of the fresh process (conftest.py): a tiny model saved with save_pretrained."""
    folder = fresh_process.model_folder
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_crosslmm.py", "configuration_crosslmm.py"} <= files
    assert not any(name.endswith(".bin") for name in files)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_crosslmm.CrossLMMConfig"
    assert auto_map["AutoModel"] == "modeling_crosslmm.CrossLMMModel"
    assert auto_map["AutoModelForImageTextToText"] == "modeling_crosslmm.CrossLMMForConditionalGeneration"
    assert auto_map["AutoModelForCausalLM"] == "modeling_crosslmm.CrossLMMForConditionalGeneration"

    inputs = torch.load(fresh_process.request["model"]["inputs"], weights_only=True)
    # The reference is this repository's class loading the same folder: weights read from the file (memory-mapped)
    # can sit at other alignments than freshly initialised ones, and the CPU kernels then round differently (seen:
    # 1.2e-7), so the in-memory model is not the exact reference for what a load computes.
    reloaded = CrossLMMForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reloaded(**inputs).logits
        torch.testing.assert_close(expected, tiny_model(gates=0.4)(**inputs).logits)  # the model that was saved

    report = fresh_process.report["model"]
    assert report["module"].startswith("transformers_modules"), report
    assert report["AutoModel"] == "CrossLMMModel"
    assert report["AutoModelForCausalLM"] == "CrossLMMForConditionalGeneration"
    assert report["model_type"] == "crosslmm"
    assert torch.equal(torch.load(fresh_process.workdir / "model-logits.pt", weights_only=True), expected)
