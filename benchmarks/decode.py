"""Decode speed and cache memory of CrossLMM against transformers' LlavaOnevisionForConditionalGeneration built from
the same vision tower and LLM sizes: random weights, same dtype and attention backend, one process.

After a prefill of one video of T frames and 64 text tokens, `--new-tokens` greedy decode steps run one token at a
time on the cache (a plain loop, the same for both models, so that only the models differ). Reported: decode tokens/s
(median over `--repeats`), the cache the prefill left (CrossLMM: pooled-token KV cache plus each DCAL's K/V of the
original visual tokens; LLaVA-OV: the KV cache of all its visual tokens) and the peak memory of the decode steps above
it; weights listed apart. A model that runs out of memory is reported as OOM and the others go on.

    python benchmarks/decode.py --size small --frames 8 16 32 64                    # CPU, float32
    python benchmarks/decode.py --size 2b --frames 32 64 128 256 1024              # GPU, bfloat16
"""

import argparse
import copy
import statistics

import torch

from common import (
    CACHE_ARG,
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
def decode(model, cache, token, steps):
    """`steps` greedy steps from `token`, growing `cache`."""
    for _ in range(steps):
        logits = model(input_ids=token, use_cache=True, **{CACHE_ARG: cache}).logits
        token = logits[:, -1:].argmax(-1)
    return token


def cache_bytes(cache):
    """Self-attention keys/values and, for CrossLMM, each DCAL's keys/values of the original visual tokens."""
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    tensors += [t for keys_values in getattr(cache, "visual_memory", {}).values() for t in keys_values]
    return sum(t.numel() * t.element_size() for t in tensors)


def run(model, num_frames, device, dtype, new_tokens, repeats):
    input_ids = prompt_ids(model.config, num_frames).to(device)
    video = random_video(model.config, num_frames, device, dtype)
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, pixel_values_videos=video, use_cache=True, logits_to_keep=1)
        cache, token = getattr(out, CACHE_ARG), out.logits[:, -1:].argmax(-1)
        del out, video
        free_memory(device)
        size = cache_bytes(cache)
        decode(model, copy.deepcopy(cache), token, 2)  # warm-up
        timings = []
        for _ in range(repeats):  # each from the prefill's cache, copied outside the timed region
            fresh = copy.deepcopy(cache)
            timings.append(timed(lambda fresh=fresh: decode(model, fresh, token, new_tokens), device)[0])
            del fresh
        fresh = copy.deepcopy(cache)
        peak = peak_memory(lambda: decode(model, fresh, token, new_tokens), device)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        timings = None
    if timings is None:  # out of memory: freed here, where the traceback no longer holds the activations
        free_memory(device)
        return {"context_tokens": input_ids.shape[1], "tokens_per_s": None, "cache_mb": "OOM"}
    return {
        "context_tokens": input_ids.shape[1],
        "tokens_per_s": new_tokens / statistics.median(timings),
        "cache_mb": size / MB,
        "decode_peak_mb": peak / MB,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--frames", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the numbers here too (tracked: benchmarks/decode-<size>-<device>.json)")
    args = parser.parse_args()
    device, dtype, models = models_from_arguments(args)

    results = []
    for num_frames in args.frames:
        rows = {}
        for name, model in models.items():
            row = {"frames": num_frames, "model": name, "weights_mb": weights_bytes(model) / MB}
            rows[name] = row | run(model, num_frames, device, dtype, args.new_tokens, args.repeats)
        ours, baseline = rows.get("CrossLMM", {}), rows.get("LLaVA-OV", {})
        if ours.get("tokens_per_s") and baseline.get("tokens_per_s"):
            ours["speedup"] = ours["tokens_per_s"] / baseline["tokens_per_s"]
            ours["cache_ratio"] = ours["cache_mb"] / baseline["cache_mb"]  # the caches are never empty
        results += list(rows.values())

    print(
        f"Decode ({args.new_tokens} tokens), {args.size}, {device.type}, {str(dtype).removeprefix('torch.')}, "
        f"attention {args.attn}, CrossLMM pool {args.pool_size} scope {args.v2v_scope}, one video + 64 text tokens\n"
    )
    columns = [
        "frames",
        "model",
        "context_tokens",
        "tokens_per_s",
        "cache_mb",
        "decode_peak_mb",
        "weights_mb",
        "speedup",
        "cache_ratio",
    ]
    print_table(results, columns)
    if args.json:
        write_json(args.json, {"settings": vars(args), "rows": results})


if __name__ == "__main__":
    main()
