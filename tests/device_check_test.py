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


def test_table_says_n_a_where_the_allocator_kept_no_memory_statistics():
  # A CPU allocator without statistics (CI's, or TF_ENABLE_ONEDNN_OPTS=0) gives the
  # bounds benchmark no peak: the table must still be written, not crash.
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import device_check  # pylint: disable=g-import-not-at-top
  symbolic = {"per_sample_s": 0.002, "peak_bytes_per_sample": None}
  result = {"steps": {"bounds": {"ok": True, "seconds": 1.0}},
            "bounds": {"networks": [{"network": "mnist_small", "symbolic": symbolic}]}}
  assert "mnist_small: symbolic 2 ms, n/a MB per example" in device_check._table(result)
  symbolic["peak_bytes_per_sample"] = 1.5e6
  assert "1.5 MB per example" in device_check._table(result)
