"""benchmarks/bench_fia.py still runs: ``python -m benchmarks.bench_fia --smoke`` (tiny model, tiny shapes, one
repeat) in a subprocess, checking the report's structure and the invariants that do not
depend on timing (no timed assertions: the machine is shared)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_mode(comfy, tmp_path):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_fia", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "cpu-smoke.json").read_text())
    assert (tmp_path / "cpu-smoke.md").read_text().startswith("# FIA performance benchmark")

    sal = res["saliency"]
    settings = sal["model"]
    # the pack samples only the window, batched; the reference the full schedule, prompt by prompt
    prompts = 2 * settings["prompt_pairs"]
    assert sal["reference"]["unet_rows"] == prompts * 2 * settings["steps"]  # CFG: 2 rows per prompt
    assert sal["pack"]["unet_rows"] == prompts * 2 * settings["saliency_steps"]
    assert sal["bare"]["unet_rows"] == sal["pack"]["unet_rows"]
    assert sal["pack"]["unet_calls"] == settings["saliency_steps"]  # every pair in one batch
    assert sal["pack_mask_equals_dense_path"] is True
    assert res["mask_building"]["fast_equals_dense"] is True
    assert res["rerun"]["first_run_unet_calls"] > 0 and res["rerun"]["rerun_unet_calls"] == 0
    assert res["apply"]["patch_tensor_bytes"] < res["apply"]["dense_float_mask_bytes"]
    assert {t["target"] for t in res["targets"]}  # the table was built
