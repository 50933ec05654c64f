"""Seek vs decode-all for sparse frame sampling on a long video.

Encodes a 10-minute 1280x720 30 fps H.264 MP4 with PyAV (in a temporary folder, or once into `--video`), then
times reading a few sampled frames:
- decode-all: transformers' `load_video(backend="pyav")`, which decodes every frame up to the last sampled one;
- seek: `video_processing_crosslmm.read_video`, which lists frames from the packets and seeks to the keyframe before
  each sampled frame.
Prints a table, and writes the numbers as JSON with `--json`.

    python benchmarks/video_decode.py [--video PATH] [--json benchmarks/video_decode.json] [--repeats 1]
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from video_processing_crosslmm import CrossLMMVideoProcessor, read_video


def encode_long_video(path: Path, minutes: float = 10, width: int = 1280, height: int = 720, fps: int = 30):
    """A synthetic clip with motion (a moving gradient and bars), x264 defaults apart from the `veryfast` preset."""
    container = av.open(str(path), mode="w")
    stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "28"})
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.thread_type = "AUTO"
    x = np.arange(width, dtype=np.int64)[None, :]
    y = np.arange(height, dtype=np.int64)[:, None]
    total = int(minutes * 60 * fps)
    for i in range(total):
        image = np.empty((height, width, 3), dtype=np.uint8)
        image[..., 0] = (x + 4 * i) % 256
        image[..., 1] = (y + 2 * i) % 256
        image[..., 2] = ((x // 80 + i // fps) % 2) * 200
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
        if i % (fps * 60) == 0:
            print(f"  encoding: minute {i // (fps * 60)} of {minutes:g}", flush=True)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def time_call(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--video",
        type=Path,
        help="the video to time; encoded there (and kept) if missing (default: one in a temporary folder, deleted)",
    )
    parser.add_argument("--json", type=Path, help="write the numbers here too (tracked: benchmarks/video_decode.json)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32, 64])
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="crosslmm-video-decode-") as scratch:
        run(args, args.video or Path(scratch) / "10min_720p.mp4")


def run(args, video: Path):
    if not video.exists():
        print(f"Encoding {video} (10 min, 1280x720, 30 fps, H.264) ...", flush=True)
        start = time.perf_counter()
        partial = video.with_suffix(".partial.mp4")
        encode_long_video(partial)
        partial.rename(video)
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)

    from transformers.video_utils import load_video

    processor = CrossLMMVideoProcessor()
    rows = []
    for num_frames in args.frames:
        sample = lambda metadata, n=num_frames: processor.sample_frames(metadata, num_frames=n)  # noqa: E731
        seek_s, (seek_frames, metadata) = time_call(lambda: read_video(str(video), sample), args.repeats)
        all_s, (all_frames, _) = time_call(
            lambda: load_video(str(video), num_frames=num_frames, backend="pyav"), args.repeats
        )
        rows.append(
            {
                "num_frames": num_frames,
                "seek_s": round(seek_s, 3),
                "decode_all_s": round(all_s, 3),
                "speedup": round(all_s / seek_s, 1),
                "frames_returned": [len(seek_frames), len(all_frames)],
            }
        )
        print(f"  {num_frames} frames: seek {seek_s:.2f} s, decode-all {all_s:.2f} s", flush=True)

    fps_s, (fps_frames, fps_metadata) = time_call(
        lambda: read_video(str(video), lambda metadata: processor.sample_frames(metadata, fps=1, max_frames=256)),
        args.repeats,
    )

    print(
        f"\nvideo: {video} ({metadata.total_num_frames} frames, {metadata.duration:.0f} s, "
        f"{metadata.width}x{metadata.height}, {os.path.getsize(video) / 2**20:.0f} MiB)"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, PyAV {av.__version__}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("\n| sampled frames | seek (s) | decode-all (s) | speed-up |")
    print("| ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['num_frames']} | {row['seek_s']:.2f} | {row['decode_all_s']:.2f} | {row['speedup']:.1f}x |")
    print(f"\nfps=1 capped at max_frames=256: {len(fps_frames)} frames in {fps_s:.2f} s (seek reader)")

    report = {
        "video": {
            "path": str(video),
            "frames": metadata.total_num_frames,
            "duration_s": metadata.duration,
            "width": metadata.width,
            "height": metadata.height,
            "codec": "h264",
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "pyav": av.__version__,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),  # other work on the machine skews timings
        },
        "repeats": args.repeats,
        "rows": rows,
        "fps1_max256": {"seconds": round(fps_s, 3), "frames": len(fps_frames)},
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
