"""vLLM's renderer for CrossLMM (the `crosslmm` tokenizer mode: the Hugging Face tokenizer and vLLM's HfRenderer),
which refuses a prompt whose `<video>`/`<image>` tokens came without their videos and images.

vLLM hands a prompt without media straight to the engine as text (its multimodal processor only sees prompts that
come with media), so the placeholders would run as plain tokens and the DCALs would see no video: a plausible, wrong
answer. The renderer is the one place every prompt passes before the engine (`LLM.generate` and the OpenAI server
alike) where a refusal reaches the client as an error (a 400) rather than stopping the engine. crosslmm.vllm.config
selects the mode for CrossLMM checkpoints.
"""

from vllm.renderers.hf import HfRenderer


class CrossLMMRenderer(HfRenderer):
    """HfRenderer, and a one-line refusal of placeholder tokens that no video or image fills."""

    def process_for_engine(self, prompt, arrival_time, **kwargs):
        engine_input = super().process_for_engine(prompt, arrival_time, **kwargs)
        self.refuse_unfilled_placeholders(engine_input)
        return engine_input

    async def process_for_engine_async(self, prompt, arrival_time, **kwargs):
        engine_input = await super().process_for_engine_async(prompt, arrival_time, **kwargs)
        self.refuse_unfilled_placeholders(engine_input)
        return engine_input

    def refuse_unfilled_placeholders(self, engine_input) -> None:
        """Raise when a `<video>`/`<image>` token of the prompt is outside every placeholder range the multimodal
        processor made for the request's media (all of them, for a prompt without media)."""
        config = self.model_config.hf_config
        placeholders = {config.video_token_id: "<video>", config.image_token_id: "<image>"}
        token_ids = engine_input.get("prompt_token_ids") or []
        filled = set()
        for ranges in (engine_input.get("mm_placeholders") or {}).values():
            for placeholder in ranges:
                filled.update(range(placeholder.offset, placeholder.offset + placeholder.length))
        unfilled = [
            placeholders[token]
            for position, token in enumerate(token_ids)
            if token in placeholders and position not in filled
        ]
        if unfilled:
            raise ValueError(
                f"CrossLMM: the prompt holds {len(unfilled)} {'/'.join(sorted(set(unfilled)))} token(s) that no video "
                "or image fills: send one video or image per placeholder (multi_modal_data, or video_url/image_url "
                "content), or take the placeholders out of the text."
            )
