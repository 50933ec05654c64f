"""vLLM's multimodal processor for CrossLMM: frames to SigLIP pixels, and each `<video>`/`<image>` placeholder of the
prompt replaced by its pooled-token placeholders (frames x pool_size**2 video tokens, pool_size**2 image tokens), as
`CrossLMMProcessor` expands them.

The pixels are made by `crosslmm.vllm.frames.frames_to_pixels` rather than by `CrossLMMProcessor` (whose video
processor needs torchvision, which vLLM's CPU environment lacks). Videos come as arrays of frames (T, H, W, 3), already
sampled: from a file, `crosslmm.vllm.frames.read_frames` samples them with the project's PyAV reader; the OpenAI
server samples `video_url`s with vLLM's own loader (`--media-io-kwargs '{"video": {"num_frames": N}}'`).
"""

from collections.abc import Mapping

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import MultiModalDataItems, VideoProcessorItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
)

from crosslmm.vllm.frames import MAX_FRAMES, frames_to_pixels
from crosslmm.vllm.memory import MemoryBudget


class CrossLMMProcessingInfo(BaseProcessingInfo):
    """What vLLM asks before processing: which modalities, and how many placeholder tokens an item may take."""

    @property
    def tokens_per_frame(self) -> int:
        return self.get_hf_config().tokens_per_frame

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.tokens_per_frame, "video": self.max_frames(seq_len, mm_counts) * self.tokens_per_frame}

    def max_frames(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        """The most frames one video may have so that every video of a prompt still fits in `seq_len` tokens."""
        videos = max(1, mm_counts.get("video", 0))
        room = seq_len - mm_counts.get("image", 0) * self.tokens_per_frame
        return max(1, min(MAX_FRAMES, room // (videos * self.tokens_per_frame)))


class CrossLMMDummyInputsBuilder(BaseDummyInputsBuilder[CrossLMMProcessingInfo]):
    """The largest inputs, for vLLM's memory profiling at start."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "<image>" * mm_counts.get("image", 0) + "<video>" * mm_counts.get("video", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_hf_config().image_size
        mm_options = mm_options or {}
        return {
            "image": self._get_dummy_images(
                width=size, height=size, num_images=mm_counts.get("image", 0), overrides=mm_options.get("image")
            ),
            "video": self._get_dummy_videos(
                width=size,
                height=size,
                num_frames=self.info.max_frames(seq_len, mm_counts),
                num_videos=mm_counts.get("video", 0),
                overrides=mm_options.get("video"),
            ),
        }


class CrossLMMMultiModalProcessor(BaseMultiModalProcessor[CrossLMMProcessingInfo]):
    """Pixels as CrossLMMProcessor makes them (`pixel_values` (images, 3, H, W), `pixel_values_videos` one
    (frames, 3, H, W) per video), and vLLM's prompt replacement of each placeholder by its pooled-token count."""

    def apply(self, inputs, timing_ctx):
        """Refuse, before any pixel is made, a request with more frames than a request's visual memory may hold
        (crosslmm.vllm.memory.MemoryBudget): vLLM answers the OpenAI server's client 400 and raises in
        `LLM.generate`."""
        items = inputs.mm_data_items
        video_frames = []
        if items.get_count("video", strict=False):
            videos = items.get_items("video", VideoProcessorItems)
            video_frames = [videos.get_num_frames(index) for index in range(len(videos))]
        budget = MemoryBudget.from_config(self.info.get_hf_config(), self.info.ctx.model_config)
        reason = budget.refusal(video_frames, items.get_count("image", strict=False))
        if reason:
            raise ValueError(reason)
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        size = self.info.get_hf_config().image_size
        data = {}
        if hf_data.get("images"):
            data["pixel_values"] = torch.cat([frames_to_pixels(image, size) for image in hf_data["images"]])
        if hf_data.get("videos"):
            videos = [video[0] if isinstance(video, tuple) else video for video in hf_data["videos"]]
            data["pixel_values_videos"] = [frames_to_pixels(video, size) for video in videos]
        return BatchFeature(data)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "pixel_values": MultiModalFieldConfig.batched("image"),
            "pixel_values_videos": MultiModalFieldConfig.batched("video"),
        }

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs, out_mm_kwargs):
        config = self.info.get_hf_config()
        per_frame = config.tokens_per_frame

        def video_tokens(item_idx: int) -> list[int]:
            frames = mm_items.get_items("video", VideoProcessorItems).get_num_frames(item_idx)
            return [config.video_token_id] * (frames * per_frame)

        return [
            PromptReplacement(
                modality="image", target=[config.image_token_id], replacement=[config.image_token_id] * per_frame
            ),
            PromptReplacement(modality="video", target=[config.video_token_id], replacement=video_tokens),
        ]
