"""Run by tests/test_parallel.py in two CPU processes (gloo): tensor parallelism, FSDP2 (accelerate), DeepSpeed ZeRO-3.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/support/distributed_worker.py tp FOLDER
    accelerate launch --config_file examples/accelerate_fsdp.yaml --num_processes 2 --mixed_precision no \
        tests/support/distributed_worker.py fsdp FOLDER
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/support/distributed_worker.py zero3 FOLDER

FOLDER holds a saved tiny CrossLMM (`model/`) and the inputs (`inputs.pt`); rank 0 writes its results there.
"""

import faulthandler
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForImageTextToText, DistributedConfig


def tensor_parallel(folder: Path):
    """Load with the model's tensor-parallel plan, check the DCAL projections are sharded, run forward and generate."""
    model = AutoModelForImageTextToText.from_pretrained(
        folder / "model", trust_remote_code=True, distributed_config=DistributedConfig(tp_plan="auto")
    ).eval()
    dcal = model.model.cross_attention_layers["1"]
    shards = {
        name: tuple(param.to_local().shape)
        for name, param in [
            ("dcal.v2v_attn.q_proj", dcal.v2v_attn.q_proj.weight),  # colwise: output rows split
            ("dcal.t2v_attn.k_proj", dcal.t2v_attn.k_proj.weight),
            ("dcal.t2v_attn.o_proj", dcal.t2v_attn.o_proj.weight),  # rowwise: input columns split
            ("dcal.mlp.down_proj", dcal.mlp.down_proj.weight),
            ("decoder.self_attn.q_proj", model.model.language_model.layers[0].self_attn.q_proj.weight),
        ]
        if isinstance(param, DTensor)
    }
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    if dist.get_rank() == 0:
        torch.save({"shards": shards, "logits": logits, "generated": generated}, folder / "tp.pt")


def fsdp(folder: Path):
    """Shard the model as accelerate's FSDP2 does from examples/accelerate_fsdp.yaml (this process is started by
    `accelerate launch` with that file, which turns it into the FSDP_* variables the plugin reads), then take two
    SGD steps on this rank's sample and save the full weights.

    accelerate's `Accelerator` only enables FSDP on accelerators (on CPU it falls back to DDP), so its sharding
    function `fsdp2_prepare_model` is called with a stand-in holding what that function reads from an Accelerator.
    """
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import FSDPModule

    from crosslmm.train.trainer import STAGES, parameter_groups, setup_training

    plugin = FullyShardedDataParallelPlugin()
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        device=torch.device("cpu"),
        is_main_process=dist.get_rank() == 0,
        mixed_precision="no",
        torch_device_mesh=None,
    )
    model = AutoModelForImageTextToText.from_pretrained(folder / "model", trust_remote_code=True).train()
    learning_rates = setup_training(
        model, replace(STAGES[2], learning_rates={"vision_tower": 0.1, "projector": 0.5, "dcals": 0.5, "llm": 0.5})
    )
    model = fsdp2_prepare_model(accelerator, model)
    units = sorted(name for name, module in model.named_modules() if isinstance(module, FSDPModule))
    optimizer = torch.optim.SGD(parameter_groups(model, learning_rates))
    batch = torch.load(folder / "inputs.pt", weights_only=True)[dist.get_rank()]
    losses = []
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    local = tuple(model.lm_head.weight.to_local().shape)
    state = {name: param.full_tensor() for name, param in model.named_parameters()}
    if dist.get_rank() == 0:
        torch.save({"state": state, "losses": losses, "units": units, "local_shape": local}, folder / "fsdp.pt")


def zero3(folder: Path):
    """DeepSpeed ZeRO-3 with examples/deepspeed_zero3.json, its "auto" values filled as Trainer fills them for one
    sample per process in float32 (Trainer itself cannot run DeepSpeed on CPU: accelerate counts one process there);
    two SGD steps on this rank's sample; save the full weights."""
    import json

    import deepspeed

    from crosslmm.train.trainer import STAGES, parameter_groups, setup_training

    config = json.loads((Path(__file__).resolve().parents[2] / "examples" / "deepspeed_zero3.json").read_text())
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    config.update(train_batch_size=dist.get_world_size())
    config.update(gradient_clipping=0.0, bf16={"enabled": False}, zero_allow_untested_optimizer=True)
    config["zero_optimization"].update(
        reduce_bucket_size=4096, stage3_prefetch_bucket_size=4096, stage3_param_persistence_threshold=0
    )
    model = AutoModelForImageTextToText.from_pretrained(folder / "model", trust_remote_code=True).train()
    learning_rates = setup_training(
        model, replace(STAGES[2], learning_rates={"vision_tower": 0.1, "projector": 0.5, "dcals": 0.5, "llm": 0.5})
    )
    optimizer = torch.optim.SGD(parameter_groups(model, learning_rates))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    partitioned = engine.module.lm_head.weight.numel() == 0  # ZeRO-3 keeps only this process's shard
    batch = torch.load(folder / "inputs.pt", weights_only=True)[dist.get_rank()]
    losses = []
    for _ in range(2):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        state = {name: param.detach().clone() for name, param in engine.module.named_parameters()}
    if dist.get_rank() == 0:
        torch.save({"state": state, "losses": losses, "partitioned": partitioned}, folder / "zero3.pt")


if __name__ == "__main__":
    faulthandler.enable()  # a rank that aborts in C++ prints its Python stack
    dist.init_process_group("gloo")
    {"tp": tensor_parallel, "fsdp": fsdp, "zero3": zero3}[sys.argv[1]](Path(sys.argv[2]))
    dist.barrier()  # every rank done before gloo is torn down
    dist.destroy_process_group()
