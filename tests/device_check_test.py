"""The device check runs every step (small versions) on this CPU and reports."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_smoke_device_check_runs_every_step(tmp_path):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  run = subprocess.run([sys.executable, "benchmarks/device_check.py", "--smoke",
                        f"--out={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900, check=False)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  result = json.loads((tmp_path / "device_check.json").read_text())
  assert set(result["steps"]) == {"device", "tf32", "soundness", "bounds",
                                  "train_step", "train"}
  table = (tmp_path / "device_check.md").read_text()
  assert "TF32 on after import: False" in table
  assert "0 verdicts changed" in table  # no TF32 on a CPU
  assert result["bounds"]["networks"][0]["network"] == "mnist_small"
