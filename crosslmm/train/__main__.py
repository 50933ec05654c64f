"""`python -m crosslmm.train`: the `crosslmm-train` command (what `torchrun` and `accelerate launch` run)."""

import sys

from crosslmm.train.command import main


if __name__ == "__main__":
    sys.exit(main())
