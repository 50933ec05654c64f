"""crosslmm-convert (convert_checkpoint.py) on tiny random sources in every layout it reads, and on each kind of bad
input."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen2ForCausalLM, SiglipVisionModel

from crosslmm.convert import ConversionError, cli, plan
from crosslmm.convert.cli import convert, main, parse_args
from modeling_crosslmm import CrossLMMForConditionalGeneration
from tiny import tiny_model
from tiny_sources import llava_next_folder, llava_onevision_folder, llava_onevision_model, qwen2_folder, siglip_folder


ROOT = Path(__file__).resolve().parent.parent
TEXT_IDS = torch.tensor([[5, 17, 42, 300, 7, 99, 12, 61]])


def run(*argv):
    return convert(parse_args([str(a) for a in argv]))


def load(folder):
    return CrossLMMForConditionalGeneration.from_pretrained(folder).eval()


def tensors(folder) -> dict:
    out = {}
    for path in Path(folder).glob("*.safetensors"):
        out.update(load_file(path))
    return out


def assert_nothing_left(parent: Path, before: set):
    assert {p.name for p in parent.iterdir()} == before, "a failed run left files behind"


# --------------------------------------------------------------------------------------------------------------------
# Sources that convert
# --------------------------------------------------------------------------------------------------------------------


def hub_layout(state: dict) -> dict:
    """The key layout of the Hub's llava-hf checkpoints (transformers 4.x): `vision_tower.vision_model.*`."""
    return {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()}


@pytest.mark.parametrize("layout", ["transformers5", "hub"])
def test_llava_onevision_transformers_format(tmp_path, layout):
    source = llava_onevision_folder(tmp_path / "llava-ov")
    if layout == "hub":
        save_file(
            hub_layout(load_file(source / "model.safetensors")),
            source / "model.safetensors",
            metadata={"format": "pt"},
        )
    output = run(
        "--source",
        source,
        "--output",
        tmp_path / "out",
        "--max-shard-size",
        "300KB",
        "--no-verify",  # verification: test_command_line (this format), the other formats' tests
    )

    files = {p.name for p in output.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "README.md",
        "model.safetensors.index.json",
        "configuration_crosslmm.py",
        "modeling_crosslmm.py",
        "processing_crosslmm.py",
        "video_processing_crosslmm.py",
        "pipeline_crosslmm.py",
        "processor_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # streamed into several shards
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(output))
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_crosslmm.CrossLMMForConditionalGeneration"
    assert "video-text-to-text" in config["custom_pipelines"]
    assert (config["image_token_id"], config["video_token_id"]) == (3, 4)  # the tokenizer's <image>/<video>
    generation = json.loads((output / "generation_config.json").read_text())
    assert {3, 4} <= set(generation["suppress_tokens"])  # placeholders are never generated
    card = ModelCard.load(output / "README.md")
    assert card.data.pipeline_tag == "video-text-to-text" and card.data.library_name == "transformers"
    usage = card.text.split("```python\n")[1].split("```")[0]
    compile(usage, "README.md", "exec")
    assert "trust_remote_code=True" in usage and 'pipeline("video-text-to-text"' in usage
    assert not list(tmp_path.glob(".out.converting-*"))

    # Everything the source has is carried over: same LM logits, vision features and projector.
    reference = llava_onevision_model()
    model = load(output)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=TEXT_IDS).logits, reference(input_ids=TEXT_IDS).logits)
        frames = torch.randn(2, 3, 28, 28)
        expected = reference.model.vision_tower(frames, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(model.model.get_image_features(frames).last_hidden_state, expected)
        features = torch.randn(3, 32)
        torch.testing.assert_close(
            model.model.multi_modal_projector(features), reference.model.multi_modal_projector(features)
        )
    # New DCAL after layer 3 (interval 4): closed gates, unit norms, the preceding decoder layer's MLP.
    dcal = model.model.cross_attention_layers["3"]
    assert dcal.v2v_gate.item() == dcal.t2v_gate.item() == dcal.mlp_gate.item() == 0
    assert torch.equal(dcal.v2v_norm.weight, torch.ones(64)) and torch.equal(dcal.mlp_norm.weight, torch.ones(64))
    decoder_mlp = model.model.language_model.layers[3].mlp
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(getattr(dcal.mlp, name).weight, getattr(decoder_mlp, name).weight)
    assert dcal.t2v_attn.k_proj.weight.shape == (32, 32)  # keys from the vision width D_v
    assert 0.01 < dcal.t2v_attn.k_proj.weight.std() < 0.03  # initializer_range


def test_dcal_options_pool_size_dtype_and_random_mlp(tmp_path):
    source = llava_onevision_folder(tmp_path / "llava-ov")
    output = run(
        "--source",
        source,
        "--output",
        tmp_path / "out",
        "--no-verify",
        "--dcal-init",
        "random",
        "--pool-size",
        "2",
        "--cross-attention-interval",
        "2",
        "--v2v-scope",
        "frame",
        "--dtype",
        "bfloat16",
    )
    config = json.loads((output / "config.json").read_text())
    assert (config["pool_size"], config["cross_attention_interval"], config["v2v_scope"]) == (2, 2, "frame")
    assert config["dtype"] == "bfloat16"
    weights = tensors(output)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert {k.split(".")[2] for k in weights if k.startswith("model.cross_attention_layers.")} == {"1", "3"}
    assert not torch.equal(
        weights["model.cross_attention_layers.1.mlp.up_proj.weight"],
        weights["model.language_model.layers.1.mlp.up_proj.weight"],
    )
    # Seeded: the same command gives the same random tensors.
    again = run(
        "--source",
        source,
        "--output",
        tmp_path / "out",
        "--overwrite",
        "--no-verify",
        "--dcal-init",
        "random",
        "--pool-size",
        "2",
        "--cross-attention-interval",
        "2",
        "--dtype",
        "bfloat16",
    )
    assert torch.equal(
        tensors(again)["model.cross_attention_layers.1.mlp.up_proj.weight"],
        weights["model.cross_attention_layers.1.mlp.up_proj.weight"],
    )


def test_llava_next_format_adds_placeholder_tokens_and_grows_the_vocabulary(tmp_path):
    reference = llava_next_folder(tmp_path / "llava-next")
    output = run("--source", tmp_path / "llava-next", "--output", tmp_path / "out")  # verification on (tiny model)

    tokenizer = AutoTokenizer.from_pretrained(output)
    config = json.loads((output / "config.json").read_text())
    assert (config["image_token_id"], config["video_token_id"]) == (64, 65)
    assert tokenizer.convert_ids_to_tokens([64, 65]) == ["<image>", "<video>"]
    model = load(output)
    embeddings = model.model.language_model.embed_tokens.weight
    assert embeddings.shape == (66, 64)
    old = reference.model.language_model.embed_tokens.weight
    torch.testing.assert_close(embeddings[64], old.mean(0))  # new rows at the mean of the old ones
    with torch.no_grad():
        ids = TEXT_IDS % 64
        torch.testing.assert_close(model(input_ids=ids).logits[..., :64], reference(input_ids=ids).logits)


@pytest.mark.parametrize("tower", ["siglip", "siglip2"])
def test_siglip_and_qwen2_parts(tmp_path, tower):
    siglip_folder(tmp_path / "vision", siglip2=tower == "siglip2")
    qwen2_folder(tmp_path / "qwen", tie_word_embeddings=True)
    # SigLIP2 takes patches, not images: verification (on) compares its own forward with CrossLMM's tower.
    verify = "--verify" if tower == "siglip2" else "--no-verify"
    output = run("--vision", tmp_path / "vision", "--text", tmp_path / "qwen", "--output", tmp_path / "out", verify)

    weights = tensors(output)
    assert "lm_head.weight" not in weights  # tied to the embeddings, as in the source
    assert not any(".head." in k or "encoder.layers.2." in k for k in weights)  # head and last layer cut
    assert torch.equal(weights["model.multi_modal_projector.linear_1.bias"], torch.zeros(64))
    config = json.loads((output / "config.json").read_text())
    assert config["vision_config"]["model_type"] == f"{tower}_vision_model"
    assert config["vision_config"]["num_hidden_layers"] == 2 and config["tie_word_embeddings"] is True
    model = load(output)
    llm = Qwen2ForCausalLM.from_pretrained(tmp_path / "qwen").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=TEXT_IDS).logits, llm(input_ids=TEXT_IDS).logits)
        if tower == "siglip":  # the penultimate layer of the full tower, as LLaVA-OneVision takes it
            frames = torch.randn(2, 3, 28, 28)
            full = SiglipVisionModel.from_pretrained(tmp_path / "vision").eval()
            expected = full(frames, output_hidden_states=True).hidden_states[-2]
            torch.testing.assert_close(model.model.get_image_features(frames).last_hidden_state, expected)


# --------------------------------------------------------------------------------------------------------------------
# A CrossLMM trained in the LLaVA-NeXT code base
# --------------------------------------------------------------------------------------------------------------------

# CrossLMM parameter names -> the names of crosslmm.convert.sources.LLAVA_NEXT_DCAL_KEY_MAP
LLAVA_NEXT_NAMES = [
    ("v2v_attn.", "v2v_cross_attn."),
    ("t2v_attn.", "t2v_cross_attn."),
    ("mlp_norm.", "ffn_norm."),
    ("mlp.", "ffn."),
    ("mlp_gate", "ffn_gate"),
]


def trained_dcals(naming):
    """The DCALs (after decoder layers 1 and 3, open gates) of a trained tiny CrossLMM, under a source naming."""
    model = tiny_model(gates=0.5, text={"vocab_size": 64})
    dcals = {k: v for k, v in model.state_dict().items() if k.startswith("model.cross_attention_layers.")}
    return {naming(k): v.clone() for k, v in dcals.items()}, dcals


def llava_next_naming(key):
    layer, name = key.split(".")[2], ".".join(key.split(".")[3:])
    for ours, theirs in LLAVA_NEXT_NAMES:
        if name.startswith(ours):
            name = theirs + name[len(ours) :]
            break
    return f"model.cross_attn_layers.{layer}.{name}"


def test_trained_crosslmm_with_the_built_in_key_map(tmp_path):
    source_dcals, dcals = trained_dcals(llava_next_naming)
    assert "model.cross_attn_layers.1.ffn.up_proj.weight" in source_dcals
    reference = llava_next_folder(tmp_path / "trained", dcal_tensors=source_dcals)
    output = run("--source", tmp_path / "trained", "--output", tmp_path / "out", "--no-verify",
                 "--cross-attention-interval", "4")  # fmt: skip

    config = json.loads((output / "config.json").read_text())
    assert (config["cross_attention_interval"], config["cross_attention_layers"]) == (2, None)  # from the keys
    weights = tensors(output)
    for key, value in dcals.items():
        assert torch.equal(weights[key], value), key
    model = load(output)  # text only: the base LLM's logits whatever the gates
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=TEXT_IDS % 64).logits[..., :64], reference(input_ids=TEXT_IDS % 64).logits
        )


def test_trained_crosslmm_with_a_key_map_file(tmp_path):
    source_dcals, dcals = trained_dcals(lambda k: k.replace("model.cross_attention_layers.", "model.dcal.", 1))
    del source_dcals["model.dcal.3.t2v_gate"]
    llava_next_folder(tmp_path / "trained", dcal_tensors=source_dcals)
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(ConversionError, match=r"unexpected.*\n.*model\.dcal\.1\."):  # names unknown to the default
        run("--source", tmp_path / "trained", "--output", tmp_path / "out")
    key_map = tmp_path / "key-map.json"
    key_map.write_text(json.dumps({r"^model\.dcal\.(\d+)\.": r"model.cross_attention_layers.\1."}))
    with pytest.raises(ConversionError, match=r"1 missing.*\n\s+model\.cross_attention_layers\.3\.t2v_gate"):
        run("--source", tmp_path / "trained", "--output", tmp_path / "out", "--key-map", key_map)
    assert_nothing_left(tmp_path, before | {"key-map.json"})

    source_dcals["model.dcal.3.t2v_gate"] = dcals["model.cross_attention_layers.3.t2v_gate"]
    llava_next_folder(tmp_path / "trained", dcal_tensors=source_dcals)
    output = run("--source", tmp_path / "trained", "--output", tmp_path / "out", "--key-map", key_map, "--no-verify")
    weights = tensors(output)
    for key, value in dcals.items():
        assert torch.equal(weights[key], value), key


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing left behind
# --------------------------------------------------------------------------------------------------------------------


def test_wrong_architectures(tmp_path):
    qwen2_folder(tmp_path / "qwen")
    siglip_folder(tmp_path / "siglip")
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(ConversionError, match="'qwen2' checkpoint.*--vision and --text"):
        run("--source", tmp_path / "qwen", "--output", tmp_path / "out")
    with pytest.raises(ConversionError, match="--vision .* has a 'qwen2' vision model"):
        run("--vision", tmp_path / "qwen", "--text", tmp_path / "qwen", "--output", tmp_path / "out")
    with pytest.raises(ConversionError, match="--text .* has a 'siglip' language model"):
        run("--vision", tmp_path / "siglip", "--text", tmp_path / "siglip", "--output", tmp_path / "out")
    next_config = tmp_path / "llama-next"
    llava_next_folder(next_config)
    config = json.loads((next_config / "config.json").read_text())
    (next_config / "config.json").write_text(json.dumps({**config, "architectures": ["LlavaLlamaForCausalLM"]}))
    with pytest.raises(ConversionError, match="LlavaLlamaForCausalLM.*needs a Qwen2 LLM"):
        run("--source", next_config, "--output", tmp_path / "out")
    assert_nothing_left(tmp_path, before | {"llama-next", "llama-next-siglip"})


def test_missing_tensors_and_mismatched_hidden_sizes(tmp_path):
    source = llava_onevision_folder(tmp_path / "llava-ov")
    weights = load_file(source / "model.safetensors")
    del weights["language_model.model.layers.2.mlp.up_proj.weight"], weights["multi_modal_projector.linear_2.bias"]
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(ConversionError) as error:
        run("--source", source, "--output", tmp_path / "out")
    message = str(error.value)
    assert "2 missing" in message
    assert "model.language_model.layers.2.mlp.up_proj.weight" in message
    assert "model.multi_modal_projector.linear_2.bias" in message

    llava_onevision_folder(source)  # intact weights, but a config whose LLM is wider than its tensors
    config = json.loads((source / "config.json").read_text())
    config["text_config"]["hidden_size"] = 96
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConversionError,
        match=r"58 shape-mismatched:\n.*\n\s+language_model\.model\.embed_tokens\.weight "
        r"-> model\.language_model\.embed_tokens\.weight: source \(768, 64\), "
        r"CrossLMM \(768, 96\)(.|\n)*and 38 more",
    ):
        run("--source", source, "--output", tmp_path / "out")
    assert_nothing_left(tmp_path, before)


def test_unreadable_and_pickled_weights(tmp_path):
    source = llava_onevision_folder(tmp_path / "llava-ov")
    before = {p.name for p in tmp_path.iterdir()}
    (source / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ConversionError, match=r"Cannot read the weight file .*model\.safetensors"):
        run("--source", source, "--output", tmp_path / "out")

    # Pickled weights load with weights_only=True: tensors convert, anything else is refused.
    (source / "model.safetensors").unlink()
    state = llava_onevision_model().state_dict()
    torch.save({k: v for k, v in state.items()}, source / "pytorch_model.bin")
    output = run("--source", source, "--output", tmp_path / "out", "--no-verify")
    assert torch.equal(tensors(output)["lm_head.weight"], state["lm_head.weight"])
    torch.save({"lm_head.weight": Path("not a tensor")}, source / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="Cannot read the weight file .*pytorch_model.bin.*Weights only load"):
        run("--source", source, "--output", tmp_path / "out2")
    assert_nothing_left(tmp_path, before | {"out"})


def test_existing_output_is_kept_without_overwrite(tmp_path):
    source = llava_onevision_folder(tmp_path / "llava-ov")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="exists; pass --overwrite"):
        run("--source", source, "--output", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    run("--source", source, "--output", tmp_path / "out", "--overwrite", "--no-verify")
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()


def test_two_conversions_into_one_new_output_cannot_both_succeed(tmp_path, monkeypatch):
    """A folder that appears at --output while a conversion runs (here: a second conversion into the same new output,
    finishing first) is kept as it is: the run that finishes last fails naming the folder and writes nothing."""
    source = llava_onevision_folder(tmp_path / "llava-ov")
    output = tmp_path / "out"
    write_model_card = cli.write_model_card

    def while_another_conversion_finishes(folder, *args, **kwargs):
        write_model_card(folder, *args, **kwargs)
        monkeypatch.setattr(cli, "write_model_card", write_model_card)  # the second conversion runs as usual
        run("--source", source, "--output", output, "--no-verify", "--seed", "7")

    monkeypatch.setattr(cli, "write_model_card", while_another_conversion_finishes)
    with pytest.raises(ConversionError, match=f"{output} appeared while converting.*nothing was written"):
        run("--source", source, "--output", output, "--no-verify")
    assert json.loads((output / "config.json").read_text())["model_type"] == "crosslmm"  # the other run's, intact
    key = "model.cross_attention_layers.3.t2v_attn.q_proj.weight"
    again = run("--source", source, "--output", tmp_path / "o7", "--no-verify", "--seed", "7")
    assert torch.equal(tensors(output)[key], tensors(again)[key])  # the second run's weights (seed 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava-ov", "o7", "out"]  # no hidden folder left

    # A folder of the user's appearing meanwhile: kept; with --overwrite it is replaced only once the new one is done.
    def while_the_user_makes_a_folder(folder, *args, **kwargs):
        write_model_card(folder, *args, **kwargs)
        (tmp_path / "mine").mkdir(exist_ok=True)
        (tmp_path / "mine" / "notes.txt").write_text("mine")

    monkeypatch.setattr(cli, "write_model_card", while_the_user_makes_a_folder)
    with pytest.raises(ConversionError, match="appeared while converting"):
        run("--source", source, "--output", tmp_path / "mine", "--no-verify")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    run("--source", source, "--output", tmp_path / "mine", "--no-verify", "--overwrite")
    assert (tmp_path / "mine" / "config.json").exists() and not (tmp_path / "mine" / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava-ov", "mine", "o7", "out"]


def test_overwrite_keeps_the_old_folder_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    source = llava_onevision_folder(tmp_path / "llava-ov")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")

    def failing_rename(source, target):
        assert [p.name for p in (tmp_path / "out").parent.glob(".out.replaced-*")], "the old folder is moved aside"
        raise OSError(28, "No space left on device", str(target))

    monkeypatch.setattr(cli, "rename_no_replace", failing_rename)
    with pytest.raises(ConversionError, match="Writing .*out failed, nothing was written: .*No space left"):
        run("--source", source, "--output", tmp_path / "out", "--no-verify", "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava-ov", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]  # put back


def unwritable_folder(tmp_path) -> Path:
    """A folder in which making a folder fails: a read-only one, or (as root, who may write anywhere) /sys."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            os.rmdir(os.path.join(candidate, "probe"))  # in case a previous run left it
        except OSError:
            pass
        try:
            os.mkdir(candidate / "probe")
        except OSError:
            return candidate
        os.rmdir(candidate / "probe")
    pytest.skip("no unwritable folder on this machine")


@pytest.mark.parametrize(
    "case, message",
    [
        ("a file", "--output .*notes.txt is a file, not a folder; nothing was written"),
        ("a file, --overwrite", "--output .*notes.txt is a file, not a folder; nothing was written"),
        ("the source", "--source .*llava-ov lies inside --output .*llava-ov: the conversion would replace it"),
        ("above the source", "--source .*llava-ov lies inside --output"),
        ("under a file", "Cannot create .*notes.txt/out: .*notes.txt is a file, not a folder"),
        ("unwritable", "Cannot create .*: .* is not writable"),
    ],
)
def test_outputs_that_cannot_be_written_give_one_line_and_write_nothing(tmp_path, capsys, case, message):
    source = llava_onevision_folder(tmp_path / "llava-ov")
    (tmp_path / "notes.txt").write_text("mine")
    output = {
        "a file": tmp_path / "notes.txt",
        "a file, --overwrite": tmp_path / "notes.txt",
        "the source": source,
        "above the source": tmp_path,
        "under a file": tmp_path / "notes.txt" / "out",
        "unwritable": unwritable_folder(tmp_path) / "out",
    }[case]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    capsys.readouterr()  # what building the source printed
    overwrite = ["--overwrite"] if "overwrite" in case or case in ("the source", "above the source") else []
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", str(source), "--output", str(output), "--no-verify", *overwrite])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and re.search(message, err), err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_signal_during_the_conversion_leaves_no_temporary_folder(tmp_path):
    """The console script, stopped by SIGTERM, SIGINT or SIGHUP while its temporary folder exists: one line, exit
    status 128 + the signal's number, nothing left (the verification process it started is stopped too). The three
    runs go side by side: most of each is starting Python."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = {}
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        folder = tmp_path / signal.Signals(signum).name
        source = llava_onevision_folder(folder / "llava-ov")
        process = subprocess.Popen(
            [Path(sys.executable).with_name("crosslmm-convert"), "--source", source, "--output", folder / "out",
             "--verify"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=folder,
        )  # fmt: skip
        runs[signum] = folder, process
    deadline = time.monotonic() + 180
    waiting = dict(runs)
    while waiting:
        for signum, (folder, process) in list(waiting.items()):
            if list(folder.glob(".out.converting-*")):
                process.send_signal(signum)
                del waiting[signum]
            else:
                assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for signum, (folder, process) in runs.items():
        err = process.communicate(timeout=120)[1]
        assert process.returncode == 128 + signum, err
        assert "Traceback" not in err
        assert (
            err.strip().splitlines()[-1]
            == f"error: interrupted by {signal.Signals(signum).name} (no temporary folder left)"
        )
        assert sorted(p.name for p in folder.iterdir()) == ["llava-ov"]


SIGNAL_AT = """
import signal, sys, tempfile, tqdm.auto
from crosslmm.convert import cli, write

class CutOffBar(tqdm.auto.tqdm):
    def __init__(self, *args, **kwargs):
        self.disable = False  # as far as tqdm's own __init__ gets before it sets self.pos
        sys.stderr.write("Writing shards:   0%")  # its first display, without a newline
        signal.raise_signal(signal.SIGTERM)

class ClosingBar(tqdm.auto.tqdm):
    def close(self):
        sys.stderr.write("")  # what tqdm's close writes first, the bar still shown without a newline
        signal.raise_signal(signal.SIGTERM)

def right_after(owner, name, prefix=""):
    call = getattr(owner, name)
    def then_a_signal(*args, **kwargs):
        result = call(*args, **kwargs)
        if kwargs.get("prefix", "").endswith(prefix):
            signal.raise_signal(signal.SIGTERM)  # its handler runs here, before the result reaches the conversion
        return result
    setattr(owner, name, then_a_signal)

class SignalWhenCollected:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # what its handler raises here, Python reports and ignores

moment = sys.argv[1]
if moment == "progress bar":
    write.tqdm = CutOffBar
elif moment == "bar closing":  # seen in CI: the error line continued the bar's
    write.tqdm = ClosingBar
elif moment == "finalizer":  # seen in CI: SIGINT inside tqdm's __del__; the conversion went on and exited 0
    weights = cli.write_weights
    def then_a_finalizer(*args, **kwargs):
        result = weights(*args, **kwargs)
        SignalWhenCollected()  # collected at once
        return result
    cli.write_weights = then_a_finalizer
else:
    right_after(*{
        "probe folder": (tempfile, "mkdtemp", ".probe-"),
        "temporary folder": (tempfile, "mkdtemp", ".converting-"),
        "rename": (cli, "rename_no_replace"),
    }[moment])
cli.main(sys.argv[2:])
"""


MOMENTS = ["progress bar", "bar closing", "finalizer", "probe folder", "temporary folder", "rename"]


@pytest.fixture(scope="module")
def signalled_runs(tmp_path_factory):
    """The runs of `test_a_signal_at_the_worst_moment`, side by side (most of each is starting Python): for each
    moment, its folder, its stderr and its exit status."""
    started, env = {}, {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        for moment in MOMENTS:
            folder = tmp_path_factory.mktemp(moment.replace(" ", "-"))
            source = llava_onevision_folder(folder / "llava-ov")
            argv = [sys.executable, "-c", SIGNAL_AT, moment, "--source", source, "--output", folder / "out"]
            process = subprocess.Popen(
                [*argv, "--no-verify"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
            )
            started[moment] = folder, process
        return {m: (folder, p.communicate(timeout=300)[1], p.returncode) for m, (folder, p) in started.items()}
    finally:
        for _, process in started.values():
            process.kill()


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_signal_at_the_worst_moment(moment, signalled_runs):
    """SIGTERM where a signal does most harm: inside tqdm's __init__ (seen in CI: the half-built bar's finalizer
    printed a traceback after the error line; without it, the error line continued the bar's), right after the
    empty write that starts tqdm's close (seen in CI: the error line continued the bar's), between creating a
    folder (the writability probe, the temporary folder) and naming it, in the middle of the final swap. One line,
    status 143, no temporary folder; after the rename the finished output stays."""
    folder, err, status = signalled_runs[moment]
    assert status == 128 + signal.SIGTERM, err
    assert err.splitlines()[-1:] == ["error: interrupted by SIGTERM (no temporary folder left)"], err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    expected = ["llava-ov", "out"] if moment == "rename" else ["llava-ov"]
    assert sorted(p.name for p in folder.iterdir()) == expected
    if moment == "rename":
        assert (folder / "out" / "model.safetensors").is_file() and (folder / "out" / "config.json").is_file()


def test_verification_failure_leaves_nothing(tmp_path, monkeypatch):
    source = llava_onevision_folder(tmp_path / "llava-ov")
    before = {p.name for p in tmp_path.iterdir()}
    make = plan.Recipe.make

    def off_by_a_little(self, target_key, shape, seed):
        tensor = make(self, target_key, shape, seed)
        return tensor + 1e-3 if target_key == "model.language_model.norm.weight" else tensor

    monkeypatch.setattr(plan.Recipe, "make", off_by_a_little)
    with pytest.raises(ConversionError, match="Verification failed(.|\n)*Mismatched elements"):
        run("--source", source, "--output", tmp_path / "out")
    assert_nothing_left(tmp_path, before)


def test_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    options = (
        "--source --vision --text --output --overwrite --tokenizer --key-map --pool-size --cross-attention-interval"
    )
    options += " --v2v-scope --dcal-init --dtype --max-shard-size --seed --verify --no-verify --push-to-hub"
    for option in options.split():
        assert option in help_text

    with pytest.raises(SystemExit) as exit_info:  # bad input: one line on stderr, exit status 1, no traceback
        main(["--source", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("error: --source")

    # The real command, verification included, writes its folder and nothing else: not even in HOME's caches.
    source = llava_onevision_folder(tmp_path / "llava-ov")
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "HF_HUB_OFFLINE": "1", "PATH": os.environ["PATH"], "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, ROOT / "convert_checkpoint.py", "--source", source, "--output", tmp_path / "out"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Writing shards" in result.stderr and "Verified" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "llava-ov", "out"]
    assert list(home.iterdir()) == []
    assert not (tmp_path / "out" / ".verify_modules").exists()


def test_shards_hold_about_max_shard_size(tmp_path):
    source = llava_onevision_folder(tmp_path / "llava-ov")
    output = run("--source", source, "--output", tmp_path / "out", "--no-verify", "--max-shard-size", "200KB")
    shards = sorted(output.glob("*.safetensors"))
    assert len(shards) > 2
    for path in shards:
        with safe_open(path, "pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= 200_000 or len(sizes) == 1  # a tensor larger than the limit gets a shard of its own
