"""The CLIs start quietly unless asked for logs; the library is never affected."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from mixtrain_tf import networks, quiet

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, environ, expected", [
    (["python", "-m", "mixtrain_tf.train", "--flagfile=f"], {}, True),
    (["python", "-m", "mixtrain_tf.evaluate", "--model=m"], {}, True),
    (["python", "-m", "mixtrain_tf.evaluate", "--verbosity=1"], {}, False),
    (["python", "-m", "mixtrain_tf.evaluate", "-v", "2"], {}, False),
    (["python", "-m", "mixtrain_tf.evaluate", "--verbosity=0"], {}, True),
    (["python", "-m", "mixtrain_tf.train"], {"TF_CPP_MIN_LOG_LEVEL": "0"}, False),
    (["python", "-m", "pytest", "tests"], {}, False),
    (["python", "script.py"], {}, False),
])
def test_quiet_only_for_our_clis_without_a_request_for_logs(argv, environ, expected):
  assert quiet.cli_wants_quiet(argv, environ) is expected


def test_evaluate_cli_prints_no_tensorflow_start_up_lines(tmp_path):
  model = tmp_path / "net.keras"
  networks.build("mnist_small").save(model)
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  run = subprocess.run(
      [sys.executable, "-m", "mixtrain_tf.evaluate", f"--model={model}",
       "--num_examples=5", "--methods=interval", "--attacks=pgd", "--pgd_steps=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  for noise in ("oneDNN", "cuda", "absl::InitializeLog", "cpu_feature_guard",
                "dataset_info.py", "I0000"):
    assert noise not in run.stderr, run.stderr[-2000:]
