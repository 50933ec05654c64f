"""transformers' Auto classes pointed at this package's CrossLMM classes.

A CrossLMM checkpoint names its classes in `auto_map`, which transformers follows only with `trust_remote_code=True`,
running the copies of the model files saved in the checkpoint. `register_auto_classes()` registers the installed
classes through transformers' public registration API instead (`AutoConfig.register`, `AutoModel...register`,
`AutoProcessor.register`, ...): `AutoModelForImageTextToText.from_pretrained(folder)` and
`AutoProcessor.from_pretrained(folder)` then load any CrossLMM checkpoint with the code installed here, without
trusting the checkpoint's code. transformers prefers registered classes over a checkpoint's own code even when
`trust_remote_code=True` is passed, so a process that wants a checkpoint's own code must not call this.
"""

MODEL_TYPE = "crosslmm"


def register_auto_classes():
    """Register CrossLMM's config, models, processor, image and video processors with transformers' Auto classes
    (idempotent)."""
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoVideoProcessor,
    )

    from configuration_crosslmm import CrossLMMConfig
    from modeling_crosslmm import CrossLMMForConditionalGeneration, CrossLMMModel
    from processing_crosslmm import CrossLMMImageProcessor, CrossLMMProcessor, CrossLMMVideoProcessor

    AutoConfig.register(MODEL_TYPE, CrossLMMConfig, exist_ok=True)
    AutoModel.register(CrossLMMConfig, CrossLMMModel, exist_ok=True)
    AutoModelForImageTextToText.register(CrossLMMConfig, CrossLMMForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(CrossLMMConfig, CrossLMMProcessor, exist_ok=True)
    AutoImageProcessor.register(CrossLMMConfig, slow_image_processor_class=CrossLMMImageProcessor, exist_ok=True)
    AutoVideoProcessor.register(CrossLMMConfig, CrossLMMVideoProcessor, exist_ok=True)
