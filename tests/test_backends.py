"""Every attention backend available on this machine computes what eager computes: the LLM's self-attention, the
vision tower and the DCALs' cross-attention, on padded batches, in both V2V scopes, and through generate() (on a CPU,
flex_attention in one case: see FLEX_ATTENTION)."""

import copy

import pytest
import torch
from transformers.utils import is_torch_flex_attn_available

from tiny import padded_batch, tiny_model


# flex_attention compiles every new shape with torch's inductor, seconds per case on a CPU, so one case here proves it
# computes what eager computes: a padded prefill in "video" scope (`test_flex_attention_padded_prefill_matches_eager`:
# three left-padded samples of 2, 3 and 2 frames, two of them in one V2V call, an image after the text of the first).
# sdpa runs every case; tests/test_gpu.py runs every backend on every case, generation included, on a GPU.
FLEX_ATTENTION = pytest.mark.skipif(not is_torch_flex_attn_available(), reason="this torch has no flex_attention")


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


def assert_padded_batch_logits_match(eager_model, implementation):
    inputs = padded_batch(eager_model.config)
    expected = eager_model(**inputs).logits
    logits = with_backend(eager_model, implementation)(**inputs).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_padded_batch_logits_match_eager(eager_model):
    assert_padded_batch_logits_match(eager_model, "sdpa")


@FLEX_ATTENTION
@torch.no_grad()
def test_flex_attention_padded_prefill_matches_eager():
    model = tiny_model(gates=0.5, v2v_scope="video")
    model.set_attn_implementation("eager")
    assert_padded_batch_logits_match(model, "flex_attention")


@torch.no_grad()
def test_generation_with_cache_matches_eager(eager_model):
    inputs = padded_batch(eager_model.config)
    settings = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    expected = eager_model.generate(**inputs, **settings)
    out = with_backend(eager_model, "sdpa").generate(**inputs, **settings)
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
