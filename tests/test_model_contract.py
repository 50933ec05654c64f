"""What transformers expects of every model (output flags, return_dict, inputs_embeds, features) and the generation
paths users take (beams, num_return_sequences, assisted decoding, prompts ending on a video), checked against
transformers' own Qwen2 and against CrossLMM's plain forward."""

import pytest
import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import is_torch_flex_attn_available

from modeling_crosslmm import CACHE_ARG, CrossLMMCache, CrossLMMForConditionalGeneration
from tiny import count_encoded_frames, frames, padded_batch, prompt, reference_llm, tiny_config, tiny_model


def video_inputs(config, **kwargs):
    ids = prompt(config, [1, 2], ("video", 3), [3, 4], ("image",), [5, 6])
    return dict(input_ids=ids, pixel_values_videos=frames(3)[None], pixel_values=frames(1, seed=4), **kwargs)


# ---- output flags -----------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("selection", [True, [0, 2, -1]])
def test_hidden_states_and_attentions_as_qwen2_gives_them(selection):
    """Text only, CrossLMM is its Qwen2: the same hidden states and (eager) attention weights, flags as arguments or
    on the config, a list of layer indices as the installed transformers takes it."""
    model = tiny_model(gates=0.5)
    model.set_attn_implementation("eager")
    llm = reference_llm(model)
    llm.set_attn_implementation("eager")
    ids = torch.tensor([[5, 9, 2, 44, 17, 3]])
    expected = llm(input_ids=ids, output_hidden_states=selection, output_attentions=True)
    ours = model(input_ids=ids, output_hidden_states=selection, output_attentions=True)
    assert len(ours.hidden_states) == len(expected.hidden_states)
    for got, want in zip(ours.hidden_states, expected.hidden_states):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(ours.attentions) == model.config.text_config.num_hidden_layers
    for got, want in zip(ours.attentions, expected.attentions):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert ours.cross_attentions == ()  # no video: no DCAL attended to anything

    model.config.output_hidden_states = model.config.output_attentions = True
    from_config = model(input_ids=ids)
    assert len(from_config.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert len(from_config.attentions) == model.config.text_config.num_hidden_layers


@torch.no_grad()
def test_return_dict_false_gives_tuples_from_the_argument_and_the_config():
    model = tiny_model(gates=0.5)
    inputs = video_inputs(model.config)
    expected = model(**inputs).logits
    out = model(**inputs, return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], expected)
    model.config.return_dict = False
    out = model(**inputs)
    assert isinstance(out, tuple) and torch.equal(out[0], expected)
    base = model.model(**inputs)
    assert isinstance(base, tuple)


@torch.no_grad()
def test_cross_attention_weights_follow_v2v_and_t2v():
    """Eager: one (batch, heads, length, memory) tensor per DCAL. A visual position's row is a distribution over its
    own video's original tokens (V2V, video scope); a text position's row over the memory placed before it (T2V);
    text before any visual input attends to nothing."""
    model = tiny_model(gates=0.5)
    model.set_attn_implementation("eager")
    config = model.config
    ids = prompt(config, [1, 2], ("video", 2), [3, 4], ("image",), [5, 6])
    out = model(
        input_ids=ids, pixel_values_videos=frames(2)[None], pixel_values=frames(1, seed=4), output_attentions=True
    )
    grid_tokens = config.patch_grid_size**2
    video_keys, memory = 2 * grid_tokens, 3 * grid_tokens
    assert len(out.cross_attentions) == len(config.dcal_layer_indices)
    first, last = out.cross_attentions[0][0], out.cross_attentions[-1][0]
    heads = config.text_config.num_attention_heads
    assert first.shape == (heads, ids.shape[1], memory)
    video = (ids[0] == config.video_token_id).nonzero().flatten()
    image = (ids[0] == config.image_token_id).nonzero().flatten()
    sums = first.sum(-1)
    torch.testing.assert_close(sums[:, video], torch.ones(heads, len(video)))
    assert first[:, video, video_keys:].abs().max() == 0  # V2V of the video: its own tokens only
    torch.testing.assert_close(first[:, image, video_keys:].sum(-1), torch.ones(heads, len(image)))
    assert first[:, image, :video_keys].abs().max() == 0  # V2V of the image: its own tokens only
    assert sums[:, :2].abs().max() == 0  # text before the video
    between = torch.tensor([video[-1] + 1, video[-1] + 2])
    torch.testing.assert_close(first[:, between, :video_keys].sum(-1), torch.ones(heads, 2))
    assert first[:, between, video_keys:].abs().max() == 0  # T2V: the image comes later
    torch.testing.assert_close(sums[:, -2:], torch.ones(heads, 2))  # after the image: all of the memory
    assert last[:, video].abs().max() == 0  # no V2V after the last decoder layer

    # On sdpa, as for Qwen2's self-attention, no weights are returned.
    model.set_attn_implementation("sdpa")
    sdpa = model(
        input_ids=ids, pixel_values_videos=frames(2)[None], pixel_values=frames(1, seed=4), output_attentions=True
    )
    assert sdpa.attentions == () and sdpa.cross_attentions == ()


# ---- inputs_embeds and features ----------------------------------------------------------------------------------


@torch.no_grad()
def test_inputs_embeds_with_videos_equal_input_ids():
    model = tiny_model(gates=0.5)
    inputs = video_inputs(model.config)
    expected = model(**inputs).logits
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    torch.testing.assert_close(model(inputs_embeds=embeds, **inputs).logits, expected, rtol=0, atol=0)
    # Also through generate, whose first pass takes the embeddings.
    generated = model.generate(inputs_embeds=embeds, **inputs, max_new_tokens=4, do_sample=False)
    reference = model.generate(**video_inputs(model.config), max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, reference[:, -4:])


@torch.no_grad()
def test_video_and_image_features_and_the_outputs_that_carry_them():
    model = tiny_model(gates=0.5)
    config = model.config
    videos = [frames(3), frames(2, seed=1)]
    features = model.get_video_features(videos)
    assert isinstance(features, BaseModelOutputWithPooling)
    grid_tokens, per_frame = config.patch_grid_size**2, config.tokens_per_frame
    assert features.last_hidden_state.shape == (5, grid_tokens, config.vision_config.hidden_size)
    original = model.model.get_image_features(torch.cat(videos)).last_hidden_state  # each frame as an image
    torch.testing.assert_close(features.last_hidden_state, original)
    # One entry per video, its tokens as they replace its placeholders (as transformers' VLMs give them): a tuple for
    # videos of different lengths, one (videos, frames x tokens, D) tensor for videos of one length.
    width = config.text_config.hidden_size
    assert isinstance(features.pooler_output, tuple)
    assert [tuple(video.shape) for video in features.pooler_output] == [(3 * per_frame, width), (2 * per_frame, width)]
    same_length = model.get_video_features(torch.stack([frames(2), frames(2, seed=1)]))
    assert same_length.pooler_output.shape == (2, 2 * per_frame, width)
    torch.testing.assert_close(same_length.pooler_output[1], features.pooler_output[1])
    padded = torch.stack([frames(3), torch.cat([frames(2, seed=1), frames(1, seed=5)])])
    from_padded = model.get_video_features(padded, video_num_frames=torch.tensor([3, 2]))
    for got, want in zip(from_padded.pooler_output, features.pooler_output, strict=True):
        torch.testing.assert_close(got, want)
    as_tuple = model.get_video_features(videos, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], features.last_hidden_state)
    model.config.return_dict = False
    assert isinstance(model.get_video_features(videos), tuple)
    assert isinstance(model.get_video_features(videos, return_dict=None), tuple)
    model.config.return_dict = True
    with_states = model.get_video_features(videos, output_hidden_states=True)
    assert len(with_states.hidden_states) == config.vision_layers_run + 1
    torch.testing.assert_close(with_states.hidden_states[-1], features.last_hidden_state)
    images = model.get_image_features(frames(2, seed=3))
    assert images.pooler_output.shape == (2, per_frame, config.text_config.hidden_size)

    out = model(**video_inputs(config))
    assert out.video_outputs.pooler_output.shape == (1, 3 * per_frame, config.text_config.hidden_size)
    assert out.image_outputs.pooler_output.shape == (1, per_frame, config.text_config.hidden_size)
    assert out.image_outputs.last_hidden_state.shape == (1, grid_tokens, config.vision_config.hidden_size)
    # The pooled video tokens (once also under the alias `video_hidden_states`) are those get_video_features gives.
    alone = model.get_video_features(video_inputs(config)["pixel_values_videos"]).pooler_output
    torch.testing.assert_close(out.video_outputs.pooler_output, alone)
    # The vision tower's layers do not leak into the decoder's hidden states.
    assert len(model(**video_inputs(config), output_hidden_states=True).hidden_states) == (
        config.text_config.num_hidden_layers + 1
    )


# ---- generation ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_prompt_ending_on_its_video_generates_with_the_cache():
    model = tiny_model(gates=0.5)
    ids = prompt(model.config, [1, 2], ("video", 2))
    inputs = dict(input_ids=ids, pixel_values_videos=frames(2)[None], max_new_tokens=5, min_new_tokens=5)
    cached = model.generate(**inputs, do_sample=False)
    assert torch.equal(cached, model.generate(**inputs, do_sample=False, use_cache=False))


@torch.no_grad()
@pytest.mark.parametrize("visual", ["image", "video"])
def test_beams_and_several_sequences_encode_each_sample_once_and_share_its_memory(visual):
    model = tiny_model(gates=0.5)
    config = model.config
    if visual == "image":
        ids = torch.cat([prompt(config, [1], ("image",), [2, 3]), prompt(config, [4, 5], ("image",), [6])])
        inputs = dict(input_ids=ids, pixel_values=frames(2, seed=1))
        alone = [dict(input_ids=ids[i : i + 1], pixel_values=frames(2, seed=1)[i : i + 1]) for i in range(2)]
        total_frames = 2
    else:
        ids = torch.cat(
            [prompt(config, [1, 2, 3, 4, 5], ("video", 2), [7, 8]), prompt(config, [4, 5], ("video", 3), [6])]
        )
        videos = [frames(2, seed=1), frames(3, seed=2)]
        inputs = dict(input_ids=ids, pixel_values_videos=videos)
        alone = [dict(input_ids=ids[i : i + 1], pixel_values_videos=videos[i : i + 1]) for i in range(2)]
        total_frames = 5
    settings = dict(max_new_tokens=4, min_new_tokens=4, num_beams=3, do_sample=False)

    encoded = count_encoded_frames(model)
    memories = []
    handle = model.register_forward_hook(
        lambda module, args, out: memories.append(
            [(k.data_ptr(), k.shape[0]) for k, _ in getattr(out, CACHE_ARG).visual_memory.values()]
        )
    )
    beams = model.generate(**inputs, **settings)
    handle.remove()
    assert sum(encoded) == total_frames  # each sample's frames once, not once per beam
    assert all(step == memories[0] for step in memories)  # the memory is never copied nor reordered
    assert all(samples == 2 for _, samples in memories[0])  # one memory per sample, shared by its 3 beams
    assert torch.equal(beams, model.generate(**inputs, **settings, use_cache=False))
    for i, sample in enumerate(alone):
        assert torch.equal(beams[i], model.generate(**sample, **settings)[0])

    encoded.clear()
    sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert sampled.shape[0] == 4 and sum(encoded) == total_frames


@torch.no_grad()
def test_assisted_decoding_with_crosslmm_as_model_and_as_assistant():
    """Greedy assisted decoding gives the main model's own greedy answer; the assistant's first pass (which
    transformers does not mark as a first iteration) gets the frames too."""
    model, assistant = tiny_model(gates=0.5, seed=0), tiny_model(gates=0.5, seed=1)
    inputs = video_inputs(model.config)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected = model.generate(**inputs, **settings)
    encoded = count_encoded_frames(assistant)
    assert torch.equal(model.generate(**inputs, **settings, assistant_model=assistant), expected)
    assert sum(encoded) == 4  # the assistant encoded the video and the image once


@torch.no_grad()
def test_placeholders_are_never_generated():
    model = tiny_model(gates=0.5)
    config = model.config
    assert set(model.generation_config.suppress_tokens) == {config.image_token_id, config.video_token_id}
    inputs = video_inputs(config)
    last = model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
    model.lm_head.weight.data[config.video_token_id] = 100 * last / last.norm()  # by far the likeliest token
    assert model(**inputs).logits[0, -1].argmax() == config.video_token_id  # what it would pick
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1] :]
    assert not torch.isin(new, torch.tensor([config.image_token_id, config.video_token_id])).any()


def test_saved_generation_config_suppresses_the_placeholders(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    saved = GenerationConfig.from_pretrained(tmp_path)
    assert set(saved.suppress_tokens) == {model.config.image_token_id, model.config.video_token_id}


# ---- the plan --------------------------------------------------------------------------------------------------


def test_a_decode_step_plans_from_the_cache_without_reading_the_device():
    """On the meta device any read of a tensor's values fails: prefill a ragged batch (memories of different
    lengths, rows sharing a sample's memory), then a decode step runs through, one T2V call per DCAL on the cached
    keys themselves."""
    config = tiny_config()
    with torch.device("meta"):
        model = CrossLMMForConditionalGeneration(config).eval()
    short, long = prompt(config, [5, 6], ("video", 1), [7] * 10), prompt(config, [1, 2], ("video", 3), [3, 4])
    ids = torch.cat([long, long, short, short])  # two samples, each in two rows
    size = config.image_size
    videos = [torch.empty(3, 3, size, size, device="meta"), torch.empty(1, 3, size, size, device="meta")]
    with torch.no_grad():
        cache = getattr(model(input_ids=ids, pixel_values_videos=videos, use_cache=True, rows_per_sample=2), CACHE_ARG)
    assert isinstance(cache, CrossLMMCache)
    assert cache.memory_lengths == [3 * 49, 49] and cache.rows_per_sample == 2

    calls = []
    for idx, dcal in model.model.cross_attention_layers.items():
        dcal.t2v_attn.register_forward_pre_hook(
            lambda module, args, idx=int(idx): calls.append(
                (idx, args[1] is cache.visual_memory[idx][0] and args[2] is cache.visual_memory[idx][1])
            )
        )
    step = torch.ones(4, 1, dtype=torch.long, device="meta")
    with torch.no_grad():
        out = model(input_ids=step, use_cache=True, **{CACHE_ARG: cache})
    assert out.logits.shape == (4, 1, config.text_config.vocab_size)
    assert calls == [(idx, True) for idx in config.dcal_layer_indices]


BACKENDS = ["eager", "sdpa"] + (["flex_attention"] if is_torch_flex_attn_available() else [])


@torch.no_grad()
@pytest.mark.parametrize("implementation", BACKENDS)
def test_the_cached_visual_memory_is_contiguous(implementation):
    """Every decode step reads each DCAL's memory: its keys/values are kept as (samples, kv_heads, M, head_dim)
    blocks, made once at prefill (a strided view of the projection made SDPA 2.5-3x slower per key on a CPU), for
    one sample alone and for a padded batch, and stay so after beam search kept some of its rows."""
    model = tiny_model(gates=0.5)
    model.set_attn_implementation(implementation)
    if implementation == "flex_attention":
        torch._dynamo.reset()  # see tests/test_backends.py: every flex_attention case compiles afresh
    config = model.config
    for inputs in (video_inputs(config), padded_batch(config)):
        cache = getattr(model(**inputs, use_cache=True), CACHE_ARG)
        memory = [tensor for keys_values in cache.visual_memory.values() for tensor in keys_values]
        assert len(memory) == 2 * len(config.dcal_layer_indices)
        for tensor in memory:
            assert tensor.is_contiguous(), (tensor.shape, tensor.stride())
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert all(tensor.is_contiguous() for keys_values in cache.visual_memory.values() for tensor in keys_values)


# ---- training --------------------------------------------------------------------------------------------------


def test_a_text_only_training_batch_runs_every_visual_module_and_changes_nothing():
    model = tiny_model(gates=0.5)
    ids = torch.tensor([[5, 9, 2, 44, 17, 3]])
    with torch.no_grad():
        expected = reference_llm(model)(input_ids=ids).logits
    model.train()
    encoded = count_encoded_frames(model)
    out = model(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, expected) and encoded == [1]
    out.loss.backward()
    dcal = model.model.cross_attention_layers["1"]
    for param in (dcal.v2v_attn.k_proj.weight, dcal.t2v_attn.q_proj.weight, dcal.mlp.up_proj.weight):
        assert param.grad is not None and param.grad.abs().max() == 0
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().max() == 0


def test_a_micro_batch_without_answer_tokens_adds_zero_under_gradient_accumulation():
    model = tiny_model(gates=0.5).train()
    inputs = video_inputs(model.config)
    labels = torch.full_like(inputs["input_ids"], -100)
    out = model(**inputs, labels=labels, num_items_in_batch=torch.tensor(7))
    assert out.loss == 0
    out.loss.backward()
    with pytest.raises(ValueError, match="no token to learn from"):  # without num_items_in_batch: a NaN mean
        model(**inputs, labels=labels)


@torch.no_grad()
def test_a_follow_up_question_reuses_the_encoded_video():
    """A second turn passes the first turn's cache and only its new tokens' ids after the first turn's: the vision
    tower does not run again, and the answer is the one a from-scratch run of the whole conversation gives."""
    model = tiny_model(gates=0.5)
    video = frames(3)[None]
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    first = model.generate(
        input_ids=prompt(model.config, [1, 2], ("video", 3), [3, 4]),
        pixel_values_videos=video,
        return_dict_in_generate=True,
        **settings,
    )
    cache = getattr(first, CACHE_ARG)
    conversation = torch.cat([first.sequences, torch.tensor([[7, 8, 9]])], dim=1)  # the next question
    encoded = count_encoded_frames(model)
    follow_up = model.generate(input_ids=conversation, **{CACHE_ARG: cache}, **settings)
    assert encoded == []
    from_scratch = model.generate(input_ids=conversation, pixel_values_videos=video, **settings)
    assert torch.equal(follow_up, from_scratch)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda c: dict(video_inputs(c), attention_mask=torch.ones(2, 23, dtype=torch.long)),
            "attention_mask has shape",
        ),
        (
            lambda c: dict(video_inputs(c), attention_mask=torch.ones(1, 5, dtype=torch.long)),
            "attention_mask has shape",
        ),
        (lambda c: dict(input_ids=torch.tensor([[1, 2, 160]])), "outside the vocabulary 0..159"),
        (lambda c: dict(input_ids=torch.tensor([[1, -1, 2]])), "outside the vocabulary"),
        (lambda c: dict(input_ids=torch.tensor([1, 2, 3])), "input_ids must have shape"),
        (
            lambda c: dict(
                video_inputs(c), pixel_values_videos=frames(3).index_fill(0, torch.tensor([1]), float("nan"))[None]
            ),
            "pixel_values_videos holds NaN or infinite values \\(at index 0\\)",
        ),
        (lambda c: dict(video_inputs(c), pixel_values=frames(1) / 0.0), "pixel_values holds NaN or infinite"),
    ],
)
def test_inputs_that_do_not_fit_are_named(build, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(**build(model.config))
