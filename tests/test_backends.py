"""Every attention backend available on this machine computes what eager computes: the LLM's self-attention, the
vision tower and the DCALs' cross-attention, on padded batches, in both V2V scopes, and through generate()."""

import copy

import pytest
import torch
from transformers.utils import is_torch_flex_attn_available

from tiny import frames, prompt, tiny_model


BACKENDS = [
    "sdpa",
    pytest.param(
        "flex_attention",
        marks=pytest.mark.skipif(not is_torch_flex_attn_available(), reason="this torch has no flex_attention"),
    ),
]
# Ragged on purpose: different frame counts, an image after the text of the first sample, left padding. Samples 0 and
# 2 share a frame count (one V2V call for both in "video" scope) and samples 0 and 2 see the same T2V memory length,
# with sample 1 between them (the gathered, non-consecutive rows of the cached memory).
VIDEO_FRAMES = (2, 3, 2)


def padded_batch(config):
    rows = [
        prompt(config, [1, 2], ("video", 2), [3, 4, 5], ("image",), [6])[0],
        prompt(config, [7], ("video", 3), [8, 9])[0],
        prompt(config, [10, 11, 12], ("video", 2), [13, 14])[0],
    ]
    width = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):  # left padding, as for generation
        input_ids[i, width - len(row) :] = row
        attention_mask[i, width - len(row) :] = 1
    videos = [frames(n, seed=i) for i, n in enumerate(VIDEO_FRAMES)]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values_videos": videos,
        "pixel_values": frames(1, seed=9),
    }


def with_backend(model, implementation):
    """A copy of `model` (same weights) running `implementation` everywhere: LLM, vision tower and DCALs."""
    model = copy.deepcopy(model)
    model.set_attn_implementation(implementation)
    if implementation == "flex_attention":
        # torch's CPU inductor emits C++ that does not compile for flex_attention once it recompiles with dynamic
        # shapes (a second call with other sizes); every case here compiles afresh, with static shapes.
        torch._dynamo.reset()
    return model


@pytest.fixture(scope="module", params=["video", "frame"])
def eager_model(request):
    """Open gates, so that every DCAL branch shows in the logits."""
    model = tiny_model(gates=0.5, v2v_scope=request.param)
    model.set_attn_implementation("eager")
    return model


def attention_implementations(model):
    """The backend of every attention: configs, LLM, vision tower, each DCAL branch."""
    return {
        model.config._attn_implementation,
        model.model.language_model.config._attn_implementation,
        model.model.vision_tower.config._attn_implementation,
        *(layer.v2v_attn.config._attn_implementation for layer in model.model.cross_attention_layers.values()),
        *(layer.t2v_attn.config._attn_implementation for layer in model.model.cross_attention_layers.values()),
    }


def test_setting_the_backend_reaches_every_attention(eager_model, tmp_path):
    assert attention_implementations(with_backend(eager_model, "sdpa")) == {"sdpa"}
    eager_model.save_pretrained(tmp_path)
    loaded = type(eager_model).from_pretrained(tmp_path, attn_implementation="sdpa")
    assert attention_implementations(loaded) == {"sdpa"}


@pytest.mark.parametrize("implementation", BACKENDS)
@torch.no_grad()
def test_padded_batch_logits_match_eager(eager_model, implementation):
    inputs = padded_batch(eager_model.config)
    expected = eager_model(**inputs).logits
    logits = with_backend(eager_model, implementation)(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", BACKENDS)
@torch.no_grad()
def test_generation_with_cache_matches_eager(eager_model, implementation):
    if implementation == "flex_attention":
        # torch's CPU inductor cannot compile flex_attention for a padded decode step (a C++ codegen error, plain
        # Qwen2ForCausalLM included); unpadded rows here, padded ones in tests/test_gpu.py.
        config = eager_model.config
        rows = [prompt(config, [1, 2], ("video", 2), [3, 4]), prompt(config, [5, 6], ("video", 2), [7, 8])]
        inputs = {"input_ids": torch.cat(rows), "pixel_values_videos": [frames(2, seed=0), frames(2, seed=1)]}
    else:
        inputs = padded_batch(eager_model.config)
    settings = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    expected = eager_model.generate(**inputs, **settings)
    out = with_backend(eager_model, implementation).generate(**inputs, **settings)
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(expected.scores), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_batching_the_cross_attention_calls_changes_nothing(eager_model):
    """Samples batched together (sharing V2V and T2V attention calls) give the logits each gives alone."""
    inputs = padded_batch(eager_model.config)
    batched = eager_model(**inputs).logits
    images_of = {0: inputs["pixel_values"]}
    for i, video in enumerate(inputs["pixel_values_videos"]):
        real = inputs["attention_mask"][i].bool()
        alone = eager_model(
            input_ids=inputs["input_ids"][i, real][None], pixel_values_videos=[video], pixel_values=images_of.get(i)
        ).logits
        torch.testing.assert_close(batched[i, real], alone[0], rtol=1e-5, atol=1e-5)
