"""`python -m crosslmm.serve`: the `crosslmm-serve` command."""

import sys

from crosslmm.serve.command import main


if __name__ == "__main__":
    sys.exit(main())
