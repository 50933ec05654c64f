"""On a CUDA GPU in bfloat16: every attention backend installed computes what eager computes (padded batches, both V2V
scopes, prefill and cached decode steps), and the benchmarks' GPU paths run. Skipped without CUDA."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

from modeling_crosslmm import CACHE_ARG
from tiny import padded_batch, tiny_model


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKENDS = [
    "sdpa",
    pytest.param("flex_attention", marks=pytest.mark.skipif(not is_torch_flex_attn_available(), reason="no flex")),
    pytest.param(
        "flash_attention_2",
        marks=pytest.mark.skipif(not is_flash_attn_2_available(), reason="flash-attn not installed"),
    ),
]
# bfloat16 keeps 8 bits of mantissa: backends that sum in different orders differ by a few units in the last place
# of each layer's output.
TOLERANCE = {"rtol": 3e-2, "atol": 3e-2}


@pytest.fixture(scope="module", params=["video", "frame"])
def eager_model(request):
    """bfloat16 on the GPU, open gates; vision heads of 16 dimensions, the least flex_attention takes."""
    model = tiny_model(gates=0.5, v2v_scope=request.param, vision={"hidden_size": 64, "intermediate_size": 128})
    model.set_attn_implementation("eager")
    return model.to("cuda", torch.bfloat16)


def on_gpu(inputs):
    """The batch on the GPU, pixels in bfloat16."""
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, list):
            moved[key] = [v.to("cuda", torch.bfloat16) for v in value]
        elif value.is_floating_point():
            moved[key] = value.to("cuda", torch.bfloat16)
        else:
            moved[key] = value.to("cuda")
    return moved


@torch.no_grad()
def prefill_and_forced_steps(model, inputs, steps=3):
    """Logits of the prefill and of `steps` decode steps fed fixed tokens through the cache (fixed, not sampled, so
    that a near-tie in bfloat16 cannot send two backends down different continuations)."""
    out = model(**inputs, use_cache=True)
    logits, cache, mask = [out.logits], getattr(out, CACHE_ARG), inputs["attention_mask"]
    for step in range(steps):
        token = torch.full((mask.shape[0], 1), 20 + step, device=mask.device)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=mask, use_cache=True, **{CACHE_ARG: cache})
        logits.append(out.logits)
        cache = getattr(out, CACHE_ARG)
    return logits


@pytest.mark.parametrize("implementation", BACKENDS)
def test_backend_matches_eager_in_bfloat16(eager_model, implementation):
    inputs = on_gpu(padded_batch(eager_model.config))
    expected = prefill_and_forced_steps(eager_model, inputs)
    model = copy.deepcopy(eager_model)
    model.set_attn_implementation(implementation)
    logits = prefill_and_forced_steps(model, inputs)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[0][real].float(), expected[0][real].float(), **TOLERANCE)
    for step, (ours, theirs) in enumerate(zip(logits[1:], expected[1:])):
        torch.testing.assert_close(ours.float(), theirs.float(), **TOLERANCE, msg=lambda m: f"decode step {step}: {m}")


@pytest.mark.parametrize("script", ["prefill", "decode"])
def test_benchmark_gpu_path_runs(script, tmp_path):
    """The timed, synchronised, max_memory_allocated path of the benchmarks, at the tiny size, run as users run it."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{script}.py"
    out = tmp_path / "result.json"
    argv = ["--size", "tiny", "--device", "cuda", "--frames", "2", "4", "--repeats", "1", "--json", str(out)]
    result = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert out.exists() and "OOM" not in result.stdout
