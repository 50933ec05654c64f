"""examples/ablation end to end at the smallest size: data, the absence check, two arms through crosslmm-train,
held-out scores by generate, the tables and the plot (the full run, ~13 minutes, is not a test)."""

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def test_the_ablation_example_runs_end_to_end_and_writes_its_table_and_plot(tmp_path):
    argv = [
        *(sys.executable, str(ROOT / "examples" / "ablation" / "ablation.py"), "--output", str(tmp_path)),
        *("--arms", "dcal", "no-dcal", "--seeds", "0", "--steps", "4", "--eval-every", "2", "--batch-size", "4"),
        *("--train-clips", "8", "--test-clips", "4", "--check-clips", "2"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "results.md").read_text()
    assert "| dcal | 1 | on | on | 0.5 |" in table and "| no-dcal | 1 | - | - | - |" in table, table
    assert "pooled, 1 per frame" in table and "original, 64 per frame" in table, table
    # The absence argument, measured: the arrangements of a clip's colours give the same pooled tokens (to float
    # rounding) and the same logits without DCALs, and different original tokens.
    absence = json.loads((tmp_path / "absence.json").read_text())
    for pooled in ("pooled, 1 per frame", "pooled, 9 per frame"):
        assert absence[pooled]["within_clip_float64"] < 1e-12 < 1e-3 < absence[pooled]["between_clips"], absence
        assert absence[pooled]["within_clip_float32"] < 1e-6, absence
    assert absence["original, 64 per frame"]["within_clip_float32"] > 0.1, absence
    assert absence["first-token logits, no DCALs"]["within_clip_float32"] < 1e-5, absence
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("dcal-seed0", "no-dcal-seed0"):
        run = results["runs"][name]
        assert run["steps"] == [0, 2, 4] and len(run["colour"]) == len(run["control"]) == 3
        assert all(0 <= value <= 1 for value in run["colour"] + run["control"])
        assert run["loss"], "no training loss logged"
    config = json.loads((tmp_path / "dcal-seed0" / "config.json").read_text())
    assert config["use_t2v"] and config["use_v2v"]
    assert json.loads((tmp_path / "no-dcal-seed0" / "config.json").read_text())["cross_attention_layers"] == []
