"""Write a LLaVA-OneVision checkpoint of a real model's shapes (random values, std 0.02) to disk, shard by shard,
without ever holding it in memory: the source for measuring crosslmm-convert's memory and time on full-size models
(and, below 3B parameters, its verification). The sizes are those of crosslmm.samples: the LLMs of
llava-onevision-qwen2-7b and -0.5b, SigLIP-so400m/14 at 384 px with the 26 layers LLaVA-OneVision keeps.

    python benchmarks/full_size_source.py /data/llava-ov-7b-shaped --size 7b
    /usr/bin/time -v crosslmm-convert --source /data/llava-ov-7b-shaped --output /data/out --no-verify
"""

import argparse
import json
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from crosslmm.samples import build_tokenizer, geometry


SIZES = ("7b", "0.5b")


# transformers 5's model keys -> the keys it writes (the llava conversion mapping, reversed)
SAVED_PREFIXES = [("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                  ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                  ("model.image_newline", "image_newline")]  # fmt: skip


def write(folder: Path, size: str, dtype=torch.bfloat16, max_shard_size="4GB"):
    folder.mkdir(parents=True)
    tokenizer = build_tokenizer()
    parts = geometry(size)
    config = LlavaOnevisionConfig(
        vision_config=parts["vision_config"],
        text_config=parts["text_config"],
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=parts["text_config"]["tie_word_embeddings"],
        dtype="bfloat16",
    )
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    shapes = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        for ours, saved in SAVED_PREFIXES:
            if key.startswith(ours):
                key = saved + key[len(ours) :]
                break
        shapes[key] = tuple(tensor.shape)
    meta = {k: torch.empty(s, dtype=dtype, device="meta") for k, s in shapes.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: (torch.randn(shapes[k]) * 0.02).to(dtype) for k in keys}
        save_file(shard, folder / filename, metadata={"format": "pt"})
        print(filename, flush=True)
    total_size = sum(t.numel() * t.element_size() for t in meta.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": split.tensor_to_filename}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"{sum(t.numel() for t in meta.values()) / 1e9:.2f}B parameters in {len(split.filename_to_tensors)} shards")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", choices=SIZES, default="7b")
    args = parser.parse_args()
    write(args.folder, args.size)
