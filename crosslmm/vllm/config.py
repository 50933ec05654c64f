"""What vLLM may and may not do with CrossLMM, settled once when the engine's config is made.

CrossLMM's DCALs read each request's visual memory, which the model keeps per request outside vLLM's paged KV cache
(crosslmm.vllm.memory). Features that skip or replay the model's forward pass for some tokens would leave that memory
incomplete and answer wrongly without an error, so they are refused here with one line, or turned off where vLLM
turns them on by default:

- prefix caching (on by default): a request that reuses another's cached blocks never runs the tokens of the shared
  prefix, so the videos in it never reach its memory. Turned off, with a warning.
- CUDA graphs and torch.compile of the whole model: the model plans each step on the host from the batch's requests,
  which a captured graph would replay unchanged. The model runs eagerly (`enforce_eager`), with a warning.
- speculative decoding, prompt embeddings and image/video embeddings (embeddings without pixels, so the DCALs would
  see no video): refused.
- the tokenizer mode is set to `crosslmm` (the Hugging Face tokenizer; its renderer, crosslmm.vllm.renderer, refuses
  a prompt whose `<video>`/`<image>` tokens came without media).
"""

import logging

from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig


logger = logging.getLogger("crosslmm.vllm")
TOKENIZER_MODE = "crosslmm"  # registered by crosslmm.vllm.register


class CrossLMMVerifyAndUpdateConfig(VerifyAndUpdateConfig):
    """vLLM's per-architecture config hook (`MODELS_CONFIG_MAP`), run as the engine's config is made."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        if vllm_config.speculative_config is not None:
            raise ValueError(
                "CrossLMM on vLLM does not support speculative decoding: drop --speculative-config "
                "(the draft's tokens would skip the DCALs' per-request visual memory)."
            )
        model_config = vllm_config.model_config
        if getattr(model_config, "enable_prompt_embeds", False):
            raise ValueError(
                "CrossLMM on vLLM does not take prompt embeddings (--enable-prompt-embeds): embeddings without pixels "
                "never reach the DCALs; send the videos and images themselves."
            )
        if model_config.multimodal_config is not None and model_config.multimodal_config.enable_mm_embeds:
            raise ValueError(
                "CrossLMM on vLLM does not take image or video embeddings (--enable-mm-embeds): the DCALs need each "
                "item's original visual tokens; send the videos and images themselves."
            )
        if model_config.tokenizer_mode in ("auto", "hf"):
            model_config.tokenizer_mode = TOKENIZER_MODE  # the HF tokenizer, and placeholders without media refused
        if vllm_config.cache_config.enable_prefix_caching:
            vllm_config.cache_config.enable_prefix_caching = False
            logger.warning(
                "CrossLMM: prefix caching turned off (a reused prefix would skip the videos in it, which the DCALs "
                "keep per request)."
            )
        if not model_config.enforce_eager:
            model_config.enforce_eager = True
            logger.warning(
                "CrossLMM: running eagerly (--enforce-eager): each step is planned per request on the host."
            )


def register_config_hook():
    """Put the hook under CrossLMM's architecture name (idempotent)."""
    MODELS_CONFIG_MAP["CrossLMMForConditionalGeneration"] = CrossLMMVerifyAndUpdateConfig
