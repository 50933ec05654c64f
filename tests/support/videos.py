"""Small test videos encoded with PyAV, each frame carrying its own index so tests can tell which frames were sampled.

A frame's index is written as 8 vertical bars (bit 7 on the left), white for 1 and black for 0: wide enough to survive
lossy codecs at tiny sizes, and `read_index` decodes it back from an RGB frame.
"""

from fractions import Fraction

import av
import numpy as np


BARS = 8


def index_frame(index: int, width: int = 64, height: int = 48, alpha: bool = False) -> np.ndarray:
    """An (H, W, 3) uint8 frame showing `index` as bars; with `alpha`, (H, W, 4) with the top half fully transparent
    (so it reads as white once blended over a white background)."""
    frame = np.zeros((height, width, 4 if alpha else 3), dtype=np.uint8)
    bar = width // BARS
    for bit in range(BARS):
        if index >> (BARS - 1 - bit) & 1:
            frame[:, bit * bar : (bit + 1) * bar, :3] = 255
    if alpha:
        frame[..., 3] = 255
        frame[: height // 2, :, 3] = 0  # top half transparent
    return frame


def read_index(frame: np.ndarray) -> int:
    """Index of an (H, W, 3) frame drawn by `index_frame` (same width)."""
    bar = frame.shape[1] // BARS
    bits = [frame[:, b * bar : (b + 1) * bar].mean() > 127 for b in range(BARS)]
    return int("".join("1" if bit else "0" for bit in bits), 2)


def encode_video(
    path,
    num_frames: int = 20,
    fps: int = 10,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    width: int = 64,
    height: int = 48,
    rotation: int | None = None,
    pts_ms: list[int] | None = None,
    gray: bool = False,
    alpha: bool = False,
    options: dict | None = None,
    container_options: dict | None = None,
):
    """Encode `num_frames` index frames into `path` (container from the extension).

    `pts_ms` gives each frame's presentation time in milliseconds (variable frame rate); `rotation` writes a display
    matrix (counter-clockwise degrees, as phones record it); `gray`/`alpha` feed gray or RGBA frames; `options` go
    to the encoder and `container_options` to the muxer (e.g. {"movflags": "faststart"}: the MP4 index up front).
    """
    container = av.open(str(path), mode="w", options=container_options or {})
    stream = container.add_stream(codec, rate=fps, options=options or {})
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    if pts_ms is not None:
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
    if rotation is not None:
        stream.set_display_rotation(rotation)
    for i in range(num_frames):
        image = index_frame(i, width, height, alpha=alpha)
        if gray:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[..., 0]), format="gray")
        else:
            frame = av.VideoFrame.from_ndarray(image, format="rgba" if alpha else "rgb24")
        if pts_ms is not None:
            frame.pts = pts_ms[i]
            frame.time_base = Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def has_encoder(name: str) -> bool:
    return name in av.codecs_available


def truncate(src, dst, keep: float = 0.5):
    """Copy the first `keep` fraction of `src` to `dst` (a download cut short)."""
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return dst


def corrupt(src, dst, seed: int = 0):
    """Copy `src` to `dst` with everything after the first 2 kB replaced by random bytes (headers kept)."""
    data = bytearray(open(src, "rb").read())
    rng = np.random.default_rng(seed)
    data[2048:] = rng.integers(0, 256, len(data) - 2048, dtype=np.uint8).tobytes()
    with open(dst, "wb") as f:
        f.write(bytes(data))
    return dst


def encode_audio_only(path, seconds: float = 0.5, rate: int = 8000):
    """A WAV file: a real media file with no video stream."""
    container = av.open(str(path), mode="w")
    stream = container.add_stream("pcm_s16le", rate=rate)
    samples = (np.sin(np.arange(int(seconds * rate)) / 10) * 3000).astype(np.int16)[None]
    frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
    frame.sample_rate = rate
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def encode_empty_video(path, codec: str = "libx264"):
    """A container with a video stream but no frames in it."""
    container = av.open(str(path), mode="w")
    stream = container.add_stream(codec, rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    container.start_encoding()  # writes the header with the stream, then no packet follows
    container.close()
    return path
