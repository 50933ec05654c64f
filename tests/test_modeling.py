"""CrossLMM against its parts: the base LLM, the DCAL branches, padding, the cache, bad inputs."""

import copy

import pytest
import torch
from torch import nn
from transformers import SiglipVisionModel

import modeling_crosslmm
from modeling_crosslmm import CACHE_ARG, CrossLMMForConditionalGeneration
from tiny import (
    IMAGE_SIZE,
    count_encoded_frames,
    frames,
    left_padded,
    prompt,
    reference_llm,
    sample_inputs,
    set_gates,
    tiny_config,
    tiny_model,
)


def reference_visual_embeddings(model, clip):
    """SiglipVisionModel hidden_states[-1] -> bilinear antialiased pooling -> projector, written out by hand."""
    config = model.config
    tower = SiglipVisionModel(config.vision_config).eval()
    tower.load_state_dict(model.model.vision_tower.state_dict())
    features = tower(pixel_values=clip, output_hidden_states=True).hidden_states[-1]
    grid = config.patch_grid_size
    features = features.transpose(1, 2).reshape(clip.shape[0], -1, grid, grid)
    pooled = nn.functional.interpolate(
        features, size=(config.pool_size,) * 2, mode="bilinear", align_corners=False, antialias=True
    )
    pooled = pooled.flatten(2).transpose(1, 2).flatten(0, 1)
    projector = model.model.multi_modal_projector
    hidden = nn.functional.gelu(pooled @ projector.linear_1.weight.T + projector.linear_1.bias)
    return hidden @ projector.linear_2.weight.T + projector.linear_2.bias


@torch.no_grad()
def test_zero_gates_equal_qwen2_fed_llava_style_embeddings():
    model = tiny_model(gates=0.0)
    config = model.config
    video, image = frames(4), frames(1, seed=1)
    ids = prompt(config, [1, 2], ("video", 4), [3, 4, 5], ("image",), [6, 7])
    logits = model(input_ids=ids, pixel_values_videos=video[None], pixel_values=image).logits

    embeds = model.get_input_embeddings()(ids).clone()
    embeds[ids == config.video_token_id] = reference_visual_embeddings(model, video)
    embeds[ids == config.image_token_id] = reference_visual_embeddings(model, image)
    expected = reference_llm(model)(inputs_embeds=embeds).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_text_only_is_the_base_llm_whatever_the_gates():
    model = tiny_model(gates=0.7)
    ids = torch.tensor([[5, 9, 2, 44, 17, 3]])
    expected = reference_llm(model)(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids).logits, expected)


@torch.no_grad()
def test_text_before_a_video_does_not_see_it():
    model = tiny_model(gates=0.7)
    ids = prompt(model.config, [1, 2, 3], ("video", 2), [4, 5])
    a = model(input_ids=ids, pixel_values_videos=frames(2, seed=0)[None]).logits
    b = model(input_ids=ids, pixel_values_videos=frames(2, seed=5)[None]).logits
    assert torch.equal(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def dcal_update(model, ids, video, gates):
    """What the first DCAL adds to the residual stream, for one setting of its gates."""
    set_gates(model, 0.0)
    dcal = model.model.cross_attention_layers[str(model.config.dcal_layer_indices[0])]
    for name, value in gates.items():
        getattr(dcal, name).data.fill_(value)
    seen = {}
    handle = dcal.register_forward_hook(lambda m, args, out: seen.update(delta=out[0] - args[0]))
    with torch.no_grad():
        model(input_ids=ids, pixel_values_videos=video[None])
    handle.remove()
    return seen["delta"][0].abs().sum(-1)


def test_v2v_changes_visual_positions_only_and_t2v_text_after_video_only():
    model = tiny_model()
    ids = prompt(model.config, [1, 2, 3], ("video", 2), [4, 5, 6])
    visual = ids[0] == model.config.video_token_id
    after = torch.arange(ids.shape[1]) > visual.nonzero().max()

    v2v = dcal_update(model, ids, frames(2), {"v2v_gate": 0.5})
    assert (v2v[visual] > 0).all() and (v2v[~visual] == 0).all()

    t2v = dcal_update(model, ids, frames(2), {"t2v_gate": 0.5})
    assert (t2v[after] > 0).all() and (t2v[~after] == 0).all()

    # The MLP acts exactly where something was attended to.
    mlp = dcal_update(model, ids, frames(2), {"mlp_gate": 0.5})
    assert (mlp[visual | after] > 0).all() and (mlp[~(visual | after)] == 0).all()


def dcal_inputs(model, ids, video):
    """The hidden states and the plan the first DCAL receives in a real forward pass."""
    dcal = model.model.cross_attention_layers[str(model.config.dcal_layer_indices[0])]
    seen = {}
    handle = dcal.register_forward_pre_hook(lambda module, args: seen.update(args=args))
    with torch.no_grad():
        model(input_ids=ids, pixel_values_videos=video[None])
    handle.remove()
    return dcal, seen["args"][0], seen["args"][1]


@pytest.mark.parametrize("scope", ["frame", "video"])
def test_v2v_scope(scope):
    """Changing frame 1's original tokens changes only frame 1's V2V outputs with scope "frame", the whole video's
    with scope "video"."""
    model = tiny_model(v2v_scope=scope, use_t2v=False)
    ids = prompt(model.config, [1], ("video", 3), [2, 3])
    dcal, hidden, plan = dcal_inputs(model, ids, frames(3))
    dcal.v2v_gate.data.fill_(0.5)
    call = plan.v2v
    grid_tokens = model.config.patch_grid_size**2
    changed = call.tokens.clone()
    if scope == "frame":
        assert call.tokens.shape[:2] == (3, grid_tokens)  # every frame a row of the call, its own tokens as keys
        changed[1] += 1.0
    else:
        assert call.tokens.shape[:2] == (1, 3 * grid_tokens)  # the video a row, all of its tokens as keys
        changed[0, grid_tokens : 2 * grid_tokens] += 1.0

    with torch.no_grad():
        before = dcal(hidden, plan)[0][0]
        call.tokens = changed
        after = dcal(hidden, plan)[0][0]
    diff = (before - after).abs().sum(-1)
    per_frame = model.config.tokens_per_frame
    frame1 = torch.zeros_like(diff, dtype=torch.bool)
    frame1[1 + per_frame : 1 + 2 * per_frame] = True
    visual = ids[0] == model.config.video_token_id
    assert (diff[frame1] > 0).all() and (diff[~visual] == 0).all()
    if scope == "frame":
        assert (diff[~frame1] == 0).all()
    else:
        assert (diff[visual] > 0).all()


@torch.no_grad()
def test_padded_batch_equals_each_sample_alone():
    model = tiny_model(gates=0.5)
    config = model.config
    samples = [
        (prompt(config, [1, 2], ("video", 3), [3, 4, 5, 6]), [frames(3, seed=1)]),
        (prompt(config, [7], ("video", 1), [8], ("video", 2), [9]), [frames(1, seed=2), frames(2, seed=3)]),
    ]
    input_ids, attention_mask = left_padded([ids[0] for ids, _ in samples])
    width = input_ids.shape[1]
    videos = [video for _, clips in samples for video in clips]
    batched = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=videos).logits

    # The same videos as a padded 5-D tensor with their frame counts.
    padded = torch.zeros(3, 3, 3, IMAGE_SIZE, IMAGE_SIZE)
    for i, video in enumerate(videos):
        padded[i, : video.shape[0]] = video
    counts = torch.tensor([3, 1, 2])
    again = model(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=padded, video_num_frames=counts
    ).logits
    torch.testing.assert_close(again, batched)

    for row, (ids, clips) in enumerate(samples):
        alone = model(input_ids=ids, pixel_values_videos=clips).logits[0]
        torch.testing.assert_close(batched[row, width - ids.shape[1] :], alone, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_cached_generation_equals_recomputing_and_never_reencodes():
    model = tiny_model(gates=0.5)
    config = model.config
    ids = prompt(config, [1, 2], ("video", 3), [3, 4], ("image",), [5])
    inputs = dict(input_ids=ids, pixel_values_videos=frames(3)[None], pixel_values=frames(1, seed=4))
    encoded = count_encoded_frames(model)
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True, min_new_tokens=6)
    assert sum(encoded) == 4  # the prefill encodes the 4 frames once; decode steps read the cache
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False, min_new_tokens=6)
    assert torch.equal(cached, uncached)

    # Step by step: each cached step's logits equal recomputing the whole sequence.
    out = model(**inputs, use_cache=True)
    cache, sequence = getattr(out, CACHE_ARG), ids
    for step in range(3):
        token = out.logits[:, -1:].argmax(-1)
        sequence = torch.cat([sequence, token], dim=1)
        # The cache goes in under either name: `cache` (transformers >= 5.24) or `past_key_values` (before).
        out = model(input_ids=token, use_cache=True, **{("cache", "past_key_values")[step % 2]: cache})
        full = model(**{**inputs, "input_ids": sequence}).logits[:, -1]
        torch.testing.assert_close(out.logits[:, -1], full, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_batched_generation_with_left_padding_equals_alone():
    model = tiny_model(gates=0.5)
    config = model.config
    long_ids = prompt(config, [1, 2, 3, 4], ("video", 2), [5])
    short_ids = prompt(config, [6], ("video", 1), [7])
    input_ids, attention_mask = left_padded([long_ids[0], short_ids[0]])
    videos = [frames(2, seed=1), frames(1, seed=2)]
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    made = []  # the key masks of the padded memories, made once for every decode step
    original_key_mask = modeling_crosslmm.key_mask
    modeling_crosslmm.key_mask = lambda *args, **kwargs: (
        made.append(args[0].shape) or original_key_mask(*args, **kwargs)
    )
    try:
        batched = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=videos, **kwargs
        )
    finally:
        modeling_crosslmm.key_mask = original_key_mask
    assert len(made) == 3  # V2V and T2V at prefill, then one for the 4 decode steps
    for row, (ids, video) in enumerate([(long_ids, videos[0]), (short_ids, videos[1])]):
        alone = model.generate(input_ids=ids, pixel_values_videos=[video], **kwargs)
        assert torch.equal(batched[row, -5:], alone[0, -5:])


def test_labels_give_the_shifted_loss_without_visual_positions():
    model = tiny_model(gates=0.3)
    config = model.config
    ids = prompt(config, [1, 2], ("video", 2), [3, 4, 5])
    labels = ids.clone()
    labels[0, 0] = -100
    out = model(input_ids=ids, pixel_values_videos=frames(2)[None], labels=labels)
    targets = labels[0, 1:].masked_fill(ids[0, 1:] == config.video_token_id, -100)
    expected = nn.functional.cross_entropy(out.logits[0, :-1], targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    dcal = model.model.cross_attention_layers["1"]
    assert dcal.v2v_gate.grad is not None and dcal.v2v_gate.grad.abs() > 0


@torch.no_grad()
def test_average_pooling_and_images_alone():
    model = tiny_model(gates=0.5, pooling_mode="average", pool_size=1)
    config = model.config
    ids = prompt(config, [1], ("image",), [2], ("image",), [3])
    out = model(input_ids=ids, pixel_values=torch.stack([frames(1, seed=1)[0], frames(1, seed=2)[0]]))
    assert out.logits.shape == (1, ids.shape[1], config.text_config.vocab_size)
    original = model.model.get_image_features(frames(2)).last_hidden_state
    pooled = model.model.pooler(original)
    torch.testing.assert_close(pooled[:, 0], original.mean(1))


class Float64Pooling(nn.Module):
    """The reference pooling: the model's interpolation, in float64 throughout."""

    def __init__(self, pooler):
        super().__init__()
        self.pooler = pooler

    def forward(self, features):
        frames, _, dim = features.shape
        grid = features.double().transpose(1, 2).reshape(frames, dim, self.pooler.grid, self.pooler.grid)
        size = (self.pooler.pool_size, self.pooler.pool_size)
        pooled = nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False, antialias=True)
        return pooled.flatten(2).transpose(1, 2)


@torch.no_grad()
def test_a_float64_model_pools_in_float64():
    """The pooler computes in the model's dtype when it is wider than float32: a float64 model's logits are those of
    float64 pooling, and an image's pooled tokens do not depend on what else is encoded with it."""
    model = tiny_model(gates=0.5).double()
    config = model.config
    inputs = sample_inputs(config)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    logits = model(**inputs).logits
    reference = copy.deepcopy(model)
    reference.model.pooler = Float64Pooling(model.model.pooler)
    torch.testing.assert_close(logits, reference(**inputs).logits, rtol=0, atol=1e-12)

    image = inputs["pixel_values"]
    alone = model(input_ids=prompt(config, [1], ("image",), [2]), pixel_values=image).image_outputs.pooler_output
    beside = model(**inputs).image_outputs.pooler_output
    torch.testing.assert_close(beside, alone, rtol=0, atol=1e-12)  # the tower batches frames: last-bit changes


@torch.no_grad()
def test_siglip2_tower():
    from transformers import Siglip2VisionModel

    config = tiny_config(
        vision={"model_type": "siglip2_vision_model", "num_patches": 49, "image_size": None, "patch_size": 4}
    )
    model = CrossLMMForConditionalGeneration(config).eval()
    clip = frames(2)
    tokens = model.model.get_image_features(clip).last_hidden_state
    tower = Siglip2VisionModel(config.vision_config).eval()
    tower.load_state_dict(model.model.vision_tower.state_dict())
    patches = clip.reshape(2, 3, 7, 4, 7, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 49, 48)
    expected = tower(
        pixel_values=patches,
        pixel_attention_mask=torch.ones(2, 49, dtype=torch.long),
        spatial_shapes=torch.tensor([[7, 7], [7, 7]]),
        output_hidden_states=True,
    ).hidden_states[-1]
    torch.testing.assert_close(tokens, expected)


@torch.no_grad()
def test_vision_tower_runs_in_chunks():
    model = tiny_model()
    sizes = []
    model.model.vision_tower.embeddings.register_forward_hook(lambda m, args, out: sizes.append(out.shape[0]))
    model.model.get_image_features(frames(7))
    assert sizes == [3, 3, 1]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda c: dict(input_ids=prompt(c, [1], ("video", 2)), pixel_values_videos=frames(3)[None]), "placeholder"),
        (lambda c: dict(input_ids=prompt(c, [1], ("video", 2))), "no videos or images"),
        (lambda c: dict(input_ids=prompt(c, [1], ("image",)), pixel_values_videos=frames(1)[None]), "placeholder"),
        (
            lambda c: dict(input_ids=prompt(c, [1], ("video", 2)), pixel_values_videos=torch.randn(1, 2, 3, 32, 32)),
            "match the vision tower",
        ),
        (
            lambda c: dict(input_ids=prompt(c, [1], ("video", 2)), pixel_values_videos=torch.randn(2, 3, 28, 28)),
            "shape",
        ),
        (
            lambda c: dict(
                input_ids=prompt(c, [1], ("video", 2)), pixel_values_videos=frames(2)[None], video_num_frames=[3]
            ),
            "video_num_frames",
        ),
        # Embeddings without the placeholders' embeddings: nowhere to put the video.
        (lambda c: dict(inputs_embeds=torch.randn(1, 4, 64), pixel_values_videos=frames(2)[None]), "placeholder"),
    ],
)
def test_mismatched_inputs_raise_clear_errors(build, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(**build(model.config))


def test_visual_inputs_after_prefill_are_refused():
    model = tiny_model()
    ids = prompt(model.config, [1], ("video", 1), [2])
    cache = getattr(model(input_ids=ids, pixel_values_videos=frames(1)[None], use_cache=True), CACHE_ARG)
    with pytest.raises(ValueError, match="first forward pass"):
        model(input_ids=ids, pixel_values_videos=frames(1)[None], cache=cache)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids[:, -1:], cache=cache, past_key_values=cache)


@torch.no_grad()
def test_beam_search_repeats_each_samples_own_videos():
    model = tiny_model(gates=0.5)
    config = model.config
    ids = torch.cat(
        [prompt(config, [1], ("video", 1), [2], ("video", 2), [3]), prompt(config, [4], ("video", 3), [5, 6])]
    )
    videos = [frames(1, seed=1), frames(2, seed=2), frames(3, seed=3)]
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, num_beams=3, do_sample=False)
    beams = model.generate(input_ids=ids, pixel_values_videos=videos, **kwargs)
    assert torch.equal(beams, model.generate(input_ids=ids, pixel_values_videos=videos, use_cache=False, **kwargs))
    first = model.generate(input_ids=ids[:1], pixel_values_videos=videos[:2], **kwargs)
    assert torch.equal(beams[:1], first)
    sampled = model.generate(
        input_ids=ids, pixel_values_videos=videos, max_new_tokens=3, do_sample=True, num_return_sequences=2
    )
    assert sampled.shape[0] == 4
