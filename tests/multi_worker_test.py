"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 train MNIST_Small.

Both workers must finish with identical weights, equal (within float tolerance) to a
single-process run on the same global batch. Sampling is made deterministic by
giving every point the robust loss (k = per-replica batch) and turning off
shuffling; the robust loss is then the mean over the same global batch.
"""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

import mixtrain_tf.layers  # noqa: F401  (registers InputNormalization)
from mixtrain_tf import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = [
    "--dataset=mnist", "--network=mnist_small", "--method=mixtrain",
    "--epsilon=0.05", "--eps_ramp_epochs=0", "--batch_size=20", "--epochs=1",
    "--max_train_examples=60", "--validation_size=20", "--max_eval_examples=20",
    "--noshuffle", "--nodynamic_alpha", "--optimizer=sgd", "--learning_rate=0.1",
    "--final_methods=interval", "--nofinal_pgd", "--noexport",
]


def _free_ports(n):
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(("127.0.0.1", 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def _env(tf_config=None):
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("TF_CONFIG", None)
  if tf_config is not None:
    env["TF_CONFIG"] = json.dumps(tf_config)
  return env


def _weights(path):
  return keras.models.load_model(path, compile=False).get_weights()


def test_two_workers_match_each_other_and_a_single_process(tmp_path):
  ports = _free_ports(2)
  cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
  mw_dir = tmp_path / "multi"
  procs = [
      subprocess.Popen(
          [sys.executable, "-m", "mixtrain_tf.train", *COMMON, "--k=10",
           "--strategy=multi_worker", f"--model_dir={mw_dir}"],
          cwd=ROOT, env=_env({"cluster": cluster, "task": {"type": "worker",
                                                            "index": i}}),
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  single = subprocess.run(
      [sys.executable, "-m", "mixtrain_tf.train", *COMMON, "--k=20",
       f"--model_dir={tmp_path / 'single'}"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      p.kill()
      out, _ = p.communicate()
      pytest.fail(f"worker timed out:\n{out[-3000:]}")
    outs.append(out)
    assert p.returncode == 0, out[-3000:]
  assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-3000:]

  chief = _weights(mw_dir / "network.keras")
  worker = _weights(mw_dir / "workers" / "worker_1" / "network.keras")
  alone = _weights(tmp_path / "single" / "network.keras")
  for a, b, c in zip(chief, worker, alone):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)
  # the update moved the weights (the comparison is not vacuous)
  keras.utils.set_random_seed(0)
  from mixtrain_tf import networks
  init = networks.build("mnist_small").get_weights()
  assert max(np.abs(a - b).max() for a, b in zip(chief, init)) > 1e-3
  # only the chief writes the run's outputs
  assert (mw_dir / "metrics.json").exists()
  assert (mw_dir / "logs").exists()
  assert not (mw_dir / "workers" / "worker_1" / "metrics.json").exists()
  assert not (mw_dir / "workers" / "worker_1" / "logs").exists()


@pytest.mark.parametrize("text, message", [
    (None, "needs the TF_CONFIG"),
    ("{not json", "not valid JSON"),
    ('{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "no chief"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
     "not in its cluster"),
    ('{"cluster": {"worker": ["a:1"]}}', "needs a 'cluster' and a 'task'"),
])
def test_bad_tf_config_is_a_clear_error(text, message):
  with pytest.raises(train.app.UsageError, match=message):
    train.check_tf_config(text)


def test_good_tf_config_passes():
  cfg = train.check_tf_config(
      '{"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, '
      '"task": {"type": "worker", "index": 0}}')
  assert cfg["task"]["type"] == "worker"
