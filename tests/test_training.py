"""Fine-tuning: the collator's labels, Trainer, gradient checkpointing, the paper's two stages, LoRA, bad inputs."""

import warnings
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

from chats import training_sample
from crosslmm.samples import (
    build_sample_checkpoint,
    build_tokenizer,
    moving_square,
    processor_for_config,
    video_qa_samples,
)
from crosslmm.train.trainer import (
    ASSISTANT_HEADER,
    LORA_TARGET_MODULES,
    STAGES,
    CrossLMMDataCollator,
    CrossLMMTrainer,
    Stage,
    parameter_groups,
    set_branches,
    setup_training,
)
from tiny import IMAGE_SIZE, enable_checkpointing, frames, prompt, set_gates, tiny_config, tiny_model


def video_batch(config, seed=0):
    """Two samples, each a 2-frame video followed by text, with labels on the text after the video."""
    first = prompt(config, [1, 2], ("video", 2), [3, 4, 5, 6])
    second = prompt(config, [7], ("video", 2), [8, 9, 10, 11, 12])
    ids = torch.cat([first, second])
    labels = ids.clone()
    labels[:, :-4] = -100
    videos = torch.stack([frames(2, seed=seed), frames(2, seed=seed + 1)])
    return dict(input_ids=ids, pixel_values_videos=videos, labels=labels)


# ---- the collator and Trainer -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    """The tiny model's processor with the shared tokenizer; the generated videos are already the frames to use."""
    tokenizer = build_tokenizer()
    config = tiny_config(
        text={"vocab_size": len(tokenizer)},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
    )
    processor = processor_for_config(config, tokenizer)
    processor.video_processor.do_sample_frames = False
    return processor


def chat(turns):
    """A sample from (question, answer) turns; the first question comes with a video."""
    return training_sample(turns, moving_square("red", "left", num_frames=2 + len(turns)))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collator_labels_exactly_the_assistant_turns(processor, padding_side):
    processor.tokenizer.padding_side = padding_side
    tokenizer = processor.tokenizer
    samples = [
        chat([("What colour is it?", "Red."), ("Which way does it go?", "It goes to the left.")]),
        chat([("Describe the video.", "A red square moves left.")]),
    ]
    batch = CrossLMMDataCollator(processor)(samples)
    processor.tokenizer.padding_side = "right"
    assert batch["pixel_values_videos"].shape[:2] == (2, 4) and batch["video_num_frames"].tolist() == [4, 3]
    header = tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)
    answers = [["Red.", "It goes to the left."], ["A red square moves left."]]
    for row, row_answers in enumerate(answers):
        ids = batch["input_ids"][row].tolist()
        starts = [i + len(header) for i in range(len(ids)) if ids[i : i + len(header)] == header]
        assert len(starts) == len(row_answers)
        expected = torch.full((len(ids),), -100)
        for start, answer in zip(starts, row_answers):
            answer_ids = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
            assert ids[start : start + len(answer_ids)] == answer_ids
            expected[start : start + len(answer_ids)] = torch.tensor(answer_ids)
        assert torch.equal(batch["labels"][row], expected)
    # The shorter row is padded on the requested side, and padding is never labelled.
    padding = batch["attention_mask"][1] == 0
    assert padding.any() and bool(padding[0] if padding_side == "left" else padding[-1])


def test_collator_batches_images_and_videos_for_the_model(processor):
    image_sample = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
            {"role": "assistant", "content": "Blue."},
        ],
        "images": [moving_square("blue", "left")[0]],
    }
    batch = CrossLMMDataCollator(processor)([image_sample, chat([("Describe the video.", "A red square.")])])
    size = IMAGE_SIZE
    assert batch["pixel_values"].shape == (1, 3, size, size)
    assert batch["pixel_values_videos"].shape == (1, 3, 3, size, size)
    model = tiny_model(
        text={"vocab_size": len(processor.tokenizer)},
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        gates=0.5,
    ).train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_collator_refuses_bad_samples(processor):
    collator = CrossLMMDataCollator(processor)
    no_answer = chat([("What colour is it?", "Red.")])
    no_answer["messages"] = no_answer["messages"][:1]
    with pytest.raises(ValueError, match="Sample 1 has no assistant turn"):
        collator([chat([("Describe the video.", "A red square.")]), no_answer])
    no_frames = chat([("What colour is it?", "Red.")])
    del no_frames["videos"]
    with pytest.raises(ValueError, match=r"<video>.* but (0|no) video"):
        collator([no_frames])


def test_trainer_with_the_collator_and_gradient_checkpointing_lowers_the_loss(tmp_path):
    """What examples/finetune_tiny.py runs: stage 2 of a tiny checkpoint (at learning rates that move a random model
    within a few steps) on the generated video questions, with CrossLMMTrainer, the collator and gradient
    checkpointing."""
    checkpoint = build_sample_checkpoint(tmp_path / "checkpoint", "tiny")
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    processor.video_processor.do_sample_frames = False
    enable_checkpointing(model)
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=8,
        per_device_train_batch_size=4,
        lr_scheduler_type="constant",
        logging_steps=1,
        remove_unused_columns=False,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    trainer = CrossLMMTrainer(
        model=model,
        args=arguments,
        train_dataset=video_qa_samples(),
        data_collator=CrossLMMDataCollator(processor),
        learning_rates=setup_training(
            model,
            replace(STAGES[2], learning_rates={"vision_tower": 2e-4, "projector": 1e-3, "dcals": 1e-3, "llm": 1e-3}),
        ),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


# ---- gradient checkpointing ----------------------------------------------------------------------------------------


def gradients(model, batch):
    model.zero_grad()
    model(**batch).loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def test_gradient_checkpointing_recomputes_the_dcals_and_gives_the_same_gradients():
    model = tiny_model(gates=0.5).train()
    batch = video_batch(model.config)
    expected = gradients(model, batch)

    enable_checkpointing(model)
    dcals = list(model.model.cross_attention_layers.values())
    assert all(dcal.gradient_checkpointing for dcal in dcals)
    assert all(layer.gradient_checkpointing for layer in model.model.language_model.layers)
    # A checkpointed layer runs its forward again during backward: its sub-modules are called twice per step.
    calls = []
    for dcal in dcals:
        dcal.v2v_attn.register_forward_hook(lambda module, args, out: calls.append("v2v"))
        dcal.t2v_attn.register_forward_hook(lambda module, args, out: calls.append("t2v"))
    model.zero_grad()
    loss = model(**batch).loss
    forward_calls = len(calls)
    loss.backward()
    assert len(calls) == 2 * forward_calls
    checkpointed = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
    assert checkpointed.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_reentrant_checkpointing_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="non-reentrant"):
        enable_checkpointing(model, use_reentrant=True)
    with pytest.raises(ValueError, match="non-reentrant"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name, deprecated from 5.25 on, still reaches it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


# ---- the paper's two stages ----------------------------------------------------------------------------------------


def trainable(model):
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_stage1_trains_only_the_projector_and_v2v_with_t2v_off():
    model = tiny_model(gates=0.5)
    learning_rates = setup_training(model, STAGES[1])
    names = trainable(model)
    expected = {name for name, _ in model.named_parameters() if name.startswith("model.multi_modal_projector.")}
    for idx in model.config.v2v_layer_indices:  # not the DCAL after the last decoder layer, whose V2V never runs
        prefix = f"model.cross_attention_layers.{idx}."
        expected |= {
            name
            for name, _ in model.named_parameters()
            if name.startswith(prefix + "v2v_attn.") or name in (prefix + "v2v_norm.weight", prefix + "v2v_gate")
        }
    assert names == expected
    assert not model.config.use_t2v
    assert not any(dcal.use_t2v for dcal in model.model.cross_attention_layers.values())
    # T2V really is off: text after the video no longer depends on it, whatever the T2V weights.
    batch = video_batch(model.config)
    del batch["labels"]
    with torch.no_grad():
        before = model(**batch).logits
        for dcal in model.model.cross_attention_layers.values():
            dcal.t2v_gate.fill_(2.0)
        assert torch.equal(model(**batch).logits, before)
    groups = parameter_groups(model, learning_rates)
    assert {group["name"] for group in groups} == {"projector", "dcals"}
    assert sum(len(group["params"]) for group in groups) == len(expected)


def test_stage2_trains_everything_crosslmm_runs_with_the_papers_learning_rates():
    model = tiny_model()
    setup_training(model, STAGES[1])
    learning_rates = setup_training(model, STAGES[2])
    assert model.config.use_t2v and all(dcal.use_t2v for dcal in model.model.cross_attention_layers.values())
    frozen = {name for name, _ in model.named_parameters()} - trainable(model)
    # CrossLMM reads hidden_states[-1] of the tower, before its post-layernorm, and runs no V2V after the last decoder
    # layer: the only parameters it never runs.
    last = model.config.dcal_layer_indices[-1]
    assert last == model.config.text_config.num_hidden_layers - 1 and last not in model.config.v2v_layer_indices
    v2v_of_last = {
        name for name, _ in model.named_parameters() if name.startswith(f"model.cross_attention_layers.{last}.v2v_")
    }
    assert len(v2v_of_last) == 6  # norm, q/k/v/o projections, gate
    assert (
        frozen == {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"} | v2v_of_last
    )

    batch = video_batch(model.config)
    set_gates(model, 0.5)
    model(**batch).loss.backward()
    assert all(param.grad is not None for name, param in model.named_parameters() if name not in frozen)

    groups = parameter_groups(model, learning_rates, weight_decay=0.1)
    by_name = {}
    for group in groups:
        for param in group["params"]:
            by_name[id(param)] = group
    expected_lr = {
        "model.vision_tower.": 2e-6,
        "model.multi_modal_projector.": 1e-5,
        "model.cross_attention_layers.": 1e-5,
        "model.language_model.": 1e-5,
        "lm_head.": 1e-5,
    }
    for name, param in model.named_parameters():
        if name in frozen:
            assert id(param) not in by_name
            continue
        group = by_name[id(param)]
        assert group["lr"] == next(lr for prefix, lr in expected_lr.items() if name.startswith(prefix)), name
        assert group["weight_decay"] == (0.1 if param.ndim >= 2 else 0.0), name
    assert STAGES[2].learning_rates == {"vision_tower": 2e-6, "projector": 1e-5, "dcals": 1e-5, "llm": 1e-5}


def test_setup_training_trains_the_components_named_and_only_what_runs_with_t2v_off_and_gates_frozen():
    model = tiny_model(gates=0.5)
    rates = setup_training(model, Stage({"projector": 1e-3, "dcals": 2e-3}, use_t2v=False, train_gates=False))
    names = trainable(model)
    assert rates == {"projector": 1e-3, "dcals": 2e-3}
    assert names and all(
        name.startswith(("model.multi_modal_projector.", "model.cross_attention_layers.")) for name in names
    )
    assert not any(".t2v_" in name or name.endswith("_gate") for name in names), sorted(names)
    last = model.config.dcal_layer_indices[-1]  # no V2V after the last decoder layer, and T2V off: nothing runs there
    assert not any(name.startswith(f"model.cross_attention_layers.{last}.") for name in names)
    assert any(".mlp." in name for name in names) and any(".v2v_attn." in name for name in names)
    batch = video_batch(model.config)
    model(**batch).loss.backward()
    assert all(param.grad is not None for name, param in model.named_parameters() if name in names)
    with pytest.raises(ValueError, match="Unknown components"):
        Stage({"connector": 1e-3})


def test_set_branches_switches_v2v_off_in_every_dcal_and_refuses_both_off():
    model = tiny_model(gates=0.5)
    batch = video_batch(model.config)
    del batch["labels"]
    set_branches(model, use_t2v=True, use_v2v=False)
    assert not model.config.use_v2v and not any(dcal.use_v2v for dcal in model.model.cross_attention_layers.values())
    with torch.no_grad():
        before = model(**batch).logits
        set_gates(model, 2.0, names=("v2v_gate",))
        assert torch.equal(model(**batch).logits, before)  # V2V really is off
    with pytest.raises(ValueError, match="both off"):
        set_branches(model, use_t2v=False, use_v2v=False)


def test_parameter_groups_refuse_a_trainable_component_without_learning_rate():
    model = tiny_model()
    with pytest.raises(ValueError, match="vision_tower"):
        parameter_groups(model, {"projector": 1e-5, "dcals": 1e-5, "llm": 1e-5})


# ---- LoRA ----------------------------------------------------------------------------------------------------------


def lora_model(model):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGET_MODULES, init_lora_weights=False)
    return get_peft_model(model, config)


def test_lora_parameter_groups_by_module_name():
    peft_model = lora_model(tiny_model())
    groups = parameter_groups(peft_model, STAGES[2].learning_rates)
    names = {id(p): n for n, p in peft_model.named_parameters()}
    for group in groups:
        for param in group["params"]:
            name = names[id(param)]
            assert "lora_" in name
            assert group["name"] == ("dcals" if ".cross_attention_layers." in name else "llm")
    assert {group["name"] for group in groups} == {"dcals", "llm"}
    assert sum(len(g["params"]) for g in groups) == len(trainable(peft_model))


def test_lora_adapter_reloads_on_a_remote_code_checkpoint_and_merges(tmp_path):
    model = tiny_model(gates=0.4)
    model.save_pretrained(tmp_path / "base")
    peft_model = lora_model(model).eval()
    lora_layers = [name for name, _ in peft_model.named_modules() if name.endswith("lora_A")]
    assert any(".cross_attention_layers.1.t2v_attn.k_proj." in name for name in lora_layers)
    assert any(".language_model.layers.0.self_attn.q_proj." in name for name in lora_layers)
    batch = video_batch(model.config)
    del batch["labels"]
    with torch.no_grad():
        adapted = peft_model(**batch).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            assert not torch.allclose(base(**batch).logits, adapted)  # the adapter changes something
    peft_model.save_pretrained(tmp_path / "adapter")

    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "base", trust_remote_code=True)
    assert type(base).__module__.startswith("transformers_modules")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, adapted, rtol=0, atol=1e-6)
        merged = reloaded.merge_and_unload()
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**batch).logits, adapted, rtol=1e-4, atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------------------------


def test_labels_masking_everything_raise_instead_of_a_nan_loss():
    model = tiny_model()
    batch = video_batch(model.config)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(ValueError, match="no token to learn from"):
        model(**batch)
    # Labels only on the video placeholders count as nothing too: those positions never enter the loss.
    batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] != model.config.video_token_id, -100)
    with pytest.raises(ValueError, match="no token to learn from"):
        model(**batch)


def test_video_placeholder_without_frames_raises():
    model = tiny_model()
    batch = video_batch(model.config)
    del batch["pixel_values_videos"]
    with pytest.raises(ValueError, match="placeholder tokens but no videos"):
        model(**batch)
    batch["pixel_values_videos"] = [frames(2), torch.zeros(0, *frames(1).shape[1:])]
    with pytest.raises(ValueError, match="non-empty"):
        model(**batch)


def test_dtypes_float_frames_are_cast_integer_frames_raise():
    model = tiny_model(gates=0.5).to(torch.bfloat16)
    batch = video_batch(model.config)
    out = model(**batch)  # float32 frames into a bfloat16 model: cast to the tower's dtype
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    batch["pixel_values_videos"] = (batch["pixel_values_videos"] * 50).clamp(0, 255).to(torch.uint8)
    with pytest.raises(ValueError, match="floating-point pixel values"):
        model(**batch)
