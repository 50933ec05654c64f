"""Run by tests/test_parallel.py under `torchrun --nproc_per_node 2` on CPU (gloo): tensor parallelism and FSDP2.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py tp FOLDER
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py fsdp FOLDER

FOLDER holds a saved tiny CrossLMM (`model/`) and the inputs (`inputs.pt`); rank 0 writes its results there.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
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
    """Shard every decoder layer, DCAL and vision encoder layer (`_no_split_modules`, the units accelerate's FSDP2
    wraps by default), then the root, and take two SGD steps on this rank's sample; save the full weights."""
    from training_crosslmm import parameter_groups, setup_stage2

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = AutoModelForImageTextToText.from_pretrained(folder / "model", trust_remote_code=True).train()
    learning_rates = setup_stage2(model, vision_tower_lr=0.1, connector_lr=0.5, llm_lr=0.5)
    units = [module for module in model.modules() if type(module).__name__ in model._no_split_modules]
    for module in units:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
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
        torch.save({"state": state, "losses": losses, "units": len(units), "local_shape": local}, folder / "fsdp.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    dist.init_process_group("gloo")
    {"tp": tensor_parallel, "fsdp": fsdp}[sys.argv[1]](Path(sys.argv[2]))
    dist.destroy_process_group()
