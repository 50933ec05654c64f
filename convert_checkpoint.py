"""Build a CrossLMM checkpoint folder from checkpoints that exist, ready for `from_pretrained` and the Hub.

    python convert_checkpoint.py --source llava-hf/llava-onevision-qwen2-0.5b-ov-hf --output crosslmm-0.5b
    python convert_checkpoint.py --vision google/siglip2-so400m-patch14-384 --text Qwen/Qwen2.5-1.5B-Instruct \\
        --output crosslmm-2b
    python convert_checkpoint.py --source path/to/llava-next-crosslmm-run --output crosslmm-trained

Sources (local folders or Hub ids; Hub files come through huggingface_hub and its cache):

1. LLaVA-OneVision (the same SigLIP + 2-layer MLP projector + Qwen2 stack), in the transformers format
   (`LlavaOnevisionForConditionalGeneration`) or in the original LLaVA-NeXT format (`LlavaQwenForCausalLM`:
   `model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.0/2`, `model.layers.*`, `lm_head`).
   The vision tower, projector and LLM are carried over; the DCALs are new, with gates at 0, norms at 1, random
   cross-attention projections and (by default) a copy of the preceding decoder layer's MLP.
2. A SigLIP/SigLIP2 vision checkpoint plus a Qwen2.5 LLM checkpoint (`--vision`, `--text`). The tower is cut as
   LLaVA-OneVision cuts it (its last encoder layer and the attention-pooling head dropped, so that the original visual
   tokens are the penultimate layer's output); the projector is random.
3. A CrossLMM trained in the LLaVA-NeXT code base (a LLaVA-NeXT checkpoint whose keys also hold DCALs), with the DCAL
   names of this file's `LLAVA_NEXT_DCAL_KEY_MAP` (`model.cross_attn_layers.N.{v2v,t2v}_cross_attn`, `ffn`, ...), or
   those of a `--key-map` JSON file.

Every source tensor is either placed, or dropped on purpose with a reason that the run prints; any other tensor, any
CrossLMM tensor left without a source and any shape mismatch fails the run, naming each key. Tensors stream from the
source shards to the output shards (peak memory about one output shard). The folder is written next to `--output`
under a temporary name and renamed at the end, so a failed run leaves nothing behind.
"""

import argparse
import importlib.util
import inspect
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download, split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AddedToken, AutoConfig, AutoTokenizer, GenerationConfig, Qwen2Config

from configuration_crosslmm import DEFAULT_VISION_CONFIG, VISION_MODEL_TYPES, CrossLMMConfig
from modeling_crosslmm import CrossLMMForConditionalGeneration, siglip2_patches
from processing_crosslmm import CrossLMMImageProcessor, CrossLMMProcessor, CrossLMMVideoProcessor


# --------------------------------------------------------------------------------------------------------------------
# Key maps: (regular expression, replacement) pairs, the first match renames a source key to its CrossLMM key
# --------------------------------------------------------------------------------------------------------------------

# LLaVA-OneVision in the transformers format. The Hub's llava-hf checkpoints use the layout of transformers 4.x
# (`vision_tower.vision_model.*`, `language_model.model.*`, `language_model.lm_head`), transformers 5 writes
# `vision_tower.*`, and a state dict taken from a live model has `model.` in front: all land on the same names.
LLAVA_ONEVISION_KEY_MAP = [
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "model.vision_tower."),
    (r"^(?:model\.)?multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^(?:model\.language_model|language_model\.model)\.", "model.language_model."),
    (r"^(?:language_model\.)?lm_head\.", "lm_head."),
]

# LLaVA-OneVision in the original LLaVA-NeXT format (`LlavaQwenForCausalLM`, a Qwen2ForCausalLM with the tower and
# the projector inside `model`). LLaVA-NeXT saves SigLIP with its last layer already removed and no head.
LLAVA_NEXT_KEY_MAP = [
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.(embed_tokens|layers|norm)\.", r"model.language_model.\1."),
    (r"^lm_head\.", "lm_head."),
]

# The DCALs of a CrossLMM trained in the LLaVA-NeXT code base. LLaVA-NeXT keeps added modules inside `model`
# (LlavaQwenModel), so a DCAL stack there is `model.cross_attn_layers`, a ModuleDict keyed by the index N of the
# decoder layer each DCAL follows (as in CrossLMM), with the attention modules named after the paper's branches and
# the feed-forward block `ffn`. A run that named them differently passes `--key-map FILE`: a JSON object of the same
# regular expression -> replacement pairs, used instead of this map.
LLAVA_NEXT_DCAL_KEY_MAP = {
    r"^model\.cross_attn_layers\.(\d+)\.v2v_norm\.": r"model.cross_attention_layers.\1.v2v_norm.",
    r"^model\.cross_attn_layers\.(\d+)\.v2v_cross_attn\.": r"model.cross_attention_layers.\1.v2v_attn.",
    r"^model\.cross_attn_layers\.(\d+)\.v2v_gate$": r"model.cross_attention_layers.\1.v2v_gate",
    r"^model\.cross_attn_layers\.(\d+)\.t2v_norm\.": r"model.cross_attention_layers.\1.t2v_norm.",
    r"^model\.cross_attn_layers\.(\d+)\.t2v_cross_attn\.": r"model.cross_attention_layers.\1.t2v_attn.",
    r"^model\.cross_attn_layers\.(\d+)\.t2v_gate$": r"model.cross_attention_layers.\1.t2v_gate",
    r"^model\.cross_attn_layers\.(\d+)\.ffn_norm\.": r"model.cross_attention_layers.\1.mlp_norm.",
    r"^model\.cross_attn_layers\.(\d+)\.ffn\.": r"model.cross_attention_layers.\1.mlp.",
    r"^model\.cross_attn_layers\.(\d+)\.ffn_gate$": r"model.cross_attention_layers.\1.mlp_gate",
}

# A SigLIP/SigLIP2 checkpoint: the full dual encoder (`vision_model.*`, `text_model.*`) or the vision model alone.
SIGLIP_KEY_MAP = [(r"^(?:vision_model\.)?(?=embeddings\.|encoder\.|post_layernorm\.|head\.)", "model.vision_tower.")]
QWEN2_KEY_MAP = [(r"^model\.", "model.language_model."), (r"^lm_head\.", "lm_head.")]

# Source tensors with no place in CrossLMM, dropped on purpose (the run lists them with these reasons).
DROPPED_SOURCE_KEYS = [
    (r"^(?:model\.)?image_newline$", "LLaVA-OneVision's AnyRes row separator (CrossLMM has no AnyRes tiling)"),
    (r"rotary_emb\.inv_freq$", "rotary frequencies (recomputed from the config)"),
    (r"^text_model\.|^logit_scale$|^logit_bias$", "SigLIP's text tower and contrastive logit scale/bias"),
]

LLAVA_NEXT_ARCHITECTURES = ("LlavaQwenForCausalLM",)
# The files a checkpoint carries for trust_remote_code (found, not imported: the pipeline pulls in all of
# transformers.pipelines).
CODE_MODULES = ("configuration_crosslmm", "modeling_crosslmm", "processing_crosslmm", "pipeline_crosslmm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
VERIFY_MAX_PARAMETERS = 3_000_000_000
MAX_LISTED = 20  # keys named per kind of problem; a wrong config would otherwise list every tensor


class ConversionError(Exception):
    """A source that cannot become a CrossLMM checkpoint; the message names what is wrong."""


def log(message: str):
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Reading sources lazily
# --------------------------------------------------------------------------------------------------------------------


class WeightSource:
    """The tensors of one checkpoint folder, read one at a time: safetensors through `safe_open` (headers only until
    a tensor is asked for), pickled `.bin` files only through `torch.load(weights_only=True, mmap=True)`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = self._weight_files(folder)
        self.key_to_file: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        for path in self.files:
            for key in self._handle(path).keys():
                self.key_to_file[key] = path
        self.release()

    @staticmethod
    def _weight_files(folder: Path) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = folder / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError) as error:
                    raise ConversionError(f"Cannot read the weight index {index}: {error}") from error
                files = [folder / name for name in sorted(set(weight_map.values()))]
                missing = [str(path) for path in files if not path.is_file()]
                if missing:
                    raise ConversionError(f"The weight index {index} lists files that are not there: {missing}")
                return files
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
        if not files:
            raise ConversionError(f"No weights (*.safetensors or pytorch_model*.bin) in {folder}.")
        return files

    def _handle(self, path: Path):
        if path not in self._open:
            try:
                if path.suffix == ".safetensors":
                    self._open[path] = safe_open(path, framework="pt", device="cpu")
                else:
                    self._open[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
                raise ConversionError(f"Cannot read the weight file {path}: {error}") from error
        return self._open[path]

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._handle(self.key_to_file[key])
        if isinstance(handle, dict):
            return tuple(handle[key].shape)
        return tuple(handle.get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        handle = self._handle(self.key_to_file[key])
        if isinstance(handle, dict):
            return handle[key].dtype
        return SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype(), torch.float32)

    def read(self, key: str) -> torch.Tensor:
        handle = self._handle(self.key_to_file[key])
        return handle[key].clone() if isinstance(handle, dict) else handle.get_tensor(key)

    def release(self):
        """Close every file, so that the pages read so far stop counting towards this process's memory."""
        self._open.clear()


def resolve(source: str, what: str) -> Path:
    """A local folder, or a Hub id fetched with huggingface_hub (configs, tokenizer and weights only)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{what} {source} is a file; pass its folder or a Hub id.")
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    try:
        folder = Path(snapshot_download(source, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(source, allow_patterns=patterns + ["*.bin"]))
    except Exception as error:  # huggingface_hub raises many kinds: offline, not found, gated, bad id
        raise ConversionError(
            f"{what} {source!r} is neither a local folder nor a reachable Hub model: {error}"
        ) from error
    return folder


def read_config_json(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no config.json.")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ConversionError(f"Cannot read {path}: {error}") from error


# --------------------------------------------------------------------------------------------------------------------
# What each target tensor is made from
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """How to make one CrossLMM tensor: copied from a source key (rows appended when the vocabulary grows), or
    initialised (`zeros`, `ones`, `normal` with `std`)."""

    source: WeightSource | None = None
    key: str | None = None
    init: str | None = None
    std: float = 0.0
    extra_rows: int = 0

    def make(self, target_key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        if self.source is not None:
            tensor = self.source.read(self.key)
            if self.extra_rows:  # new token rows start at the mean of the old ones
                mean = tensor.float().mean(0, keepdim=True).to(tensor.dtype)
                tensor = torch.cat([tensor, mean.expand(self.extra_rows, -1)])
            return tensor
        if self.init == "zeros":
            return torch.zeros(shape)
        if self.init == "ones":
            return torch.ones(shape)
        # Seeded per key, so that a tensor's values do not depend on the shard layout.
        generator = torch.Generator().manual_seed(seed + zlib.crc32(target_key.encode()))
        return torch.randn(shape, generator=generator) * self.std


@dataclass
class Plan:
    """Every CrossLMM tensor with its recipe, the source keys dropped on purpose, and what went wrong."""

    recipes: dict[str, Recipe] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> reason
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


@dataclass
class Source:
    """A source after format detection: its configs, tensors, tokenizer folder and how to check the result."""

    kind: str  # "llava_onevision", "llava_next", "crosslmm_llava_next" or "parts"
    vision_config: object
    text_config: object
    weights: list[tuple[WeightSource, list]]  # each weight source with its key map
    tokenizer_folder: Path
    base_models: list[str]
    tie_word_embeddings: bool
    vision_feature_layer: int = -1
    vision_layers_kept: int | None = None  # parts: the encoder layers kept (LLaVA-OneVision drops the last one)
    generation_folder: Path | None = None
    reference: dict = field(default_factory=dict)  # what `verify_folder` loads to compare with


def rename(key: str, key_map) -> str | None:
    for pattern, replacement in key_map:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key, count=1)
    return None


def load_key_map(path: str | None) -> list[tuple[str, str]]:
    if path is None:
        return list(LLAVA_NEXT_DCAL_KEY_MAP.items())
    try:
        mapping = json.loads(Path(path).read_text())
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ValueError("expected a JSON object of regular expression -> replacement strings")
        for pattern in mapping:
            re.compile(pattern)
    except (OSError, ValueError, re.error) as error:
        raise ConversionError(f"Cannot use the key map {path}: {error}") from error
    return list(mapping.items())


# --------------------------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------------------------


def load_source(args) -> Source:
    if args.source and (args.vision or args.text):
        raise ConversionError("Pass either --source, or --vision and --text, not both.")
    if args.source:
        folder = resolve(args.source, "--source")
        config = read_config_json(folder)
        base = [args.source] if not Path(args.source).expanduser().exists() else []
        model_type = config.get("model_type")
        architectures = config.get("architectures") or []
        is_llava_next = "mm_vision_tower" in config
        if args.key_map and not is_llava_next:
            raise ConversionError("--key-map names DCAL keys of a LLaVA-NeXT checkpoint; the source is not one.")
        if model_type == "llava_onevision" or "LlavaOnevisionForConditionalGeneration" in architectures:
            return _llava_onevision_source(folder, base)
        if is_llava_next and set(architectures) & set(LLAVA_NEXT_ARCHITECTURES):
            return _llava_next_source(folder, config, base, load_key_map(args.key_map))
        if is_llava_next:
            raise ConversionError(
                f"{args.source} is a LLaVA-NeXT checkpoint with architectures {architectures}; CrossLMM needs a Qwen2 "
                f"LLM ({', '.join(LLAVA_NEXT_ARCHITECTURES)})."
            )
        raise ConversionError(
            f"{args.source} is a {model_type!r} checkpoint ({', '.join(architectures) or 'no architectures'}); "
            "--source takes LLaVA-OneVision (transformers' LlavaOnevisionForConditionalGeneration, or LLaVA-NeXT's "
            "LlavaQwenForCausalLM, also with DCALs). For a SigLIP tower plus a Qwen2.5 LLM use --vision and --text."
        )
    if not (args.vision and args.text):
        raise ConversionError("Pass --source, or both --vision and --text.")
    if args.key_map:
        raise ConversionError(
            "--key-map names DCAL keys of a LLaVA-NeXT checkpoint (--source), not of --vision/--text."
        )
    return _parts_source(args)


def _vision_config_of(config, what: str):
    """The SigLIP/SigLIP2 vision config inside a (possibly dual-encoder) config."""
    config = getattr(config, "vision_config", None) or config
    if config.model_type not in VISION_MODEL_TYPES:
        raise ConversionError(f"{what} has a {config.model_type!r} vision model; CrossLMM takes {VISION_MODEL_TYPES}.")
    return config


def _text_config_of(config, what: str):
    if config.model_type != "qwen2":
        raise ConversionError(f"{what} has a {config.model_type!r} language model; CrossLMM takes Qwen2/Qwen2.5.")
    return config


def _llava_onevision_source(folder: Path, base: list[str]) -> Source:
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, OSError) as error:
        raise ConversionError(f"Cannot read the LLaVA-OneVision config in {folder}: {error}") from error
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ConversionError(f"vision_feature_layer={layer} (several layers) has no CrossLMM equivalent.")
    text_config = _text_config_of(config.text_config, "The LLaVA-OneVision checkpoint")
    return Source(
        kind="llava_onevision",
        vision_config=_vision_config_of(config.vision_config, "The LLaVA-OneVision checkpoint"),
        text_config=text_config,
        weights=[(WeightSource(folder), LLAVA_ONEVISION_KEY_MAP)],
        tokenizer_folder=folder,
        base_models=base,
        tie_word_embeddings=bool(config.tie_word_embeddings),
        vision_feature_layer=layer,
        generation_folder=folder,
        reference={"kind": "llava_onevision", "path": str(folder)},
    )


def _llava_next_source(folder: Path, config: dict, base: list[str], dcal_key_map) -> Source:
    """LLaVA-NeXT keeps the Qwen2 fields at the top of config.json and names the SigLIP tower in `mm_vision_tower`;
    its SigLIP wrapper drops the tower's last layer and head, and takes the last remaining hidden state."""
    weights = WeightSource(folder)
    # LLaVA-NeXT's config holds Qwen2's fields next to its own `mm_*` ones: keep Qwen2's.
    text_fields = set(inspect.signature(Qwen2Config.__init__).parameters) | {"rope_theta", "rope_scaling"}
    text_fields -= {"self", "architectures", "transformers_version", "dtype"}
    text_config = Qwen2Config(**{k: v for k, v in config.items() if k in text_fields})

    tower = config["mm_vision_tower"]
    try:  # the tower's own config (local folder or Hub); LLaVA-NeXT itself hard-codes SigLIP-so400m/14 at 384 px
        vision_config = _vision_config_of(AutoConfig.from_pretrained(tower), f"mm_vision_tower {tower!r}")
    except (OSError, ValueError) as error:
        log(f"mm_vision_tower {tower!r} has no readable config ({error}); using SigLIP-so400m/14 at 384 px.")
        vision_config = AutoConfig.for_model(**DEFAULT_VISION_CONFIG)
    prefix = "model.vision_tower.vision_tower.vision_model.encoder.layers."
    layers = {int(key[len(prefix) :].split(".")[0]) for key in weights.keys() if key.startswith(prefix)}
    vision_config.num_hidden_layers = len(layers)
    vision_config.vision_use_head = False

    dcal_keys = [key for key in weights.keys() if rename(key, dcal_key_map)]
    kind = "crosslmm_llava_next" if dcal_keys else "llava_next"
    return Source(
        kind=kind,
        vision_config=vision_config,
        text_config=text_config,
        weights=[(weights, LLAVA_NEXT_KEY_MAP + (dcal_key_map if dcal_keys else []))],
        tokenizer_folder=folder,
        base_models=base,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        generation_folder=folder,
        reference={
            "kind": "llava_next",
            "path": str(folder),
            "text_config": text_config.to_dict(),
            "vision_config": vision_config.to_dict(),
        },
    )


def _parts_source(args) -> Source:
    vision_folder = resolve(args.vision, "--vision")
    text_folder = resolve(args.text, "--text")
    try:
        vision_config = _vision_config_of(AutoConfig.from_pretrained(vision_folder), f"--vision {args.vision}")
        text_config = _text_config_of(AutoConfig.from_pretrained(text_folder), f"--text {args.text}")
    except (OSError, ValueError) as error:
        raise ConversionError(f"Cannot read the configs of --vision/--text: {error}") from error
    vision_config = AutoConfig.for_model(**vision_config.to_dict())  # a copy: the tower is cut below
    full_layers = vision_config.num_hidden_layers
    vision_config.num_hidden_layers = full_layers - 1  # LLaVA-OneVision's cut: the penultimate layer's output
    vision_config.vision_use_head = False
    base = [spec for spec in (args.vision, args.text) if not Path(spec).expanduser().exists()]
    return Source(
        kind="parts",
        vision_config=vision_config,
        text_config=text_config,
        weights=[(WeightSource(vision_folder), SIGLIP_KEY_MAP), (WeightSource(text_folder), QWEN2_KEY_MAP)],
        tokenizer_folder=text_folder,
        base_models=base,
        tie_word_embeddings=bool(text_config.tie_word_embeddings),
        vision_layers_kept=full_layers - 1,
        generation_folder=text_folder,
        reference={"kind": "parts", "vision": str(vision_folder), "text": str(text_folder)},
    )


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer and config
# --------------------------------------------------------------------------------------------------------------------


def load_tokenizer(folder: Path):
    """The source's tokenizer with the `<image>`/`<video>` placeholders, added as special tokens when missing."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        raise ConversionError(f"Cannot load a tokenizer from {folder} (pass --tokenizer): {error}") from error
    vocab = tokenizer.get_vocab()
    missing = [token for token in ("<image>", "<video>") if token not in vocab]
    if missing:
        log(f"The tokenizer has no {missing}: adding them as special tokens.")
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return tokenizer


def build_config(source: Source, tokenizer, args, dtype: torch.dtype) -> CrossLMMConfig:
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    text_config = Qwen2Config(**source.text_config.to_dict())
    text_config.vocab_size = max(text_config.vocab_size, image_token_id + 1, video_token_id + 1)
    text_config.tie_word_embeddings = source.tie_word_embeddings
    dcal_layers = None
    if source.kind == "crosslmm_llava_next":  # where the trained DCALs are, from their keys
        targets = [rename(key, key_map) or "" for weights, key_map in source.weights for key in weights.keys()]
        dcal_layers = sorted({int(t.split(".")[2]) for t in targets if t.startswith("model.cross_attention_layers.")})
    try:
        config = CrossLMMConfig(
            vision_config=source.vision_config.to_dict(),
            text_config=text_config.to_dict(),
            pool_size=args.pool_size,
            cross_attention_interval=args.cross_attention_interval,
            cross_attention_layers=dcal_layers,
            v2v_scope=args.v2v_scope,
            vision_feature_layer=source.vision_feature_layer,
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            tie_word_embeddings=source.tie_word_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    except ValueError as error:
        raise ConversionError(f"The source does not make a valid CrossLMM config: {error}") from error
    if dcal_layers and dcal_layers == list(range(dcal_layers[0], text_config.num_hidden_layers, dcal_layers[0] + 1)):
        config.cross_attention_layers, config.cross_attention_interval = None, dcal_layers[0] + 1  # a regular layout
    config.dtype = str(dtype).removeprefix("torch.")
    return config


def source_dtype(source: Source) -> torch.dtype:
    """The dtype of the source LLM's token embeddings (float32 if it has none)."""
    llm_weights = source.weights[-1][0]
    embed_key = next((k for k in llm_weights.keys() if k.endswith("embed_tokens.weight")), None)
    return llm_weights.dtype(embed_key) if embed_key else torch.float32


def expected_tensors(config: CrossLMMConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a CrossLMM with this config saves, with its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = CrossLMMForConditionalGeneration(config)
    tied = set(model._tied_weights_keys) if config.tie_word_embeddings else set()
    return {key: tuple(t.shape) for key, t in model.state_dict().items() if key not in tied}


# --------------------------------------------------------------------------------------------------------------------
# Planning: every target tensor gets a recipe, every source tensor a place or a reason to drop it
# --------------------------------------------------------------------------------------------------------------------


def plan_conversion(source: Source, config: CrossLMMConfig, dcal_init: str) -> Plan:
    plan = Plan()
    expected = expected_tensors(config)
    for weights, key_map in source.weights:
        for key in weights.keys():
            reason = _drop_reason(key, source, config)
            if reason:
                plan.dropped[key] = reason
                continue
            target = rename(key, key_map)
            if target is not None and target in plan.recipes:
                plan.unexpected.append(f"{key} (a second source for {target})")
            elif target in expected:
                plan.recipes[target] = Recipe(source=weights, key=key)
            elif target is not None and (reason := _drop_reason(target, source, config)):
                plan.dropped[key] = reason
            else:
                plan.unexpected.append(key)

    std = config.text_config.initializer_range
    for target in expected:
        if target not in plan.recipes:
            recipe = _new_tensor(target, config, source, plan, dcal_init, std)
            if recipe is not None:
                plan.recipes[target] = recipe

    for target, recipe in plan.recipes.items():
        if recipe.source is None:
            continue
        shape = recipe.source.shape(recipe.key)
        want = expected[target]
        if target.endswith(("embed_tokens.weight", "lm_head.weight")) and len(shape) == 2 and shape[1:] == want[1:]:
            recipe.extra_rows = max(want[0] - shape[0], 0)  # placeholders added to the tokenizer
            shape = (shape[0] + recipe.extra_rows, *shape[1:])
        if shape != want:
            plan.mismatched.append(f"{recipe.key} -> {target}: source {shape}, CrossLMM {want}")
    missing = [key for key in expected if key not in plan.recipes]
    problems = []
    for title, keys in (
        ("missing (no source tensor)", missing),
        ("unexpected (no place in CrossLMM)", plan.unexpected),
        ("shape-mismatched", plan.mismatched),
    ):
        if keys:
            listed = keys[:MAX_LISTED] + ([f"... and {len(keys) - MAX_LISTED} more"] if len(keys) > MAX_LISTED else [])
            problems.append(f"{len(keys)} {title}:\n  " + "\n  ".join(listed))
    if problems:
        hint = " (a trained CrossLMM with other DCAL names needs --key-map)" if plan.unexpected else ""
        raise ConversionError(f"The source does not fit CrossLMM{hint}.\n" + "\n".join(problems))
    plan.recipes = {key: plan.recipes[key] for key in expected}  # the model's order: layers stay together
    return plan


def _drop_reason(key: str, source: Source, config: CrossLMMConfig) -> str | None:
    """Why a (source or renamed) key has no place in CrossLMM on purpose; None if it should have one."""
    for pattern, reason in DROPPED_SOURCE_KEYS:
        if re.search(pattern, key):
            return reason
    if key.startswith("model.vision_tower.head.") and not config.vision_config.vision_use_head:
        return "SigLIP's attention-pooling head (CrossLMM uses the patch tokens)"
    match = re.match(r"model\.vision_tower\.encoder\.layers\.(\d+)\.", key)
    if match and source.vision_layers_kept is not None and int(match.group(1)) >= source.vision_layers_kept:
        return "SigLIP's last encoder layer (CrossLMM, as LLaVA-OneVision, reads the penultimate layer)"
    if key == "lm_head.weight" and config.tie_word_embeddings:
        return "tied to embed_tokens"
    return None


def _new_tensor(target: str, config, source: Source, plan: Plan, dcal_init: str, std: float) -> Recipe | None:
    """Recipes for the tensors no source has: the DCALs (and, from parts, the projector)."""
    match = re.match(r"model\.cross_attention_layers\.(\d+)\.(.+)$", target)
    if match and source.kind != "crosslmm_llava_next":
        layer, name = match.groups()
        if name.endswith("_gate"):
            return Recipe(init="zeros")  # tanh(0) = 0: the DCAL adds nothing until trained
        if name.endswith("norm.weight"):
            return Recipe(init="ones")
        if name.startswith("mlp.") and dcal_init == "copy":
            return plan.recipes.get(f"model.language_model.layers.{layer}.{name}")
        return Recipe(init="normal", std=std)
    if target.startswith("model.multi_modal_projector.") and source.kind == "parts":
        return Recipe(init="zeros") if target.endswith(".bias") else Recipe(init="normal", std=std)
    return None


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def write_weights(plan: Plan, folder: Path, dtype: torch.dtype, max_shard_size: str, seed: int, shapes: dict):
    """Shards laid out up front from the shapes, then filled one at a time: peak memory is about one shard."""
    meta = {key: torch.empty(shapes[key], dtype=dtype, device="meta") for key in plan.recipes}
    try:
        split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    except ValueError as error:
        raise ConversionError(f"--max-shard-size {max_shard_size!r}: {error}") from error
    total = sum(t.numel() * t.element_size() for t in meta.values())
    sources = {id(r.source): r.source for r in plan.recipes.values() if r.source is not None}
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing shards", file=sys.stderr) as progress:
        for filename, keys in split.filename_to_tensors.items():
            shard, pointers = {}, set()
            for key in keys:
                tensor = plan.recipes[key].make(key, shapes[key], seed).to(dtype).contiguous()
                if tensor.data_ptr() in pointers:  # a DCAL's MLP copied from a decoder layer in the same shard
                    tensor = tensor.clone()
                pointers.add(tensor.data_ptr())
                shard[key] = tensor
                progress.update(tensor.numel() * tensor.element_size())
            save_file(shard, folder / filename, metadata={"format": "pt"})
            del shard
            for source in sources.values():
                source.release()
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": total}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_processor(folder: Path, tokenizer, config: CrossLMMConfig):
    size = {"height": config.image_size, "width": config.image_size}
    processor = CrossLMMProcessor(
        image_processor=CrossLMMImageProcessor(size=size),
        video_processor=CrossLMMVideoProcessor(size=size),
        tokenizer=tokenizer,
        pool_size=config.pool_size,
    )
    processor.save_pretrained(folder)


def write_generation_config(folder: Path, source: Source, tokenizer):
    try:
        generation = GenerationConfig.from_pretrained(source.generation_folder)
    except OSError:  # none in the source: end a turn at <|im_end|> as Qwen2.5-Instruct does
        eos = [
            tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>") if t in tokenizer.get_vocab()
        ]
        generation = GenerationConfig(eos_token_id=eos or tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    generation.save_pretrained(folder)


def write_model_card(folder: Path, source: Source, config: CrossLMMConfig, repo_id: str | None):
    described = {
        "llava_onevision": "LLaVA-OneVision (transformers format)",
        "llava_next": "LLaVA-OneVision (LLaVA-NeXT format)",
        "crosslmm_llava_next": "a CrossLMM trained in the LLaVA-NeXT code base",
        "parts": "a SigLIP vision tower and a Qwen2.5 LLM, with a new (random) projector",
    }[source.kind]
    name = repo_id or "path/to/this/folder"
    from_models = f" ({', '.join(source.base_models)})" if source.base_models else ""
    untrained = (
        ""
        if source.kind == "crosslmm_llava_next"
        else "Its DCALs are untrained (gates at 0): it computes what its base model computes, and needs CrossLMM "
        "training before it makes use of the original visual tokens."
    )
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="video-text-to-text",
        base_model=source.base_models or None,
        tags=["crosslmm", "video", "custom_code"],
    )
    body = textwrap.dedent(
        f"""\
        # CrossLMM

        [CrossLMM](https://arxiv.org/abs/2505.17020) model: a SigLIP vision tower, a token pooler
        ({config.pool_size}x{config.pool_size} tokens per frame), an MLP projector and a Qwen2 LLM with dual
        cross-attention layers (DCALs) after decoder layers {config.dcal_layer_indices}.

        Converted with `convert_checkpoint.py` from {described}{from_models}.
        {untrained}

        ## Usage

        ```python
        from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

        model = AutoModelForImageTextToText.from_pretrained("{name}", trust_remote_code=True)
        processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)
        messages = [{{"role": "user", "content": [
            {{"type": "video", "path": "video.mp4"}},
            {{"type": "text", "text": "What happens in this video?"}},
        ]}}]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={{"num_frames": 32}},
        )
        output = model.generate(**inputs, max_new_tokens=64)
        print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))

        # or, with the pipeline
        pipe = pipeline("video-text-to-text", model="{name}", trust_remote_code=True)
        print(pipe(text=messages, num_frames=32, max_new_tokens=64, return_full_text=False)[0]["generated_text"])
        ```
        """
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(folder / "README.md")


def copy_code(folder: Path):
    for name in CODE_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ConversionError(f"{name}.py is not installed next to convert_checkpoint.py.")
        shutil.copyfile(spec.origin, folder / f"{name}.py")


# --------------------------------------------------------------------------------------------------------------------
# Verification: the converted folder, loaded as users load it, against the source loaded with transformers
# --------------------------------------------------------------------------------------------------------------------


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
        report["vision features"] = _compare(model.model.get_original_visual_tokens(frames), theirs)
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
    """`verify_folder` in a fresh process whose transformers module cache lies inside the new folder (removed after),
    so that loading with trust_remote_code writes nothing outside it."""
    modules = folder / ".verify_modules"
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import convert_checkpoint; "
        f"convert_checkpoint.verify_folder({str(folder)!r}, {reference!r}, {str(dtype).removeprefix('torch.')!r})"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(modules), "HF_HUB_OFFLINE": "1"}
    log("Verifying: loading the new folder with trust_remote_code and the source with transformers...")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    shutil.rmtree(modules, ignore_errors=True)
    if result.returncode != 0:
        raise ConversionError(
            "Verification failed: the converted model does not reproduce the source.\n" + result.stderr[-4000:]
        )
    log(f"Verified, largest absolute differences: {result.stdout.strip().splitlines()[-1]}")


# --------------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------------


def convert(args) -> Path:
    output = Path(args.output).expanduser().resolve()
    if output.exists() and not args.overwrite:
        raise ConversionError(f"{output} exists; pass --overwrite to replace it.")
    source = load_source(args)
    tokenizer = load_tokenizer(resolve(args.tokenizer, "--tokenizer") if args.tokenizer else source.tokenizer_folder)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else source_dtype(source)
    config = build_config(source, tokenizer, args, dtype)
    plan = plan_conversion(source, config, args.dcal_init)
    shapes = expected_tensors(config)
    num_parameters = sum(torch.Size(shape).numel() for shape in shapes.values())
    verify = args.verify if args.verify is not None else num_parameters < VERIFY_MAX_PARAMETERS
    _report_plan(plan, source, num_parameters)

    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{output.name}.converting-", dir=output.parent))
    try:
        write_weights(plan, temporary, dtype, args.max_shard_size, args.seed, shapes)
        config.save_pretrained(temporary)
        write_processor(temporary, tokenizer, config)
        write_generation_config(temporary, source, tokenizer)
        copy_code(temporary)
        write_model_card(temporary, source, config, args.push_to_hub)
        if verify:
            run_verification(temporary, source.reference, dtype)
        else:
            log(f"Not verified ({num_parameters / 1e9:.1f}B parameters, or --no-verify; --verify forces it).")
        _set_permissions(temporary)
        if output.exists():
            shutil.rmtree(output)
        temporary.rename(output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    log(f"Wrote {output}")
    if args.push_to_hub:
        api = HfApi()
        api.create_repo(args.push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=output, repo_id=args.push_to_hub, commit_message="Add CrossLMM checkpoint")
        log(f"Pushed to https://huggingface.co/{args.push_to_hub}")
    return output


def _set_permissions(folder: Path):
    """mkdtemp makes a private folder: give the result the permissions a plain mkdir would (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _report_plan(plan: Plan, source: Source, num_parameters: int):
    copied = sum(r.source is not None for r in plan.recipes.values())
    log(
        f"Source format: {source.kind}; {num_parameters / 1e6:,.1f}M parameters; {copied} tensors copied, "
        f"{len(plan.recipes) - copied} new, {len(plan.dropped)} dropped on purpose."
    )
    by_reason: dict[str, list[str]] = {}
    for key, reason in plan.dropped.items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        log(f"Dropped ({reason}): {', '.join(keys)}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="crosslmm-convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--source",
        help="LLaVA-OneVision (transformers or LLaVA-NeXT format, or a LLaVA-NeXT-trained "
        "CrossLMM): local folder or Hub id.",
    )
    parser.add_argument("--vision", help="SigLIP/SigLIP2 checkpoint (folder or Hub id), with --text.")
    parser.add_argument("--text", help="Qwen2/Qwen2.5 LLM checkpoint (folder or Hub id), with --vision.")
    parser.add_argument("--output", required=True, help="Folder to create.")
    parser.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    parser.add_argument("--tokenizer", help="Tokenizer folder or Hub id (default: the source's, or --text's).")
    parser.add_argument(
        "--key-map",
        help="JSON file of regex -> replacement for the DCAL keys of a LLaVA-NeXT-trained "
        "CrossLMM, used instead of the built-in LLAVA_NEXT_DCAL_KEY_MAP.",
    )
    parser.add_argument("--pool-size", type=int, default=3, help="Pooled tokens per frame side (1, 3, 4; default 3).")
    parser.add_argument(
        "--cross-attention-interval",
        type=int,
        default=4,
        help="A DCAL after every K-th decoder layer (default 4; a trained source's own layout wins).",
    )
    parser.add_argument(
        "--v2v-scope",
        choices=("video", "frame"),
        default="video",
        help="What a pooled token sees in V2V: its whole video (default) or its frame.",
    )
    parser.add_argument(
        "--dcal-init",
        choices=("copy", "random"),
        default="copy",
        help="New DCALs' MLP: a copy of the preceding decoder layer's MLP (default) or random.",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="Weights' dtype (default: the source LLM's embedding dtype).",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="Largest output shard (default 5GB).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the randomly initialised tensors.")
    parser.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"Compare the result with the source (default: on below {VERIFY_MAX_PARAMETERS / 1e9:.0f}B parameters).",
    )
    parser.add_argument("--push-to-hub", metavar="REPO", help="Upload the folder to this Hub repository at the end.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        convert(args)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
