"""Each request's visual memory on vLLM, and the plan of one engine step.

vLLM batches the tokens of many requests into one flat sequence, splits long prompts into chunks (chunked prefill),
and keeps only the self-attention KV cache in its paged blocks. CrossLMM's DCALs also need, for every request, the
original visual tokens of its videos and images: V2V for the pooled tokens of a video while its placeholders run,
T2V for every text token after it, across prefill chunks and decode steps. This module keeps that memory per request:

- `ItemRegistry`: what `embed_multimodal` encoded (each video's or image's original tokens), under a small integer id
  that travels inside the pooled-token embeddings vLLM caches for the item (`tag`/`untag`), so that the step that
  places the item's placeholders finds its tokens. An entry lives exactly as long as vLLM's encoder cache holds the
  item's embeddings (a `weakref.finalize` on them).
- `RequestMemory`: one request's items in reading order and, per DCAL, the T2V keys/values of all of them, made once.
  Requests are told apart by the first block of their KV block table, which a request owns from its first prefill
  chunk to its end (prefix caching, the one way to share a block, is turned off: crosslmm.vllm.config). A request
  whose first chunk starts at position 0 gets a fresh memory; a memory any of whose blocks shows up in another
  request's block table belongs to a finished request and is dropped (vLLM 0.32 tells the model nothing else about
  finished requests).
- `StepPlan`: for one forward pass, every V2V and T2V call (which flat token positions, which keys) worked out once
  on the host; the DCALs only run it.
- `MemoryBudget`: how many bytes that memory may take, a frame, a request and the engine, from the config and the
  engine's `max_model_len` and `max_num_seqs` (the processor refuses a request above it; the model logs it at start).
"""

import weakref
from dataclasses import dataclass, field

import torch


# How an item's id and each row's index inside the item travel in the pooled embeddings: DIGITS base-128 digits each,
# exact in every float dtype vLLM runs (bfloat16 holds integers up to 256 exactly).
BASE, DIGITS = 128, 4
TAG_WIDTH = 2 * DIGITS


def _digits(values: torch.Tensor) -> torch.Tensor:
    return torch.stack([(values // BASE**i) % BASE for i in range(DIGITS)], dim=-1)


def tag(pooled: torch.Tensor, item_id: int) -> torch.Tensor:
    """(rows, D) pooled tokens -> (rows, D + TAG_WIDTH): each row followed by the item's id and the row's index."""
    rows = torch.arange(pooled.shape[0], device=pooled.device)
    ids = torch.full_like(rows, item_id)
    return torch.cat([pooled, _digits(ids).to(pooled.dtype), _digits(rows).to(pooled.dtype)], dim=-1)


def untag(tagged: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """(n, D + TAG_WIDTH) -> the (n, D) embeddings, and each row's item id and index inside its item."""
    digits = tagged[:, -TAG_WIDTH:].float().round().long().cpu()
    weights = BASE ** torch.arange(DIGITS)
    ids = (digits[:, :DIGITS] * weights).sum(-1)
    rows = (digits[:, DIGITS:] * weights).sum(-1)
    return tagged[:, :-TAG_WIDTH], ids.tolist(), rows.tolist()


@dataclass(frozen=True)
class MemoryBudget:
    """The bound on the visual memory, which lives beside vLLM's paged KV cache and outside its accounting.

    A frame (an image is one) keeps N = patch_grid_size**2 original tokens: their T2V keys and values in every DCAL
    that runs T2V, and the tokens themselves until every DCAL has projected them (a request's prefill), so at most
    `N x (t2v_dcals x 2 x kv_heads x head_dim + D_v)` values. A request holds at most `max_frames` frames: each takes
    pool_size**2 placeholder tokens of a prompt that fits in `max_model_len`, and, where `--limit-mm-per-prompt`
    gives videos a `num_frames` (what vLLM profiles its memory with), no video may have more, so a request has at most
    `count x num_frames` video frames and `count` images. At most `max_num_seqs` requests are in flight."""

    bytes_per_frame: int
    max_frames: int  # a request's, videos and images together
    video_frames: int | None  # a video's, from --limit-mm-per-prompt
    max_model_len: int
    tokens_per_frame: int

    @classmethod
    def from_config(cls, config, model_config) -> "MemoryBudget":
        """From the checkpoint's config and vLLM's ModelConfig (dtype, max_model_len, multimodal limits)."""
        text = config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        t2v_dcals = len(config.dcal_layer_indices) if config.use_t2v else 0
        values = t2v_dcals * 2 * text.num_key_value_heads * head_dim + config.vision_config.hidden_size
        element = torch.empty((), dtype=model_config.dtype).element_size()
        max_model_len = model_config.max_model_len
        max_frames = max_model_len // config.tokens_per_frame
        video_frames = None
        multimodal = model_config.multimodal_config
        if multimodal is not None:
            video_frames = getattr(multimodal.limit_per_prompt.get("video"), "num_frames", None)
            if video_frames is not None:
                videos, images = (multimodal.get_limit_per_prompt(modality) for modality in ("video", "image"))
                max_frames = min(max_frames, videos * video_frames + images)
        bytes_per_frame = config.patch_grid_size**2 * values * element
        return cls(bytes_per_frame, max_frames, video_frames, max_model_len, config.tokens_per_frame)

    @property
    def per_request(self) -> int:
        return self.max_frames * self.bytes_per_frame

    def total(self, max_num_seqs: int) -> int:
        """The cap for `max_num_seqs` requests in flight (finished ones: `RequestMemory.blocks`)."""
        return max_num_seqs * self.per_request

    def describe(self, max_num_seqs: int) -> str:
        """The line the model logs at start."""
        limits = f"--max-model-len {self.max_model_len}"
        if self.video_frames is not None:
            limits += f", {self.video_frames} frames a video (--limit-mm-per-prompt)"
        return (
            f"CrossLMM visual memory (beside the KV cache, outside --gpu-memory-utilization): "
            f"{_mib(self.bytes_per_frame)} a frame, at most {self.max_frames} frames = {_mib(self.per_request)} a "
            f"request ({limits}), {_mib(self.total(max_num_seqs))} for --max-num-seqs {max_num_seqs} requests in "
            "flight."
        )

    def refusal(self, video_frames: list[int], images: int) -> str | None:
        """Why a request with videos of `video_frames` frames and `images` images cannot be served, or None."""
        if self.video_frames is not None and any(frames > self.video_frames for frames in video_frames):
            return (
                f"CrossLMM: this request has a video of {max(video_frames)} frames, more than the {self.video_frames} "
                f"a video may have ({_mib(self.bytes_per_frame)} of visual memory a frame): send fewer frames or "
                "raise num_frames in --limit-mm-per-prompt."
            )
        frames = sum(video_frames) + images
        if frames <= self.max_frames:
            return None
        limits, option = f"--max-model-len {self.max_model_len}", "--max-model-len"
        if self.video_frames is not None:
            limits, option = f"{limits} and --limit-mm-per-prompt", f"{option} or --limit-mm-per-prompt"
        return (
            f"CrossLMM: this request has {frames} frames (videos and images together), more than the "
            f"{self.max_frames} a request may have ({self.tokens_per_frame} placeholder tokens and "
            f"{_mib(self.bytes_per_frame)} of visual memory a frame; {limits}): send fewer frames or raise {option}."
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


@dataclass
class Item:
    """One encoded video or image: its original visual tokens (frames, N, D_v); `rows` placeholder tokens."""

    tokens: torch.Tensor
    rows: int

    @property
    def memory_size(self) -> int:
        return self.tokens.shape[0] * self.tokens.shape[1]


class ItemRegistry:
    """Encoded items by id, each alive while vLLM's encoder cache keeps the embeddings it was returned in."""

    def __init__(self):
        self.items: dict[int, Item] = {}
        self.next_id = 0

    def add(self, item: Item, pooled: torch.Tensor) -> torch.Tensor:
        """Register `item`; returns its tagged pooled embeddings, which the item's entry lives as long as."""
        item_id = self.next_id
        self.next_id = (self.next_id + 1) % BASE**DIGITS
        self.items[item_id] = item
        tagged = tag(pooled, item_id)
        weakref.finalize(tagged, self.items.pop, item_id, None)
        return tagged

    def get(self, item_id: int) -> Item:
        item = self.items.get(item_id)
        if item is None:  # would mean vLLM gathered embeddings whose tensor was freed: never silently go on
            raise RuntimeError(f"CrossLMM: the original visual tokens of multimodal item {item_id} are gone.")
        return item


@dataclass
class PlacedItem:
    """An item where one request's prompt holds its placeholders. `tokens` is dropped (None) once no query of the
    request can need it any more (`RequestMemory.release_tokens`)."""

    tokens: torch.Tensor | None
    rows: int
    start: int  # position of its first placeholder token
    size: int  # memory tokens: frames x N

    @property
    def end(self) -> int:
        return self.start + self.rows - 1


@dataclass
class RequestMemory:
    """One request's videos and images in reading order, and each DCAL's T2V keys/values of all of them."""

    placed: list[PlacedItem] = field(default_factory=list)
    length: int = 0
    t2v: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)
    # The KV blocks its request held when last in a step. A block has one owner (prefix caching is off), so once
    # another request holds one of them, this request has ended: its memory is dropped. Hence the memories held,
    # finished ones included, never cover more placeholder tokens than the KV cache has slots.
    blocks: set[int] = field(default_factory=set)

    def place(self, item: Item, start: int) -> PlacedItem:
        """The item whose placeholders start at `start`, added in reading order the first time a chunk reaches it."""
        for placed in self.placed:
            if placed.start == start:
                return placed
        placed = PlacedItem(item.tokens, item.rows, start, item.memory_size)
        self.placed.append(placed)
        self.length += placed.size
        return placed

    def visible(self, position: int) -> int:
        """How many memory tokens a text token at `position` sees: those of the items that end before it."""
        return sum(placed.size for placed in self.placed if placed.end < position)

    def t2v_memory(self, layer_idx: int, project) -> tuple[torch.Tensor, torch.Tensor]:
        """The DCAL's (kv_heads, M, head_dim) keys and values of every placed item, `project`ed once per item."""
        keys, values, done = self.t2v.get(layer_idx, (None, None, 0))
        if done < len(self.placed):
            tokens = torch.cat([placed.tokens.flatten(0, 1) for placed in self.placed[done:]])
            new_keys, new_values = project(tokens)
            if keys is not None:
                new_keys, new_values = torch.cat([keys, new_keys], 1), torch.cat([values, new_values], 1)
            keys, values = new_keys, new_values
            self.t2v[layer_idx] = (keys, values, len(self.placed))
        return keys, values

    def release_tokens(self, before: int, t2v_layers: int):
        """After a step: forget the original tokens of the items that end before position `before` once all
        `t2v_layers` DCALs have projected them (no later query of the request needs them for V2V)."""
        projected = min((done for _, _, done in self.t2v.values()), default=0) if t2v_layers else len(self.placed)
        if len(self.t2v) < t2v_layers:
            projected = 0
        for placed in self.placed[:projected]:
            if placed.end < before:
                placed.tokens = None

    def nbytes(self) -> int:
        """Bytes held: the T2V keys/values and the original tokens not yet released."""
        kv = sum(k.nbytes + v.nbytes for k, v, _ in self.t2v.values())
        return kv + sum(placed.tokens.nbytes for placed in self.placed if placed.tokens is not None)


@dataclass
class V2VCall:
    """Pooled-token queries at flat `positions` attending to `tokens` (K, D_v): their video's (or frame's) tokens."""

    positions: torch.Tensor
    tokens: torch.Tensor


@dataclass
class T2VCall:
    """Text queries at flat `positions` of one request attending to a prefix of its memory: `visible` (n,) tokens
    each, or all of it when None."""

    positions: torch.Tensor
    visible: torch.Tensor | None
    memory: RequestMemory


@dataclass
class StepPlan:
    """Every DCAL call of one step, and each request's memory with the position its next step starts at."""

    v2v: list[V2VCall] = field(default_factory=list)
    t2v: list[T2VCall] = field(default_factory=list)
    requests: list[tuple[RequestMemory, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.v2v or self.t2v)
