"""The DCAL gates' starting value: `crosslmm-convert --gate-init` (default 0, the paper's) and
`build_sample_checkpoint(gate_init=...)`; what it changes (examples/ablation measures the effect on training)."""

import torch
from safetensors.torch import load_file

from crosslmm.convert.cli import convert, parse_args
from crosslmm.samples import build_sample_checkpoint
from tiny_sources import llava_onevision_folder


GATES = ("v2v_gate", "t2v_gate", "mlp_gate")


def gates(folder) -> dict:
    state = {}
    for path in folder.glob("*.safetensors"):
        state.update(load_file(path))
    return {name: tensor for name, tensor in state.items() if name.rsplit(".", 1)[-1] in GATES}


def test_convert_starts_the_gates_at_0_unless_gate_init_says_otherwise(tmp_path):
    source = llava_onevision_folder(tmp_path / "src")
    assert parse_args(["--source", "x", "--output", "y"]).gate_init == 0.0
    closed = gates(convert(parse_args(["--source", str(source), "--output", str(tmp_path / "closed"), "--no-verify"])))
    opened = gates(
        convert(
            parse_args(
                ["--source", str(source), "--output", str(tmp_path / "open"), "--gate-init", "0.5", "--no-verify"]
            )
        )
    )
    assert closed and set(closed) == set(opened)
    assert all(torch.equal(tensor, torch.zeros(1)) for tensor in closed.values())
    assert all(torch.equal(tensor, torch.full((1,), 0.5)) for tensor in opened.values())


def test_sample_checkpoints_take_a_gate_value(tmp_path):
    default = gates(build_sample_checkpoint(tmp_path / "default", "tiny"))
    closed = gates(build_sample_checkpoint(tmp_path / "closed", "tiny", gate_init=0.0))
    assert all(torch.equal(tensor, torch.full((1,), 0.5)) for tensor in default.values())  # SAMPLE_GATE, as before
    assert closed and all(torch.equal(tensor, torch.zeros(1)) for tensor in closed.values())
