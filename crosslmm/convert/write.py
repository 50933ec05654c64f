"""Writing the converted folder: streamed weight shards, the processor, the generation config, the code files, the
model card; and pushing the folder to the Hub. `processor_for_config` is also how the sample builders
(`crosslmm.samples`) make their processors."""

import json
import os
import sys
from importlib import resources
from pathlib import Path
from string import Template

import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, split_torch_state_dict_into_shards
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from configuration_crosslmm import CrossLMMConfig
from crosslmm.convert import ConversionError, logger
from crosslmm.convert.plan import Plan
from crosslmm.convert.sources import ConversionSource
from modeling_crosslmm import CrossLMMForConditionalGeneration


# The weights are written by streaming, not by `from_pretrained` of a model built from the source and its
# `save_pretrained`: that would hold the whole model in memory (about 15 GiB for a 7B in bfloat16), where the stream
# holds one output shard (2 to 5 GiB measured at 7B, with 1 GB and 5 GB shards).
def write_weights(plan: Plan, folder: Path, dtype: torch.dtype, max_shard_size: str, seed: int, shapes: dict):
    """Shards laid out up front from the shapes, then filled one at a time: peak memory is about one shard."""
    meta = {key: torch.empty(shapes[key], dtype=dtype, device="meta") for key in plan.recipes}
    try:
        split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    except ValueError as error:
        raise ConversionError(f"--max-shard-size {max_shard_size!r}: {error}") from error
    total = sum(t.numel() * t.element_size() for t in meta.values())
    sources = {id(r.source): r.source for r in plan.recipes.values() if r.source is not None}
    with tqdm(total=total, unit="B", unit_scale=True, desc="Writing shards", file=sys.stderr) as progress:
        for filename, keys in split.filename_to_tensors.items():
            shard, pointers = {}, set()
            for key in keys:
                tensor = plan.recipes[key].make(key, shapes[key], seed).to(dtype).contiguous()
                if tensor.data_ptr() in pointers:  # a DCAL's MLP copied from a decoder layer in the same shard
                    tensor = tensor.clone()
                pointers.add(tensor.data_ptr())
                shard[key] = tensor
                progress.update(tensor.numel() * tensor.element_size())
            save_file(shard, folder / filename, metadata={"format": "pt"})
            del shard
            for source in sources.values():
                source.release()
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": total}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_code(folder: Path, config: CrossLMMConfig):
    """The model's code file and what it imports relatively (the configuration, and through it the pipeline), copied
    by transformers' `custom_object_save` as a model's `save_pretrained` copies them; `auto_map` goes into `config`.
    The processor's code files come with `write_processor`."""
    with torch.device("meta"):
        model = CrossLMMForConditionalGeneration(config)
    custom_object_save(model, folder, config=config)


def processor_for_config(config: CrossLMMConfig, tokenizer):
    """The `CrossLMMProcessor` of a model with this config: frames resized to `config.image_size`, placeholders
    expanded to `config.tokens_per_frame` tokens per frame (the processor stores the pool size)."""
    from processing_crosslmm import CrossLMMImageProcessor, CrossLMMProcessor
    from video_processing_crosslmm import CrossLMMVideoProcessor

    size = {"height": config.image_size, "width": config.image_size}
    return CrossLMMProcessor(
        image_processor=CrossLMMImageProcessor(size=size),
        video_processor=CrossLMMVideoProcessor(size=size),
        tokenizer=tokenizer,
        pool_size=config.pool_size,
    )


def write_processor(folder: Path, tokenizer, config: CrossLMMConfig):
    """The processor of `config`, with the source's tokenizer: processor, video-processor, image-processor and
    tokenizer files, the chat template and the processor's code files."""
    processor_for_config(config, tokenizer).save_pretrained(folder)


def write_generation_config(folder: Path, source: ConversionSource, tokenizer, config: CrossLMMConfig):
    """The source's generation settings (else: end a turn at <|im_end|> as Qwen2.5-Instruct does), never generating
    the `<image>`/`<video>` placeholders, which stand for visual tokens."""
    try:
        generation = GenerationConfig.from_pretrained(source.generation_folder)
    except OSError:
        eos = [
            tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>") if t in tokenizer.get_vocab()
        ]
        generation = GenerationConfig(eos_token_id=eos or tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    placeholders = [config.image_token_id, config.video_token_id]
    generation.suppress_tokens = sorted(set(generation.suppress_tokens or []) | set(placeholders))
    generation.save_pretrained(folder)


def write_model_card(folder: Path, source: ConversionSource, config: CrossLMMConfig, repo_id: str | None):
    """README.md: the card's metadata (`pipeline_tag`, base models, tags) and model_card.md filled in."""
    described = {
        "llava_onevision": "LLaVA-OneVision (transformers format)",
        "llava_next": "LLaVA-OneVision (LLaVA-NeXT format)",
        "crosslmm_llava_next": "a CrossLMM trained in the LLaVA-NeXT code base",
        "parts": "a SigLIP vision tower and a Qwen2.5 LLM, with a new (random) projector",
    }[source.kind]
    name = repo_id or "path/to/this/folder"
    from_models = f" ({', '.join(source.base_models)})" if source.base_models else ""
    untrained = (
        ""
        if source.kind == "crosslmm_llava_next"
        else "Its DCALs are untrained (gates at 0): it computes what its base model computes, and needs CrossLMM "
        "training before it makes use of the original visual tokens."
    )
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="video-text-to-text",
        base_model=source.base_models or None,
        tags=["crosslmm", "video", "custom_code"],
    )
    template = Template(resources.files(__package__).joinpath("model_card.md").read_text())
    body = template.substitute(
        pool_size=config.pool_size,
        dcal_layers=config.dcal_layer_indices,
        described=described,
        from_models=from_models,
        untrained=untrained,
        name=name,
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(folder / "README.md")


def set_permissions(folder: Path):
    """mkdtemp makes a private folder: give the result the permissions a plain mkdir would (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def push_folder(folder: Path, repo_id: str):
    """Upload the whole folder to the Hub repository `repo_id` (created if needed)."""
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="Add CrossLMM checkpoint")
    logger.info(f"Pushed to https://huggingface.co/{repo_id}")
