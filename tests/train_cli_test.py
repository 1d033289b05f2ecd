"""Tests of the training script mixtrain_tf.train: flag errors, every flagfile on a
tiny subset of its real dataset, outputs, and resuming a killed run.

The flagfile runs call `train.run(FLAGS)` in this process; the error and resume
tests start `python -m mixtrain_tf.train` as the user would.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from mixtrain_tf import data, networks, train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGFILES = REPO_ROOT / "flags"
FLAGS = flags.FLAGS
if "eps_ramp_epochs" not in FLAGS:  # train.define_flags defines on the global FLAGS
  train.define_flags()


def _env() -> dict:
  return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
          "PYTHONPATH": os.pathsep.join([str(REPO_ROOT),
                                         os.environ.get("PYTHONPATH", "")])}


def _train_command(*args: str) -> list[str]:
  return [sys.executable, "-m", "mixtrain_tf.train", *args]


# -- flag errors ------------------------------------------------------------------

BAD_FLAGS = {
    "unknown_network": (["--network=resnet50"], r"--network=resnet50.*one of"),
    "negative_epsilon": (["--epsilon=-1"], r"--epsilon must be in \[0, 1\]"),
    "k_above_batch": (["--k=60", "--batch_size=50"], r"--k must be <= --batch_size"),
    "network_dataset_mismatch": (["--dataset=cifar10", "--network=mnist_small"],
                                 r"--network does not take --dataset's images"),
    "missing_model_dir": ([], r"--model_dir must have a value"),
    "zero_time_budget": (["--time_budget_s=0"], r"--time_budget_s must be > 0"),
}


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory):
  """Starts one CLI process per BAD_FLAGS case, all at once.

  Returns {case: (returncode, stdout, stderr, CPU seconds, model_dir)}. CPU time,
  not wall time, says how much work a process did: the machine may be busy.
  """
  root = tmp_path_factory.mktemp("bad_flags")
  procs = {}
  for name, (args, _) in BAD_FLAGS.items():
    model_dir = root / name
    flag_args = ["--flagfile=flags/mnist_small.cfg", *args]
    if name != "missing_model_dir":
      flag_args.append(f"--model_dir={model_dir}")
    out, err = open(root / f"{name}.out", "w+"), open(root / f"{name}.err", "w+")
    procs[name] = (subprocess.Popen(_train_command(*flag_args), cwd=REPO_ROOT,
                                    env=_env(), stdout=out, stderr=err, text=True),
                   out, err, model_dir)
  results = {}
  deadline = time.monotonic() + 300
  for name, (proc, out, err, model_dir) in procs.items():
    while (waited := os.wait4(proc.pid, os.WNOHANG))[0] == 0:
      if time.monotonic() > deadline:
        proc.kill()
        pytest.fail(f"{name}: the CLI did not exit in 300 s")
      time.sleep(0.1)
    _, status, usage = waited
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    results[name] = (proc.returncode, out.read(), err.read(),
                     usage.ru_utime + usage.ru_stime, model_dir)
    out.close()
    err.close()
  return results


@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_bad_flags_fail_fast_with_one_line(name, bad_flag_runs):
  returncode, out, err, cpu_seconds, model_dir = bad_flag_runs[name]
  assert returncode != 0
  error_lines = [line for line in err.splitlines() if "Flags parsing error" in line]
  assert len(error_lines) == 1, err[-3000:]
  assert re.search(BAD_FLAGS[name][1], error_lines[0]), error_lines[0]
  assert "Traceback" not in err, err[-3000:]
  assert not model_dir.exists(), "training started: --model_dir was created"
  assert "Epoch" not in out
  assert cpu_seconds < 30, f"failing took {cpu_seconds:.0f} CPU seconds"


# -- every flagfile on a tiny subset --------------------------------------------


@pytest.fixture
def parse_flags(monkeypatch):
  """Parses a command line into the global FLAGS, from the repo root (flagfiles
  name each other relative to it); restores the test setup afterwards."""
  monkeypatch.chdir(REPO_ROOT)

  def parse(*args: str):
    FLAGS.unparse_flags()
    FLAGS(["train", *args])
    return FLAGS

  yield parse
  FLAGS.unparse_flags()
  FLAGS.mark_as_parsed()


# Small subsets: 2 train batches of 10, 4 validation and 4 test examples.
TINY = ["--epochs=1", "--batch_size=10", "--max_train_examples=20",
        "--validation_size=10", "--max_eval_examples=4", "--eval_batch_size=2",
        "--pgd_steps=2"]
# The big networks' symbolic bounds cost seconds per example: k = 1, interval only.
BIG = ["--k=1", "--final_methods=interval", "--eval_bound=interval"]
SLOW = pytest.mark.slow
# (flagfile, extra flags, marks). Every flagfile runs as written on a tiny subset;
# the fast suite keeps the small networks and one residual network trained with
# interval bounds for one step (its symbolic train step takes tens of CPU seconds).
SMOKE_CASES = {
    "mnist_small": ("mnist_small", [], ()),
    "cifar_small": ("cifar_small", [], ()),
    "mnist_small_eps0.3": ("mnist_small_eps0.3", [], SLOW),
    "mnist_small_eps0.3_finetune": ("mnist_small_eps0.3_finetune", [], SLOW),
    "mnist_large": ("mnist_large", BIG, SLOW),
    "cifar_large": ("cifar_large", BIG, SLOW),
    "cifar_resnet": ("cifar_resnet", BIG, SLOW),
    "imagenet200": ("imagenet200", BIG, SLOW),
    "cifar_resnet_interval_1step": (
        "cifar_resnet", BIG + ["--method=interval", "--max_train_examples=10"],
        ()),
}


def test_every_flagfile_has_a_smoke_run():
  assert {p.stem for p in FLAGFILES.glob("*.cfg")} == {
      flagfile for flagfile, _, _ in SMOKE_CASES.values()}


def _expected_flagfile_values(name: str) -> dict:
  """The flag values a flagfile sets (following nested --flagfile lines)."""
  values = {}
  for line in (FLAGFILES / f"{name}.cfg").read_text().splitlines():
    line = line.strip()
    if line.startswith("--flagfile="):
      values.update(_expected_flagfile_values(pathlib.Path(line.split("=", 1)[1]).stem))
    elif line.startswith("--"):
      key, value = line[2:].split("=", 1)
      values[key] = value
  return values


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=marks) for case, (_, _, marks) in SMOKE_CASES.items()])
def test_flagfile_smoke_run(case, parse_flags, tmp_path):
  name, extra, _ = SMOKE_CASES[case]
  model_dir = tmp_path / "run"
  f = parse_flags(f"--flagfile=flags/{name}.cfg", *TINY, *extra,
                  f"--model_dir={model_dir}")
  expected = _expected_flagfile_values(name)
  assert f.network == expected["network"] and f.dataset == expected["dataset"]
  metrics = train.run(f)

  written = json.loads((model_dir / "metrics.json").read_text())
  assert written == json.loads(json.dumps(metrics))
  test = written["test"]
  assert test["examples"] == 4
  assert test["epsilon"] == pytest.approx(float(expected["epsilon"]))
  methods = f.final_methods
  assert set(test["verified"]) == set(methods)
  assert set(test["attacks"]) == {"pgd"}
  clean = test["clean"]["accuracy"]
  pgd = test["attacks"]["pgd"]["accuracy"]
  for leaf in [test["clean"], test["attacks"]["pgd"], *test["verified"].values()]:
    assert 0.0 <= leaf["accuracy"] <= 1.0 and leaf["seconds"] >= 0.0
    assert leaf["count"] == round(leaf["accuracy"] * 4)
  assert all(v["accuracy"] <= pgd <= clean for v in test["verified"].values())
  assert written["epochs"] == 1
  assert written["train_seconds"] > 0
  recorded = written["flags"]
  assert recorded["network"] == expected["network"]
  assert recorded["dataset"] == expected["dataset"]
  assert recorded["epsilon"] == pytest.approx(float(expected["epsilon"]))
  assert recorded["max_train_examples"] == f.max_train_examples
  assert recorded["epochs"] == 1
  assert recorded["model_dir"] == str(model_dir)

  flags_txt = (model_dir / "flags.txt").read_text()
  assert f"--network={expected['network']}" in flags_txt
  assert f"--model_dir={model_dir}" in flags_txt
  assert list((model_dir / "logs").rglob("events.out.tfevents.*"))
  history = json.loads((model_dir / "history.json").read_text())
  assert {"loss", "clean_loss", "robust_loss", "val_verified", "val_accuracy"} <= (
      set(history))
  assert all(len(v) == 1 for v in history.values())
  assert 0.0 <= history["epsilon"][0] <= f.epsilon + 1e-6  # a float32 variable
  assert not (model_dir / "backup").exists(), "the backup outlived training"

  network = keras.models.load_model(model_dir / "network.keras")
  shape = networks.INPUT_SHAPES[expected["network"]]
  images = np.random.default_rng(0).uniform(0, 1, (2, *shape)).astype(np.float32)
  logits = network.predict(images, verbose=0)
  assert logits.shape == (2, data.num_classes(expected["dataset"]))
  saved_model_pb = model_dir / "saved_model" / "saved_model.pb"
  assert saved_model_pb.is_file()
  # The graph holds no big constants (e.g. identity bases of the symbolic bounds).
  assert saved_model_pb.stat().st_size < 20 * 2**20, (
      f"saved_model.pb is {saved_model_pb.stat().st_size / 2**20:.0f} MB")
  serve = tf.saved_model.load(str(model_dir / "saved_model")).signatures[
      "serving_default"]
  np.testing.assert_allclose(serve(images=tf.constant(images))["logits"], logits,
                             rtol=1e-5, atol=1e-5)


# -- resume after a kill -------------------------------------------------------------


def test_killed_run_resumes_from_its_backup(tmp_path):
  """SIGKILL after the first epoch's backup; the same command finishes the run."""
  model_dir = tmp_path / "run"
  command = _train_command(
      "--flagfile=flags/mnist_small.cfg", "--epochs=3", "--batch_size=10",
      "--max_train_examples=200", "--validation_size=10", "--max_eval_examples=4",
      "--eval_batch_size=4", "--final_methods=interval", "--pgd_steps=2",
      "--eps_ramp_epochs=2", f"--model_dir={model_dir}")
  metadata = model_dir / "backup" / "training_metadata.json"

  def backed_up_epochs() -> int | None:
    try:
      return json.loads(metadata.read_text())["epoch"]
    except (OSError, ValueError, KeyError):
      return None

  proc = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.monotonic() + 240
  while backed_up_epochs() is None:
    if proc.poll() is not None:
      pytest.fail("the run ended before its first backup: "
                  + proc.stderr.read()[-3000:])
    assert time.monotonic() < deadline, "no backup after 240 s"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL
  done = backed_up_epochs()
  assert done is not None and 1 <= done < 3, f"backup after {done} epochs"
  assert not (model_dir / "metrics.json").exists()

  rerun = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300, check=False)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert metrics["epochs"] == 3
  history = json.loads((model_dir / "history.json").read_text())
  assert history and all(len(v) == 3 - done for v in history.values()), (
      f"history has {len(history['loss'])} epochs, expected {3 - done}: "
      "the rerun started over instead of resuming")
  assert not (model_dir / "backup").exists()


# -- time budget and learning curve ---------------------------------------------------


def test_time_budget_run_stops_by_time_and_writes_a_curve(parse_flags, tmp_path):
  model_dir = tmp_path / "run"
  f = parse_flags("--flagfile=flags/mnist_small.cfg", "--batch_size=10",
                  "--max_train_examples=20", "--validation_size=10",
                  "--max_eval_examples=4", "--eval_batch_size=2", "--pgd_steps=2",
                  "--time_budget_s=6", "--curve_examples=3", "--curve_every=6",
                  "--export=false", f"--model_dir={model_dir}")
  metrics = train.run(f)
  # 18 nominal epochs (the flagfile) laid over 6 s: many short real epochs.
  assert metrics["epochs"] > 1
  assert metrics["train_seconds"] >= 6.0
  assert metrics["train_peak_rss_mb"] > 100
  history = json.loads((model_dir / "history.json").read_text())
  assert history["train_seconds"][-1] >= 6.0
  assert history["schedule_epoch"][-1] == pytest.approx(18.0)
  assert history["epsilon"][-1] == pytest.approx(0.125)  # ramped to --train_epsilon
  curve = json.loads((model_dir / "curve.json").read_text())
  assert len(curve) >= 2
  assert [p["schedule_epoch"] for p in curve][-1] == pytest.approx(18.0)
  assert all(b["schedule_epoch"] >= a["schedule_epoch"] + 6 - 1e-6
             for a, b in zip(curve[:-1], curve[1:-1]))
  seconds = [p["train_seconds"] for p in curve]
  assert seconds == sorted(seconds) and seconds[-1] <= metrics["train_seconds"] + 1
  for p in curve:
    assert p["examples"] == 3
    assert set(p["verified"]) == {"interval", "symbolic"}
    assert all(0.0 <= v <= p["clean"] <= 1.0 for v in p["verified"].values())
  assert curve[-1]["train_epsilon"] == pytest.approx(0.125)


# -- starting from saved weights ----------------------------------------------------


def test_init_weights_starts_from_a_saved_network(parse_flags, tmp_path):
  source = networks.build("mnist_small")
  source.set_weights([w * 0.5 + 0.01 for w in source.get_weights()])
  source.save(tmp_path / "source.keras")
  model_dir = tmp_path / "run"
  f = parse_flags("--flagfile=flags/mnist_small.cfg", *TINY, "--learning_rate=1e-12",
                  f"--init_weights={tmp_path / 'source.keras'}", "--export=false",
                  f"--model_dir={model_dir}")
  train.run(f)
  trained = keras.models.load_model(model_dir / "network.keras")
  for got, want in zip(trained.get_weights(), source.get_weights(), strict=True):
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "nothing_here", "no network at"),
    (lambda d: networks.build("cifar_small").save(d / "c.keras") or d / "c.keras",
     "has weights of shapes"),
])
def test_init_weights_that_do_not_fit_fail_with_a_clear_error(make, match,
                                                                parse_flags, tmp_path):
  from absl import app
  f = parse_flags("--flagfile=flags/mnist_small.cfg", *TINY,
                  f"--init_weights={make(tmp_path)}", f"--model_dir={tmp_path / 'r'}")
  with pytest.raises(app.UsageError, match=match):
    train.run(f)
