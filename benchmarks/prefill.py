"""Prefill latency, throughput and peak memory of CrossLMM against transformers' LlavaOnevisionForConditionalGeneration
built from the same vision tower and LLM sizes: random weights, same dtype and attention backend, one process.

One video of T frames and 64 text tokens; a prefill is the forward pass generation starts with (cache filled, logits of
the last position). Each model runs once untimed at each frame count, then `--repeats` timed runs (median reported).
Peak memory is what the prefill allocates above the weights and inputs already there (CUDA: max_memory_allocated;
CPU: the resident-set high-water mark; see common.peak_memory); weights are listed apart. A model
that runs out of memory is reported as OOM and the others go on.

    python benchmarks/prefill.py --size small --frames 8 16 32 64                       # CPU, float32
    python benchmarks/prefill.py --size 2b --frames 32 64 128 256 1024 --attn sdpa     # GPU, bfloat16
"""

import argparse
import statistics

import torch

from common import (
    add_model_arguments,
    free_memory,
    is_out_of_memory,
    models_from_arguments,
    peak_memory,
    print_table,
    prompt_ids,
    random_video,
    timed,
    weights_bytes,
    write_json,
)


MB = 2**20


@torch.no_grad()
def prefill(model, input_ids, video):
    return model(input_ids=input_ids, pixel_values_videos=video, use_cache=True, logits_to_keep=1)


def run(model, num_frames, device, dtype, repeats):
    """Median seconds of the timed runs and the peak memory of one more run; OOM when out of memory."""
    input_ids = prompt_ids(model.config, num_frames).to(device)
    video = random_video(model.config, num_frames, device, dtype)
    try:
        prefill(model, input_ids, video)  # warm-up: kernels chosen, caches allocated
        free_memory(device)
        timings = []
        for _ in range(repeats):
            timings.append(timed(lambda: prefill(model, input_ids, video), device)[0])
            free_memory(device)
        peak = peak_memory(lambda: prefill(model, input_ids, video), device)
        free_memory(device)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        timings = None
    if timings is None:  # out of memory: freed here, where the traceback no longer holds the activations
        free_memory(device)
        return {"llm_tokens": input_ids.shape[1], "seconds": None, "peak_mb": "OOM"}
    seconds = statistics.median(timings)
    return {
        "llm_tokens": input_ids.shape[1],
        "seconds": seconds,
        "frames_per_s": num_frames / seconds,
        "peak_mb": peak / MB,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--frames", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the numbers here too (tracked: benchmarks/prefill-<size>-<device>.json)")
    args = parser.parse_args()
    device, dtype, models = models_from_arguments(args)

    results = []
    for num_frames in args.frames:
        rows = {}
        for name, model in models.items():
            row = {"frames": num_frames, "model": name, "weights_mb": weights_bytes(model) / MB}
            rows[name] = row | run(model, num_frames, device, dtype, args.repeats)
        ours, baseline = rows.get("CrossLMM", {}), rows.get("LLaVA-OV", {})
        if ours.get("seconds") and baseline.get("seconds"):
            ours["speedup"] = baseline["seconds"] / ours["seconds"]
            ours["memory_ratio"] = ours["peak_mb"] / baseline["peak_mb"] if baseline["peak_mb"] else None
        results += list(rows.values())

    print(
        f"Prefill, {args.size}, {device.type}, {str(dtype).removeprefix('torch.')}, attention {args.attn}, "
        f"CrossLMM pool {args.pool_size} scope {args.v2v_scope}, one video + 64 text tokens\n"
    )
    columns = [
        "frames",
        "model",
        "llm_tokens",
        "seconds",
        "frames_per_s",
        "peak_mb",
        "weights_mb",
        "speedup",
        "memory_ratio",
    ]
    print_table(results, columns)
    if args.json:
        write_json(args.json, {"settings": vars(args), "rows": results})


if __name__ == "__main__":
    main()
