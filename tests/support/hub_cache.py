"""Lay files out as huggingface_hub's cache lays out a pulled model repository, so that tests can load "from the Hub"
offline: `models--org--name/blobs/<sha256>`, `snapshots/<commit>/<file>` symlinks to the blobs, `refs/main`."""

import hashlib
import os
from pathlib import Path


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "1" * 40) -> Path:
    """`files` maps paths in the repository to their contents; returns the snapshot folder."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
