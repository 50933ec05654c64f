"""Prefill FLOPs of CrossLMM against LLaVA-OneVision built from the same parts, counted by torch's FlopCounterMode
while the real modules run on the meta device (shapes only, no memory, no arithmetic).

One video of T frames and 64 text tokens (16 before the video, 48 after), logits of the last position only (what
generation needs). CrossLMM at pool 1/3/4 (1/9/16 tokens per frame), a DCAL after every 4th decoder layer, both V2V
scopes; LLaVA-OneVision as transformers runs it (196 tokens per frame plus one newline token, projector on all 729
tokens before pooling). Both vision towers: SigLIP-so400m/14 at 384 px, the 26 layers LLaVA-OneVision keeps.

Both models read where the visual tokens go from `input_ids` (CrossLMM lays them out from a CPU copy, LLaVA-OneVision
checks their count), so the ids are given on the CPU while every module and activation is on meta. FLOPs count a
multiply-add as 2, and causal self-attention as the full square (the counter's convention, the same for both models).

    python benchmarks/flops.py [--sizes 2b 7b] [--frames 32 64 128 256 1024] [--json benchmarks/flops.json]
"""

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import SIZES, build, crosslmm_config, frame_size, llava_config, print_table, prompt_ids, write_json


POOL_SIZES = (1, 3, 4)
V2V_SCOPES = ("video", "frame")


def component_flops(counts, prefix):
    """FLOPs of the module at `prefix` and everything under it: the outermost modules counted under it, summed (the
    CrossLMM vision tower's layers are called one by one, not through the tower's own forward)."""
    keys = [key for key in counts if key == prefix or key.startswith(prefix + ".")]
    outermost = [key for key in keys if not any(key.startswith(other + ".") for other in keys)]
    return sum(sum(counts[key].values()) for key in outermost)


@torch.no_grad()
def count(model, num_frames):
    """TFLOPs of one prefill, in total and per part."""
    config = model.config
    ids = prompt_ids(config, num_frames)
    size = frame_size(config)
    video = torch.empty(1, num_frames, 3, size, size, device="meta")
    # CPU ids for both models: CrossLMM reads its layout from them, LLaVA-OneVision checks its placeholder count
    # with them (an embedding lookup takes CPU ids into a meta table).
    # use_cache=True: a prefill for generation; it also keeps transformers' packed-sequence check (data-dependent)
    # out of the way on meta.
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, pixel_values_videos=video, use_cache=True, logits_to_keep=1)
    counts = counter.get_flop_counts()
    root = type(model).__name__ + ".model"
    parts = {
        "vision": component_flops(counts, f"{root}.vision_tower"),
        "projector": component_flops(counts, f"{root}.multi_modal_projector"),
        "llm": component_flops(counts, f"{root}.language_model"),
        "dcal": component_flops(counts, f"{root}.cross_attention_layers"),
        "lm_head": component_flops(counts, type(model).__name__ + ".lm_head"),
    }
    total = counter.get_total_flops()
    assert sum(parts.values()) == total, "FLOPs outside the named parts"
    return {"llm_tokens": ids.shape[1], **{k: v / 1e12 for k, v in parts.items()}, "total": total / 1e12}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["2b", "7b"], choices=SIZES)
    parser.add_argument("--frames", nargs="+", type=int, default=[32, 64, 128, 256, 1024])
    parser.add_argument("--json", help="write the numbers here too (tracked: benchmarks/flops.json)")
    args = parser.parse_args()

    results = []
    for size in args.sizes:
        models = {"LLaVA-OV": build(llava_config(size), device="meta")}
        for pool in POOL_SIZES:
            for scope in V2V_SCOPES:
                models[f"CrossLMM pool {pool} {scope}"] = build(crosslmm_config(size, pool, scope), device="meta")
        for num_frames in args.frames:
            baseline = None
            for name, model in models.items():
                row = {"size": size, "frames": num_frames, "model": name, **count(model, num_frames)}
                baseline = baseline or row["total"]
                row["total / vision"] = row["total"] / row["vision"]
                row["vs LLaVA-OV"] = row["total"] / baseline
                results.append(row)
    columns = [
        "size",
        "frames",
        "model",
        "llm_tokens",
        "vision",
        "projector",
        "llm",
        "dcal",
        "lm_head",
        "total",
        "total / vision",
        "vs LLaVA-OV",
    ]
    print("Prefill TFLOPs (multiply-add = 2), one video + 64 text tokens\n")
    print_table(results, columns)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
