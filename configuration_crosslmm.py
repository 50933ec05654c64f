"""CrossLMM configuration (arXiv 2505.17020): SigLIP vision tower + pooler + projector + Qwen2 with DCALs."""

from typing import TYPE_CHECKING

from transformers import AutoConfig, PretrainedConfig


# The video-text-to-text pipeline travels with the config:
# transformers copies a config's relative imports next to it on save_pretrained/push_to_hub and fetches them with it
# under trust_remote_code, so naming the pipeline module here ships pipeline_crosslmm.py in every checkpoint folder.
if TYPE_CHECKING:
    from .pipeline_crosslmm import CrossLMMVideoTextToTextPipeline  # noqa: F401


VISION_MODEL_TYPES = ("siglip_vision_model", "siglip2_vision_model")
TEXT_MODEL_TYPES = ("qwen2",)
POOLING_MODES = ("bilinear", "average")
V2V_SCOPES = ("video", "frame")

# SigLIP-so400m/14 at 384 px as LLaVA-OneVision uses it (last layer dropped, no head).
DEFAULT_VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "patch_size": 14,
    "image_size": 384,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "vision_use_head": False,
}
# Qwen2.5-1.5B-Instruct, the LLM of CrossLMM-2B.
DEFAULT_TEXT_CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


# The classes a Hub repository's `config.json` points the Auto classes at (`trust_remote_code=True`).
AUTO_MAP = {
    "AutoConfig": "configuration_crosslmm.CrossLMMConfig",
    "AutoModel": "modeling_crosslmm.CrossLMMModel",
    "AutoModelForImageTextToText": "modeling_crosslmm.CrossLMMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_crosslmm.CrossLMMForConditionalGeneration",
}
# What `pipeline("video-text-to-text", model=..., trust_remote_code=True)` reads from `config.json` (the format of
# transformers' `Pipeline.save_pretrained`): the pipeline class in the repository and the Auto class loading the model.
CUSTOM_PIPELINES = {
    "video-text-to-text": {
        "impl": "pipeline_crosslmm.CrossLMMVideoTextToTextPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "type": "multimodal",
    }
}


def _sub_config(value, default):
    if value is None:
        value = dict(default)
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", default["model_type"])
        value = AutoConfig.for_model(model_type, **value)
    return value


class CrossLMMConfig(PretrainedConfig):
    r"""
    Configuration of a CrossLMM model.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            SigLIP or SigLIP2 vision tower config. Defaults to SigLIP-so400m/14 at 384 px.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Qwen2-family decoder config. Defaults to Qwen2.5-1.5B-Instruct.
        pool_size (`int`, defaults to 3):
            Each frame's patch grid is pooled to `pool_size x pool_size` tokens before the projector (1, 3, 4 in the
            paper: 1, 9 or 16 tokens per frame).
        pooling_mode (`str`, defaults to `"bilinear"`):
            `"bilinear"` (antialiased bilinear resize, every patch contributes) or `"average"` (adaptive average).
        cross_attention_interval (`int`, defaults to 4):
            A dual cross-attention layer (DCAL) follows every K-th decoder layer (after layers K-1, 2K-1, ...).
        cross_attention_layers (`list[int]`, *optional*):
            Explicit indices of the decoder layers a DCAL follows; overrides `cross_attention_interval`.
        cross_attention_mlp (`bool`, defaults to `True`):
            Whether each DCAL ends with a gated feed-forward block.
        v2v_scope (`str`, defaults to `"video"`):
            Which original tokens a pooled token sees in V2V: all of its video (`"video"`) or its own frame
            (`"frame"`).
        use_v2v / use_t2v (`bool`, default `True`):
            Switch the visual-to-visual / text-to-visual branches on or off.
        vision_feature_layer (`int`, defaults to -1):
            Which hidden state of the vision tower gives the original visual tokens (-1: last layer, before the
            post-layernorm).
        vision_batch_size (`int`, defaults to 64):
            Frames the vision tower encodes at once; bounds its activation memory whatever the video length.
        image_token_id / video_token_id (`int`):
            Placeholder token ids replaced by pooled, projected visual tokens.
        projector_hidden_act (`str`, defaults to `"gelu"`):
            Activation of the two-layer MLP projector.
    """

    model_type = "crosslmm"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        pool_size: int = 3,
        pooling_mode: str = "bilinear",
        cross_attention_interval: int = 4,
        cross_attention_layers: list[int] | None = None,
        cross_attention_mlp: bool = True,
        v2v_scope: str = "video",
        use_v2v: bool = True,
        use_t2v: bool = True,
        vision_feature_layer: int = -1,
        vision_batch_size: int = 64,
        image_token_id: int = 151646,
        video_token_id: int = 151647,
        projector_hidden_act: str = "gelu",
        tie_word_embeddings: bool | None = None,
        **kwargs,
    ):
        self.vision_config = _sub_config(vision_config, DEFAULT_VISION_CONFIG)
        self.text_config = _sub_config(text_config, DEFAULT_TEXT_CONFIG)
        self.pool_size = pool_size
        self.pooling_mode = pooling_mode
        self.cross_attention_interval = cross_attention_interval
        self.cross_attention_layers = list(cross_attention_layers) if cross_attention_layers is not None else None
        self.cross_attention_mlp = cross_attention_mlp
        self.v2v_scope = v2v_scope
        self.use_v2v = use_v2v
        self.use_t2v = use_t2v
        self.vision_feature_layer = vision_feature_layer
        self.vision_batch_size = vision_batch_size
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.projector_hidden_act = projector_hidden_act
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        kwargs.setdefault("custom_pipelines", {task: dict(info) for task, info in CUSTOM_PIPELINES.items()})
        if tie_word_embeddings is None:
            tie_word_embeddings = getattr(self.text_config, "tie_word_embeddings", False)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_crosslmm()

    @property
    def patch_grid_size(self) -> int:
        """Side of the vision tower's square patch grid (27 for SigLIP-so400m/14 at 384 px)."""
        vision = self.vision_config
        if vision.model_type == "siglip2_vision_model":
            return int(round(vision.num_patches**0.5))
        return vision.image_size // vision.patch_size

    @property
    def image_size(self) -> int:
        """Height and width, in pixels, of the frames the model takes: the tower's own `image_size` (384 for
        SigLIP-so400m/14, whose stride-14 patch embedding ignores the last 6 pixel rows and columns, as in the
        checkpoints CrossLMM is converted from); a SigLIP2 NaFlex tower, which has none, takes its square grid of
        `num_patches` whole patches."""
        vision = self.vision_config
        if vision.model_type == "siglip2_vision_model":
            return self.patch_grid_size * vision.patch_size
        return vision.image_size

    @property
    def num_decoder_layers(self) -> int:
        """The LLM's decoder layers (`output_hidden_states` gives one hidden state more: the embeddings)."""
        return self.text_config.num_hidden_layers

    @property
    def v2v_layer_indices(self) -> list[int]:
        """The DCALs that run V2V: all of them (with `use_v2v`) but one after the last decoder layer, whose V2V
        output no text position reads."""
        if not self.use_v2v:
            return []
        return [idx for idx in self.dcal_layer_indices if idx < self.text_config.num_hidden_layers - 1]

    @property
    def vision_layers_run(self) -> int:
        """How many encoder layers of the tower run: `hidden_states[vision_feature_layer]` is the output of this
        many layers (the embeddings are hidden state 0), so the layers after it never run."""
        return self.vision_feature_layer % (self.vision_config.num_hidden_layers + 1)

    @property
    def tokens_per_frame(self) -> int:
        return self.pool_size**2

    @property
    def dcal_layer_indices(self) -> list[int]:
        """Indices of the decoder layers followed by a DCAL, sorted."""
        if self.cross_attention_layers is not None:
            return sorted(self.cross_attention_layers)
        k = self.cross_attention_interval
        return list(range(k - 1, self.text_config.num_hidden_layers, k))

    def validate_crosslmm(self):
        """Reject configurations that contradict themselves, naming the field at fault."""
        if self.vision_config.model_type not in VISION_MODEL_TYPES:
            raise ValueError(
                f"vision_config.model_type must be one of {VISION_MODEL_TYPES}, got {self.vision_config.model_type!r}."
            )
        if self.text_config.model_type not in TEXT_MODEL_TYPES:
            raise ValueError(
                f"text_config.model_type must be one of {TEXT_MODEL_TYPES}, got {self.text_config.model_type!r}."
            )
        grid = self.patch_grid_size
        if not isinstance(self.pool_size, int) or not 1 <= self.pool_size <= grid:
            raise ValueError(
                f"pool_size must be an integer in 1..{grid} (the patch grid side), got {self.pool_size!r}."
            )
        if self.pooling_mode not in POOLING_MODES:
            raise ValueError(f"pooling_mode must be one of {POOLING_MODES}, got {self.pooling_mode!r}.")
        if self.v2v_scope not in V2V_SCOPES:
            raise ValueError(f"v2v_scope must be one of {V2V_SCOPES}, got {self.v2v_scope!r}.")
        if not isinstance(self.cross_attention_interval, int) or self.cross_attention_interval < 1:
            raise ValueError(
                f"cross_attention_interval must be a positive integer, got {self.cross_attention_interval!r}."
            )
        num_layers = self.text_config.num_hidden_layers
        if self.cross_attention_layers is not None:
            bad = [i for i in self.cross_attention_layers if not isinstance(i, int) or not 0 <= i < num_layers]
            if bad:
                raise ValueError(
                    f"cross_attention_layers has indices {bad} outside the decoder's layers 0..{num_layers - 1}."
                )
            if len(set(self.cross_attention_layers)) != len(self.cross_attention_layers):
                raise ValueError(f"cross_attention_layers has repeated indices: {self.cross_attention_layers}.")
        if self.dcal_layer_indices and not (self.use_v2v or self.use_t2v):
            raise ValueError(
                "use_v2v and use_t2v are both False but DCALs are requested; switch one branch on or set "
                "cross_attention_layers=[]."
            )
        num_vision_layers = self.vision_config.num_hidden_layers
        if not -num_vision_layers - 1 <= self.vision_feature_layer <= num_vision_layers:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} is outside the vision tower's hidden states "
                f"(-{num_vision_layers + 1}..{num_vision_layers})."
            )
        if not isinstance(self.vision_batch_size, int) or self.vision_batch_size < 1:
            raise ValueError(f"vision_batch_size must be a positive integer, got {self.vision_batch_size!r}.")
        if self.image_token_id == self.video_token_id:
            raise ValueError("image_token_id and video_token_id must differ.")


__all__ = ["CrossLMMConfig"]
