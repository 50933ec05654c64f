"""The benchmark scripts run on a CPU as their docstrings tell users to run them (tiny size, a few steps), so that
the tables in docs/performance.md stay reproducible as the model changes. Their figures are not checked here: speed
is measured by the scripts, not by tests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    "script, options",
    [
        ("prefill", ["--frames", "2", "--repeats", "1"]),
        ("decode", ["--frames", "2", "--repeats", "1", "--new-tokens", "2", "--profile"]),
        ("decode", ["--frames", "2", "--repeats", "1", "--new-tokens", "2", "--no-dcal-mlp"]),
    ],
)
def test_benchmark_runs_on_cpu_and_writes_both_models(script, options, tmp_path):
    out = tmp_path / "result.json"
    argv = [str(BENCHMARKS / f"{script}.py"), "--size", "tiny", "--device", "cpu", "--threads", "1", *options]
    result = subprocess.run([sys.executable, *argv, "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {row["model"] for row in rows} == {"LLaVA-OV", "CrossLMM"}
    if "--no-dcal-mlp" in options:
        assert "DCALs without their MLP" in result.stdout
    if "--profile" in options:
        assert "Share of a decode step" in result.stdout
