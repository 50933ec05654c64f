"""Run `crosslmm-train` in one process of an `accelerate launch` with examples/accelerate_fsdp.yaml, on CPUs:

    accelerate launch --config_file examples/accelerate_fsdp.yaml --num_processes 2 --mixed_precision no \\
        tests/support/train_worker.py CROSSLMM-TRAIN-ARGUMENTS... [--then CROSSLMM-TRAIN-ARGUMENTS...]

Each `--then` starts another run in the same processes (one launch, several runs: the launch is the slow part).

accelerate turns FSDP off on CPUs (its state falls back to multi-CPU data parallelism), so this switches its state to
FSDP with the plugin the launcher configured, exactly as it is on GPUs; everything else (Trainer's FSDP2 preparation,
the sharded optimizer, full-state-dict checkpoints) is the real path.
"""

import faulthandler
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


def fsdp_on_cpu():
    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__


if __name__ == "__main__":
    faulthandler.enable()  # a rank that aborts in C++ prints its Python stack
    fsdp_on_cpu()
    from crosslmm.train.command import main

    runs, current = [], []
    for arg in sys.argv[1:]:
        if arg == "--then":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    for argv in [*runs, current]:
        code = main(argv)
        if code:
            sys.exit(code)
