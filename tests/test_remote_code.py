"""save_pretrained -> from_pretrained(trust_remote_code=True) in a fresh process, without this repository."""

import json

import torch

from isolated import run_isolated
from tiny import frames, prompt, tiny_model


def test_saved_folder_loads_through_auto_classes_with_identical_logits(tmp_path):
    model = tiny_model(gates=0.4)
    folder = tmp_path / "crosslmm-tiny"
    model.save_pretrained(folder)

    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_crosslmm.py", "configuration_crosslmm.py"} <= files
    assert not any(name.endswith(".bin") for name in files)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_crosslmm.CrossLMMConfig"
    assert auto_map["AutoModel"] == "modeling_crosslmm.CrossLMMModel"
    assert auto_map["AutoModelForImageTextToText"] == "modeling_crosslmm.CrossLMMForConditionalGeneration"
    assert auto_map["AutoModelForCausalLM"] == "modeling_crosslmm.CrossLMMForConditionalGeneration"

    ids = prompt(model.config, [1, 2], ("video", 2), [3], ("image",), [4, 5])
    inputs = dict(input_ids=ids, pixel_values_videos=frames(2)[None], pixel_values=frames(1, seed=3))
    torch.save(inputs, tmp_path / "inputs.pt")
    # The reference is this repository's class loading the same folder: weights read from the file (memory-mapped)
    # can sit at other alignments than freshly initialised ones, and the CPU kernels then round differently (seen:
    # 1.2e-7), so the in-memory model is not the exact reference for what a load computes.
    reloaded = type(model).from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reloaded(**inputs).logits
        torch.testing.assert_close(expected, model(**inputs).logits)

    run_isolated(
        """
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
        folder = "crosslmm-tiny"
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load("inputs.pt", weights_only=True)
        with torch.no_grad():
            torch.save(model(**inputs).logits, "logits.pt")
        assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "CrossLMMModel"
        assert type(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)).__name__ == (
            "CrossLMMForConditionalGeneration"
        )
        assert AutoConfig.from_pretrained(folder, trust_remote_code=True).model_type == "crosslmm"
        """,
        tmp_path,
    )
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), expected)
