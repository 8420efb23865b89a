"""``bench/gpu_check.py --tiny``: the GPU machine check runs every section on the CPU, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


def test_the_gpu_check_runs_every_section_in_its_tiny_cpu_mode(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = ("versions", "methods_bf16", "throughput", "warm_trials", "resume", "unet")
    assert {name: report[name]["status"] for name in sections} == dict.fromkeys(sections, "ok"), report
    assert report["methods_bf16"]["failed"] == {} and report["methods_bf16"]["cases"] == 9  # three per family
    assert report["warm_trials"]["failed_trials"] == 1 and len(report["warm_trials"]["trials"]) == 5
    assert report["resume"]["equal"], report["resume"]
    for case in ("lora/none", "lora/randaug", "full/none", "full/randaug"):
        assert report["throughput"][case]["end_to_end_img_s"] > 0 and report["throughput"][case]["tflops"] > 0
    assert report["unet"]["lora"]["trainable_params"] < report["unet"]["full"]["trainable_params"]
