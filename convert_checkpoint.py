"""Build a CrossLMM checkpoint folder from checkpoints that exist: `python convert_checkpoint.py --help`.

The same command as `crosslmm-convert`; the converter itself is the installed package's `crosslmm.convert`.
"""

from crosslmm.convert.cli import main


if __name__ == "__main__":
    main()
