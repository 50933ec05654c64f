"""Reading conversion sources: format detection, key maps, tensors read one at a time, the tokenizer."""

import inspect
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from transformers import AddedToken, AutoConfig, AutoTokenizer, Qwen2Config

from configuration_crosslmm import DEFAULT_VISION_CONFIG, VISION_MODEL_TYPES
from crosslmm.convert import ConversionError, logger


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


LLAVA_NEXT_ARCHITECTURES = ("LlavaQwenForCausalLM",)
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


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


@dataclass
class ConversionSource:
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


def load_source(args) -> ConversionSource:
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


def _llava_onevision_source(folder: Path, base: list[str]) -> ConversionSource:
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, OSError) as error:
        raise ConversionError(f"Cannot read the LLaVA-OneVision config in {folder}: {error}") from error
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ConversionError(f"vision_feature_layer={layer} (several layers) has no CrossLMM equivalent.")
    text_config = _text_config_of(config.text_config, "The LLaVA-OneVision checkpoint")
    return ConversionSource(
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


def _llava_next_source(folder: Path, config: dict, base: list[str], dcal_key_map) -> ConversionSource:
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
        logger.info(f"mm_vision_tower {tower!r} has no readable config ({error}); using SigLIP-so400m/14 at 384 px.")
        vision_config = AutoConfig.for_model(**DEFAULT_VISION_CONFIG)
    prefix = "model.vision_tower.vision_tower.vision_model.encoder.layers."
    layers = {int(key[len(prefix) :].split(".")[0]) for key in weights.keys() if key.startswith(prefix)}
    vision_config.num_hidden_layers = len(layers)
    vision_config.vision_use_head = False

    dcal_keys = [key for key in weights.keys() if rename(key, dcal_key_map)]
    kind = "crosslmm_llava_next" if dcal_keys else "llava_next"
    return ConversionSource(
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


def _parts_source(args) -> ConversionSource:
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
    return ConversionSource(
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
# The source's tokenizer and dtype
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
        logger.info(f"The tokenizer has no {missing}: adding them as special tokens.")
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return tokenizer


def source_dtype(source: ConversionSource) -> torch.dtype:
    """The dtype of the source LLM's token embeddings (float32 if it has none)."""
    llm_weights = source.weights[-1][0]
    embed_key = next((k for k in llm_weights.keys() if k.endswith("embed_tokens.weight")), None)
    return llm_weights.dtype(embed_key) if embed_key else torch.float32
