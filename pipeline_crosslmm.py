"""`pipeline("video-text-to-text")` for CrossLMM: videos and a question in, generated text out.

A checkpoint's `config.json` registers this class under `custom_pipelines`, and the file travels with every checkpoint
folder, so `pipeline("video-text-to-text", model=folder_or_repo, trust_remote_code=True)` works wherever the model
loads. transformers' multimodal generation pipeline (`AnyToAnyPipeline`) already does the work: chat messages or
`text=` plus `videos=`, batching, `max_new_tokens`, `return_full_text`. This class points it at video models, sends
loose frame sampling options (`num_frames`, `fps`, ...) to the processor and generation options (`do_sample`,
`num_beams`, ...) to `generate`, and names the mistake of a video without a prompt.
"""

import inspect

from transformers import AutoModelForImageTextToText, GenerationConfig, GenerationMixin
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.any_to_any import AnyToAnyPipeline


TASK = "video-text-to-text"


class CrossLMMVideoTextToTextPipeline(AnyToAnyPipeline):
    """Answer questions about videos (and images) with a CrossLMM checkpoint.

    Example:

    ```python
    >>> from transformers import pipeline

    >>> pipe = pipeline("video-text-to-text", model="path/to/crosslmm", trust_remote_code=True)
    >>> # or, with a model and its processor in memory:
    >>> # pipe = pipeline("video-text-to-text", model=model, processor=processor)
    >>> messages = [
    ...     {
    ...         "role": "user",
    ...         "content": [
    ...             {"type": "video", "path": "clip.mp4"},
    ...             {"type": "text", "text": "What happens in this video?"},
    ...         ],
    ...     }
    ... ]
    >>> pipe(text=messages, num_frames=32, max_new_tokens=64, return_full_text=False)
    >>> pipe(text="<video>\\nWhat happens?", videos="clip.mp4", fps=1.0, max_new_tokens=64)
    ```
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Batched prompts are padded on the left, so that each row's answer follows its own prompt (transformers'
        # text-generation pipeline does the same for decoder-only models).
        self.processor.tokenizer.padding_side = "left"

    def check_model_type(self, supported_models):
        # Remote-code models are in none of transformers' task tables; what this task needs is a model taking videos.
        if "video" not in getattr(self.model, "input_modalities", ()):
            raise ValueError(f"{type(self.model).__name__} does not take videos, so it cannot serve {self.task!r}.")

    def _sanitize_parameters(self, processor_kwargs=None, generate_kwargs=None, **kwargs):
        """Send loose options where they belong. Frame sampling options (`num_frames`, `fps`, `max_frames`,
        `start_time`, ...) go to the processor inside `processor_kwargs`, where both input forms read them (loose, a
        chat warns, and transformers 5.17 drops them when `processor_kwargs` is also given). Generation options
        (`do_sample`, `temperature`, `num_beams`, `streamer`, ...) go to `generate`, as in the text-generation
        pipeline; the processor would ignore them."""
        pipeline_options = set(inspect.signature(AnyToAnyPipeline._sanitize_parameters).parameters)
        video_options = set(self.processor.video_processor.valid_kwargs.__annotations__) - pipeline_options
        generation_options = set(GenerationConfig().to_dict()) | set(
            inspect.signature(GenerationMixin.generate).parameters
        )
        generation_options -= pipeline_options | {"self", "inputs", "kwargs"}
        to_processor = {name: kwargs.pop(name) for name in list(kwargs) if name in video_options}
        to_generate = {name: kwargs.pop(name) for name in list(kwargs) if name in generation_options}
        if to_processor:
            processor_kwargs = {**to_processor, **(processor_kwargs or {})}
        if to_generate:
            generate_kwargs = {**to_generate, **(generate_kwargs or {})}
        return super()._sanitize_parameters(
            processor_kwargs=processor_kwargs, generate_kwargs=generate_kwargs, **kwargs
        )

    def __call__(self, text=None, images=None, videos=None, **kwargs):
        """Chat messages (one chat or a list of chats) as `text`, or prompt string(s) with `<video>`/`<image>`
        placeholders plus `videos=` (paths or decoded frame arrays) and/or `images=`. Generation options
        (`max_new_tokens`, `do_sample`, `num_beams`, ..., or `generate_kwargs={...}`) and frame sampling options
        (`num_frames`, `fps`, ..., or `processor_kwargs={...}`) are keyword arguments."""
        if text is None:
            given = "videos" if videos is not None else "images" if images is not None else "nothing"
            raise ValueError(
                f"No prompt given (only {given}): pass chat messages as `text`, or a prompt string with one <video> "
                "(or <image>) placeholder per video (image) as `text` together with `videos=`/`images=`."
            )
        return super().__call__(text=text, images=images, videos=videos, **kwargs)


# Checkpoints loaded by name find this class through their config's `custom_pipelines`. Registering the task as well
# (once this module is imported, from a checkpoint or a checkout) lets `pipeline(TASK, model=..., processor=...)` take
# a model already in memory. A task transformers itself defines keeps precedence.
if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=CrossLMMVideoTextToTextPipeline, pt_model=AutoModelForImageTextToText, type="multimodal"
    )

__all__ = ["CrossLMMVideoTextToTextPipeline"]
