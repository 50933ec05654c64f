"""CrossLMM (arXiv 2505.17020): long videos for LLMs through pooled tokens plus dual cross-attention layers.

Data flow: frames -> SigLIP tower (in chunks) -> original visual tokens (T x N x D_v) -> pooler (pool_size^2 tokens
per frame) -> projector -> pooled tokens replace the <video>/<image> placeholders -> Qwen2 decoder, with a dual
cross-attention layer (DCAL) after every K-th decoder layer. In a DCAL, V2V lets each pooled token attend to the
original tokens of its own video (or frame), and T2V lets each text token attend to the original tokens of every
video/image placed before it. Gates start at 0, so a fresh CrossLMM computes exactly what its base LLM computes.
"""

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, eager_attention_forward


try:  # inside a Hub repository, loaded by transformers' dynamic-module loader
    from .configuration_crosslmm import CrossLMMConfig
except ImportError:  # imported from a checkout
    from configuration_crosslmm import CrossLMMConfig


# transformers 5.24 renamed the cache argument and output field `past_key_values` to `cache`. CrossLMM takes either
# name and hands its cache to transformers' decoder layers, masks and outputs under the installed release's name.
CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def _one_cache(cache, past_key_values):
    """The cache passed under either of its names."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the cache as `cache` or as `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------


class CrossLMMCache(DynamicCache):
    """Self-attention KV cache (pooled tokens and text only) plus each DCAL's T2V keys/values of the original visual
    tokens, computed once at prefill so that decode steps never touch the vision tower again.

    `visual_memory[layer_idx]` holds `(keys, values)` of shape (batch, kv_heads, M, head_dim), padded along M;
    `memory_lengths[b]` is how many of the M slots belong to sample b.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.visual_memory: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.memory_lengths: torch.Tensor | None = None

    def _map_memory(self, fn):
        self.visual_memory = {idx: (fn(k), fn(v)) for idx, (k, v) in self.visual_memory.items()}
        if self.memory_lengths is not None:
            self.memory_lengths = fn(self.memory_lengths)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._map_memory(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._map_memory(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._map_memory(lambda t: t[indices])

    def reset(self):
        super().reset()
        self.visual_memory = {}
        self.memory_lengths = None


# --------------------------------------------------------------------------------------------------------------------
# Where the visual tokens sit: which queries see which original tokens
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class VisualItem:
    """One video or image of the batch: its pooled-token positions in row `sample` and its original tokens."""

    sample: int
    positions: torch.Tensor  # (frames * pool_size**2,) positions of its pooled tokens in the row
    original_tokens: torch.Tensor  # (frames, N, D_v)


@dataclass
class VisualContext:
    """What the DCALs of one forward pass need: built once, shared by every DCAL.

    V2V queries are the pooled tokens of each item. T2V queries are text positions, grouped per sample by how much
    of that sample's memory (its items' original tokens concatenated in sequence order) they may see: everything of
    the items placed before them, which is always a prefix of the memory.
    """

    items: list[VisualItem]  # empty on decode steps
    t2v_groups: list[tuple[int, torch.Tensor, int]]  # (sample, query positions, visible memory length)
    memory_lengths: torch.Tensor  # (batch,) original tokens per sample


# --------------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------------


class CrossLMMPooler(nn.Module):
    """Parameter-free token merge: each frame's patch grid is resized to pool_size x pool_size tokens."""

    def __init__(self, config: CrossLMMConfig):
        super().__init__()
        self.grid = config.patch_grid_size
        self.pool_size = config.pool_size
        self.mode = config.pooling_mode

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(frames, grid*grid, D) -> (frames, pool_size**2, D), tokens row-major inside a frame."""
        frames, _, dim = features.shape
        grid = features.transpose(1, 2).reshape(frames, dim, self.grid, self.grid).float()
        if self.mode == "bilinear":
            pooled = nn.functional.interpolate(
                grid, size=(self.pool_size, self.pool_size), mode="bilinear", align_corners=False, antialias=True
            )
        else:
            pooled = nn.functional.adaptive_avg_pool2d(grid, self.pool_size)
        return pooled.flatten(2).transpose(1, 2).to(features.dtype)


class CrossLMMMultiModalProjector(nn.Module):
    """LLaVA's two-layer MLP from the vision width to the LLM width."""

    def __init__(self, config: CrossLMMConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size, bias=True)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class CrossLMMCrossAttention(nn.Module):
    """Multi-head cross-attention: queries from the LLM width, keys/values from the original visual tokens (D_v),
    grouped-query heads like the LLM. Runs on transformers' attention backends with no mask: callers hand it only
    the keys each query may see."""

    def __init__(self, config: CrossLMMConfig):
        super().__init__()
        text = config.text_config
        self.config = text
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.num_heads = text.num_attention_heads
        self.num_key_value_heads = text.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = text.attention_dropout
        self.is_causal = False
        vision_dim = config.vision_config.hidden_size
        self.q_proj = nn.Linear(text.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(vision_dim, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(vision_dim, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, text.hidden_size, bias=False)

    def project_memory(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, M, D_v) original tokens -> keys, values of shape (n, kv_heads, M, head_dim)."""
        shape = (*tokens.shape[:-1], -1, self.head_dim)  # -1: the local heads under tensor parallelism
        tokens = tokens.to(self.k_proj.weight.dtype)
        return self.k_proj(tokens).view(shape).transpose(1, 2), self.v_proj(tokens).view(shape).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(n, Lq, D) queries attend to all of their row's (n, kv_heads, M, head_dim) keys/values."""
        n, length, _ = queries.shape
        query_states = self.q_proj(queries).view(n, length, -1, self.head_dim).transpose(1, 2)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention_interface(
            self,
            query_states,
            keys,
            values,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.o_proj(output.reshape(n, length, -1))


class CrossLMMDualCrossAttentionLayer(GradientCheckpointingLayer):
    """DCAL (figure 2): V2V and T2V cross-attention in parallel, each pre-norm and tanh-gated into the residual
    stream, then a gated feed-forward block at the positions that attended to something."""

    def __init__(self, config: CrossLMMConfig, layer_idx: int):
        super().__init__()
        text = config.text_config
        self.layer_idx = layer_idx
        self.use_v2v = config.use_v2v
        self.use_t2v = config.use_t2v
        self.v2v_scope = config.v2v_scope
        self.v2v_norm = Qwen2RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.v2v_attn = CrossLMMCrossAttention(config)
        self.v2v_gate = nn.Parameter(torch.zeros(1))
        self.t2v_norm = Qwen2RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.t2v_attn = CrossLMMCrossAttention(config)
        self.t2v_gate = nn.Parameter(torch.zeros(1))
        if config.cross_attention_mlp:
            self.mlp_norm = Qwen2RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
            self.mlp = Qwen2MLP(text)
            self.mlp_gate = nn.Parameter(torch.zeros(1))
        else:
            self.mlp = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        visual: VisualContext,
        cache: CrossLMMCache | None = None,
    ) -> torch.Tensor:
        """Adds the gated V2V and T2V outputs, then the gated MLP, at the positions they concern.

        Every attention call gets exactly the keys its queries may see and no mask, so any backend of
        `ALL_ATTENTION_FUNCTIONS` (eager, sdpa, flex_attention, flash_attention_2/3) runs it as plain full
        attention, and no queries x keys mask (nor block mask, nor varlen packing) is ever needed. To keep the calls
        few on a batch, queries that see keys of the same length share one call: V2V items of equal frame count (all
        frames at once for `v2v_scope="frame"`), T2V groups of equal visible memory (padded with extra query rows,
        whose outputs are dropped: queries never see each other, so padding them needs no mask)."""
        rows, cols, updates = [], [], []
        # Under device_map the vision tower and the VisualContext may sit on other devices: the original tokens and
        # positions move here, so that K/V are made on the device of the layer using them.
        device = hidden_states.device
        if self.use_v2v and visual.items:
            for bucket in self._v2v_buckets(visual.items):
                samples = torch.cat([torch.full_like(item.positions, item.sample) for item in bucket]).to(device)
                positions = torch.cat([item.positions for item in bucket]).to(device)
                rows.append(samples)
                cols.append(positions)
                updates.append(self._v2v(hidden_states[samples, positions], bucket))
        if self.use_t2v and visual.t2v_groups:
            keys, values = self._t2v_memory(visual, cache, device)
            buckets: dict[int, list[tuple[int, torch.Tensor]]] = {}
            for sample, positions, visible in visual.t2v_groups:
                buckets.setdefault(visible, []).append((sample, positions.to(device)))
            for visible, groups in buckets.items():
                samples = [sample for sample, _ in groups]
                queries = nn.utils.rnn.pad_sequence([hidden_states[s, p] for s, p in groups], batch_first=True)
                visible_keys, visible_values = (_rows(t, samples)[:, :, :visible] for t in (keys, values))
                out = self.t2v_attn(self.t2v_norm(queries), visible_keys, visible_values)
                for (sample, positions), sample_out in zip(groups, out):
                    rows.append(torch.full_like(positions, sample))
                    cols.append(positions)
                    updates.append(torch.tanh(self.t2v_gate) * sample_out[: positions.shape[0]])
        if not rows:
            return hidden_states
        rows, cols, updates = torch.cat(rows), torch.cat(cols), torch.cat(updates).to(hidden_states.dtype)
        hidden_states = hidden_states.index_put((rows, cols), updates, accumulate=True)
        if self.mlp is not None:  # at the positions that attended to something: those just updated
            selected = hidden_states[rows, cols]
            update = torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(selected))
            hidden_states = hidden_states.index_put((rows, cols), update.to(hidden_states.dtype), accumulate=True)
        return hidden_states

    def _v2v_buckets(self, items: list[VisualItem]) -> list[list[VisualItem]]:
        """Items whose V2V runs in one attention call: all of them for `"frame"` scope (every frame sees its own N
        tokens), items of equal frame count for `"video"` scope (every pooled token sees all of its item)."""
        if self.v2v_scope == "frame":
            return [items]
        by_frames: dict[int, list[VisualItem]] = {}
        for item in items:
            by_frames.setdefault(item.original_tokens.shape[0], []).append(item)
        return list(by_frames.values())

    def _v2v(self, pooled: torch.Tensor, bucket: list[VisualItem]) -> torch.Tensor:
        """Pooled tokens of a bucket's items (concatenated, (sum frames*P^2, D)) attend to their original tokens."""
        keys, values = [], []
        for item in bucket:
            original = item.original_tokens.to(pooled.device)  # (frames, N, D_v)
            if self.v2v_scope == "video":
                original = original.reshape(1, -1, original.shape[-1])
            item_keys, item_values = self.v2v_attn.project_memory(original)
            keys.append(item_keys)
            values.append(item_values)
        keys, values = torch.cat(keys), torch.cat(values)
        # One row of keys per frame ("frame") or per item ("video"); each row has the same number of queries.
        queries = self.v2v_norm(pooled).view(keys.shape[0], -1, pooled.shape[-1])
        out = self.v2v_attn(queries, keys, values).reshape(pooled.shape)
        return torch.tanh(self.v2v_gate) * out

    def _t2v_memory(self, visual: VisualContext, cache: CrossLMMCache | None, device: torch.device):
        """T2V keys/values (batch, kv_heads, M, head_dim) of every sample's memory, its items' original tokens in
        reading order, padded along M: projected item by item at prefill (and cached), read from the cache after."""
        if visual.items:
            batch = visual.memory_lengths.shape[0]
            totals = [0] * batch
            for item in visual.items:
                totals[item.sample] += item.original_tokens.shape[0] * item.original_tokens.shape[1]
            keys = values = None
            filled = [0] * batch
            for item in visual.items:
                original = item.original_tokens.to(device).reshape(1, -1, item.original_tokens.shape[-1])
                item_keys, item_values = self.t2v_attn.project_memory(original)
                if keys is None:
                    keys = item_keys.new_zeros(batch, item_keys.shape[1], max(totals), item_keys.shape[3])
                    values = torch.zeros_like(keys)
                start, end = filled[item.sample], filled[item.sample] + item_keys.shape[2]
                keys[item.sample, :, start:end] = item_keys[0]
                values[item.sample, :, start:end] = item_values[0]
                filled[item.sample] = end
            if cache is not None:
                cache.visual_memory[self.layer_idx] = (keys, values)
            return keys, values
        if cache is None or self.layer_idx not in cache.visual_memory:
            raise ValueError("T2V has no visual memory: pass the videos/images in the first forward pass.")
        return cache.visual_memory[self.layer_idx]


def siglip2_patches(frames: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, H, W) square frames of whole patches -> the flattened patches (n, grid*grid, 3*patch*patch) and
    spatial shapes (n, 2) a SigLIP2 NaFlex tower takes, patches row-major and pixels in (row, column, channel) order
    as `Siglip2ImageProcessor` makes them."""
    n, channels, height, width = frames.shape
    grid = height // patch_size
    patches = frames[:, :, : grid * patch_size, : grid * patch_size]
    patches = patches.reshape(n, channels, grid, patch_size, grid, patch_size).permute(0, 2, 4, 3, 5, 1)
    spatial_shapes = torch.tensor([[grid, grid]] * n, device=frames.device)
    return patches.reshape(n, grid * grid, -1), spatial_shapes


def _rows(tensor: torch.Tensor, samples: list[int]) -> torch.Tensor:
    """tensor[samples]: a view when the samples are consecutive (no copy of the cached memory), else a gather."""
    if samples == list(range(samples[0], samples[-1] + 1)):
        return tensor[samples[0] : samples[-1] + 1]
    return tensor[samples]


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class CrossLMMPreTrainedModel(PreTrainedModel):
    config_class = CrossLMMConfig
    config: CrossLMMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "Qwen2DecoderLayer",
        "SiglipEncoderLayer",
        "Siglip2EncoderLayer",
        "CrossLMMDualCrossAttentionLayer",
    ]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def post_init(self):
        super().post_init()
        # post_init gathers the children's `_no_split_modules`; the SigLIP tower's list names text-model classes that
        # a vision-only tower lacks, and accelerate's FSDP wrap policy refuses a class it cannot find: keep those
        # present.
        present = {type(module).__name__ for module in self.modules()}
        self._no_split_modules = {name for name in self._no_split_modules if name in present}

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        """Reentrant checkpointing differentiates only through a layer's tensor arguments; a DCAL reads the original
        visual tokens from its VisualContext argument, so it needs the non-reentrant kind (transformers' default)."""
        if enable and getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "CrossLMM's DCALs need non-reentrant gradient checkpointing: pass "
                "gradient_checkpointing_kwargs={'use_reentrant': False} (the default), not use_reentrant=True."
            )
        if gradient_checkpointing_func is not None:
            kwargs["gradient_checkpointing_func"] = gradient_checkpointing_func
        super()._set_gradient_checkpointing(enable, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, CrossLMMDualCrossAttentionLayer):
            # Zero gates: a new DCAL is the identity, so the base LLM's behaviour is kept until training opens them.
            init.zeros_(module.v2v_gate)
            init.zeros_(module.t2v_gate)
            if module.mlp is not None:
                init.zeros_(module.mlp_gate)


class CrossLMMModel(CrossLMMPreTrainedModel):
    """Vision tower, pooler, projector and the Qwen2 decoder with DCALs; no LM head."""

    def __init__(self, config: CrossLMMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.pooler = CrossLMMPooler(config)
        self.multi_modal_projector = CrossLMMMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.cross_attention_layers = nn.ModuleDict(
            {str(idx): CrossLMMDualCrossAttentionLayer(config, idx) for idx in config.dcal_layer_indices}
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    # ---- vision ----------------------------------------------------------------------------------------------------

    def get_original_visual_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """(F, 3, H, W) frames -> (F, N, D_v) original visual tokens, `vision_batch_size` frames at a time so that
        activation memory does not grow with the video length."""
        size = self.config.image_size
        if frames.ndim != 4 or frames.shape[1:] != (3, size, size):
            raise ValueError(
                f"frames must have shape (frames, 3, {size}, {size}) to match the vision tower, "
                f"got {tuple(frames.shape)}."
            )
        if not frames.is_floating_point():
            raise ValueError(
                f"frames must be floating-point pixel values normalized by the processor, got {frames.dtype}."
            )
        dtype = self.vision_tower.dtype  # float frames are cast to the tower's dtype
        step, original = self.config.vision_batch_size, None
        for start in range(0, frames.shape[0], step):
            chunk = self._encode_frames(frames[start : start + step].to(dtype))
            if original is None:  # filled chunk by chunk: no second copy of all the tokens, as torch.cat would make
                original = chunk.new_empty(frames.shape[0], *chunk.shape[1:])
            original[start : start + chunk.shape[0]] = chunk
        return original

    def _encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """`hidden_states[vision_feature_layer]` of the tower, running only the encoder layers needed."""
        vision = self.vision_tower  # SiglipVisionTransformer / Siglip2VisionTransformer
        if self.config.vision_config.model_type == "siglip2_vision_model":
            patches, spatial_shapes = siglip2_patches(frames, self.config.vision_config.patch_size)
            hidden_states = vision.embeddings(patches, spatial_shapes)
        else:
            hidden_states = vision.embeddings(frames)
        for encoder_layer in vision.encoder.layers[: self.config.vision_layers_run]:
            hidden_states = encoder_layer(hidden_states, None)
        return hidden_states

    def _split_videos(self, pixel_values_videos, video_num_frames) -> list[torch.Tensor]:
        """Videos as a list of (T_i, 3, H, W): from a 5-D tensor (optionally padded, with `video_num_frames`) or a
        list of 4-D tensors."""
        if isinstance(pixel_values_videos, (list, tuple)):
            videos = list(pixel_values_videos)
        else:
            if pixel_values_videos.ndim != 5:
                raise ValueError(
                    "pixel_values_videos must have shape (videos, frames, 3, H, W) or be a list of (frames, 3, H, W) "
                    f"tensors, got shape {tuple(pixel_values_videos.shape)}."
                )
            videos = list(pixel_values_videos)
            if video_num_frames is not None:
                counts = [int(n) for n in video_num_frames]
                if len(counts) != len(videos) or any(not 0 < n <= pixel_values_videos.shape[1] for n in counts):
                    raise ValueError(
                        f"video_num_frames {counts} does not fit pixel_values_videos of shape "
                        f"{tuple(pixel_values_videos.shape)}."
                    )
                videos = [video[:n] for video, n in zip(videos, counts)]
        for i, video in enumerate(videos):
            if video.ndim != 4 or video.shape[0] == 0:
                raise ValueError(
                    f"video {i} must be a non-empty (frames, 3, H, W) tensor, got shape {tuple(video.shape)}."
                )
        return videos

    def encode_visual_inputs(self, pixel_values=None, pixel_values_videos=None, video_num_frames=None):
        """Original tokens and pooled, projected tokens of every video and image (an image is a one-frame video).

        Returns two lists per modality, in input order: original (T, N, D_v) and pooled+projected (T * P^2, D).
        """
        videos = self._split_videos(pixel_values_videos, video_num_frames) if pixel_values_videos is not None else []
        images = list(pixel_values[:, None]) if pixel_values is not None else []
        if pixel_values is not None and pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must have shape (images, 3, H, W), got {tuple(pixel_values.shape)}.")
        clips = videos + images
        if not clips:
            return [], [], [], []
        lengths = [clip.shape[0] for clip in clips]
        original = self.get_original_visual_tokens(clips[0] if len(clips) == 1 else torch.cat(clips))
        # Pooled chunk by chunk, as the tower runs: the pooler computes in float32, which must not grow with frames.
        pooled = torch.cat([self.pooler(chunk) for chunk in original.split(self.config.vision_batch_size)])
        # The tower may run in another dtype than the rest (e.g. kept in float32 while the LLM trains in bfloat16).
        pooled = self.multi_modal_projector(pooled.to(self.multi_modal_projector.linear_1.weight.dtype))
        original = list(original.split(lengths))
        pooled = [p.flatten(0, 1) for p in pooled.split(lengths)]
        n = len(videos)
        return original[:n], pooled[:n], original[n:], pooled[n:]

    # ---- layout ----------------------------------------------------------------------------------------------------

    def _place_items(self, input_ids, token_id, name, originals, pooled) -> list[VisualItem]:
        """Assign the placeholder tokens of one modality, in reading order, to its items."""
        rows, cols = (input_ids == token_id).nonzero(as_tuple=True)
        expected = sum(p.shape[0] for p in pooled)
        if rows.numel() != expected:
            per_item = [p.shape[0] for p in pooled]
            raise ValueError(
                f"The prompt has {rows.numel()} {name} placeholder tokens but the {len(pooled)} {name}(s) given need "
                f"{expected} ({per_item}: frames x pool_size**2 each). Let the processor expand the placeholders, "
                f"and give one {name} per placeholder."
            )
        items, start = [], 0
        for item_original, item_pooled in zip(originals, pooled):
            end = start + item_pooled.shape[0]
            item_rows = rows[start:end]
            if (item_rows != item_rows[0]).any():
                raise ValueError(f"The placeholder tokens of one {name} are split across batch rows.")
            items.append(VisualItem(int(item_rows[0]), cols[start:end], item_original))
            start = end
        return items

    def _visual_context(self, input_ids, attention_mask, items, cache, batch, seq_len, device):
        """The VisualContext of this pass, or None when no DCAL has anything to attend to.

        The layout is worked out on the CPU, where `input_ids` and the items' positions are (read once from the
        device), and moved to `device` at the end: no host sync per lookup, and the FLOP counter can run the model on
        the meta device with CPU `input_ids`."""
        if items:
            lengths = [0] * batch
            for item in items:
                lengths[item.sample] += item.original_tokens.shape[0] * item.original_tokens.shape[1]
            memory_lengths = torch.tensor(lengths, device=device)
        elif isinstance(cache, CrossLMMCache) and cache.memory_lengths is not None:
            memory_lengths = cache.memory_lengths
            lengths = memory_lengths.tolist()
        else:
            return None
        layout_device = input_ids.device if input_ids is not None else torch.device("cpu")
        if isinstance(cache, CrossLMMCache) and items:
            cache.memory_lengths = memory_lengths

        t2v_groups = []
        if self.config.use_t2v:
            visual = torch.zeros(batch, seq_len, dtype=torch.bool, device=layout_device)
            for item in items:
                visual[item.sample, item.positions] = True
            text = ~visual
            if attention_mask is not None:
                text &= attention_mask[:, -seq_len:].to(layout_device).bool()
            for sample in range(batch):
                sample_items = [i for i in items if i.sample == sample]
                if items:  # prefill: a text token sees the items that end before it
                    ends = torch.tensor([int(i.positions[-1]) for i in sample_items], dtype=torch.long)
                    sizes = [i.original_tokens.shape[0] * i.original_tokens.shape[1] for i in sample_items]
                    visible_after = [0] + torch.tensor(sizes).cumsum(0).tolist()
                    seen = torch.searchsorted(ends.to(layout_device), torch.arange(seq_len, device=layout_device))
                else:  # decode: every item is before the new tokens
                    visible_after = [0, lengths[sample]]
                    seen = torch.ones(seq_len, dtype=torch.long, device=layout_device)
                for count in range(1, len(visible_after)):
                    positions = (text[sample] & (seen == count)).nonzero(as_tuple=True)[0]
                    if positions.numel() and visible_after[count] > 0:
                        t2v_groups.append((sample, positions, visible_after[count]))
        items = [VisualItem(item.sample, item.positions.to(device), item.original_tokens) for item in items]
        t2v_groups = [(sample, positions.to(device), visible) for sample, positions, visible in t2v_groups]
        return VisualContext(items, t2v_groups, memory_lengths)

    # ---- forward ---------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | list[torch.FloatTensor] | None = None,
        video_num_frames: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        has_visual = pixel_values is not None or pixel_values_videos is not None
        if has_visual and input_ids is None:
            raise ValueError("Videos and images need input_ids, whose placeholder tokens say where they go.")
        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        output_hidden_states = output_hidden_states if output_hidden_states is not None else False
        cache = self._prepare_cache(_one_cache(cache, past_key_values), use_cache, has_visual)

        if inputs_embeds is None:
            embed_tokens = self.get_input_embeddings()
            inputs_embeds = embed_tokens(input_ids.to(embed_tokens.weight.device))
        if input_ids is not None:  # where the visual tokens go is read on the CPU (see _visual_context)
            input_ids = input_ids.cpu()
        batch, seq_len = inputs_embeds.shape[:2]
        items = []
        if has_visual:
            videos_orig, videos_pooled, images_orig, images_pooled = self.encode_visual_inputs(
                pixel_values, pixel_values_videos, video_num_frames
            )
            items = self._place_items(input_ids, self.config.video_token_id, "video", videos_orig, videos_pooled)
            items += self._place_items(input_ids, self.config.image_token_id, "image", images_orig, images_pooled)
            inputs_embeds = inputs_embeds.clone()
            for item, pooled in zip(items, videos_pooled + images_pooled):
                inputs_embeds[item.sample, item.positions] = pooled.to(inputs_embeds.device, inputs_embeds.dtype)
            items.sort(key=lambda item: (item.sample, int(item.positions[0])))  # memory is in reading order
        elif input_ids is not None:
            placeholders = (input_ids == self.config.video_token_id) | (input_ids == self.config.image_token_id)
            if placeholders.any() and (cache is None or cache.get_seq_length() == 0):
                raise ValueError(
                    "The prompt has <video>/<image> placeholder tokens but no videos or images were given."
                )

        past_seen = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:  # left padding: count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
            else:
                position_ids = torch.arange(past_seen, past_seen + seq_len, device=inputs_embeds.device)[None]

        visual = self._visual_context(input_ids, attention_mask, items, cache, batch, seq_len, inputs_embeds.device)
        return self._decode(
            inputs_embeds, attention_mask, position_ids, cache, use_cache, visual, output_hidden_states, **kwargs
        )

    def _prepare_cache(self, cache, use_cache, has_visual):
        """CrossLMM keeps its visual memory in a CrossLMMCache; an empty DynamicCache (as `generate` makes) is
        swapped for one."""
        if isinstance(cache, CrossLMMCache):
            if has_visual and cache.get_seq_length() > 0:
                raise ValueError(
                    "Videos and images can only be given in the first forward pass of a cached sequence (prefill)."
                )
            return cache
        if cache is not None and (type(cache) is not DynamicCache or cache.get_seq_length() > 0):
            raise ValueError(
                f"CrossLMM keeps the DCALs' visual memory in a CrossLMMCache and cannot use a "
                f"{type(cache).__name__}; pass no cache (or the cache a previous call returned)."
            )
        if use_cache or cache is not None:
            return CrossLMMCache(config=self.config.text_config)
        return None

    def _decode(
        self, inputs_embeds, attention_mask, position_ids, cache, use_cache, visual, output_hidden_states, **kwargs
    ):
        """Qwen2Model.forward's loop, with a DCAL after the chosen decoder layers."""
        llm = self.language_model
        text_config = self.config.text_config
        if isinstance(attention_mask, dict):
            mask_mapping = attention_mask
        else:
            mask_kwargs = {
                "config": text_config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                CACHE_ARG: cache,
                "position_ids": position_ids,
            }
            mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if "sliding_attention" in text_config.layer_types:
                mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = llm.rotary_emb(hidden_states, position_ids)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for idx, decoder_layer in enumerate(llm.layers[: text_config.num_hidden_layers]):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask_mapping[text_config.layer_types[idx]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                **{CACHE_ARG: cache},
                **kwargs,
            )
            if visual is not None and str(idx) in self.cross_attention_layers:
                hidden_states = self.cross_attention_layers[str(idx)](hidden_states, visual, cache)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = llm.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_ARG: cache if use_cache else None},
            hidden_states=all_hidden_states,
        )


class CrossLMMForConditionalGeneration(CrossLMMPreTrainedModel, GenerationMixin):
    """CrossLMMModel with the LM head: the class `AutoModelForImageTextToText` loads."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # Tensor parallelism (`tp_plan="auto"`): the Qwen2 decoder brings its own plan (`base_model_tp_plan`); the DCALs
    # are split the same way, heads column-wise and output projections row-wise. The vision tower is replicated.
    _tp_plan = {
        "lm_head": "colwise_gather_output",
        **{
            f"model.cross_attention_layers.*.{branch}.{proj}": style
            for branch in ("v2v_attn", "t2v_attn")
            for proj, style in (
                ("q_proj", "colwise"),
                ("k_proj", "colwise"),
                ("v_proj", "colwise"),
                ("o_proj", "rowwise"),
            )
        },
        "model.cross_attention_layers.*.mlp.gate_proj": "colwise",
        "model.cross_attention_layers.*.mlp.up_proj": "colwise",
        "model.cross_attention_layers.*.mlp.down_proj": "rowwise",
    }

    def __init__(self, config: CrossLMMConfig):
        super().__init__(config)
        self.model = CrossLMMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        pixel_values_videos: torch.FloatTensor | list[torch.FloatTensor] | None = None,
        video_num_frames: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        pixel_values_videos: (videos, frames, 3, H, W), or a list of (frames_i, 3, H, W) for videos of different
            lengths, or a padded 5-D tensor with `video_num_frames` (videos,) giving each video's real frame count.
        pixel_values: (images, 3, H, W); each image is a one-frame video.
        labels: (batch, seq) token ids for the shifted causal-LM loss; -100 is ignored and visual placeholder
            positions never count.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos,
            video_num_frames=video_num_frames,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            if input_ids is not None:
                visual = (input_ids == self.config.video_token_id) | (input_ids == self.config.image_token_id)
                labels = labels.masked_fill(visual, -100)
            if not (labels[..., 1:] != -100).any():  # the mean over zero tokens would be a silent NaN
                raise ValueError(
                    "Every label is -100 or a visual placeholder: the batch has no token to learn from. Keep at "
                    "least one answer token per sample (CrossLMMDataCollator labels the assistant turns)."
                )
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG)},
            hidden_states=outputs.hidden_states,
        )

    def prepare_inputs_for_generation(
        self,
        *args,
        pixel_values=None,
        pixel_values_videos=None,
        video_num_frames=None,
        is_first_iteration=False,
        **kwargs,
    ):
        """Visual inputs go to the prefill only; decode steps read the DCALs' visual memory from the cache."""
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
            model_inputs["pixel_values_videos"] = pixel_values_videos
            model_inputs["video_num_frames"] = video_num_frames
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and `num_return_sequences` repeat each sample; repeat its own videos and images with it
        (the default would repeat them as if there were exactly one per sample)."""
        if expand_size > 1 and input_ids is not None:
            videos = model_kwargs.pop("pixel_values_videos", None)
            num_frames = model_kwargs.pop("video_num_frames", None)
            images = model_kwargs.pop("pixel_values", None)
            if videos is not None:
                videos = self.model._split_videos(videos, num_frames)
                model_kwargs["pixel_values_videos"] = self._repeat_per_sample(
                    input_ids, self.config.video_token_id, videos, expand_size
                )
            if images is not None:
                images = self._repeat_per_sample(
                    input_ids, self.config.image_token_id, list(images[:, None]), expand_size
                )
                model_kwargs["pixel_values"] = torch.cat(images)
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)

    def _repeat_per_sample(self, input_ids, token_id, clips, repeats):
        """Clips in reading order -> each row's clips repeated `repeats` times, rows kept in order."""
        per_clip = [clip.shape[0] * self.config.tokens_per_frame for clip in clips]
        expanded, next_clip = [], 0
        for row_tokens in (input_ids == token_id).sum(-1).tolist():
            row_clips = []
            while row_tokens > 0 and next_clip < len(clips):
                row_clips.append(clips[next_clip])
                row_tokens -= per_clip[next_clip]
                next_clip += 1
            expanded += row_clips * repeats
        return expanded


CrossLMMConfig.register_for_auto_class()
CrossLMMModel.register_for_auto_class("AutoModel")
CrossLMMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["CrossLMMCache", "CrossLMMForConditionalGeneration", "CrossLMMModel", "CrossLMMPreTrainedModel"]
