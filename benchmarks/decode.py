"""Decode speed and cache memory of CrossLMM against transformers' LlavaOnevisionForConditionalGeneration built from
the same vision tower and LLM sizes: random weights, same dtype and attention backend, one process.

After a prefill of one video of T frames and 64 text tokens, `--new-tokens` greedy decode steps run one token at a
time on the cache (a plain loop, the same for both models, so that only the models differ). Reported: decode tokens/s
(median over `--repeats`, the models taking turns, and the fastest repeat, the least disturbed on a shared machine;
`spread`: (slowest - fastest) / median), the cache the prefill left (CrossLMM: pooled-token KV cache plus each DCAL's
K/V of the original visual tokens; LLaVA-OV: the KV cache of all its visual tokens) and the peak memory of the decode
steps above it; weights listed apart. A model that runs out of memory is reported as OOM and the others go on.

    python benchmarks/decode.py --size small --frames 8 16 32 64                    # CPU, float32
    python benchmarks/decode.py --size small --llm-layers 24 --profile              # 6 DCALs; where a step goes
    python benchmarks/decode.py --size small --frames 8 16 --no-dcal-mlp            # what the DCALs' MLP costs
    python benchmarks/decode.py --size 2b --frames 32 64 128 256 1024              # GPU, bfloat16
"""

import argparse
import copy
import statistics
import time

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
from modeling_crosslmm import CrossLMMCrossAttention


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


def prefill(model, num_frames, device, dtype):
    """(context tokens, cache, first token) after one video of `num_frames` and the prompt's text; None on OOM."""
    input_ids = prompt_ids(model.config, num_frames).to(device)
    video = random_video(model.config, num_frames, device, dtype)
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, pixel_values_videos=video, use_cache=True, logits_to_keep=1)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        out = None
    if out is None:  # out of memory: freed here, where the traceback no longer holds the activations
        free_memory(device)
        return input_ids.shape[1], None, None
    cache, token = getattr(out, CACHE_ARG), out.logits[:, -1:].argmax(-1)
    del out, video
    free_memory(device)
    return input_ids.shape[1], cache, token


def measure(models, num_frames, device, dtype, new_tokens, repeats):
    """Each model's row at one frame count. The models take turns, repeat after repeat, so that other work on a
    shared machine slows both alike; each repeat decodes from a copy of the prefill's cache made outside the timed
    region."""
    prefilled = {name: prefill(model, num_frames, device, dtype) for name, model in models.items()}
    rows = {
        name: {"frames": num_frames, "model": name, "context_tokens": context, "weights_mb": weights_bytes(model) / MB}
        for (name, model), (context, _, _) in zip(models.items(), prefilled.values())
    }
    ready = {name: (cache, token) for name, (_, cache, token) in prefilled.items() if cache is not None}
    for name in set(models) - set(ready):
        rows[name] |= {"tokens_per_s": None, "cache_mb": "OOM"}
    timings = {name: [] for name in ready}
    for name, (cache, token) in ready.items():
        decode(models[name], copy.deepcopy(cache), token, 2)  # warm-up
    for _ in range(repeats):
        for name, (cache, token) in ready.items():
            fresh = copy.deepcopy(cache)
            timings[name].append(timed(lambda: decode(models[name], fresh, token, new_tokens), device)[0])
            del fresh
    for name, (cache, token) in ready.items():
        fresh = copy.deepcopy(cache)
        peak = peak_memory(lambda: decode(models[name], fresh, token, new_tokens), device)
        rows[name] |= {
            "tokens_per_s": new_tokens / statistics.median(timings[name]),
            "fastest_tokens_per_s": new_tokens / min(timings[name]),
            "spread": (max(timings[name]) - min(timings[name])) / statistics.median(timings[name]),
            "cache_mb": cache_bytes(cache) / MB,
            "decode_peak_mb": peak / MB,
        }
    return rows, ready


# What a decode step spends its time on: each module kind's forward, timed by hooks (on a GPU synchronised around
# each, which slows the step but keeps the shares).
PARTS = {
    "DCAL attention over the memory": lambda name, module: isinstance(module, CrossLMMCrossAttention),
    "DCAL MLP": lambda name, module: "cross_attention_layers" in name and name.endswith(".mlp"),
    "self-attention": lambda name, module: name.endswith(".self_attn"),
    "decoder MLP": lambda name, module: "cross_attention_layers" not in name and name.endswith(".mlp"),
    "LM head": lambda name, module: name == "lm_head",
}


def profile(model, cache, token, steps, device):
    """Seconds per decode step in each of `PARTS`, the greedy pick (argmax) and the rest."""
    spent, started, handles = dict.fromkeys([*PARTS, "greedy pick", "rest"], 0.0), {}, []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def before(module, args):
        sync()
        started[module] = time.perf_counter()

    for name, module in model.named_modules():
        part = next((part for part, matches in PARTS.items() if matches(name, module)), None)
        if part is not None:

            def after(module, args, out, part=part):
                sync()
                spent[part] += time.perf_counter() - started.pop(module)

            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        with torch.no_grad():
            sync()
            begin = time.perf_counter()
            for _ in range(steps):
                logits = model(input_ids=token, use_cache=True, **{CACHE_ARG: cache}).logits
                sync()
                picked = time.perf_counter()
                token = logits[:, -1:].argmax(-1)
                sync()
                spent["greedy pick"] += time.perf_counter() - picked
            total = time.perf_counter() - begin
    finally:
        for handle in handles:
            handle.remove()
    spent["rest"] = total - sum(spent.values())
    return {part: seconds / steps for part, seconds in spent.items()}, total / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--frames", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also print what a decode step spends its time on")
    parser.add_argument("--json", help="write the numbers here too (tracked: benchmarks/decode-<size>-<device>.json)")
    args = parser.parse_args()
    device, dtype, models = models_from_arguments(args)

    results, profiles = [], []
    for num_frames in args.frames:
        rows, ready = measure(models, num_frames, device, dtype, args.new_tokens, args.repeats)
        ours, baseline = rows.get("CrossLMM", {}), rows.get("LLaVA-OV", {})
        if ours.get("tokens_per_s") and baseline.get("tokens_per_s"):
            ours["speedup"] = ours["tokens_per_s"] / baseline["tokens_per_s"]
            ours["fastest_speedup"] = ours["fastest_tokens_per_s"] / baseline["fastest_tokens_per_s"]
            ours["cache_ratio"] = ours["cache_mb"] / baseline["cache_mb"]  # the caches are never empty
        results += list(rows.values())
        if args.profile:
            for name, (cache, token) in ready.items():
                shares, step = profile(models[name], copy.deepcopy(cache), token, args.new_tokens, device)
                row = {"frames": num_frames, "model": name, "step_ms": 1e3 * step}
                profiles.append(row | {part: 100 * seconds / step for part, seconds in shares.items()})
        del ready
        free_memory(device)

    layers = models[next(iter(models))].config.get_text_config().num_hidden_layers
    print(
        f"Decode ({args.new_tokens} tokens), {args.size}, {layers} LLM layers, {device.type}, "
        f"{str(dtype).removeprefix('torch.')}, attention {args.attn}, CrossLMM pool {args.pool_size} scope "
        f"{args.v2v_scope}{', DCALs without their MLP' if args.no_dcal_mlp else ''}, one video + 64 text tokens, "
        f"{args.repeats} repeats taking turns\n"
    )
    columns = [
        "frames",
        "model",
        "context_tokens",
        "tokens_per_s",
        "fastest_tokens_per_s",
        "spread",
        "cache_mb",
        "decode_peak_mb",
        "weights_mb",
        "speedup",
        "fastest_speedup",
        "cache_ratio",
    ]
    print_table(results, columns)
    if profiles:
        print("\nShare of a decode step (%), hooks around each module's forward:\n")
        print_table(profiles, ["frames", "model", "step_ms", *PARTS, "greedy pick", "rest"])
    if args.json:
        write_json(args.json, {"settings": vars(args), "rows": results, "profile": profiles})


if __name__ == "__main__":
    main()
