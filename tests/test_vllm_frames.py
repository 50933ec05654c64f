"""crosslmm.vllm.frames (the vLLM plugin's pixels, made without torchvision) against CrossLMM's own video and image
processors, here where transformers has torchvision: the same frames and the same pixels, so that vLLM and
transformers see the same inputs."""

import numpy as np
import pytest
import torch

from crosslmm.samples import build_sample_video
from crosslmm.vllm.frames import frames_to_pixels, read_frames
from processing_crosslmm import CrossLMMImageProcessor
from video_processing_crosslmm import CrossLMMVideoProcessor


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return build_sample_video(tmp_path_factory.mktemp("frames") / "clip.mp4", seconds=1.0)


@pytest.mark.parametrize("sampling", [{"num_frames": 4}, {"num_frames": None, "fps": 6, "max_frames": 5}])
def test_video_pixels_are_the_video_processors(clip, sampling):
    expected = CrossLMMVideoProcessor()([str(clip)], return_tensors="pt", **sampling)["pixel_values_videos"][0]
    pixels = frames_to_pixels(read_frames(clip, **sampling), 384)
    assert pixels.shape == expected.shape
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)


def test_image_pixels_are_the_image_processors():
    image = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    expected = CrossLMMImageProcessor()(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(frames_to_pixels(image, 384), expected, atol=1e-6, rtol=0)


def test_bad_frames_are_named():
    with pytest.raises(ValueError, match=r"must be \(frames, height, width, 3\) RGB frames, got shape \(2, 5\)"):
        frames_to_pixels(np.zeros((2, 5)), 384)
