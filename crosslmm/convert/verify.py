"""Verification: the converted folder, loaded as users load it (`trust_remote_code`), against the source loaded with
transformers only, in a fresh process whose module cache lies inside the new folder."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, Qwen2Config

from crosslmm.convert import DTYPES, ConversionError, logger
from crosslmm.convert.sources import WeightSource
from modeling_crosslmm import siglip2_patches


VERIFY_MAX_PARAMETERS = 3_000_000_000


def verify_folder(folder: str, reference: dict, dtype: str = "float32"):
    """Load `folder` with `trust_remote_code` and compare it with the source: LM logits on text-only prompts (which
    a CrossLMM computes exactly as its base LLM, DCALs or not), the vision tower's features on random frames and, when
    the source has one, the projector. Raises AssertionError on a mismatch; prints the largest differences."""
    from transformers import AutoModelForImageTextToText

    torch_dtype = DTYPES[dtype]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch_dtype).eval()
    config = model.config
    lm, tower, projector = _reference_parts(reference, torch_dtype)

    generator = torch.Generator().manual_seed(0)
    vocab = lm.config.get_text_config().vocab_size
    placeholders = torch.tensor([config.image_token_id, config.video_token_id])
    ids = torch.randint(0, vocab, (2, 12), generator=generator)
    ids[torch.isin(ids, placeholders)] = 0
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # two prompts of different lengths
    text = tokenizer(
        ["Describe the video in detail.", "How many objects can you see?"], return_tensors="pt", padding=True
    )
    frames = torch.randn(2, 3, config.image_size, config.image_size, generator=generator).to(torch_dtype)
    report = {}
    with torch.no_grad():
        for name, batch, mask in (("random ids", ids, None), ("text", text.input_ids, text.attention_mask)):
            ours = model(input_ids=batch, attention_mask=mask).logits[..., :vocab]
            theirs = lm(input_ids=batch, attention_mask=mask).logits
            report[f"logits ({name})"] = _compare(ours, theirs, mask)
        theirs = _tower_features(tower, frames, config)
        report["vision features"] = _compare(model.model.get_image_features(frames).last_hidden_state, theirs)
        if projector is not None:
            features = torch.randn(5, config.vision_config.hidden_size, generator=generator).to(torch_dtype)
            report["projector"] = _compare(model.model.multi_modal_projector(features), projector(features))
    print(json.dumps(report))


def _compare(ours: torch.Tensor, theirs: torch.Tensor, mask=None) -> float:
    if mask is not None:  # padded positions are not compared
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    torch.testing.assert_close(ours, theirs)
    return float((ours.float() - theirs.float()).abs().max())


def _reference_parts(reference: dict, dtype):
    """The source's language model (with LM head), vision tower and projector, loaded with transformers only."""
    from transformers import (
        LlavaOnevisionForConditionalGeneration,
        Qwen2ForCausalLM,
        Siglip2VisionModel,
        SiglipVisionModel,
    )

    if reference["kind"] == "llava_onevision":
        source = LlavaOnevisionForConditionalGeneration.from_pretrained(reference["path"], dtype=dtype).eval()
        return source, source.model.vision_tower, source.model.multi_modal_projector
    if reference["kind"] == "parts":
        lm = Qwen2ForCausalLM.from_pretrained(reference["text"], dtype=dtype)
        vision_config = AutoConfig.from_pretrained(reference["vision"])
        vision_config = getattr(vision_config, "vision_config", vision_config)
        tower_class = Siglip2VisionModel if vision_config.model_type == "siglip2_vision_model" else SiglipVisionModel
        return lm.eval(), tower_class.from_pretrained(reference["vision"], dtype=dtype).eval(), None
    # LLaVA-NeXT: its LLM is a Qwen2ForCausalLM plus extra keys; the tower and the projector (`mm_projector`, an
    # nn.Sequential of Linear, GELU, Linear) are read from their tensors.
    text_config = Qwen2Config.from_dict(reference["text_config"])
    lm = Qwen2ForCausalLM.from_pretrained(reference["path"], config=text_config, dtype=dtype).eval()
    weights = WeightSource(Path(reference["path"]))
    vision_prefix, projector_prefix = "model.vision_tower.vision_tower.vision_model.", "model.mm_projector."
    tower = SiglipVisionModel(AutoConfig.for_model(**reference["vision_config"]))
    tower.load_state_dict(
        {k[len(vision_prefix) :]: weights.read(k) for k in weights.keys() if k.startswith(vision_prefix)}
    )
    width = text_config.hidden_size
    projector = torch.nn.Sequential(
        torch.nn.Linear(tower.config.hidden_size, width), torch.nn.GELU(), torch.nn.Linear(width, width)
    )
    projector.load_state_dict(
        {k[len(projector_prefix) :]: weights.read(k) for k in weights.keys() if k.startswith(projector_prefix)}
    )
    return lm, tower.to(dtype).eval(), projector.to(dtype).eval()


def _tower_features(tower, frames: torch.Tensor, config) -> torch.Tensor:
    """The source tower's hidden state that CrossLMM takes as original visual tokens (an absolute layer index, since
    a tower from --vision keeps the layer that the conversion drops)."""
    if config.vision_config.model_type == "siglip2_vision_model":  # SigLIP2 takes flattened patches and their grid
        patches, spatial_shapes = siglip2_patches(frames, config.vision_config.patch_size)
        outputs = tower(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(patches.shape[:2], dtype=torch.long),
            spatial_shapes=spatial_shapes,
            output_hidden_states=True,
        )
    else:
        outputs = tower(frames, output_hidden_states=True)
    return outputs.hidden_states[config.vision_layers_run]


def run_verification(folder: Path, reference: dict, dtype: torch.dtype):
    """`verify_folder` in a fresh process (this module run with `python -m`) whose transformers module cache lies
    inside the new folder (removed after), so that loading with trust_remote_code writes nothing outside it."""
    modules = folder / ".verify_modules"
    argv = [str(folder), json.dumps(reference), str(dtype).removeprefix("torch.")]
    env = {**os.environ, "HF_MODULES_CACHE": str(modules), "HF_HUB_OFFLINE": "1"}
    logger.info("Verifying: loading the new folder with trust_remote_code and the source with transformers...")
    result = subprocess.run(
        [sys.executable, "-m", "crosslmm.convert.verify", *argv], env=env, capture_output=True, text=True
    )
    shutil.rmtree(modules, ignore_errors=True)
    if result.returncode != 0:
        raise ConversionError(
            "Verification failed: the converted model does not reproduce the source.\n" + result.stderr[-4000:]
        )
    logger.info(f"Verified, largest absolute differences: {result.stdout.strip().splitlines()[-1]}")


if (
    __name__ == "__main__"
):  # python -m crosslmm.convert.verify FOLDER REFERENCE_JSON DTYPE, as run_verification runs it
    verify_folder(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])
