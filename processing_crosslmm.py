"""CrossLMM processor: text, videos and images in, placeholder-expanded token ids and SigLIP pixels out.

`CrossLMMProcessor` ties the tokenizer to `CrossLMMImageProcessor` (SigLIP's, at the model's size) and
`CrossLMMVideoProcessor` (video_processing_crosslmm.py: reading, frame sampling, normalising), expands every `<video>`
placeholder to frames x pool_size**2 video tokens (each `<image>` to pool_size**2 image tokens) and carries the Qwen2
ChatML chat template with video/image content.
"""

import os

from transformers.image_utils import make_flat_list_of_images
from transformers.models.siglip.image_processing_siglip import SiglipImageProcessor
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin
from transformers.video_utils import make_batched_videos


try:  # inside a Hub repository, loaded by transformers' dynamic-module loader
    from .video_processing_crosslmm import (
        SIGLIP_MEAN,
        SIGLIP_SIZE,
        SIGLIP_STD,
        CrossLMMVideoProcessor,
        CrossLMMVideoProcessorKwargs,
        map_pixel_arrays,
        pixels_in_0_255,
    )
except ImportError:  # imported from a checkout
    from video_processing_crosslmm import (
        SIGLIP_MEAN,
        SIGLIP_SIZE,
        SIGLIP_STD,
        CrossLMMVideoProcessor,
        CrossLMMVideoProcessorKwargs,
        map_pixel_arrays,
        pixels_in_0_255,
    )


# Qwen2 ChatML. Media blocks become their placeholder followed by a newline, as in LLaVA-OneVision's prompts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif block['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif block['type'] == 'text' %}{{ block['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------------------------------
# Image processor
# --------------------------------------------------------------------------------------------------------------------


class CrossLMMImageProcessor(SiglipImageProcessor):
    """SigLIP image processor at 384 px (mean/std 0.5, bicubic): an image is a one-frame video for CrossLMM. Float
    arrays are checked and scaled as the video processor's are (`pixels_in_0_255`): floats in [0, 1] are not divided
    by 255 a second time, NaN or infinite pixels are refused."""

    size = SIGLIP_SIZE
    image_mean = SIGLIP_MEAN
    image_std = SIGLIP_STD
    model_input_names = ["pixel_values"]

    def preprocess(self, images, *args, **kwargs):
        do_rescale = self.do_rescale if kwargs.get("do_rescale") is None else kwargs["do_rescale"]
        images = map_pixel_arrays(images, lambda pixels: pixels_in_0_255(pixels, do_rescale, "An image array"))
        return super().preprocess(images, *args, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------


class CrossLMMProcessorKwargs(ProcessingKwargs, total=False):
    videos_kwargs: CrossLMMVideoProcessorKwargs
    # PyTorch tensors, batches padded: what apply_chat_template(..., return_dict=True) returns feeds the model as is.
    _defaults = {"text_kwargs": {"padding": True}, "common_kwargs": {"return_tensors": "pt"}}


class CrossLMMProcessor(ProcessorMixin):
    """Tokenizer + image and video processors. Each `<video>` in the text becomes frames x pool_size**2 video tokens
    and each `<image>` pool_size**2 image tokens, matching the pooled tokens the model puts in their place.

    Args:
        image_processor (`CrossLMMImageProcessor`), video_processor (`CrossLMMVideoProcessor`), tokenizer:
            the parts; the tokenizer must know the "<image>" and "<video>" tokens.
        chat_template (`str`, *optional*): defaults to Qwen2 ChatML with video/image content blocks.
        pool_size (`int`, defaults to 3): the model config's `pool_size` (tokens per frame = pool_size**2).
    """

    valid_processor_kwargs = CrossLMMProcessorKwargs

    def __init__(self, image_processor=None, video_processor=None, tokenizer=None, chat_template=None, pool_size=3):
        if tokenizer is None:
            raise ValueError("CrossLMMProcessor needs a tokenizer.")
        self.pool_size = int(pool_size)
        self.image_token, self.video_token = "<image>", "<video>"
        self.image_token_id = self._token_id(tokenizer, self.image_token)
        self.video_token_id = self._token_id(tokenizer, self.video_token)
        image_processor = image_processor if image_processor is not None else CrossLMMImageProcessor()
        video_processor = video_processor if video_processor is not None else CrossLMMVideoProcessor()
        chat_template = chat_template if chat_template is not None else CHAT_TEMPLATE
        super().__init__(image_processor, video_processor, tokenizer, chat_template=chat_template)

    @staticmethod
    def _token_id(tokenizer, token: str) -> int:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ValueError(f"The tokenizer has no {token!r} token; add it as a special token first.")
        return token_id

    @property
    def tokens_per_frame(self) -> int:
        return self.pool_size**2

    def num_video_tokens(self, num_frames: int) -> int:
        """Placeholder tokens a video of `num_frames` (sampled) frames takes: one per pooled token of each frame."""
        return int(num_frames) * self.tokens_per_frame

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """One placeholder per video/image, and no media without a prompt (the model could not place them)."""
        if text is None:
            if images is not None or videos is not None:
                raise ValueError(
                    "Videos or images were given without a prompt: pass text with one <video>/<image> placeholder "
                    "per video/image (or use apply_chat_template)."
                )
        else:
            texts = [text] if isinstance(text, str) else list(text)
            given = {
                "video": 0 if videos is None else len(make_batched_videos(videos)),
                "image": 0 if images is None else len(make_flat_list_of_images(images)),
            }
            for name, token in (("video", self.video_token), ("image", self.image_token)):
                placeholders = sum(sample.count(token) for sample in texts)
                if placeholders != given[name]:
                    raise ValueError(
                        f"The prompt has {placeholders} {token} placeholder(s) but {given[name]} {name}(s) were "
                        f"given: give one {name} per {token}, in the order of the placeholders."
                    )
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        if "video_num_frames" in video_inputs:
            num_frames = int(video_inputs["video_num_frames"][video_idx])
        else:
            num_frames = len(video_inputs["pixel_values_videos"][video_idx])
        return self.video_token * self.num_video_tokens(num_frames)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.tokens_per_frame

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens each image and video takes in the prompt, without processing them (for serving code).

        Args:
            image_sizes (`list[list[int]]`, *optional*): (height, width) of each image.
            video_sizes (`list[list[int]]`, *optional*): (frames, height, width) of each video, frames as sampled.

        Returns:
            `MultiModalData` with `num_image_tokens`, `num_image_patches` (one per image: no tiling) and
            `num_video_tokens`. Sizes do not matter: every frame is resized to the model's size and pooled to
            `tokens_per_frame` tokens.
        """
        data = {}
        if image_sizes is not None:
            data["num_image_tokens"] = [self.tokens_per_frame] * len(image_sizes)
            data["num_image_patches"] = [1] * len(image_sizes)
        if video_sizes is not None:
            data["num_video_tokens"] = [self.num_video_tokens(size[0]) for size in video_sizes]
        return MultiModalData(**data)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """processor_config.json, tokenizer and chat template (transformers), plus video_preprocessor_config.json and
        preprocessor_config.json so that AutoVideoProcessor/AutoImageProcessor load the parts on their own."""
        repo_id = kwargs.pop("repo_id", None)
        files = super().save_pretrained(save_directory)
        files += self.video_processor.save_pretrained(save_directory)
        files += self.image_processor.save_pretrained(save_directory)
        if push_to_hub:  # push_to_hub saves again (through this method) into a fresh folder and uploads all of it
            self.push_to_hub(repo_id or os.path.basename(os.path.normpath(save_directory)), **kwargs)
        return files


CrossLMMProcessor.register_for_auto_class("AutoProcessor")
CrossLMMImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["CrossLMMImageProcessor", "CrossLMMProcessor"]
