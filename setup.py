"""Packaging. setup.cfg holds the metadata, the `crosslmm` package and the commands; the top-level modules are the
model's own files, the repository root's `*_crosslmm.py` (what a checkpoint carries), found here, not listed."""

from pathlib import Path

from setuptools import setup


setup(py_modules=sorted(path.stem for path in Path(__file__).resolve().parent.glob("*_crosslmm.py")))
