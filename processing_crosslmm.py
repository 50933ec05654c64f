"""CrossLMM processors: frames in, placeholder-expanded token ids and SigLIP pixels out.

`CrossLMMVideoProcessor` decodes and samples videos with PyAV and normalises frames for the SigLIP tower;
`CrossLMMImageProcessor` does the same for images; `CrossLMMProcessor` ties both to the tokenizer, expands every
`<video>` placeholder to frames x pool_size**2 video tokens (each `<image>` to pool_size**2 image tokens) and carries
the Qwen2 ChatML chat template with video/image content.

Videos are read with PyAV on top of what transformers offers: the base video processor decodes paths with torchcodec
only, and transformers' PyAV reader decodes every frame up to the last sampled one and trusts the container's frame
count (0 for WebM). So this file lists the frames from the packets (exact timestamps, also for variable frame rate),
seeks to the keyframe before each sampled frame, applies rotation metadata and blends alpha over white.
"""

import base64
import binascii
import io
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import BatchFeature
from transformers.image_utils import PILImageResampling, make_flat_list_of_images
from transformers.models.siglip.image_processing_siglip import SiglipImageProcessor
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, VideosKwargs
from transformers.utils import logging
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata, get_video_size, make_batched_metadata, make_batched_videos


try:
    import av
except ImportError:  # only needed to read video files
    av = None


logger = logging.get_logger(__name__)

# SigLIP at 384 px, as LLaVA-OneVision feeds it: mean/std 0.5, bicubic resize to a square.
SIGLIP_SIZE = {"height": 384, "width": 384}
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]

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


class VideoLoadError(ValueError):
    """A video file that cannot be used: not a video, corrupt or truncated, or without a decodable frame."""


# --------------------------------------------------------------------------------------------------------------------
# Reading videos
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CrossLMMVideoMetadata(VideoMetadata):
    """transformers' `VideoMetadata` plus what the sampler and the caller need to know.

    `frames_timestamps` are the sampled frames' presentation times in seconds from the first frame (from the pts, so
    right for variable frame rate); `requested_num_frames` is how many frames were asked for, more than
    `len(frames_indices)` when the video (or the time window) is shorter; `rotation` is the counter-clockwise rotation
    applied from the file's display matrix. `frame_times` (every frame's time) is only used while sampling.
    """

    source: str | None = None
    frames_timestamps: list[float] | None = None
    requested_num_frames: int | None = None
    rotation: int = 0
    start_time: float | None = None
    end_time: float | None = None
    frame_times: list[float] | None = field(default=None, repr=False)

    @property
    def timestamps(self) -> list[float]:
        if self.frames_timestamps is not None:
            return self.frames_timestamps
        return super().timestamps


def _source_name(video: str) -> str:
    """How messages and metadata name a video: its path or URL; a `data:` URL by its media type and size only."""
    if video.startswith("data:"):
        header, _, payload = video.partition(",")
        media_type = header[len("data:") :].split(";")[0] or "no media type"
        return f"the data: URL ({media_type}, {len(payload)} characters)"
    return video


def _data_url_bytes(video: str) -> bytes:
    """The bytes of a `data:[<media type>][;base64],<data>` URL (RFC 2397), as OpenAI-style clients send files."""
    header, comma, payload = video.partition(",")
    if not comma:
        raise VideoLoadError(f"{_source_name(video)} is malformed: no ',' separates its header from its data.")
    if not header.endswith(";base64"):
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise VideoLoadError(f"{_source_name(video)} does not hold valid base64 data ({error}).") from None


def _open_container(video: str):
    """Open a local path, an http(s)/file URL or a base64 `data:` URL with PyAV; one clear error for each way it can
    fail."""
    if av is None:
        raise ImportError("Reading video files needs PyAV: pip install av")
    if not isinstance(video, (str, os.PathLike)):
        raise TypeError(f"A video must be a file path, a URL or an array of frames, got {type(video).__name__}.")
    video = os.fspath(video)
    # A file:// URL is read as the file it names (seekable, not copied into memory).
    path = urllib.request.url2pathname(urllib.parse.urlparse(video).path) if video.startswith("file://") else video
    if video.startswith("data:"):
        source = io.BytesIO(_data_url_bytes(video))
    elif "://" in path:
        with urllib.request.urlopen(video) as response:
            source = io.BytesIO(response.read())
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"Video file not found: {video}")
    else:
        source = path
    try:
        return av.open(source)
    except av.FFmpegError as error:
        raise VideoLoadError(
            f"{_source_name(video)} is not a video PyAV can read (unknown format, or a corrupt/truncated file): "
            f"{error}"
        ) from None


def _list_frames(container, stream, video: str):
    """Presentation timestamps (stream time base) and keyframe flags of every frame, in presentation order, read from
    the packets without decoding them."""
    packets = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is not None:
                packets.append((pts, packet.is_keyframe, packet.duration or 0))
    except av.FFmpegError as error:
        raise VideoLoadError(f"{video} is corrupt or truncated (reading its packets failed: {error})") from None
    if not packets:
        raise VideoLoadError(f"{video} has no decodable video frames (an empty stream, or a corrupt file).")
    if stream.frames and len(packets) < stream.frames:
        raise VideoLoadError(
            f"{video} is truncated or corrupt: its header lists {stream.frames} frames but only {len(packets)} are "
            "in the file."
        )
    packets.sort()
    return packets


def _to_rgb(frame) -> np.ndarray:
    """(H, W, 3) uint8 RGB with the display rotation applied; gray converts, alpha is blended over white."""
    if any(component.is_alpha for component in frame.format.components):
        rgba = frame.to_ndarray(format="rgba").astype(np.float32)
        alpha = rgba[..., 3:] / 255.0
        image = (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    else:
        image = frame.to_ndarray(format="rgb24")
    quarter_turns = round((frame.rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(image, k=quarter_turns)) if quarter_turns else image


def _decoded_frames(container, stream, wanted: set):
    """Frames decoded from the current position on. Packets of frames nobody asked for are decoded with
    `skip_frame="NONREF"`: frames no other frame refers to (most B-frames) are then skipped, not decoded."""
    codec = stream.codec_context
    for packet in container.demux(stream):
        codec.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in wanted else "NONREF"
        yield from codec.decode(packet)


def _decode_at(container, stream, targets: list[int], keyframes: list[int], video: str) -> list:
    """Decode the frames whose pts are `targets` (ascending). Seeks to the keyframe before a target only when that
    keyframe lies past the current position, so dense samples decode straight through and sparse ones skip ahead."""
    frames, position, decoder, wanted = [], None, None, set(targets)
    try:
        for target in targets:
            keyframe = keyframes[np.searchsorted(keyframes, target, side="right") - 1]
            if decoder is None or position is None or keyframe > position:
                container.seek(keyframe, stream=stream, backward=True)
                decoder = _decoded_frames(container, stream, wanted)
            for frame in decoder:
                if frame.pts is None:
                    continue
                position = frame.pts
                if frame.pts >= target:
                    frames.append(frame)
                    break
            else:
                break  # the decoder ran dry before this target
    except av.FFmpegError as error:
        raise VideoLoadError(f"{video} is corrupt or truncated (decoding failed: {error})") from None
    if not frames:
        raise VideoLoadError(f"{video} has no decodable video frames (an empty stream, or a corrupt file).")
    if len(frames) < len(targets):
        raise VideoLoadError(
            f"{video} is truncated or corrupt: only {len(frames)} of the {len(targets)} sampled frames decode."
        )
    return frames


def read_video(video: str, sample_indices_fn=None) -> tuple[np.ndarray, CrossLMMVideoMetadata]:
    """Decode the frames `sample_indices_fn(metadata=...)` picks (all frames without it) from a file, a URL or a
    `data:` URL.

    Returns (T, H, W, 3) uint8 RGB frames and their `CrossLMMVideoMetadata`.
    """
    container = _open_container(video)
    video = _source_name(os.fspath(video))  # what messages and the metadata call it
    with container:
        if not container.streams.video:
            raise VideoLoadError(f"{video} has no video stream.")
        stream = container.streams.video[0]
        packets = _list_frames(container, stream, video)
        time_base = float(stream.time_base)
        first_pts = packets[0][0]
        frame_times = [(pts - first_pts) * time_base for pts, _, _ in packets]
        last_duration = packets[-1][2] * time_base or (frame_times[-1] / (len(packets) - 1) if len(packets) > 1 else 0)
        duration = frame_times[-1] + last_duration
        average_rate = float(stream.average_rate) if stream.average_rate else None
        metadata = CrossLMMVideoMetadata(
            total_num_frames=len(packets),
            fps=average_rate or (len(packets) / duration if duration else None),
            width=stream.width,
            height=stream.height,
            duration=round(duration, 6),
            video_backend="pyav",
            source=str(video),
            frame_times=frame_times,
        )
        indices = np.arange(len(packets)) if sample_indices_fn is None else sample_indices_fn(metadata=metadata)
        indices = [int(i) for i in indices]
        keyframes = [pts for pts, is_keyframe, _ in packets if is_keyframe] or [first_pts]
        frames = _decode_at(container, stream, [packets[i][0] for i in indices], keyframes, video)
        images = [_to_rgb(frame) for frame in frames]
    if len({image.shape for image in images}) > 1:  # resolution changes mid-stream: bring frames to the first size
        height, width = images[0].shape[:2]
        images = [
            av.VideoFrame.from_ndarray(image, format="rgb24").reformat(width, height).to_ndarray() for image in images
        ]
    metadata.frames_indices = indices
    metadata.frames_timestamps = [round(frame_times[i], 6) for i in indices]
    metadata.rotation = round((frames[0].rotation or 0) / 90) % 4 * 90
    metadata.height, metadata.width = images[0].shape[:2]
    metadata.frame_times = None
    return np.stack(images), metadata


# --------------------------------------------------------------------------------------------------------------------
# Video and image processors
# --------------------------------------------------------------------------------------------------------------------


class CrossLMMVideosKwargs(VideosKwargs, total=False):
    """Sampling options on top of transformers' `num_frames`/`fps`: `max_frames` caps `fps` sampling and
    `start_time`/`end_time` (seconds) restrict sampling to a window of the video."""

    max_frames: int | None
    start_time: int | float | None
    end_time: int | float | None


class CrossLMMVideoProcessor(BaseVideoProcessor):
    """SigLIP-normalised frames for CrossLMM. Samples `num_frames` frames uniformly over the video (or the
    `start_time`/`end_time` window), or, when `fps` is set, one frame every 1/fps seconds capped at `max_frames`."""

    resample = PILImageResampling.BICUBIC
    image_mean = SIGLIP_MEAN
    image_std = SIGLIP_STD
    size = SIGLIP_SIZE
    rescale_factor = 1 / 255
    default_to_square = False
    crop_size = None
    do_resize = True
    do_center_crop = None
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_sample_frames = True
    num_frames = 32
    fps = None
    max_frames = 256
    start_time = None
    end_time = None
    valid_kwargs = CrossLMMVideosKwargs
    model_input_names = ["pixel_values_videos", "video_num_frames"]

    def sample_frames(
        self,
        metadata: VideoMetadata,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        start_time: float | None = None,
        end_time: float | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Indices of the frames to keep. `fps`, when set, takes precedence over `num_frames`. A video with fewer
        frames than asked gives all of its frames (`metadata.requested_num_frames` keeps the number asked)."""
        num_frames = self.num_frames if num_frames is None else num_frames
        max_frames = self.max_frames if max_frames is None else max_frames
        for name, value in (("num_frames", num_frames), ("fps", fps), ("max_frames", max_frames)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        source = f"{metadata.source}: " if getattr(metadata, "source", None) else ""

        frame_times = getattr(metadata, "frame_times", None)
        if frame_times is None and metadata.fps:
            frame_times = [i / metadata.fps for i in range(metadata.total_num_frames)]
        windowed = start_time is not None or end_time is not None
        if frame_times is None and (windowed or fps is not None):
            raise ValueError(
                f"{source}sampling by time (fps, start_time, end_time) needs the video's frame rate; pass "
                "video_metadata with fps, or sample with num_frames."
            )

        candidates = np.arange(metadata.total_num_frames)
        if windowed:
            duration = metadata.duration if metadata.duration else frame_times[-1] + 1 / metadata.fps
            start = 0.0 if start_time is None else float(start_time)
            end = duration if end_time is None else float(end_time)
            if start < 0 or end <= start or start >= duration:
                raise ValueError(
                    f"{source}the time window start_time={start_time}, end_time={end_time} is outside the video "
                    f"(0 to {duration:.3f} s) or empty."
                )
            times = np.asarray(frame_times)
            candidates = candidates[(times >= start) & (times < end)]
            if len(candidates) == 0:
                raise ValueError(f"{source}no frame lies in the time window {start}-{end} s.")
            if isinstance(metadata, CrossLMMVideoMetadata):
                metadata.start_time, metadata.end_time = start, min(end, duration)

        if fps is not None:
            times = np.asarray(frame_times)[candidates]
            targets = np.arange(times[0], times[-1] + 1e-9, 1.0 / fps)
            # The frame nearest to each target time (frames may be unevenly spaced: variable frame rate).
            after = np.clip(np.searchsorted(times, targets), 1, len(times) - 1) if len(times) > 1 else np.zeros(1, int)
            before = np.maximum(after - 1, 0)
            nearest = np.where(np.abs(times[before] - targets) <= np.abs(times[after] - targets), before, after)
            picked = np.unique(nearest)
            wanted = len(targets)
            if len(picked) > max_frames:
                picked = picked[np.linspace(0, len(picked) - 1, max_frames).round().astype(int)]
                wanted = max_frames
            indices = candidates[picked]
        else:
            wanted = int(num_frames)
            # np.linspace over [first, last] includes both ends, as LLaVA-NeXT/OneVision sample.
            positions = np.linspace(0, len(candidates) - 1, min(wanted, len(candidates))).round().astype(int)
            indices = candidates[np.unique(positions)]
        if len(indices) < wanted:
            logger.warning_once(
                f"{source}the video has {len(indices)} frames to sample from, fewer than the {wanted} asked; "
                "using all of them."
            )
        if isinstance(metadata, CrossLMMVideoMetadata):
            metadata.requested_num_frames = wanted
        return indices

    def _decode_and_sample_videos(self, videos, video_metadata, do_sample_frames=None, sample_indices_fn=None):
        """Paths and URLs are read with `read_video` (transformers' default reader needs torchcodec); arrays of frames
        are sampled in memory. Both may be mixed in one batch, as chat messages mix them."""
        videos = make_batched_videos(videos)
        if video_metadata is None:
            video_metadata = [None] * len(videos)
        else:
            video_metadata = make_batched_metadata(videos, video_metadata)
        sample_indices_fn = sample_indices_fn if do_sample_frames else None
        out_videos, out_metadata = [], []
        for video, metadata in zip(videos, video_metadata):
            if isinstance(video, (str, os.PathLike)):
                video, metadata = read_video(video, sample_indices_fn)
            else:
                if len(video) == 0:
                    raise ValueError("A video given as an array of frames has no frames.")
                if metadata is None:
                    height, width = get_video_size(video)
                    metadata = CrossLMMVideoMetadata(total_num_frames=len(video), height=height, width=width)
                indices = list(range(len(video)))
                if sample_indices_fn is not None:
                    indices = [int(i) for i in sample_indices_fn(metadata=metadata)]
                    video = video[indices]
                metadata.frames_indices = indices
            out_videos.append(video)
            out_metadata.append(metadata)
        return out_videos, out_metadata

    def _preprocess(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        """transformers' resize/rescale/normalise, then the layout CrossLMM takes: (V, T, 3, H, W) when every video
        has T frames, otherwise zero-padded to the longest with `video_num_frames` (V,)."""
        clips = super()._preprocess(videos, return_tensors=None, **kwargs)["pixel_values_videos"]
        if return_tensors is None:
            return BatchFeature({"pixel_values_videos": clips})
        counts = [clip.shape[0] for clip in clips]
        if len(set(counts)) == 1:
            return BatchFeature({"pixel_values_videos": torch.stack(clips)}, tensor_type=return_tensors)
        padded = clips[0].new_zeros((len(clips), max(counts), *clips[0].shape[1:]))
        for i, clip in enumerate(clips):
            padded[i, : clip.shape[0]] = clip
        data = {"pixel_values_videos": padded, "video_num_frames": torch.tensor(counts)}
        return BatchFeature(data, tensor_type=return_tensors)


class CrossLMMImageProcessor(SiglipImageProcessor):
    """SigLIP image processor at 384 px (mean/std 0.5, bicubic): an image is a one-frame video for CrossLMM."""

    size = SIGLIP_SIZE
    image_mean = SIGLIP_MEAN
    image_std = SIGLIP_STD
    model_input_names = ["pixel_values"]


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------


class CrossLMMProcessorKwargs(ProcessingKwargs, total=False):
    videos_kwargs: CrossLMMVideosKwargs
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
        return self.video_token * (num_frames * self.tokens_per_frame)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.tokens_per_frame

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
CrossLMMVideoProcessor.register_for_auto_class("AutoVideoProcessor")
CrossLMMImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "CrossLMMImageProcessor",
    "CrossLMMProcessor",
    "CrossLMMVideoMetadata",
    "CrossLMMVideoProcessor",
    "VideoLoadError",
    "read_video",
]
