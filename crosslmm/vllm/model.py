"""CrossLMM as a native vLLM model: vLLM's SigLIP tower and Qwen2 decoder layers (paged self-attention), CrossLMM's
pooler and projector, and the DCALs, each request's visual memory kept per request (crosslmm.vllm.memory).

The math is modeling_crosslmm.py's, token for token: V2V lets each pooled token attend to the original tokens of its
own video (or frame, `v2v_scope="frame"`), T2V lets each text token attend to the original tokens of the videos and
images that end before it, each branch pre-norm and tanh-gated into the residual stream, then a gated MLP at the
positions that attended to something; no V2V after the last decoder layer. Weights load from the checkpoint's own
safetensors names.
"""

from collections.abc import Iterable

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.siglip import SiglipVisionTransformer
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from crosslmm.vllm.memory import Item, ItemRegistry, MemoryBudget, RequestMemory, StepPlan, T2VCall, V2VCall, untag
from crosslmm.vllm.processing import CrossLMMDummyInputsBuilder, CrossLMMMultiModalProcessor, CrossLMMProcessingInfo
from modeling_crosslmm import CrossLMMMultiModalProjector, CrossLMMPooler


logger = init_logger("vllm.crosslmm")  # under vLLM's logger, which prints INFO lines


class CrossAttention(nn.Module):
    """Queries from the LLM width, keys/values from the original visual tokens, grouped-query heads."""

    def __init__(self, config):
        super().__init__()
        text = config.text_config
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.num_heads, self.num_kv_heads = text.num_attention_heads, text.num_key_value_heads
        vision_dim = config.vision_config.hidden_size
        self.q_proj = nn.Linear(text.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(vision_dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(vision_dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, text.hidden_size, bias=False)

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, D_v) original tokens -> keys, values (kv_heads, M, head_dim)."""
        tokens = tokens.to(self.k_proj.weight.dtype)
        shape = (tokens.shape[0], self.num_kv_heads, self.head_dim)
        keys = self.k_proj(tokens).view(shape).transpose(0, 1).contiguous()
        return keys, self.v_proj(tokens).view(shape).transpose(0, 1).contiguous()

    def forward(self, queries, keys, values, visible: torch.Tensor | None = None) -> torch.Tensor:
        """(n, D) queries against (kv_heads, M, head_dim) keys/values, query `i` seeing the first `visible[i]` keys
        (all when None). The query heads of each key/value head are folded into its queries, as in
        modeling_crosslmm.py."""
        n = queries.shape[0]
        groups = self.num_heads // self.num_kv_heads
        query_states = self.q_proj(queries).view(n, self.num_heads, self.head_dim).transpose(0, 1)
        query_states = query_states.reshape(self.num_kv_heads, groups * n, self.head_dim)
        mask = None
        if visible is not None:
            mask = torch.arange(keys.shape[1], device=keys.device) < visible.to(keys.device)[:, None]
            mask = mask.repeat(groups, 1)
        output = nn.functional.scaled_dot_product_attention(query_states, keys, values, attn_mask=mask)
        output = output.view(self.num_kv_heads, groups, n, self.head_dim).permute(2, 0, 1, 3).reshape(n, -1)
        return self.o_proj(output)


class DualCrossAttentionLayer(nn.Module):
    """DCAL: V2V and T2V, each pre-norm and tanh-gated into the residual stream, then the gated MLP at the positions
    that attended to something. Runs a `StepPlan`; parameter names are the checkpoint's."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        text = config.text_config
        self.layer_idx = layer_idx
        self.use_v2v = layer_idx in config.v2v_layer_indices
        self.use_t2v = config.use_t2v
        self.v2v_norm = Qwen2RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.v2v_attn = CrossAttention(config)
        self.v2v_gate = nn.Parameter(torch.zeros(1))
        self.t2v_norm = Qwen2RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.t2v_attn = CrossAttention(config)
        self.t2v_gate = nn.Parameter(torch.zeros(1))
        self.mlp = None
        if config.cross_attention_mlp:
            self.mlp_norm = Qwen2RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
            self.mlp = Qwen2MLP(text)
            self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden_states: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """(tokens, D) hidden states of the whole step -> the same after this DCAL."""
        attended = []
        if self.use_v2v:
            for call in plan.v2v:
                keys, values = self.v2v_attn.project(call.tokens)
                hidden_states = self._gated(hidden_states, "v2v", call.positions, keys, values, None)
                attended.append(call.positions)
        if self.use_t2v:
            for call in plan.t2v:
                keys, values = call.memory.t2v_memory(self.layer_idx, self.t2v_attn.project)
                hidden_states = self._gated(hidden_states, "t2v", call.positions, keys, values, call.visible)
                attended.append(call.positions)
        if self.mlp is not None and attended:
            positions = torch.cat(attended).to(hidden_states.device)
            update = torch.tanh(self.mlp_gate) * self.mlp(self.mlp_norm(hidden_states[positions]))
            hidden_states = hidden_states.index_add(0, positions, update.to(hidden_states.dtype))
        return hidden_states

    def _gated(self, hidden_states, branch, positions, keys, values, visible):
        norm, attention, gate = (getattr(self, f"{branch}_{part}") for part in ("norm", "attn", "gate"))
        positions = positions.to(hidden_states.device)
        out = torch.tanh(gate) * attention(norm(hidden_states[positions]), keys, values, visible)
        return hidden_states.index_add(0, positions, out.to(hidden_states.dtype))


class CrossLMMInner(nn.Module):
    """`model.*` of the checkpoint: vision tower, projector, Qwen2 decoder and the DCALs."""

    def __init__(self, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        config = vllm_config.model_config.hf_config
        if config.vision_config.model_type != "siglip_vision_model":
            raise ValueError(
                f"crosslmm's vLLM model supports SigLIP vision towers, not {config.vision_config.model_type}."
            )
        self.vision_tower = SiglipVisionTransformer(
            config.vision_config,
            vllm_config.quant_config,
            num_hidden_layers_override=config.vision_layers_run,
            require_post_norm=False,
            use_head=False,
            prefix=f"{prefix}.vision_tower",
        )
        self.pooler = CrossLMMPooler(config)  # the same modules as modeling_crosslmm.py's (the pooler has no weights)
        self.multi_modal_projector = CrossLMMMultiModalProjector(config)
        self.language_model = Qwen2Model(vllm_config=vllm_config, prefix=f"{prefix}.language_model")
        self.cross_attention_layers = nn.ModuleDict(
            {str(idx): DualCrossAttentionLayer(config, idx) for idx in config.dcal_layer_indices}
        )


@MULTIMODAL_REGISTRY.register_processor(
    CrossLMMMultiModalProcessor, info=CrossLMMProcessingInfo, dummy_inputs=CrossLMMDummyInputsBuilder
)
class CrossLMMForConditionalGeneration(nn.Module, SupportsMultiModal):
    """The class vLLM runs for `architectures: ["CrossLMMForConditionalGeneration"]` with the plugin installed."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        if modality.startswith("video"):
            return "<video>"
        raise ValueError(f"CrossLMM takes videos and images, not {modality}.")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        text = config.text_config
        self.model = CrossLMMInner(vllm_config, maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings or text.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.language_model.embed_tokens)
        self.logits_processor = LogitsProcessor(text.vocab_size)
        self.items = ItemRegistry()
        self.requests: dict[int, RequestMemory] = {}
        self._step_visual = None  # (flat positions, item ids, rows) of this step's visual tokens, for forward
        self._attention_layer = self.model.language_model.layers[0].self_attn.attn.layer_name
        self._block_size = vllm_config.cache_config.block_size
        self.budget = MemoryBudget.from_config(config, vllm_config.model_config)
        logger.info(self.budget.describe(vllm_config.scheduler_config.max_num_seqs))

    def get_language_model(self) -> nn.Module:
        return self.model.language_model

    # ---- vision -----------------------------------------------------------------------------------------------

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Each video's and image's pooled, projected tokens (tagged with the item's id, see memory.tag), its
        original tokens kept in `self.items` for the DCALs."""
        clips = []
        videos = kwargs.get("pixel_values_videos")
        if videos is not None:
            clips += list(videos)
        images = kwargs.get("pixel_values")
        if images is not None:
            clips += [image[None] for image in images]
        embeddings = []
        for frames in clips:
            original = self._original_tokens(frames)
            pooled = self._pool(original)
            item = Item(original, pooled.shape[0])
            embeddings.append(self.items.add(item, pooled))
        return embeddings

    def _original_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """(F, 3, H, W) -> (F, N, D_v): the tower's hidden states at `vision_feature_layer`, `vision_batch_size`
        frames at a time."""
        tower = self.model.vision_tower
        frames = frames.to(tower.dtype)
        chunks = [tower(chunk) for chunk in frames.split(self.config.vision_batch_size)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def _pool(self, original: torch.Tensor) -> torch.Tensor:
        """(F, N, D_v) -> (F * pool_size**2, D): CrossLMMPooler then the projector."""
        pooled = self.model.pooler(original)
        projector = self.model.multi_modal_projector
        return projector(pooled.to(projector.linear_1.weight.dtype)).flatten(0, 1)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None) -> torch.Tensor:
        """Token embeddings with the pooled tokens in place of their placeholders; remembers, for this step's
        `forward`, which flat positions hold which item's rows."""
        embeddings = self.model.language_model.embed_input_ids(input_ids)
        self._step_visual = None
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return embeddings
        pooled, item_ids, rows = untag(torch.cat(list(multimodal_embeddings)))
        positions = is_multimodal.to(embeddings.device).nonzero().flatten()
        embeddings = embeddings.index_put((positions,), pooled.to(embeddings.dtype))
        self._step_visual = (positions.cpu().tolist(), item_ids, rows)
        return embeddings

    # ---- the step ---------------------------------------------------------------------------------------------

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs) -> torch.Tensor:
        language_model = self.model.language_model
        if inputs_embeds is None:
            inputs_embeds = language_model.embed_input_ids(input_ids)
        plan = self._plan(positions, inputs_embeds.shape[0])
        hidden_states, residual = inputs_embeds, None
        dcals = self.model.cross_attention_layers
        for idx, layer in enumerate(language_model.layers):
            hidden_states, residual = layer(positions, hidden_states, residual)
            if plan and str(idx) in dcals:  # the DCAL reads and writes the whole residual stream
                hidden_states, residual = dcals[str(idx)](hidden_states + residual, plan), None
        t2v_layers = len(dcals) if self.config.use_t2v else 0
        for memory, next_position in plan.requests:
            memory.release_tokens(next_position, t2v_layers)
        if residual is None:
            return language_model.norm(hidden_states)
        hidden_states, _ = language_model.norm(hidden_states, residual)
        return hidden_states

    def _plan(self, positions: torch.Tensor, num_tokens: int) -> StepPlan:
        """Where every DCAL query of this step looks, worked out on the host from the batch's requests (the
        attention metadata: each request's tokens and first KV block) and from what `embed_input_ids` saw."""
        step_visual, self._step_visual = self._step_visual, None
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(self._attention_layer)
        if metadata is None:  # a profiling or warm-up pass: no requests
            return StepPlan()
        starts = metadata.query_start_loc.cpu().tolist()
        num_reqs = len(starts) - 1
        seq_lens = metadata.seq_lens[:num_reqs].cpu().tolist()
        block_table = metadata.block_table[:num_reqs].cpu()
        positions_host = positions[:num_tokens].cpu().tolist()

        visual = {}  # flat position -> (item, row)
        if step_visual is not None:
            for index, item_id, row in zip(*step_visual):
                visual[index] = (self.items.get(item_id), row)

        blocks = [row[: -(-seq_len // self._block_size)] for row, seq_len in zip(block_table.tolist(), seq_lens)]
        self._drop_finished(blocks)
        plan = StepPlan()
        for request, (start, end) in enumerate(zip(starts, starts[1:])):
            if end <= start:
                continue
            key = blocks[request][0]
            if seq_lens[request] - (end - start) == 0:  # its first chunk
                self.requests[key] = RequestMemory()
            memory = self.requests.setdefault(key, RequestMemory())
            memory.blocks.update(blocks[request])
            self._plan_request(plan, memory, range(start, end), positions_host, visual)
            plan.requests.append((memory, positions_host[end - 1] + 1))
        return plan

    def _plan_request(self, plan: StepPlan, memory: RequestMemory, flat: range, positions: list, visual: dict):
        """One request's V2V and T2V calls of this step."""
        per_frame = self.config.tokens_per_frame
        v2v = {}  # placed item start -> (placed, [(flat, row)])
        text, visible = [], []
        for index in flat:
            position = positions[index]
            if index in visual:
                item, row = visual[index]
                placed = memory.place(item, position - row)
                v2v.setdefault(placed.start, (placed, []))[1].append((index, row))
            else:
                text.append(index)
        for index in text:
            visible.append(memory.visible(positions[index]))
        for placed, queries in v2v.values():
            if self.config.v2v_scope == "frame":
                by_frame = {}
                for index, row in queries:
                    by_frame.setdefault(row // per_frame, []).append(index)
                for frame, indices in by_frame.items():
                    plan.v2v.append(V2VCall(torch.tensor(indices), placed.tokens[frame]))
            else:
                indices = torch.tensor([index for index, _ in queries])
                plan.v2v.append(V2VCall(indices, placed.tokens.reshape(-1, placed.tokens.shape[-1])))
        seen = [(index, n) for index, n in zip(text, visible) if n > 0]
        if seen and self.config.use_t2v:
            counts = torch.tensor([n for _, n in seen])
            full = bool((counts == memory.length).all())
            plan.t2v.append(T2VCall(torch.tensor([index for index, _ in seen]), None if full else counts, memory))

    def _drop_finished(self, blocks: list[list[int]]):
        """Forget the memories of finished requests: those holding a block that a request of this step (`blocks`: each
        one's KV blocks, its first one its key) now holds (a block has one owner: prefix caching is off)."""
        owner = {block: row[0] for row in blocks for block in row}
        for key, memory in list(self.requests.items()):
            if any(owner.get(block, key) != key for block in memory.blocks):
                del self.requests[key]

    def visual_memory_bytes(self) -> int:
        """Bytes the visual memory holds now: every request's (crosslmm.vllm.memory.RequestMemory.nbytes) and the
        encoded items vLLM's encoder cache still holds."""
        items = sum(item.tokens.nbytes for item in self.items.items.values())
        return items + sum(memory.nbytes() for memory in self.requests.values())

    # ---- logits and weights -----------------------------------------------------------------------------------

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The LM head's logits; the placeholder tokens are never generated (modeling_crosslmm.py saves them as
        `suppress_tokens`)."""
        logits = self.logits_processor(self.lm_head, hidden_states)
        if logits is not None:
            logits[..., [self.config.image_token_id, self.config.video_token_id]] = float("-inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tied = self.config.tie_word_embeddings or self.config.text_config.tie_word_embeddings
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=["lm_head."] if tied else None)
        return loader.load_weights(weights)
