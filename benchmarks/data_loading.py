"""Training samples per second against the number of DataLoader workers: what `crosslmm-train` reads per second.

Encodes a set of 30-second 640x360 30 fps H.264 clips with PyAV (x264 `veryfast`, its default keyframe interval; in a
temporary folder, or once into `--folder`), writes a LLaVA-Video JSON file with one question per clip, and times the
real input path of `crosslmm-train`: `crosslmm.train.data.VideoChatDataset` (PyAV seek-and-decode of the sampled
frames, each resized to 384 px as it is decoded) plus the collator (chat template, placeholder expansion,
normalisation) in a torch DataLoader, for each number of workers and frames per video. The first batch (worker
start-up) is left out of the rate. Also the time one thread spends per sample on each of the two, which tells how
many workers a GPU step needs. Prints tables, and writes the numbers as JSON with `--json`.

    python benchmarks/data_loading.py [--workers 0 1 2 4] [--frames 32 64] [--samples 48] [--repeats 1]

With `--repeats N` each setting runs N times and the fastest run is kept (the machine may be shared).
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
import torch

from crosslmm.samples import build_tokenizer
from crosslmm.train.data import VideoChatDataset, load_training_data, read_sources
from crosslmm.train.trainer import CrossLMMDataCollator
from processing_crosslmm import CrossLMMImageProcessor, CrossLMMProcessor
from video_processing_crosslmm import CrossLMMVideoProcessor


def encode_clip(path: Path, seed: int, seconds: int = 30, width: int = 640, height: int = 360, fps: int = 30):
    """A clip with motion everywhere (moving gradients and a bouncing block), so that x264 cannot skip its work."""
    rng = np.random.default_rng(seed)
    x = np.arange(width)[None, :]
    y = np.arange(height)[:, None]
    speed = rng.integers(1, 6, 3)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "26"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            image = np.empty((height, width, 3), dtype=np.uint8)
            image[..., 0] = (x * speed[0] + 3 * i) % 256
            image[..., 1] = (y * speed[1] + 2 * i) % 256
            image[..., 2] = ((x + y) // 7 + speed[2] * i) % 256
            bx, by = (37 * i) % (width - 60), (23 * i) % (height - 60)
            image[by : by + 60, bx : bx + 60] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build_data(folder: Path, clips: int, samples: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(clips):
        path = folder / f"clip-{number}.mp4"
        if not path.exists():
            print(f"  encoding {path} ...", flush=True)
            partial = path.with_suffix(".partial.mp4")
            encode_clip(partial, seed=number)
            partial.rename(path)
    records = [
        {
            "id": f"sample-{number}",
            "video": f"clip-{number % clips}.mp4",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe what moves in this video."},
                {"from": "gpt", "value": "A white square bounces over moving coloured stripes. " * 4},
            ],
        }
        for number in range(samples)
    ]
    data = folder / "samples.json"
    data.write_text(json.dumps(records))
    return data


def rate(dataset, collator, workers: int, batch_size: int) -> dict:
    prefetch = 2 if workers else None
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=collator, prefetch_factor=prefetch
    )
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter()
    count = 0
    for batch in iterator:
        count += batch["input_ids"].shape[0]
    end = time.perf_counter()
    return {
        "workers": workers,
        "first_batch_s": round(first - start, 2),
        "samples": count,
        "samples_per_s": round(count / (end - first), 2),
    }


def cost_per_sample(dataset, collator, samples: int = 8) -> dict:
    """Seconds one thread spends on a sample: decoding its frames, each resized as it is decoded (the dataset), and
    preparing them (the collator: chat template, placeholder expansion, normalisation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    decode = prepare = 0.0
    try:
        for index in range(samples):
            start = time.perf_counter()
            item = dataset[index]
            middle = time.perf_counter()
            collator([item])
            decode, prepare = decode + middle - start, prepare + time.perf_counter() - middle
    finally:
        torch.set_num_threads(threads)
    return {"decode_s": round(decode / samples, 3), "prepare_s": round(prepare / samples, 3)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--folder", type=Path, help="where the clips are encoded and kept (default: a temporary folder, deleted)"
    )
    parser.add_argument("--json", type=Path, help="write the numbers here too (tracked: benchmarks/data_loading.json)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="crosslmm-data-loading-") as scratch:
        run(args, args.folder or Path(scratch))


def run(args, folder: Path):
    data_file = build_data(folder, args.clips, args.samples)
    processor = CrossLMMProcessor(
        image_processor=CrossLMMImageProcessor(),
        video_processor=CrossLMMVideoProcessor(),  # 384 px, SigLIP normalisation
        tokenizer=build_tokenizer(),
        pool_size=3,
    )
    collate_processor = CrossLMMProcessor(
        image_processor=CrossLMMImageProcessor(),
        video_processor=CrossLMMVideoProcessor(do_sample_frames=False),
        tokenizer=build_tokenizer(),
        pool_size=3,
    )
    data = load_training_data(read_sources([str(data_file)], video_folder=str(folder)))
    rows = []
    costs = {}
    for frames in args.frames:
        dataset = VideoChatDataset(data, processor, num_frames=frames)
        costs[frames] = cost_per_sample(dataset, CrossLMMDataCollator(collate_processor))
        print(f"{frames} frames, one thread, per sample: {costs[frames]}", flush=True)
        for workers in args.workers:
            runs = [
                rate(dataset, CrossLMMDataCollator(collate_processor), workers, args.batch_size)
                for _ in range(args.repeats)
            ]
            timing = max(runs, key=lambda run: run["samples_per_s"])
            row = {"num_frames": frames, **timing}
            rows.append(row)
            print(row, flush=True)

    print()
    print("| frames per video | decoding and resizing, one thread | chat template and normalising, one thread |")
    print("| --- | --- | --- |")
    for frames, cost in costs.items():
        print(f"| {frames} | {cost['decode_s']:.3f} s | {cost['prepare_s']:.3f} s |")
    print()
    print("| frames per video | DataLoader workers | samples/s | first batch |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        cells = [row["num_frames"], row["workers"], f"{row['samples_per_s']:.2f}", f"{row['first_batch_s']:.1f} s"]
        print("| " + " | ".join(map(str, cells)) + " |")
    result = {
        "clips": {"count": args.clips, "seconds": 30, "width": 640, "height": 360, "fps": 30, "codec": "h264"},
        "samples": args.samples,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "pyav": av.__version__,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        },
        "seconds_per_sample_one_thread": {str(frames): cost for frames, cost in costs.items()},
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
