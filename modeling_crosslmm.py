"""CrossLMM (arXiv 2505.17020): long videos for LLMs through pooled tokens plus dual cross-attention layers.

Data flow: frames -> SigLIP tower (in chunks) -> original visual tokens (T x N x D_v) -> pooler (pool_size^2 tokens
per frame) -> projector -> pooled tokens replace the <video>/<image> placeholders -> Qwen2 decoder, with a dual
cross-attention layer (DCAL) after every K-th decoder layer. In a DCAL, V2V lets each pooled token attend to the
original tokens of its own video (or frame), and T2V lets each text token attend to the original tokens of every
video/image placed before it. Gates start at 0, so a fresh CrossLMM computes exactly what its base LLM computes.

Where every query looks is worked out once per forward pass by the model's `VisualPlanner`, on the host: a
`PrefillPlan` from the placeholder positions, a `DecodePlan` from the cache on decode steps; the DCALs only run it.
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
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2MLP,
    Qwen2RMSNorm,
    eager_attention_forward,
)
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs


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
# Outputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CrossLMMModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    cross_attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True` on the eager
        backend): one tensor per DCAL, in decoder order, of shape `(batch_size, num_heads, sequence_length,
        memory_length)`: row `p` holds what position `p` attended to among the original visual tokens of its sample
        (its videos and images in reading order, frame by frame, `patch_grid_size**2` tokens a frame). Visual
        positions hold their V2V weights, text positions their T2V weights; positions that attended to nothing are 0.
    image_outputs / video_outputs (`BaseModelOutputWithPooling`, *optional*):
        what `get_image_features` / `get_video_features` returned for the images / videos of this pass: the original
        visual tokens (`last_hidden_state`) and the pooled, projected tokens (`pooler_output`).
    """

    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    video_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class CrossLMMCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    cross_attentions, image_outputs, video_outputs: as in `CrossLMMModelOutputWithPast`.
    """

    cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    video_outputs: BaseModelOutputWithPooling | None = None


# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------


class CrossLMMCache(DynamicCache):
    """Self-attention KV cache (pooled tokens and text only) plus each DCAL's T2V keys/values of the original visual
    tokens, computed once at prefill so that decode steps never touch the vision tower again.

    The visual memory is kept once per sample, however many rows of the batch share it (beam search,
    `num_return_sequences`): `visual_memory[layer_idx]` holds `(keys, values)` of shape
    (samples, kv_heads, M, head_dim), padded along M, and rows `s * rows_per_sample` to
    `(s + 1) * rows_per_sample - 1` read sample `s`'s memory. `memory_lengths[s]` is how many of the M slots are
    sample `s`'s (a host list, so that a decode step plans without reading the device) and `memory_visible`
    (samples,) holds them on the device for the key mask (None when no sample is padded); `memory_scale`
    (samples, 1, 1) is 0 for samples without any video or image (None when every sample has some).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reset_visual_memory()

    def reset_visual_memory(self):
        self.visual_memory: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.memory_lengths: list[int] = []
        self.memory_visible: torch.Tensor | None = None
        self.memory_scale: torch.Tensor | None = None
        self.rows_per_sample = 1
        self.decode_mask: tuple | None = None  # (what it was made for, the decode steps' key mask): made once

    @property
    def has_visual_memory(self) -> bool:
        return bool(self.memory_lengths)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.rows_per_sample *= repeats

    def batch_select_indices(self, indices: torch.Tensor):
        """Keep some rows: each keeps its own copy of its sample's memory (rows may now come in any order)."""
        super().batch_select_indices(indices)
        if self.has_visual_memory:
            samples = indices.to(torch.long) // self.rows_per_sample
            self.visual_memory = {
                idx: (k.index_select(0, samples.to(k.device)), v.index_select(0, samples.to(v.device)))
                for idx, (k, v) in self.visual_memory.items()
            }
            self.memory_lengths = [self.memory_lengths[s] for s in samples.tolist()]
            for name in ("memory_visible", "memory_scale"):
                if (tensor := getattr(self, name)) is not None:
                    setattr(self, name, tensor.index_select(0, samples.to(tensor.device)))
            self.rows_per_sample, self.decode_mask = 1, None

    def reset(self):
        super().reset()
        self.reset_visual_memory()

    def keep_memory_layout(self, lengths: list[int], rows_per_sample: int, device):
        """At prefill, what a decode step needs to plan without reading the device: the memory lengths on the host,
        and on the device the keys each sample sees and which samples have none (None when not needed)."""
        self.memory_lengths, self.rows_per_sample = list(lengths), rows_per_sample
        self.memory_visible = self.memory_scale = self.decode_mask = None
        if min(lengths) < max(lengths):
            # A sample without memory sees one key (no backend takes a row that sees nothing), scaled by 0.
            self.memory_visible = torch.tensor([max(n, 1) for n in lengths], device=device)
            if min(lengths) == 0:
                self.memory_scale = torch.tensor([float(n > 0) for n in lengths], device=device)[:, None, None]


# --------------------------------------------------------------------------------------------------------------------
# The plan: which queries see which original tokens, decided once per forward pass
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CrossAttentionCall:
    """One attention call of a DCAL branch: the queries of row `i` (flat positions into the batch's
    rows * length hidden states) attend to the original visual tokens `tokens[i]`. Rows of unequal length are padded:
    `take` then lists the real queries among the flattened ones, and `mask` (in the backend's form, see `key_mask`)
    keeps each query to its keys."""

    queries: torch.Tensor  # (n, Lq)
    tokens: torch.Tensor  # (n, K, D_v)
    key_starts: torch.Tensor  # (n,): where `tokens[i]` starts in its sample's memory (for attention weights)
    take: torch.Tensor | None = None  # flat indices into the (n * Lq) queries of the real ones; None: all
    mask: object = None


@dataclass
class PrefillPlan:
    """What the DCALs of a prefill (or training) pass do, built once by `CrossLMMModel` and shared by every DCAL: one
    V2V call (each pooled token and the original tokens of its video, or of its frame) and one T2V call (the text
    positions of each sample, its rows side by side, and the sample's memory: its videos' and images' original tokens
    in reading order, of which each query sees the prefix placed before it). A training pass without visual inputs
    runs a blank frame's calls with `scale` 0, so that its updates are exactly 0 (`CrossLMMModel._idle_plan`)."""

    memory_lengths: list[int]
    v2v: CrossAttentionCall | None = None
    t2v: CrossAttentionCall | None = None
    scale: float = 1.0
    output_attentions: bool = False


@dataclass
class DecodePlan:
    """A decode step: every position of every row attends to its sample's whole memory, kept in the cache. `mask`
    keeps each sample to its own keys (None: no sample's memory is padded); `memory_scale` (samples, 1, 1) is 0 for
    the samples without any video or image (None: every sample has some)."""

    memory_lengths: list[int]
    mask: object = None
    memory_scale: torch.Tensor | None = None
    output_attentions: bool = False

    def scaled(self, update: torch.Tensor) -> torch.Tensor:
        """(samples, queries, D) updates, 0 for the samples without memory."""
        return update if self.memory_scale is None else update * self.memory_scale


def key_mask(visible: torch.Tensor, keys: int, implementation: str, dtype: torch.dtype, groups: int = 1):
    """The mask of a cross-attention call whose query `q` of row `b` sees the first `visible[b, q]` (at least 1) of
    the row's `keys` keys, in the form the attention backend takes: a `BlockMask` for flex_attention, additive
    (n, 1, groups * Lq, K) for eager, boolean (n, 1, groups * Lq, K) for sdpa. The queries are repeated `groups`
    times, as `CrossLMMCrossAttention` folds the query heads of each key/value head into its queries."""
    visible = visible.repeat(1, groups)
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        n, queries = visible.shape
        return create_block_mask(lambda b, h, q, kv: kv < visible[b, q], n, None, queries, keys, device=visible.device)
    seen = (torch.arange(keys, device=visible.device) < visible[..., None])[:, None]
    if implementation == "eager":
        return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(~seen, torch.finfo(dtype).min)
    return seen


def masked_implementation(implementation: str) -> str:
    """The backend that runs a cross-attention call with a key mask: the configured one, except that flash-attention
    kernels take no key mask (only unpadding copies of the keys), so masked calls run on sdpa there."""
    return implementation if implementation in ("eager", "flex_attention", "sdpa") else "sdpa"


def _zero3_safe_parameter(module: nn.Module) -> nn.Parameter:
    """A module's first parameter, for its dtype and device: read through `parameters()`, since reading
    `module.weight` during a forward makes DeepSpeed ZeRO-3 gather the weight (on this rank alone)."""
    return next(module.parameters())


def _check_finite(name: str, clips):
    """A NaN or infinite pixel would make every logit NaN: name the argument and the videos/images that hold one
    (not checked on the meta device, which holds no values)."""
    bad = [
        i
        for i, clip in enumerate(clips)
        if clip.is_floating_point() and clip.device.type != "meta" and not bool(clip.isfinite().all())
    ]
    if bad:
        raise ValueError(f"{name} holds NaN or infinite values (at index {', '.join(map(str, bad))}).")


def _check_images(pixel_values: torch.Tensor):
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must have shape (images, 3, H, W), got {tuple(pixel_values.shape)}.")


def _pad_rows(rows: list[torch.Tensor], visible: list[torch.Tensor], fill: int):
    """Rows of queries (flat positions) and of how many keys each sees, padded to the longest row, and to one query
    at least: a call with no query is no call to the attention backends (padding queries repeat a position and see
    `fill` keys). Returns both as (n, width) tensors and the flat indices of the real queries (None when all are)."""
    width = max(1, *(len(row) for row in rows))
    queries = torch.zeros(len(rows), width, dtype=torch.long)
    seen = torch.full((len(rows), width), fill, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, row_visible) in enumerate(zip(rows, visible)):
        queries[i, : len(row)], seen[i, : len(row)], real[i, : len(row)] = row, row_visible, True
    take = None if bool(real.all()) else real.flatten().nonzero().flatten()
    return queries, seen, take


@dataclass
class _Item:
    """One video or image of a prefill, on the host: where its pooled tokens sit in each row of its sample."""

    sample: int
    kind: str  # "video" or "image"
    frame: int  # its first frame among the pass's frames (every video's, then every image's)
    frames: int
    positions: torch.Tensor  # (rows_per_sample, frames * pool_size**2) positions in each row of its sample


class VisualPlanner:
    """Works out on the host, once per forward pass, where every DCAL query looks: at prefill, which positions hold
    which video's or image's pooled tokens (`layout`) and the `PrefillPlan`; on a decode step, the `DecodePlan` from
    what the cache holds. `dtype` is the additive key masks' (eager); `rows_per_sample`: see CrossLMMModel.forward."""

    def __init__(self, config: CrossLMMConfig, dtype: torch.dtype, rows_per_sample: int = 1):
        self.config, self.dtype, self.rows_per_sample = config, dtype, rows_per_sample

    def layout(self, masks: dict, clips: dict) -> list[_Item]:
        """Assign the placeholder tokens of each modality, in reading order, to its videos / images (`clips[kind]`:
        each one's frame count, in input order). Returns the items of every sample in reading order."""
        per_frame = self.config.tokens_per_frame
        rows = masks["video"].shape[0]
        if self.rows_per_sample < 1 or rows % self.rows_per_sample:
            raise ValueError(f"rows_per_sample={self.rows_per_sample} does not divide the batch's {rows} rows.")
        repeats = f", in each of the {self.rows_per_sample} rows of a sample" if self.rows_per_sample > 1 else ""
        items = []
        for kind in ("video", "image"):
            counts, mask = clips[kind], masks[kind]
            found, needed = int(mask.sum()), sum(counts) * per_frame * self.rows_per_sample
            if found != needed:
                raise ValueError(
                    f"The prompt has {found} {kind} placeholder tokens but the {len(counts)} {kind}(s) given need "
                    f"{needed} ({[n * per_frame for n in counts]}: frames x pool_size**2 each{repeats}). Let the "
                    f"processor expand the placeholders, and give one {kind} per placeholder."
                )
            next_clip, frame = 0, 0 if kind == "video" else sum(clips["video"])
            for sample in range(rows // self.rows_per_sample):
                block = mask[sample * self.rows_per_sample : (sample + 1) * self.rows_per_sample]
                positions = [row.nonzero().flatten() for row in block]
                if any(len(p) != len(positions[0]) for p in positions):
                    raise ValueError(f"The rows of one sample (rows_per_sample) hold different {kind} placeholders.")
                used = 0
                while used < len(positions[0]):
                    tokens = counts[next_clip] * per_frame
                    if used + tokens > len(positions[0]):
                        raise ValueError(f"The placeholder tokens of one {kind} are split across batch rows.")
                    span = torch.stack([p[used : used + tokens] for p in positions])
                    items.append(_Item(sample, kind, frame, counts[next_clip], span))
                    used += tokens
                    frame += counts[next_clip]
                    next_clip += 1
        items.sort(key=lambda item: (item.sample, int(item.positions[0, 0])))
        return items

    def prefill(
        self, items, original, placeholders, attention_mask, cache, output_attentions, training
    ) -> PrefillPlan:
        """Every DCAL query of a prefill with its keys, worked out once on the host: the V2V call, the T2V call and
        each sample's memory (kept in the cache for the decode steps). `original` holds the original tokens of every
        frame, videos' then images'."""
        rows, length = placeholders["video"].shape
        memory, memory_start, lengths = self._visual_memory(items, original, rows // self.rows_per_sample)
        v2v = None
        if self.config.use_v2v:
            v2v = self._v2v_call(items, original, memory_start, length)
        text = ~(placeholders["video"] | placeholders["image"]).cpu()
        if attention_mask is not None and attention_mask.ndim == 2:
            text &= attention_mask[:, -length:].cpu().bool()
        t2v = self._t2v_call(items, memory, lengths, text, always=cache is not None or training)
        if cache is not None and self.config.use_t2v:
            cache.keep_memory_layout(lengths, self.rows_per_sample, memory.device)
        return PrefillPlan(memory_lengths=lengths, v2v=v2v, t2v=t2v, output_attentions=output_attentions)

    def _visual_memory(self, items, original, samples):
        """Each sample's memory, (samples, M, D_v) padded along M: its items' original tokens in reading order. Also
        where each item starts in it and each sample's length."""
        grid_tokens = self.config.patch_grid_size**2
        memory_start, lengths = [], [0] * samples
        for item in items:
            memory_start.append(lengths[item.sample])
            lengths[item.sample] += item.frames * grid_tokens
        tokens = [original[item.frame : item.frame + item.frames] for item in items]
        if samples == 1 and len(items) == 1:
            return tokens[0].reshape(1, lengths[0], -1), memory_start, lengths
        memory = tokens[0].new_zeros(samples, max(lengths), tokens[0].shape[-1])
        for item, start, item_tokens in zip(items, memory_start, tokens):
            memory[item.sample, start : start + item.frames * grid_tokens] = item_tokens.flatten(0, 1)
        return memory, memory_start, lengths

    def _t2v_call(self, items, memory, lengths, text, always):
        """T2V in one call: a row per sample, its rows' `text` positions side by side, each seeing the memory of the
        items that end before it (a prefix of its sample's memory). None when no query sees any memory, unless
        `always` (the call then fills the cache, or keeps data-parallel ranks making the same calls in training)."""
        grid_tokens, length, memory_length = self.config.patch_grid_size**2, text.shape[1], max(lengths)
        queries, visible = [[] for _ in lengths], [[] for _ in lengths]
        for sample in range(len(lengths)):
            sample_items = [i for i, item in enumerate(items) if item.sample == sample]
            sizes = torch.tensor([0] + [items[i].frames * grid_tokens for i in sample_items]).cumsum(0)
            for j in range(self.rows_per_sample):
                row = sample * self.rows_per_sample + j
                ends = torch.tensor([int(items[i].positions[j, -1]) for i in sample_items], dtype=torch.long)
                positions = text[row].nonzero().flatten()
                seen = sizes[torch.searchsorted(ends, positions)]
                queries[sample].append(row * length + positions[seen > 0])
                visible[sample].append(seen[seen > 0])
        queries, visible = [torch.cat(q) for q in queries], [torch.cat(v) for v in visible]
        if not (always or any(len(q) for q in queries)):
            return None
        queries, visible, take = _pad_rows(queries, visible, memory_length)
        mask = self._key_mask(visible, memory_length) if bool((visible < memory_length).any()) else None
        return CrossAttentionCall(queries, memory, torch.zeros(len(lengths), dtype=torch.long), take, mask)

    def _v2v_call(self, items, original, memory_start, length):
        """V2V in one call: each pooled token attends to its own video's original tokens ("video" scope: a row per
        video or image, padded to the longest) or to its own frame's ("frame" scope: a row per frame, which are
        `original`'s frames as they are)."""
        per_frame, grid_tokens = self.config.tokens_per_frame, self.config.patch_grid_size**2

        def frame_queries(item):  # (frames, rows_per_sample * per_frame): each frame's pooled positions in each row
            rows = item.sample * self.rows_per_sample + torch.arange(self.rows_per_sample)
            positions = item.positions.view(self.rows_per_sample, item.frames, per_frame)
            return (rows[:, None, None] * length + positions).transpose(0, 1).flatten(1)

        if self.config.v2v_scope == "frame":
            queries = torch.zeros(original.shape[0], self.rows_per_sample * per_frame, dtype=torch.long)
            starts = torch.zeros(original.shape[0], dtype=torch.long)
            for item, start in zip(items, memory_start):
                queries[item.frame : item.frame + item.frames] = frame_queries(item)
                starts[item.frame : item.frame + item.frames] = start + grid_tokens * torch.arange(item.frames)
            return CrossAttentionCall(queries, original, starts)

        item_queries = [frame_queries(item).flatten() for item in items]
        spans = [original[item.frame : item.frame + item.frames].flatten(0, 1) for item in items]
        starts = torch.tensor(memory_start)
        if len({len(span) for span in spans}) == 1:  # equal lengths: no padding
            tokens = spans[0][None] if len(spans) == 1 else torch.stack(spans)
            return CrossAttentionCall(torch.stack(item_queries), tokens, starts)
        longest = max(len(span) for span in spans)
        tokens = spans[0].new_zeros(len(spans), longest, spans[0].shape[-1])
        for i, span in enumerate(spans):
            tokens[i, : len(span)] = span
        sizes = [torch.full((len(q),), len(span)) for q, span in zip(item_queries, spans)]
        queries, visible, take = _pad_rows(item_queries, sizes, longest)
        return CrossAttentionCall(queries, tokens, starts, take, self._key_mask(visible, longest))

    def _key_mask(self, visible, keys):
        """`key_mask` for the DCALs' calls, on the backend that runs them, whose query heads are folded by key/value
        head."""
        text = self.config.text_config
        implementation = masked_implementation(text._attn_implementation)
        return key_mask(
            visible, keys, implementation, self.dtype, text.num_attention_heads // text.num_key_value_heads
        )

    def decode(self, cache: CrossLMMCache, rows, length, output_attentions) -> DecodePlan:
        """A step after the prefill: every new position of every row reads its sample's whole memory. Planned from
        what the cache holds on the host; nothing is read back from the device."""
        samples, rows_per_sample = len(cache.memory_lengths), cache.rows_per_sample
        if rows != samples * rows_per_sample:
            raise ValueError(
                f"The cache holds visual memory for {samples} sample(s) x {rows_per_sample} row(s) but this batch has "
                f"{rows} rows."
            )
        mask = None
        if cache.memory_visible is not None:
            # The same mask at every step of one length (a flex_attention BlockMask is costly to make): kept.
            implementation = masked_implementation(self.config.text_config._attn_implementation)
            made_for = (implementation, rows_per_sample, length, self.dtype)
            if cache.decode_mask is None or cache.decode_mask[0] != made_for:
                visible = cache.memory_visible[:, None].expand(samples, rows_per_sample * length)
                mask = self._key_mask(visible, max(cache.memory_lengths))
                cache.decode_mask = (made_for, mask)
            mask = cache.decode_mask[1]
        return DecodePlan(
            memory_lengths=cache.memory_lengths,
            mask=mask,
            memory_scale=None if cache.memory_scale is None else cache.memory_scale.to(self.dtype),
            output_attentions=output_attentions,
        )


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
        # At least float32 (interpolation in half precision loses the average's digits), float64 in a float64 model.
        dtype = torch.promote_types(features.dtype, torch.float32)
        grid = features.transpose(1, 2).reshape(frames, dim, self.grid, self.grid).to(dtype)
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
    grouped-query heads like the LLM, on transformers' attention backends."""

    def __init__(self, config: CrossLMMConfig):
        super().__init__()
        text = config.text_config
        self.config = text
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.num_heads = text.num_attention_heads
        self.num_key_value_heads = text.num_key_value_heads
        self.num_key_value_groups = 1  # the backends see no grouped heads: `forward` folds them into the queries
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = text.attention_dropout
        self.is_causal = False
        vision_dim = config.vision_config.hidden_size
        self.q_proj = nn.Linear(text.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(vision_dim, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(vision_dim, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, text.hidden_size, bias=False)

    def project_memory(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, M, D_v) original tokens -> keys, values of shape (n, kv_heads, M, head_dim), contiguous: the decode
        steps read them from the cache at every token, and every attention kernel reads a head's keys fastest as one
        block (on a CPU, SDPA over the strided projection's view took 2.5-3.3x as long per key)."""
        shape = (*tokens.shape[:-1], -1, self.head_dim)  # -1: the local heads under tensor parallelism
        tokens = tokens.to(dtype=_zero3_safe_parameter(self.k_proj).dtype)
        keys = self.k_proj(tokens).view(shape).transpose(1, 2).contiguous()
        return keys, self.v_proj(tokens).view(shape).transpose(1, 2).contiguous()

    def forward(self, queries, keys, values, mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n, Lq, D) queries attend to their row's (n, kv_heads, K, head_dim) keys/values, restricted by `mask`
        (from `key_mask`, made with `groups=num_key_value_groups`) when given. Returns the output (n, Lq, D) and, on
        eager, the weights (n, heads, Lq, K).

        The query heads that share a key/value head are folded into its queries, (n, kv_heads, groups * Lq,
        head_dim): without a causal order this is the same attention, and every backend then reads each key once
        per key/value head, with neither `repeat_kv`'s copy of the keys (eager, masked sdpa) nor a pass per query
        head."""
        n, length, _ = queries.shape
        query_states = self.q_proj(queries)  # heads from the width: the local heads under tensor parallelism
        heads, kv_heads = query_states.shape[-1] // self.head_dim, keys.shape[1]
        groups = heads // kv_heads
        query_states = query_states.view(n, length, heads, self.head_dim).transpose(1, 2)
        query_states = query_states.reshape(n, kv_heads, groups * length, self.head_dim)
        implementation = self.config._attn_implementation
        if mask is not None:
            implementation = masked_implementation(implementation)
            mask = mask.to(query_states.device)  # a BlockMask moves too
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, weights = attention_interface(
            self,
            query_states,
            keys.to(query_states.device),
            values.to(query_states.device),
            mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        # (n, groups * Lq, kv_heads, head_dim) -> (n, Lq, heads * head_dim), head `h` being group `h % groups` of
        # key/value head `h // groups` (as `repeat_kv` orders them)
        output = output.reshape(n, groups, length, kv_heads, self.head_dim).permute(0, 2, 3, 1, 4)
        if weights is not None:
            weights = weights.reshape(n, heads, length, weights.shape[-1])
        return self.o_proj(output.flatten(2)), weights


class CrossAttentionWeights:
    """`output_attentions` of one DCAL at prefill: each position's weights over its sample's memory, (positions, heads,
    memory) filled call by call, each query's keys placed where they start in the memory. Inert when the plan does
    not ask for weights (or the backend gives none)."""

    def __init__(self, plan: PrefillPlan, rows: int, length: int, heads: int, like: torch.Tensor):
        self.rows, self.length, self.memory_length = rows, length, max(plan.memory_lengths)
        self.dense = None
        if plan.output_attentions:  # room past the memory for the padded keys of a V2V row, cut off by `per_row`
            room = plan.v2v.tokens.shape[1] if plan.v2v is not None else 0
            self.dense = like.new_zeros(rows * length, heads, self.memory_length + room)

    def add(self, call: CrossAttentionCall, call_weights: torch.Tensor | None, positions: torch.Tensor):
        """A call's (n, heads, Lq, K) weights, for its real queries, now at flat `positions`."""
        if self.dense is None or call_weights is None:
            return
        device = self.dense.device
        starts = call.key_starts.to(device).repeat_interleave(call.queries.shape[1])
        call_weights = call_weights.permute(0, 2, 1, 3).flatten(0, 1)
        if call.take is not None:
            take = call.take.to(device)
            call_weights, starts = call_weights[take], starts[take]
        columns = starts[:, None] + torch.arange(call_weights.shape[-1], device=device)
        heads = torch.arange(call_weights.shape[1], device=device)
        call_weights = call_weights.to(self.dense.dtype)
        self.dense[positions[:, None, None], heads[None, :, None], columns[:, None, :]] = call_weights

    def per_row(self) -> torch.Tensor | None:
        """(rows, heads, length, memory_length), or None when no weights were asked for."""
        if self.dense is None:
            return None
        memory = self.memory_length
        return self.dense[..., :memory].reshape(self.rows, self.length, self.dense.shape[1], memory).transpose(1, 2)

    @staticmethod
    def of_decode_step(call_weights: torch.Tensor, rows: int, length: int) -> torch.Tensor:
        """A decode step's (samples, heads, rows_per_sample * length, M) weights -> (rows, heads, length, M)."""
        samples, heads, _, memory = call_weights.shape
        weights = call_weights.view(samples, heads, -1, length, memory).transpose(1, 2)
        return weights.reshape(rows, heads, length, memory)


class CrossLMMDualCrossAttentionLayer(GradientCheckpointingLayer):
    """DCAL (figure 2): V2V and T2V cross-attention in parallel, each pre-norm and tanh-gated into the residual
    stream, then a gated feed-forward block at the positions that attended to something. Where each query looks is
    the plan's business (`PrefillPlan`, `DecodePlan`); this layer runs it.

    At prefill and in training each enabled branch runs exactly once per pass, its sub-modules always in the same
    order, whatever the inputs: DeepSpeed ZeRO-3 gathers a sub-module's parameters on each call, so data-parallel
    ranks must make the same calls."""

    def __init__(self, config: CrossLMMConfig, layer_idx: int):
        super().__init__()
        text = config.text_config
        self.config, self.layer_idx = config, layer_idx
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

    # The branches are read from the model's config at every pass, the one place a training stage or an ablation
    # switches them (and what a saved checkpoint carries).
    @property
    def use_v2v(self) -> bool:
        return self.layer_idx in self.config.v2v_layer_indices  # not after the last decoder layer: no text reads it

    @property
    def use_t2v(self) -> bool:
        return self.config.use_t2v

    def forward(
        self, hidden_states: torch.Tensor, plan: PrefillPlan | DecodePlan, cache: CrossLMMCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """mllama's gated cross-attention layer at the positions the plan names: norm -> attention -> tanh(gate) ->
        residual for V2V, then for T2V, then the gated MLP. Returns the new hidden states and, when the plan asks for
        them (eager backend), the attention weights over each sample's memory (batch, heads, length, memory_length)."""
        if isinstance(plan, DecodePlan):
            return self._decode_step(hidden_states, plan, cache)
        rows, length, width = hidden_states.shape
        hidden_states = hidden_states.reshape(rows * length, width)
        weights = CrossAttentionWeights(plan, rows, length, self.t2v_attn.num_heads, hidden_states)
        attended = []  # V2V and T2V queries are disjoint: visual and text positions
        if self.use_v2v and plan.v2v is not None:
            hidden_states, positions, _ = self._gated_attention(hidden_states, "v2v", plan, weights)
            attended.append(positions)
        if self.use_t2v and plan.t2v is not None:
            hidden_states, positions, memory = self._gated_attention(hidden_states, "t2v", plan, weights)
            attended.append(positions)
            if cache is not None:  # the decode steps' keys/values
                cache.visual_memory[self.layer_idx] = memory
        if self.mlp is not None and attended:  # at the positions that attended to something
            positions = torch.cat(attended)
            update = plan.scale * self._gated_mlp(hidden_states[positions])
            hidden_states = hidden_states.index_add(0, positions, update.to(hidden_states.dtype))
        return hidden_states.view(rows, length, width), weights.per_row()

    def _gated_attention(self, hidden_states, branch: str, plan: PrefillPlan, weights: CrossAttentionWeights):
        """One branch (`"v2v"` or `"t2v"`) at its call's queries of the flat (positions, D) hidden states: norm ->
        cross-attention -> tanh(gate) -> residual. Returns the new hidden states, the positions it updated and the
        keys/values it made of the call's original tokens."""
        norm, attention, gate = (getattr(self, f"{branch}_{part}") for part in ("norm", "attn", "gate"))
        call = getattr(plan, branch)
        # Under device_map the vision tower may sit on another device: K/V are made on this layer's.
        keys, values = attention.project_memory(call.tokens.to(hidden_states.device))
        queries = call.queries.to(hidden_states.device)
        out, call_weights = attention(norm(hidden_states[queries]), keys, values, call.mask)
        out, positions = (plan.scale * torch.tanh(gate) * out).flatten(0, 1), queries.flatten()
        if call.take is not None:
            take = call.take.to(hidden_states.device)
            out, positions = out[take], positions[take]
        weights.add(call, call_weights, positions)
        return hidden_states.index_add(0, positions, out.to(hidden_states.dtype)), positions, (keys, values)

    def _decode_step(self, hidden_states, plan: DecodePlan, cache: CrossLMMCache):
        """T2V alone (a new position is text), in one call for the whole batch: the rows of one sample side by side as
        one row of queries against its cached keys/values, no copy of them; then the gated MLP."""
        if not self.use_t2v:
            return hidden_states, None
        rows, length, width = hidden_states.shape
        keys, values = cache.visual_memory[self.layer_idx]
        samples = keys.shape[0]
        queries = self.t2v_norm(hidden_states.reshape(samples, -1, width))
        out, call_weights = self.t2v_attn(queries, keys, values, plan.mask)
        out = plan.scaled(torch.tanh(self.t2v_gate) * out)
        hidden_states = hidden_states + out.reshape(rows, length, width).to(hidden_states.dtype)
        if self.mlp is not None:
            update = plan.scaled(self._gated_mlp(hidden_states).reshape(samples, -1, width))
            hidden_states = hidden_states + update.reshape(rows, length, width).to(hidden_states.dtype)
        weights = None
        if plan.output_attentions and call_weights is not None:
            weights = CrossAttentionWeights.of_decode_step(call_weights, rows, length)
        return hidden_states, weights

    def _gated_mlp(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(hidden_states))


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


# Negative `output_hidden_states` indices count the decoder's layers, which the composite config keeps in its
# `num_decoder_layers` (the transformers releases that resolve negative indices read the count's name here).
_DECODER_HIDDEN_STATES = OutputRecorder(Qwen2DecoderLayer, index=0)
if "num_hidden_layers_key" in OutputRecorder.__dataclass_fields__:
    _DECODER_HIDDEN_STATES.num_hidden_layers_key = "num_decoder_layers"


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
    # transformers' output capturing (`output_hidden_states`, `output_attentions`, also set on the config). The Qwen2
    # decoder and the vision tower record through their own `_can_record_outputs`; the keys listed here make the flags
    # count for CrossLMM, and the DCALs' attention weights are recorded as `cross_attentions`.
    _can_record_outputs = {
        "hidden_states": _DECODER_HIDDEN_STATES,
        "attentions": Qwen2Attention,
        "cross_attentions": OutputRecorder(CrossLMMDualCrossAttentionLayer, index=1),
    }

    def post_init(self):
        super().post_init()
        # post_init gathers the children's `_no_split_modules`; the SigLIP tower's list names text-model classes that
        # a vision-only tower lacks, and accelerate's FSDP wrap policy refuses a class it cannot find: keep those
        # present.
        present = {type(module).__name__ for module in self.modules()}
        self._no_split_modules = {name for name in self._no_split_modules if name in present}

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        """Reentrant checkpointing differentiates only through a layer's tensor arguments; a DCAL reads the original
        visual tokens from its plan argument, so it needs the non-reentrant kind (transformers' default)."""
        if enable and getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant"):
            raise ValueError(
                "CrossLMM's DCALs need non-reentrant activation (gradient) checkpointing: leave use_reentrant "
                "at its default (False) in activation_checkpointing_kwargs / gradient_checkpointing_kwargs."
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
        # vLLM's Transformers backend builds models with its "vllm" attention and feeds them merged input embeddings
        # without pixels: the DCALs would never run, and the answers would be plausible and wrong.
        if config.text_config._attn_implementation == "vllm":
            raise ValueError(
                "CrossLMM cannot run on vLLM's Transformers backend (its cross-attention layers would never see the "
                "videos): `pip install 'crosslmm[vllm]'` adds the native vLLM model."
            )
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

    def get_video_features(
        self, pixel_values_videos, video_num_frames: torch.LongTensor | None = None, **kwargs
    ) -> BaseModelOutputWithPooling:
        r"""
        pixel_values_videos: (videos, frames, 3, H, W), or a list of (frames_i, 3, H, W), or a padded 5-D tensor with
            `video_num_frames` (videos,) giving each video's real frame count.

        Returns `BaseModelOutputWithPooling` (a tuple with `return_dict=False`): `last_hidden_state` (frames, N, D_v)
        the original visual tokens of every frame of every video in order, as the vision tower gives them (and its
        `hidden_states`/`attentions` with `output_hidden_states`/`output_attentions`); `pooler_output` one entry per
        video, its pooled, projected tokens (frames * pool_size**2, D) as they replace its placeholders: a
        (videos, frames * pool_size**2, D) tensor when the videos have the same length, as LLaVA-OneVision's, else a
        tuple of one tensor per video, as transformers' VLMs return features of different lengths.
        """
        return_dict = kwargs.pop("return_dict", None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        videos = self._split_videos(pixel_values_videos, video_num_frames)
        encoded = self._encode_visual(videos[0] if len(videos) == 1 else torch.cat(videos), return_dict=True, **kwargs)
        encoded.pooler_output = per_video(encoded.pooler_output, [len(video) for video in videos])
        return encoded if return_dict else encoded.to_tuple()

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        r"""
        pixel_values: (images, 3, H, W); each image is a one-frame video.

        Returns `BaseModelOutputWithPooling`: `last_hidden_state` (images, N, D_v), `pooler_output` (images,
        pool_size**2, D), as `get_video_features`.
        """
        _check_images(pixel_values)
        return self._encode_visual(pixel_values, **kwargs)

    @capture_outputs(tie_last_hidden_states=False)
    def _encode_visual(self, frames: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Original tokens and pooled, projected tokens of (F, 3, H, W) frames. The tower runs `vision_batch_size`
        frames at a time, except in one pass when its hidden states or attentions are recorded (layer by layer) and
        in training: there the activations are kept for the backward pass anyway, and every data-parallel rank then
        runs the tower exactly once per step, whatever its frame count (FSDP/ZeRO-3 gather per call)."""
        recorded = any(
            kwargs.get(f"output_{name}", getattr(self.config, f"output_{name}"))
            for name in ("hidden_states", "attentions")
        )
        one_pass = recorded or (self.training and torch.is_grad_enabled())
        original = self._original_tokens(frames, frames.shape[0] if one_pass else None)
        # Pooled chunk by chunk, as the tower runs: the pooler's float32 copy (in a half-precision model) must not grow
        # with frames.
        pooled = torch.cat([self.pooler(chunk) for chunk in original.split(self.config.vision_batch_size)])
        # The tower may run in another dtype than the rest (e.g. kept in float32 while the LLM trains in bfloat16).
        pooled = self.multi_modal_projector(pooled.to(_zero3_safe_parameter(self.multi_modal_projector).dtype))
        return BaseModelOutputWithPooling(last_hidden_state=original, pooler_output=pooled)

    def _original_tokens(self, frames: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """(F, 3, H, W) frames -> (F, N, D_v) original visual tokens, `batch_size` (default `vision_batch_size`)
        frames at a time so that activation memory does not grow with the video length."""
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
        step, original = batch_size or self.config.vision_batch_size, None
        if frames.shape[0] <= step:  # one chunk: the tower's output as it is, not a copy of it
            return self._encode_frames(frames.to(dtype))
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
        if not videos:
            raise ValueError("pixel_values_videos holds no video.")
        for i, video in enumerate(videos):
            if video.ndim != 4 or video.shape[0] == 0:
                raise ValueError(
                    f"video {i} must be a non-empty (frames, 3, H, W) tensor, got shape {tuple(video.shape)}."
                )
        return videos

    @staticmethod
    def _split_features(encoded: BaseModelOutputWithPooling, clips: dict) -> dict[str, BaseModelOutputWithPooling]:
        """The features of every video's and image's frames, encoded together, as `get_video_features` and
        `get_image_features` return them."""
        video, image = slice(None, sum(clips["video"])), slice(sum(clips["video"]), None)
        features = {}
        if clips["video"]:
            pooled = per_video(encoded.pooler_output[video], clips["video"])
            features["video"] = BaseModelOutputWithPooling(encoded.last_hidden_state[video], pooled)
        if clips["image"]:
            features["image"] = BaseModelOutputWithPooling(
                encoded.last_hidden_state[image], encoded.pooler_output[image]
            )
        return features

    def get_placeholder_mask(self, input_ids, inputs_embeds) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, video) boolean masks (batch, length) of the placeholder tokens, found in `input_ids` or, without
        them, as the placeholders' embeddings inside `inputs_embeds` (as transformers' LLaVA models find them)."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id, input_ids == self.config.video_token_id
        embed = self.get_input_embeddings()
        masks = []
        for token_id in (self.config.image_token_id, self.config.video_token_id):
            token = embed(torch.tensor(token_id, device=_zero3_safe_parameter(embed).device)).to(inputs_embeds.device)
            masks.append((inputs_embeds == token.to(inputs_embeds.dtype)).all(-1))
        return masks[0], masks[1]

    # ---- forward ---------------------------------------------------------------------------------------------------

    @capture_outputs
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
        rows_per_sample: int = 1,
        **kwargs,
    ) -> CrossLMMModelOutputWithPast:
        r"""
        pixel_values_videos, video_num_frames, pixel_values: as in `get_video_features` / `get_image_features`.
        rows_per_sample (`int`, defaults to 1): consecutive rows of the batch that repeat one sample (beam search and
            `num_return_sequences` in `generate`): its videos and images are given once, encoded once, and its rows
            share one visual memory.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        use_cache = use_cache if use_cache is not None else self.config.text_config.use_cache
        has_visual = pixel_values is not None or pixel_values_videos is not None
        cache = self._prepare_cache(_one_cache(cache, past_key_values), use_cache, has_visual)
        prefill = cache is None or cache.get_seq_length() == 0
        self._check_text_inputs(input_ids, inputs_embeds, attention_mask, cache, prefill)
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        output_attentions = bool(output_attentions) and self.config.text_config._attn_implementation == "eager"

        embed_tokens = self.get_input_embeddings()
        if inputs_embeds is None:
            inputs_embeds = embed_tokens(input_ids.to(_zero3_safe_parameter(embed_tokens).device))
        features, plan = {}, None
        if has_visual:
            encoded, clips = self._encode_visual_inputs(pixel_values, pixel_values_videos, video_num_frames)
            features = self._split_features(encoded, clips)
            masks = dict(zip(("image", "video"), self.get_placeholder_mask(input_ids, inputs_embeds)))
            planner = VisualPlanner(self.config, _zero3_safe_parameter(embed_tokens).dtype, rows_per_sample)
            items = planner.layout({kind: mask.cpu() for kind, mask in masks.items()}, clips)
            inputs_embeds = self._insert_pooled(inputs_embeds, items, encoded.pooler_output, rows_per_sample)
            plan = planner.prefill(
                items, encoded.last_hidden_state, masks, attention_mask, cache, output_attentions, self.training
            )
        elif prefill:
            image_placeholders, video_placeholders = self.get_placeholder_mask(input_ids, inputs_embeds)
            if (image_placeholders | video_placeholders).any():
                raise ValueError(
                    "The prompt has <video>/<image> placeholder tokens but no videos or images were given."
                )
            if self.training and torch.is_grad_enabled():
                inputs_embeds, plan = self._idle_plan(inputs_embeds)
        elif cache.has_visual_memory:
            planner = VisualPlanner(self.config, inputs_embeds.dtype)
            plan = planner.decode(cache, *inputs_embeds.shape[:2], output_attentions)

        if position_ids is None:
            position_ids = self._position_ids(attention_mask, cache, inputs_embeds)
        hidden_states = self._run_decoder_with_dcals(
            inputs_embeds, attention_mask, position_ids, cache, use_cache, plan, **kwargs
        )
        return CrossLMMModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_ARG: cache if use_cache else None},
            image_outputs=features.get("image"),
            video_outputs=features.get("video"),
        )

    def _encode_visual_inputs(self, pixel_values, pixel_values_videos, video_num_frames):
        """Every video's frames, then every image, through the tower in one go, outside this pass's output capturing
        (the tower's layers are not the decoder's hidden states). Returns the features and each video's and image's
        frame count, in input order."""
        clips, frames = {"video": [], "image": []}, []
        if pixel_values_videos is not None:
            frames = self._split_videos(pixel_values_videos, video_num_frames)
            _check_finite("pixel_values_videos", frames)
            clips["video"] = [len(video) for video in frames]
        if pixel_values is not None:
            _check_images(pixel_values)
            _check_finite("pixel_values", pixel_values)
            frames.append(pixel_values)
            clips["image"] = [1] * len(pixel_values)
        frames = frames[0] if len(frames) == 1 else torch.cat(frames)
        return self._encode_visual(
            frames, return_dict=True, output_hidden_states=False, output_attentions=False
        ), clips

    @staticmethod
    def _position_ids(attention_mask, cache, inputs_embeds):
        """Positions of the new tokens; with a 2-D attention mask (left padding) only real tokens count."""
        length = inputs_embeds.shape[1]
        if attention_mask is not None and attention_mask.ndim == 2:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        past_seen = cache.get_seq_length() if cache is not None else 0
        return torch.arange(past_seen, past_seen + length, device=inputs_embeds.device)[None]

    def _check_text_inputs(self, input_ids, inputs_embeds, attention_mask, cache, prefill):
        """Shapes that do not fit, and token ids outside the vocabulary, named here rather than as an index error
        from inside torch or transformers' masking (ids are read at the first pass only: decode steps read nothing
        back from the device)."""
        if input_ids is not None and input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}.")
        if inputs_embeds is not None and inputs_embeds.ndim != 3:
            raise ValueError(
                f"inputs_embeds must have shape (batch, length, hidden), got {tuple(inputs_embeds.shape)}."
            )
        rows, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if attention_mask is not None and attention_mask.ndim == 2:
            expected = (rows, length + (cache.get_seq_length() if cache is not None else 0))
            if tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)} but the batch needs {expected} (rows, "
                    "tokens so far including these)."
                )
        if prefill and input_ids is not None and input_ids.numel():
            vocab = self.config.text_config.vocab_size
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab:
                raise ValueError(f"input_ids holds token ids outside the vocabulary 0..{vocab - 1} ({low}..{high}).")

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

    # ---- where the visual tokens go (prefill, on the host) ---------------------------------------------------------

    def _insert_pooled(self, inputs_embeds, items, pooled, rows_per_sample):
        """The pooled, projected tokens (every frame's, (frames, pool_size**2, D)) in place of their placeholders, in
        every row of their sample."""
        rows, length, width = inputs_embeds.shape
        per_frame = self.config.tokens_per_frame
        targets, sources = [], []
        for item in items:
            rows_of_item = item.sample * rows_per_sample + torch.arange(rows_per_sample)
            targets.append((rows_of_item[:, None] * length + item.positions).flatten())
            tokens = torch.arange(item.frame * per_frame, (item.frame + item.frames) * per_frame)
            sources.append(tokens.repeat(rows_per_sample))
        device = inputs_embeds.device
        values = pooled.flatten(0, 1)[torch.cat(sources).to(pooled.device)].to(device, inputs_embeds.dtype)
        flat = inputs_embeds.reshape(rows * length, width).index_put((torch.cat(targets).to(device),), values)
        return flat.view(rows, length, width)

    def _idle_plan(self, inputs_embeds) -> tuple[torch.Tensor, PrefillPlan]:
        """Training on a micro-batch without videos or images: a blank frame goes the way a video goes, into the
        embeddings and to every DCAL branch (queried from the first position), with every update scaled by exactly 0.
        Data-parallel ranks with and without visual inputs then make the same calls in the same order, as FSDP and
        DeepSpeed ZeRO-3 need (they gather parameters per call and reduce gradients in the order they come)."""
        size = self.config.image_size
        blank = torch.zeros(1, 3, size, size, device=self.vision_tower.device)
        encoded = self._encode_visual(blank, return_dict=True, output_hidden_states=False, output_attentions=False)
        pooled = encoded.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds + 0.0 * pooled.sum()
        first, start = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        call = CrossAttentionCall(first, encoded.last_hidden_state, start)
        plan = PrefillPlan(memory_lengths=[call.tokens.shape[1]], v2v=call, t2v=call, scale=0.0)
        return inputs_embeds, plan

    def _run_decoder_with_dcals(self, inputs_embeds, attention_mask, position_ids, cache, use_cache, plan, **kwargs):
        """Adapted from transformers' `Qwen2Model.forward` (masks, rotary embeddings, the decoder layer loop), with
        each DCAL run after the decoder layer it follows. Returns the final, normalized hidden states."""
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
            if plan is not None and str(idx) in self.cross_attention_layers:
                hidden_states, _ = self.cross_attention_layers[str(idx)](hidden_states, plan, cache)
        return llm.norm(hidden_states)


def per_video(pooled: torch.Tensor, frame_counts: list[int]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Pooled tokens of every frame (frames, pool_size**2, D) -> one entry per video (frames_i * pool_size**2, D):
    a (videos, frames * pool_size**2, D) view when the videos have the same length, else a tuple (as transformers'
    VLMs return features of different lengths, e.g. Qwen2-VL's)."""
    if len(set(frame_counts)) == 1:
        return pooled.reshape(len(frame_counts), -1, pooled.shape[-1])
    return tuple(video.flatten(0, 1) for video in pooled.split(frame_counts))


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
        # The placeholders stand for visual tokens: never generate them (saved with the generation config).
        if self.generation_config.suppress_tokens is None:
            self.generation_config.suppress_tokens = [config.image_token_id, config.video_token_id]

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_video_features(self, pixel_values_videos, video_num_frames=None, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_video_features(pixel_values_videos, video_num_frames, **kwargs)

    def get_image_features(self, pixel_values, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
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
        logits_to_keep: int | torch.Tensor = 0,
        rows_per_sample: int = 1,
        **kwargs,
    ) -> CrossLMMCausalLMOutputWithPast:
        r"""
        pixel_values_videos, video_num_frames, pixel_values, rows_per_sample: as in `CrossLMMModel.forward`.
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
            rows_per_sample=rows_per_sample,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            image_mask, video_mask = self.model.get_placeholder_mask(input_ids, inputs_embeds)
            labels = labels.masked_fill((image_mask | video_mask).to(labels.device), -100)
            # Without `num_items_in_batch` the loss is a mean over this batch's tokens: over none it is a silent NaN.
            # With it (gradient accumulation), a micro-batch without answer tokens rightly adds 0.
            if kwargs.get("num_items_in_batch") is None and not (labels[..., 1:] != -100).any():
                raise ValueError(
                    "Every label is -100 or a visual placeholder: the batch has no token to learn from. Keep at "
                    "least one answer token per sample (CrossLMMDataCollator labels the assistant turns)."
                )
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return CrossLMMCausalLMOutputWithPast(
            loss=loss, logits=logits, **{key: value for key, value in outputs.items() if key != "last_hidden_state"}
        )

    def prepare_inputs_for_generation(
        self,
        input_ids,
        inputs_embeds=None,
        pixel_values=None,
        pixel_values_videos=None,
        video_num_frames=None,
        rows_per_sample=1,
        **kwargs,
    ):
        """Visual inputs go to the first pass only, the one that starts from an empty cache (whatever transformers
        calls it: assisted decoding runs an assistant's first pass as a later iteration). Later passes read the
        DCALs' visual memory from the cache. Without a cache every pass recomputes, frames included."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        cache = model_inputs.get(CACHE_ARG)
        if cache is None or cache.get_seq_length() == 0:
            model_inputs.update(
                pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos,
                video_num_frames=video_num_frames,
                rows_per_sample=rows_per_sample,
            )
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search and `num_return_sequences` repeat each sample's rows; its videos and images stay as given,
        encoded once, and its rows share them (`rows_per_sample`)."""
        visual = {
            name: model_kwargs.pop(name)
            for name in ("pixel_values", "pixel_values_videos", "video_num_frames")
            if name in model_kwargs
        }
        rows_per_sample = model_kwargs.pop("rows_per_sample", 1) or 1
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        model_kwargs.update(visual, rows_per_sample=rows_per_sample * expand_size)
        return input_ids, model_kwargs


CrossLMMConfig.register_for_auto_class()
CrossLMMModel.register_for_auto_class("AutoModel")
CrossLMMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["CrossLMMCache", "CrossLMMForConditionalGeneration", "CrossLMMModel", "CrossLMMPreTrainedModel"]
