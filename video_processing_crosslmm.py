"""CrossLMM video processor: video files and frame arrays in, SigLIP-normalised frames out.

Three parts, each with one job:

- `read_video` is the reader. It lists every frame of a file from its packets (exact presentation times, also for
  variable frame rate) into a `CrossLMMVideoMetadata`, asks a sampler which frames to keep, and decodes only those:
  it seeks to the keyframe before each, applies rotation metadata and blends alpha over white.
- `sample_frame_indices` is the sampler: a function of the frames' times and the sampling options that returns the
  indices to keep (uniformly, or at a rate, optionally inside a time window), plus how many frames were asked for.
- `CrossLMMVideoProcessor` (transformers' `BaseVideoProcessor`) ties them together and resizes and normalises the
  frames for the SigLIP tower.

Videos are read with PyAV on top of what transformers offers: the base video processor decodes paths with torchcodec
only, and transformers' PyAV reader decodes every frame up to the last sampled one and trusts the container's frame
count (0 for WebM).
"""

import base64
import binascii
import contextlib
import contextvars
import io
import math
import os
import re
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import BatchFeature
from transformers.image_processing_utils import get_size_dict
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import VideosKwargs
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


class VideoLoadError(ValueError):
    """A video file that cannot be used: not a video, corrupt or truncated, or without a decodable frame."""


# --------------------------------------------------------------------------------------------------------------------
# Metadata: what the reader knows about a video, and which of its frames were sampled
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class CrossLMMVideoMetadata(VideoMetadata):
    """transformers' `VideoMetadata` plus what the reader lists and what the caller needs to know.

    `frame_times` are the presentation times, in seconds from the first frame, of every frame of the video (from the
    pts, so right for variable frame rate), listed by the reader; `timestamps` are those of the sampled frames.
    `requested_num_frames` is how many frames were asked for, more than `len(frames_indices)` when the video (or the
    time window) is shorter; `start_time`/`end_time` the time window sampled (clipped to the video); `rotation` the
    counter-clockwise rotation applied from the file's display matrix.
    """

    source: str | None = None
    frame_times: list[float] | None = field(default=None, repr=False)
    requested_num_frames: int | None = None
    rotation: int = 0
    start_time: float | None = None
    end_time: float | None = None

    @property
    def timestamps(self) -> list[float]:
        if self.frame_times is not None and self.frames_indices is not None:
            return [round(self.frame_times[i], 6) for i in self.frames_indices]
        return super().timestamps


def frame_times_of(metadata: VideoMetadata) -> list[float] | None:
    """Every frame's time in seconds: as the reader listed them, or from the frame rate of metadata given with an
    array of frames; None when neither is known."""
    times = getattr(metadata, "frame_times", None)
    if times is None and metadata.fps:
        times = [i / metadata.fps for i in range(metadata.total_num_frames)]
    return times


# --------------------------------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameSelection:
    """What the sampler picked: frame `indices` (ascending), how many frames the options asked for, and the time
    window sampled (None: the whole video)."""

    indices: list[int]
    requested_num_frames: int
    start_time: float | None = None
    end_time: float | None = None

    # A sequence of its indices, as transformers' samplers return them, for code that takes indices.
    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)

    def __getitem__(self, item):
        return self.indices[item]


def sample_frame_indices(
    num_total: int,
    frame_times: list[float] | None = None,
    duration: float | None = None,
    num_frames: int | None = 32,
    fps: float | None = None,
    max_frames: int | None = 256,
    start_time: float | None = None,
    end_time: float | None = None,
    source: str | None = None,
) -> FrameSelection:
    """Which of `num_total` frames to keep. Uniformly `num_frames` over the video (or the `start_time`/`end_time`
    window), first and last included as LLaVA-NeXT/OneVision sample; or, when `fps` is set (it takes precedence), the
    frame nearest to every 1/fps seconds. Either way at most `max_frames` (spread evenly; a `num_frames` above it is
    lowered to it, with a warning), and never more than the frames that exist: the work is bounded by the video, not
    by the numbers asked (an `fps` of 1e10 over a 10^9-second gap costs what the frames cost). Sampling by time
    needs `frame_times` (every frame's time in seconds). A video with fewer frames than asked gives all of its frames,
    with a warning.
    """
    for name, value in (("num_frames", num_frames), ("fps", fps), ("max_frames", max_frames)):
        finite = isinstance(value, (int, float, np.number)) and math.isfinite(value)
        if value is not None and not (finite and value > 0):
            raise ValueError(f"{name} must be a finite positive number, got {value!r}.")
    prefix = f"{source}: " if source else ""
    windowed = start_time is not None or end_time is not None
    if frame_times is None and (windowed or fps is not None):
        raise ValueError(
            f"{prefix}sampling by time (fps, start_time, end_time) needs the video's frame rate; pass "
            "video_metadata with fps, or sample with num_frames."
        )

    candidates = np.arange(num_total)
    window = (None, None)
    if windowed:
        times = np.asarray(frame_times)
        if not duration:
            duration = times[-1] + (times[-1] - times[-2] if len(times) > 1 else 0)
        start = 0.0 if start_time is None else float(start_time)
        end = duration if end_time is None else float(end_time)
        if start < 0 or end <= start or start >= duration:
            raise ValueError(
                f"{prefix}the time window start_time={start_time}, end_time={end_time} is outside the video "
                f"(0 to {duration:.3f} s) or empty."
            )
        candidates = candidates[(times >= start) & (times < end)]
        if len(candidates) == 0:
            raise ValueError(f"{prefix}no frame lies in the time window {start}-{end} s.")
        window = (start, min(end, duration))

    if fps is not None:
        picked, wanted = _nearest_to_rate(np.asarray(frame_times, dtype=np.float64)[candidates], float(fps))
        if max_frames is not None:
            wanted = min(wanted, int(max_frames))
            if len(picked) > max_frames:
                picked = picked[np.linspace(0, len(picked) - 1, int(max_frames)).round().astype(int)]
        indices = candidates[picked]
    else:
        wanted = int(num_frames)
        if max_frames is not None and wanted > max_frames:
            logger.warning_once(
                f"{prefix}num_frames={wanted} is above max_frames={int(max_frames)}: sampling {int(max_frames)} "
                "frames (raise max_frames to sample more)."
            )
            wanted = int(max_frames)
        positions = np.linspace(0, len(candidates) - 1, min(wanted, len(candidates))).round().astype(int)
        indices = candidates[np.unique(positions)]
    if len(indices) < wanted:
        logger.warning_once(
            f"{prefix}the video has {len(indices)} frames to sample from, fewer than the {wanted} asked; using all "
            "of them."
        )
    return FrameSelection([int(i) for i in indices], wanted, *window)


# Up to this many target times (or this many per frame) are laid out one by one; beyond, the frames are picked
# from the targets' count per frame, so that the work follows the frames that exist and not the rate asked.
_EXPLICIT_TARGETS = 4096


def _nearest_to_rate(times: np.ndarray, fps: float) -> tuple[np.ndarray, int]:
    """The positions in `times` (ascending seconds) of the frames nearest to the times t0, t0 + 1/fps, ... up to the
    last frame (unique, ascending), and how many such target times there are (at most 2**62)."""
    step = 1.0 / fps
    with np.errstate(over="ignore"):  # a rate of 1e300 makes infinitely many targets: that is fine below
        count = np.ceil((float(times[-1] - times[0]) + 1e-9) / step)
        if count <= max(_EXPLICIT_TARGETS, 4 * len(times)):
            targets = np.arange(times[0], times[-1] + 1e-9, step)
            # The frame nearest to each target time (frames may be unevenly spaced: variable frame rate).
            after = np.clip(np.searchsorted(times, targets), 1, len(times) - 1) if len(times) > 1 else np.zeros(1, int)
            before = np.maximum(after - 1, 0)
            nearest = np.where(np.abs(times[before] - targets) <= np.abs(times[after] - targets), before, after)
            return np.unique(nearest), len(targets)
        # Frame i is the nearest to the targets in (midpoint(i-1, i), midpoint(i, i+1)]: it is picked when a target
        # t0 + k * step (0 <= k < count) lies there. O(frames), whatever the rate or the gaps between frames.
        middles = (times[:-1] + times[1:]) / 2 - times[0]
        first = np.maximum(np.floor(np.concatenate([[-np.inf], middles]) / step) + 1, 0)
        last = np.minimum(np.floor(np.concatenate([middles, [np.inf]]) / step), count - 1)
    return np.flatnonzero(first <= last), int(min(count, 2**62))


# --------------------------------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------------------------------


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
    elif os.path.isdir(path):
        raise IsADirectoryError(f"{video} is a directory, not a video file.")
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


@contextlib.contextmanager
def _ffmpeg_errors():
    """The messages FFmpeg logs at level ERROR (or worse) in this thread while the block runs, as (level, name,
    message). PyAV drops FFmpeg's log unless a level is set, and drops a message identical to the one before (the
    same damage in a second file would go unseen), so both settings are changed for as long as any thread is inside
    this block, and put back after; PyAV's capture is per thread."""
    logging_ = getattr(av, "logging", None)
    if logging_ is None or not hasattr(logging_, "Capture") or not hasattr(logging_, "set_skip_repeated"):
        yield []
        return
    with _log_settings["lock"]:
        if _log_settings["users"] == 0:
            _log_settings["before"] = (logging_.get_level(), logging_.get_skip_repeated())
            level = _log_settings["before"][0]
            logging_.set_level(logging_.ERROR if level is None else max(level, logging_.ERROR))
            logging_.set_skip_repeated(False)
        _log_settings["users"] += 1
    try:
        with logging_.Capture() as logs:
            yield logs
    finally:
        with _log_settings["lock"]:
            _log_settings["users"] -= 1
            if _log_settings["users"] == 0:
                level, skip_repeated = _log_settings["before"]
                logging_.set_level(level)
                logging_.set_skip_repeated(skip_repeated)


_log_settings = {"lock": threading.Lock(), "users": 0, "before": None}


def _tag_seconds(value) -> float | None:
    """Seconds of a Matroska DURATION tag ("HH:MM:SS.nnnnnnnnn"), None when absent or unreadable."""
    match = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d*)?)\s*", str(value or ""))
    if not match:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _header_frames_and_seconds(container, stream) -> tuple[int | None, float | None]:
    """What the file's header says the video stream holds: a frame count (MP4/MOV/AVI headers, Matroska's
    NUMBER_OF_FRAMES tag) and a duration in seconds (the stream's, Matroska's per-track DURATION tag, or the
    container's when the video is its only stream). None where the header says nothing."""
    tags = {key.upper(): value for key, value in (stream.metadata or {}).items()}
    frames = stream.frames or None
    if frames is None and str(tags.get("NUMBER_OF_FRAMES", "")).strip().isdigit():
        frames = int(tags["NUMBER_OF_FRAMES"])
    seconds = None
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    if seconds is None:
        seconds = _tag_seconds(tags.get("DURATION"))
    if seconds is None and container.duration and len(container.streams) == 1:
        seconds = container.duration / 1e6  # microseconds (av.time_base)
    return frames, seconds


def _list_frames(container, stream, video: str, logs: list):
    """Presentation timestamps (stream time base), keyframe flags and durations of every frame, in presentation
    order, read from the packets without decoding them. Fails when the file holds less than its header says (a
    truncated download) or when the demuxer reported damage while the file was opened and listed (`logs`, from
    `_ffmpeg_errors`: corrupt bytes it skipped, and the frames in them): what is listed is then not the whole video."""
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
    packets.sort()
    header_frames, header_seconds = _header_frames_and_seconds(container, stream)
    if header_frames and len(packets) < header_frames:
        raise VideoLoadError(
            f"{video} is truncated or corrupt: its header lists {header_frames} frames but only {len(packets)} are "
            "in the file."
        )
    if header_seconds and not stream.frames:  # MP4/MOV/AVI: the exact frame count above is the check
        time_base = float(stream.time_base)
        first, last = packets[0][0], packets[-1][0]
        listed = (last - first + packets[-1][2]) * time_base
        slack = 0.5 + 2 * (last - first) * time_base / max(len(packets) - 1, 1) + max(first, 0) * time_base
        if listed + slack < header_seconds:
            raise VideoLoadError(
                f"{video} is truncated or corrupt: its header says {header_seconds:.3f} s but only {listed:.3f} s "
                "of frames are in the file."
            )
    demuxer = container.format.name
    damage = [message.strip() for level, name, message in logs if level <= av.logging.ERROR and name == demuxer]
    if damage:
        raise VideoLoadError(
            f"{video} is corrupt or truncated: reading it, the {demuxer} demuxer reported {len(damage)} error(s), "
            f"frames are missing (first: {damage[0]})."
        )
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


def _decode_at(container, stream, targets: list[int], keyframes: list[int], video: str, convert) -> list:
    """`convert(frame)` of each frame whose pts is in `targets` (ascending), converted as soon as it is decoded so
    that no more than one decoded frame is held at full size. Seeks to the keyframe before a target only when that
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
                    frames.append(convert(frame))
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


def _record_selection(metadata: VideoMetadata, selection) -> list[int]:
    """The indices of `selection` (a `FrameSelection` or plain indices), noted in `metadata` with what was asked."""
    if isinstance(selection, FrameSelection):
        if isinstance(metadata, CrossLMMVideoMetadata):
            metadata.requested_num_frames = selection.requested_num_frames
            metadata.start_time, metadata.end_time = selection.start_time, selection.end_time
        selection = selection.indices
    indices = [int(i) for i in selection]
    metadata.frames_indices = indices
    return indices


def read_video(video: str, sample_indices_fn=None, frame_transform=None) -> tuple[np.ndarray, CrossLMMVideoMetadata]:
    """Decode the frames `sample_indices_fn(metadata=...)` picks (all frames without it) from a file, a URL or a
    `data:` URL.

    The sampler gets the reader's `CrossLMMVideoMetadata` (every frame's time in `frame_times`) and returns frame
    indices, or a `FrameSelection`. `frame_transform`, if given, is applied to each frame ((H, W, 3) uint8 RGB) as
    soon as it is decoded and must return an (h, w, 3) uint8 array: the video processor passes its own resize, so
    that a 4K video never holds its sampled frames at full size. Returns (T, h, w, 3) uint8 RGB frames and the
    metadata, with the sampled `frames_indices` (its `width`/`height` are the video's, as displayed).
    """
    # The demuxer's complaints are captured from the moment the file is opened: probing it reads packets ahead.
    with _ffmpeg_errors() as demuxer_logs, _open_container(video) as container:
        video = _source_name(os.fspath(video))  # what messages and the metadata call it
        if not container.streams.video:
            raise VideoLoadError(f"{video} has no video stream.")
        stream = container.streams.video[0]
        packets = _list_frames(container, stream, video, demuxer_logs)
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
        selection = range(len(packets)) if sample_indices_fn is None else sample_indices_fn(metadata=metadata)
        indices = _record_selection(metadata, selection)
        keyframes = [pts for pts, is_keyframe, _ in packets if is_keyframe] or [first_pts]
        shown = {}  # the first frame's rotation and displayed size

        def convert(frame):
            image = _to_rgb(frame)
            shown.setdefault("rotation", round((frame.rotation or 0) / 90) % 4 * 90)
            shown.setdefault("size", image.shape[:2])
            return image if frame_transform is None else frame_transform(image)

        images = _decode_at(container, stream, [packets[i][0] for i in indices], keyframes, video, convert)
    if len({image.shape for image in images}) > 1:  # resolution changes mid-stream: bring frames to the first size
        height, width = images[0].shape[:2]
        images = [
            av.VideoFrame.from_ndarray(image, format="rgb24").reformat(width, height).to_ndarray() for image in images
        ]
    metadata.rotation = shown["rotation"]
    metadata.height, metadata.width = shown["size"]
    return np.stack(images), metadata


# --------------------------------------------------------------------------------------------------------------------
# Pixel values given as arrays
# --------------------------------------------------------------------------------------------------------------------


def pixels_in_0_255(pixels, do_rescale: bool, what: str):
    """`pixels` (an array or tensor of frames or an image) in the 0-255 scale the processors rescale by 1/255.

    Integer pixels are taken as 0-255. Float pixels: NaN or infinite values are refused; pixels all within [0, 1]
    are taken as already scaled to [0, 1] (as transformers' image processors detect them) and multiplied by 255
    instead of being divided by 255 again into an all-black input, with a warning; float pixels with negative values
    and none above 1 look normalized already and are refused (the processor would normalize them a second time);
    other floats are taken as 0-255. With `do_rescale=False` the caller has scaled the pixels: they pass as given.
    """
    if isinstance(pixels, torch.Tensor):
        if not pixels.is_floating_point() or pixels.numel() == 0:
            return pixels
        finite = bool(torch.isfinite(pixels).all())
        low, high = (float(pixels.min()), float(pixels.max())) if finite else (0.0, 0.0)
    elif isinstance(pixels, np.ndarray):
        if not np.issubdtype(pixels.dtype, np.floating) or pixels.size == 0:
            return pixels
        finite = bool(np.isfinite(pixels).all())
        low, high = (float(pixels.min()), float(pixels.max())) if finite else (0.0, 0.0)
    else:
        return pixels
    if not finite:
        raise ValueError(f"{what} holds NaN or infinite pixel values.")
    if not do_rescale:
        return pixels
    if low < 0 and high <= 1:
        raise ValueError(
            f"{what} has float pixels in [{low:.3g}, {high:.3g}]: normalized already? Give pixels in 0-255 (uint8 "
            "or float) or floats in [0, 1]; or pass do_rescale=False and do_normalize=False."
        )
    if high <= 1:
        logger.warning_once(
            f"{what} has float pixels in [0, 1]: taken as scaled to [0, 1] already (not divided by 255 again). "
            "Give uint8 pixels in 0-255 to silence this, or do_rescale=False to use the values as they are."
        )
        return pixels * 255
    return pixels


def map_pixel_arrays(inputs, function):
    """`function` applied to every array or tensor inside (nested lists/tuples of) images or videos."""
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(map_pixel_arrays(item, function) for item in inputs)
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        return function(inputs)
    return inputs


# The options of the `preprocess` call in progress (per thread and task): how `_decode_and_sample_videos`, which
# transformers calls without them, resizes decoded frames and scales arrays of frames.
_CALL_OPTIONS = contextvars.ContextVar("crosslmm_video_call_options", default=None)


# --------------------------------------------------------------------------------------------------------------------
# The video processor
# --------------------------------------------------------------------------------------------------------------------


class CrossLMMVideoProcessorKwargs(VideosKwargs, total=False):
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
    valid_kwargs = CrossLMMVideoProcessorKwargs
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
    ) -> FrameSelection:
        """The frames `sample_frame_indices` keeps, with this processor's defaults for the options not given."""
        return sample_frame_indices(
            metadata.total_num_frames,
            frame_times_of(metadata),
            metadata.duration,
            num_frames=self.num_frames if num_frames is None else num_frames,
            fps=fps,
            max_frames=self.max_frames if max_frames is None else max_frames,
            start_time=start_time,
            end_time=end_time,
            source=getattr(metadata, "source", None),
        )

    def frame_resizer(self, do_resize=None, size=None, resample=None):
        """This processor's resize of one decoded frame ((H, W, 3) uint8 in, (h, w, 3) uint8 out), for
        `read_video(..., frame_transform=...)`: exactly what `preprocess` does to each frame (the same torchvision
        call, frame by frame instead of on the stacked video, which gives the same pixels), so that frames need not
        be held at full size until all are decoded; `preprocess` then finds them at their size and leaves them as
        they are. None when the options do not resize."""
        if not (self.do_resize if do_resize is None else do_resize):
            return None
        size = SizeDict(**get_size_dict(size or self.size, default_to_square=self.default_to_square))
        resample = self.resample if resample is None else resample

        def resize(image: np.ndarray) -> np.ndarray:
            frame = torch.from_numpy(image).permute(2, 0, 1).contiguous()[None]
            return self.resize(frame, size=size, resample=resample)[0].permute(1, 2, 0).numpy()

        return resize

    def preprocess(self, videos, **kwargs) -> BatchFeature:
        """transformers' `preprocess`, with decoded frames resized as they are decoded (see `frame_resizer`) and
        float arrays of frames checked and scaled (see `pixels_in_0_255`)."""
        options = {
            "resize": self.frame_resizer(kwargs.get("do_resize"), kwargs.get("size"), kwargs.get("resample")),
            "do_rescale": self.do_rescale if kwargs.get("do_rescale") is None else kwargs["do_rescale"],
        }
        token = _CALL_OPTIONS.set(options)
        try:
            return super().preprocess(videos, **kwargs)
        finally:
            _CALL_OPTIONS.reset(token)

    def _decode_and_sample_videos(self, videos, video_metadata, do_sample_frames=None, sample_indices_fn=None):
        """Paths and URLs are read with `read_video` (transformers' default reader needs torchcodec), each frame
        resized as it is decoded; arrays of frames are sampled in memory, then checked and brought to 0-255. Both
        may be mixed in one batch, as chat messages mix them."""
        options = _CALL_OPTIONS.get() or {"resize": None, "do_rescale": self.do_rescale}
        videos = make_batched_videos(videos)
        if video_metadata is None:
            video_metadata = [None] * len(videos)
        else:
            video_metadata = make_batched_metadata(videos, video_metadata)
        sample_indices_fn = sample_indices_fn if do_sample_frames else None
        out_videos, out_metadata = [], []
        for number, (video, metadata) in enumerate(zip(videos, video_metadata)):
            if isinstance(video, (str, os.PathLike)):
                video, metadata = read_video(video, sample_indices_fn, frame_transform=options["resize"])
            else:
                if len(video) == 0:
                    raise ValueError("A video given as an array of frames has no frames.")
                if metadata is None:
                    height, width = get_video_size(video)
                    metadata = CrossLMMVideoMetadata(total_num_frames=len(video), height=height, width=width)
                elif metadata.total_num_frames != len(video):
                    raise ValueError(
                        f"video_metadata of video {number} says {metadata.total_num_frames} frames, but the array "
                        f"has {len(video)}."
                    )
                if sample_indices_fn is None:
                    _record_selection(metadata, range(len(video)))
                else:
                    video = video[_record_selection(metadata, sample_indices_fn(metadata=metadata))]
                video = pixels_in_0_255(video, options["do_rescale"], f"Video {number} (an array of frames)")
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


CrossLMMVideoProcessor.register_for_auto_class("AutoVideoProcessor")

__all__ = [
    "CrossLMMVideoMetadata",
    "CrossLMMVideoProcessor",
    "CrossLMMVideoProcessorKwargs",
    "FrameSelection",
    "VideoLoadError",
    "map_pixel_arrays",
    "pixels_in_0_255",
    "read_video",
    "sample_frame_indices",
]
