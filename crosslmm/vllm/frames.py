"""Frames for CrossLMM on vLLM, without vLLM or torchvision: `read_frames` samples a video file as
`CrossLMMVideoProcessor` does (the project's PyAV reader), `frames_to_pixels` makes the SigLIP pixels the video
processor makes, in plain torch (vLLM's CPU build pins a torch for which PyPI has no CPU torchvision, which
transformers' video processors need)."""

import numpy as np
import torch


MAX_FRAMES = 256  # CrossLMMVideoProcessor's `max_frames`: the most frames a video is given


def frames_to_pixels(frames, size: int) -> torch.Tensor:
    """(T, H, W, 3) frames (uint8, or floats in 0-255 or 0-1) or one (H, W, 3) image / PIL image -> (T, 3, size,
    size) float32 SigLIP pixels: resized (bicubic, antialiased) and normalized (mean and std 0.5) as
    CrossLMMVideoProcessor and CrossLMMImageProcessor make them. uint8 frames are resized as uint8, which is what
    torchvision does on a CPU: the same pixels (tests/test_vllm_frames.py)."""
    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"A video must be (frames, height, width, 3) RGB frames, got shape {array.shape}.")
    pixels = torch.from_numpy(np.array(array)).permute(0, 3, 1, 2)  # a writable copy
    if pixels.is_floating_point() and float(pixels.max()) <= 1.0:
        pixels = pixels * 255
    if tuple(pixels.shape[-2:]) != (size, size):
        pixels = torch.nn.functional.interpolate(
            pixels.contiguous(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
        )
    return (pixels.float() / 255 - 0.5) / 0.5


def read_frames(path, num_frames: int = 32, fps: float | None = None, max_frames: int = MAX_FRAMES, **window):
    """A video file's frames sampled as CrossLMMVideoProcessor samples them (the project's PyAV reader: `num_frames`
    uniformly, or one every 1/`fps` seconds up to `max_frames`, optionally inside `start_time`/`end_time`), as
    (T, H, W, 3) uint8 for `LLM.generate({"prompt": ..., "multi_modal_data": {"video": frames}})`."""
    from video_processing_crosslmm import frame_times_of, read_video, sample_frame_indices

    def sample(metadata, **kwargs):
        return sample_frame_indices(
            metadata.total_num_frames,
            frame_times_of(metadata),
            metadata.duration,
            num_frames=num_frames,
            fps=fps,
            max_frames=max_frames,
            source=str(path),
            **window,
        )

    frames, _ = read_video(str(path), sample)
    return np.asarray(frames)
