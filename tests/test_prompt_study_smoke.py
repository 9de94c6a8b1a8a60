"""benchmarks/prompt_study.py runs: ``python -m benchmarks.prompt_study --smoke`` (tiny harness model, counts 2 and the
full set, one seed, the reference procedure once) through its command line in a
subprocess, checking the report's structure and the invariants that do not depend on
timing or on the random weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_prompt_study_smoke_mode(comfy, tmp_path):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.prompt_study", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "prompt_study.json").read_text())
    assert {"interface", "settings", "models", "recommendation", "environment", "total_s"} <= set(res)
    assert (tmp_path / "prompt_study.md").read_text().startswith("# Prompt-count study")
    assert (tmp_path / "prompt_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    settings = res["settings"]
    assert settings["counts"] == [2, "full"] and settings["seeds"] == [0]
    model = res["models"]["tiny"]
    assert {"description", "concepts", "records", "table", "fidelity", "connections"} <= set(model)
    table = model["table"]
    assert set(table) == {"2", "full"}
    for row in table.values():
        assert {"pairs", "jaccard_mean", "jaccard_min", "unet_rows", "seconds"} <= set(row)
        assert 0.0 <= row["jaccard_min"] <= row["jaccard_mean"] <= 1.0
    full = table["full"]
    assert full["pairs"] == 30  # the reference's object set: the 30 places
    assert full["jaccard_min"] == 1.0  # the full-set mask against itself
    # the pack samples only the saliency window: 2 rows (CFG) per prompt and window step
    assert full["unet_rows"] == 2 * 2 * full["pairs"] * settings["saliency_steps"]
    assert table["2"]["unet_rows"] == 2 * 2 * 2 * settings["saliency_steps"]
    assert res["recommendation"]["num_prompts"] in (2, "full")

    fid = model["fidelity"]
    ref = fid["reference"]
    # the reference samples the full schedule for every prompt, one prompt at a time
    assert ref["unet_rows"] == 2 * 2 * fid["pairs"] * settings["steps"]
    assert ref["unet_calls"] == 2 * fid["pairs"] * settings["steps"]
    assert fid["pack_over_reference_rows"] == settings["saliency_steps"] / settings["steps"]
    assert {"jaccard_with_pack", "selected", "identical"} <= set(ref)
    assert "reference_cfg_rows" in fid
