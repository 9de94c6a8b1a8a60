"""The demo (demo/forget_concepts.py, through its command line) in its fast mode: a real ComfyUI server runs the example workflow on
the toy model and the demo writes its grid, mask report and metrics."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from devkit import harness as H


@pytest.mark.server
@pytest.mark.slow
def test_demo_fast(comfy, tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "demo.forget_concepts", "--fast", "--forget", "circle,heart",
                        "--out", str(out)],
                       cwd=str(H.REPO_ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:]
    for name in ("before_after.png", "mask_report.txt", "metrics.json", "workflow_api.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["forget"] == ["circle", "heart"]
    assert set(metrics["per_concept"]) == {"circle", "heart", "square"}
    for v in metrics["per_concept"].values():
        assert len(v["before"]) == len(v["after"]) == 2
    assert metrics["mask"]["pruned"] > 0
    report = (out / "mask_report.txt").read_text()
    assert "circle" in report and "ff.net.2" in report
    from PIL import Image
    assert Image.open(out / "before_after.png").size[0] > 300
