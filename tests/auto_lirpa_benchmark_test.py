"""benchmarks/auto_lirpa.py needs the optional torch + auto_LiRPA, which CI never
installs: without them it must stop at once with a one-line install hint."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_without_torch_the_benchmark_prints_the_install_hint():
  # sys.modules["torch"] = None makes `import torch` fail even where it is installed.
  code = ("import runpy, sys; sys.modules['torch'] = None; "
          "sys.argv = ['benchmarks/auto_lirpa.py']; "
          "runpy.run_path('benchmarks/auto_lirpa.py', run_name='__main__')")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
  assert run.stdout == ""  # nothing was benchmarked
  hints = [line for line in run.stderr.splitlines() if "needs torch" in line]
  assert len(hints) == 1, run.stderr[-2000:]
  assert hints[0].startswith("benchmarks/auto_lirpa.py needs torch and auto_LiRPA")
  assert "pip install torch" in hints[0] and "auto_LiRPA" in hints[0]
