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
import shutil
import signal
import socket
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
    "k_not_a_number": (["--k=many"], r"--k must be an integer >= 1 or 'auto'"),
    "network_dataset_mismatch": (["--dataset=cifar10", "--network=mnist_small"],
                                 r"--network does not take --dataset's images"),
    "missing_model_dir": ([], r"--model_dir must have a value"),
    "zero_time_budget": (["--time_budget_s=0"], r"--time_budget_s must be > 0"),
    "zero_max_train_examples": (["--max_train_examples=0"],
                                r"--max_train_examples must be >= 1"),
    "zero_max_eval_examples": (["--max_eval_examples=0"],
                               r"--max_eval_examples must be >= 1"),
    "negative_validation_size": (["--validation_size=-1"],
                                 r"--validation_size must be >= 0"),
}


def _run_all(root: pathlib.Path, commands: dict) -> dict:
  """Runs {case: (CLI flags, model_dir)} as CLI processes, all at once.

  Returns {case: (returncode, stdout, stderr, CPU seconds, model_dir)}. CPU time,
  not wall time, says how much work a process did: the machine may be busy.
  """
  procs = {}
  for name, (flag_args, model_dir) in commands.items():
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


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory):
  """One CLI process per BAD_FLAGS case (see `_run_all`)."""
  root = tmp_path_factory.mktemp("bad_flags")
  commands = {}
  for name, (args, _) in BAD_FLAGS.items():
    model_dir = root / name
    flag_args = ["--flagfile=flags/mnist_small.cfg", *args]
    if name != "missing_model_dir":
      flag_args.append(f"--model_dir={model_dir}")
    commands[name] = (flag_args, model_dir)
  return _run_all(root, commands)


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


# -- bad inputs found before any work -----------------------------------------------


def _file(path: pathlib.Path, content: bytes = b"x") -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content)
  return path


def _finished_run(run: pathlib.Path) -> pathlib.Path:
  for name in ("metrics.json", "network.keras", "history.json", "flags.txt"):
    _file(run / name, f"kept {name}".encode())
  return run


def _run_in_progress(run: pathlib.Path) -> pathlib.Path:
  # This test process is alive on this host: a live lock.
  _file(run / ".lock", json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "started": "2026-01-01T00:00:00"}).encode())
  return run


# case: (setup(case folder) -> (extra flags, --model_dir), error pattern,
#        whether --model_dir must stay as it was: absent, or with the same files)
BAD_INPUTS = {
    "model_dir_is_a_file": (
        lambda d: ([], _file(d / "run")), r"--model_dir: .*run is a file"),
    "model_dir_under_a_file": (
        lambda d: ([], _file(d / "file") / "run"),
        r"--model_dir: .*file is a file, so .*run cannot be created"),
    "missing_data_dir": (
        lambda d: ([f"--data_dir={d / 'nowhere'}"], d / "run"),
        r"--data_dir: .*nowhere .*is not a directory; pass --data_dir"),
    "corrupt_init_weights": (
        lambda d: ([f"--init_weights={_file(d / 'w.keras', b'not a zip')}"],
                   d / "run"),
        r"--init_weights: .*w\.keras could not be read as a Keras model: not a zip"),
    "dynamic_alpha_without_validation": (
        lambda d: (["--validation_size=0"], d / "run"),
        r"--dynamic_alpha needs --validation_size > 0"),
    "finished_run": (
        lambda d: ([], _finished_run(d / "run")),
        r"--model_dir=.*run already holds a finished run.*new --model_dir.*"
        r"--overwrite"),
    "run_in_progress": (
        lambda d: ([], _run_in_progress(d / "run")),
        rf"--model_dir=.*run is in use by another run \(pid {os.getpid()} on host "),
}


def _snapshot(path: pathlib.Path):
  if path.is_file():
    return path.read_bytes()
  if path.is_dir():
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
  return None


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
  """One CLI process per BAD_INPUTS case; also {case: snapshot of --model_dir}."""
  root = tmp_path_factory.mktemp("bad_inputs")
  commands, before = {}, {}
  for name, (setup, _) in BAD_INPUTS.items():
    args, model_dir = setup(root / name)
    before[name] = _snapshot(model_dir)
    # TINY: code that misses the problem trains for seconds, not an hour.
    commands[name] = (["--flagfile=flags/mnist_small.cfg", *TINY, *args,
                       f"--model_dir={model_dir}"], model_dir)
  return _run_all(root, commands), before


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_inputs_fail_before_any_work_with_one_line(name, bad_input_runs):
  runs, before = bad_input_runs
  returncode, out, err, cpu_seconds, model_dir = runs[name]
  assert returncode != 0
  error_lines = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1, err[-3000:]
  assert re.search(BAD_INPUTS[name][1], error_lines[0]), error_lines[0]
  assert "Traceback" not in err and "flags:" not in err, err[-3000:]
  assert "Epoch" not in out
  assert _snapshot(model_dir) == before[name], "--model_dir was changed"
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
    "mnist_small_ibp_eps0.3": ("mnist_small_ibp_eps0.3", [], ()),
    "mnist_small_ibp_eps0.3_long": ("mnist_small_ibp_eps0.3_long", [], SLOW),
    "mnist_small_ibp_eps0.1": ("mnist_small_ibp_eps0.1", [], SLOW),
    "cifar_small_ibp_2": ("cifar_small_ibp_2", [], ()),
    "cifar_small_ibp_2_long": ("cifar_small_ibp_2_long", [], SLOW),
    "cifar_small_ibp_8": ("cifar_small_ibp_8", [], SLOW),
    "mnist_small_mtl_ibp_eps0.3": ("mnist_small_mtl_ibp_eps0.3", [], SLOW),
    "cifar_small_mtl_ibp_2": ("cifar_small_mtl_ibp_2", [], SLOW),
    "mnist_small_mtl_ibp_eps0.1": ("mnist_small_mtl_ibp_eps0.1", [], SLOW),
    "mnist_large_ibp_eps0.3": ("mnist_large_ibp_eps0.3", BIG, SLOW),
    "cifar_large_ibp_2": ("cifar_large_ibp_2", BIG, SLOW),
    "cifar_large_ibp_8": ("cifar_large_ibp_8", BIG, SLOW),
    "cifar_resnet_ibp_2": ("cifar_resnet_ibp_2", BIG, SLOW),
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

RESUME_FLAGS = [
    "--flagfile=flags/mnist_small.cfg", "--epochs=3", "--batch_size=10",
    "--max_train_examples=200", "--validation_size=10", "--max_eval_examples=4",
    "--eval_batch_size=4", "--final_methods=interval", "--pgd_steps=2",
    "--eps_ramp_epochs=2", "--curve_examples=2", "--export=false"]


def _backed_up_epochs(model_dir: pathlib.Path) -> int | None:
  try:
    return json.loads((model_dir / "backup" / "training_metadata.json").read_text())[
        "epoch"]
  except (OSError, ValueError, KeyError):
    return None


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
  """A run SIGKILLed after its first epoch's backup: (model_dir, epochs backed up).

  Tests copy the folder before using it.
  """
  model_dir = tmp_path_factory.mktemp("killed") / "run"
  proc = subprocess.Popen(_train_command(*RESUME_FLAGS, f"--model_dir={model_dir}"),
                          cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  while _backed_up_epochs(model_dir) is None:
    if proc.poll() is not None:
      pytest.fail("the run ended before its first backup: "
                  + proc.stderr.read()[-3000:])
    assert time.monotonic() < deadline, "no backup after 240 s"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL
  done = _backed_up_epochs(model_dir)
  assert done is not None and 1 <= done < 3, f"backup after {done} epochs"
  assert not (model_dir / "metrics.json").exists()
  return model_dir, done


def _copy_run(source: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  target = tmp_path / "run"
  shutil.copytree(source, target)
  return target


def _epoch_steps(event_file: pathlib.Path, tag: str = "epoch_loss") -> list[int]:
  steps = []
  try:
    for event in tf.compat.v1.train.summary_iterator(str(event_file)):
      steps += [event.step for v in event.summary.value if v.tag == tag]
  except tf.errors.DataLossError:  # the killed run's file may end mid-record
    pass
  return steps


def test_killed_run_resumes_from_its_backup(killed_run, tmp_path):
  """The same command finishes a SIGKILLed run; history, train seconds, the curve
  and TensorBoard's epoch steps cover the whole run, not only its resumed part."""
  model_dir = _copy_run(killed_run[0], tmp_path)
  done = killed_run[1]
  before = json.loads((model_dir / "backup" / "progress.json").read_text())[:done]
  assert (model_dir / ".lock").exists(), "the killed run left no (stale) lock"
  old_events = set((model_dir / "logs" / "train").glob("events.out.tfevents.*"))

  rerun = subprocess.run(_train_command(*RESUME_FLAGS, f"--model_dir={model_dir}"),
                         cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300, check=False)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  # It resumed (Keras prints the epochs it runs) rather than starting over.
  assert "Epoch 1/3" not in rerun.stdout and "Epoch 3/3" in rerun.stdout, (
      rerun.stdout[-3000:])
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert metrics["epochs"] == 3
  assert metrics["done"] == ["training", "evaluation"]
  history = json.loads((model_dir / "history.json").read_text())
  assert history and all(len(v) == 3 for v in history.values()), (
      f"history has {len(history['loss'])} epochs, expected all 3")
  for epoch in before:  # the epochs before the kill are the killed run's
    for key, value in epoch["logs"].items():
      assert history[key][epoch["epoch"]] == pytest.approx(value), key
  assert metrics["train_seconds"] >= round(before[-1]["train_seconds"], 1)
  curve = json.loads((model_dir / "curve.json").read_text())
  assert [p["epoch"] for p in curve] == [1, 2, 3]
  seconds = [p["train_seconds"] for p in curve]
  assert seconds == sorted(seconds) and seconds[-1] <= metrics["train_seconds"] + 1
  new_events = set((model_dir / "logs" / "train").glob("events.out.tfevents.*"))
  [resumed_events] = new_events - old_events
  assert _epoch_steps(resumed_events) == list(range(done, 3)), (
      "TensorBoard's epoch steps restarted instead of continuing")
  assert not (model_dir / "backup").exists()
  assert not (model_dir / ".lock").exists(), "the lock outlived the run"


def test_resume_with_other_flags_is_refused_and_names_them(killed_run, tmp_path):
  model_dir = _copy_run(killed_run[0], tmp_path)
  flags_txt = (model_dir / "flags.txt").read_text()
  rerun = subprocess.run(
      _train_command(*RESUME_FLAGS, "--epochs=4", "--learning_rate=0.01",
                     "--eval_batch_size=2", f"--model_dir={model_dir}"),
      cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300,
      check=False)
  assert rerun.returncode != 0
  error_lines = [line for line in rerun.stderr.splitlines()
                 if line.startswith("error:")]
  assert len(error_lines) == 1, rerun.stderr[-3000:]
  assert "holds an unfinished run with other flags" in error_lines[0]
  assert "--epochs=3 (now --epochs=4)" in error_lines[0]
  assert "--learning_rate=0.001 (now --learning_rate=0.01)" in error_lines[0]
  # --eval_batch_size and --model_dir may differ (train.RESUME_MAY_DIFFER).
  assert "eval_batch_size" not in error_lines[0]
  assert "model_dir=" not in error_lines[0].split("other flags:")[1]
  assert "Traceback" not in rerun.stderr and "Epoch" not in rerun.stdout
  assert (model_dir / "flags.txt").read_text() == flags_txt
  assert _backed_up_epochs(model_dir) == killed_run[1]


# -- one run per directory, finished runs kept ------------------------------------


def test_second_run_on_the_same_model_dir_stops_with_one_line(tmp_path):
  """While a run trains, a second one on its --model_dir stops at once."""
  model_dir = tmp_path / "run"
  first = subprocess.Popen(
      _train_command("--flagfile=flags/mnist_small.cfg", *TINY, "--epochs=10000",
                     f"--model_dir={model_dir}"),
      cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True)
  try:
    deadline = time.monotonic() + 240
    while not (model_dir / "flags.txt").exists():  # written under the lock
      if first.poll() is not None:
        pytest.fail("the first run ended early: " + first.stderr.read()[-3000:])
      assert time.monotonic() < deadline, "the first run did not start in 240 s"
      time.sleep(0.05)
    lock = json.loads((model_dir / ".lock").read_text())
    assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()
    second = subprocess.run(
        _train_command("--flagfile=flags/mnist_small.cfg", *TINY,
                       f"--model_dir={model_dir}"),
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300,
        check=False)
    assert first.poll() is None, "the first run was disturbed"
  finally:
    first.kill()
    first.wait(timeout=30)
    first.stderr.close()
  assert second.returncode != 0
  error_lines = [line for line in second.stderr.splitlines()
                 if line.startswith("error:")]
  assert len(error_lines) == 1, second.stderr[-3000:]
  assert f"is in use by another run (pid {first.pid} on host" in error_lines[0]
  assert "Traceback" not in second.stderr and "Epoch" not in second.stdout


def _outputs(model_dir: pathlib.Path) -> dict:
  return {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}


def test_finished_run_is_never_overwritten_unless_asked(parse_flags, tmp_path):
  from mixtrain_tf import rundir
  model_dir = tmp_path / "run"
  first = ["--flagfile=flags/mnist_small.cfg", *TINY, "--export=false",
           f"--model_dir={model_dir}"]
  train.run(parse_flags(*first))
  kept = _outputs(model_dir)
  assert {"metrics.json", "history.json", "flags.txt", "network.keras"} <= set(kept)
  for again in [first, [*first, "--epochs=2"]]:  # same or other flags
    with pytest.raises(rundir.RunDirError,
                       match=r"already holds a finished run.*--overwrite"):
      train.run(parse_flags(*again))
    assert _outputs(model_dir) == kept
  metrics = train.run(parse_flags(*first, "--epochs=2", "--overwrite"))
  assert metrics["epochs"] == 2
  assert json.loads((model_dir / "metrics.json").read_text())["epochs"] == 2
  assert "--epochs=2" in (model_dir / "flags.txt").read_text()
  assert not [p.name for p in model_dir.iterdir() if p.name.startswith(".")], (
      "temporary or lock files were left behind")


def test_read_only_model_dir_fails_before_any_work(parse_flags, tmp_path,
                                                   monkeypatch):
  from absl import app

  from mixtrain_tf import rundir
  model_dir = tmp_path / "ro" / "run"
  (tmp_path / "ro").mkdir()
  f = parse_flags("--flagfile=flags/mnist_small.cfg", *TINY,
                  f"--model_dir={model_dir}")
  if os.geteuid() != 0:  # root may write to read-only folders
    (tmp_path / "ro").chmod(0o555)
  else:  # what os.access says for a read-only file system, even to root
    real_access = os.access
    monkeypatch.setattr(rundir.os, "access", lambda p, mode: (
        real_access(p, mode) and not str(p).startswith(str(tmp_path / "ro"))))
  try:
    with pytest.raises(app.UsageError,
                       match=r"--model_dir: .*run cannot be created: .*ro is not "
                       r"writable \(read-only\)"):
      train.run(f)
  finally:
    (tmp_path / "ro").chmod(0o755)
  assert not model_dir.exists()


# -- late failures keep what was done ----------------------------------------------


def test_failed_export_keeps_the_trained_and_evaluated_run(parse_flags, tmp_path,
                                                           monkeypatch):
  def broken_export(network, path):
    os.makedirs(path)
    (pathlib.Path(path) / "half_written").write_text("x")
    raise OSError("No space left on device")

  monkeypatch.setattr(train.export, "export_saved_model", broken_export)
  model_dir = tmp_path / "run"
  f = parse_flags("--flagfile=flags/mnist_small.cfg", *TINY, f"--model_dir={model_dir}")
  with pytest.raises(OSError, match="No space left"):
    train.run(f)
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert metrics["done"] == ["training", "evaluation"]
  assert metrics["failed"] == {"step": "export",
                               "error": "OSError: No space left on device"}
  assert metrics["test"]["examples"] == 4 and metrics["epochs"] == 1
  keras.models.load_model(model_dir / "network.keras")
  assert json.loads((model_dir / "history.json").read_text())["loss"]
  assert not (model_dir / "saved_model").exists()
  assert sorted(p.name for p in model_dir.iterdir()) == [
      "flags.txt", "history.json", "logs", "metrics.json", "network.keras"], (
          "a half-written export or the lock was left behind")


def test_failed_final_evaluation_keeps_the_trained_run(parse_flags, tmp_path,
                                                       monkeypatch):
  def broken_evaluate(*args, **kwargs):
    raise MemoryError("out of memory")

  monkeypatch.setattr(train.evaluation, "evaluate", broken_evaluate)
  model_dir = tmp_path / "run"
  f = parse_flags("--flagfile=flags/mnist_small.cfg", *TINY, f"--model_dir={model_dir}")
  with pytest.raises(MemoryError):
    train.run(f)
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert metrics["done"] == ["training"]
  assert metrics["failed"]["step"] == "evaluation"
  assert "test" not in metrics and metrics["train_seconds"] > 0
  keras.models.load_model(model_dir / "network.keras")
  assert not (model_dir / "saved_model").exists()


# -- time budget and learning curve ---------------------------------------------------


def test_time_budget_run_stops_by_time_and_writes_a_curve(parse_flags, tmp_path):
  model_dir = tmp_path / "run"
  f = parse_flags("--flagfile=flags/mnist_small.cfg", "--batch_size=10",
                  "--max_train_examples=20", "--validation_size=10",
                  "--max_eval_examples=4", "--eval_batch_size=2", "--pgd_steps=2",
                  "--time_budget_s=15", "--curve_examples=3", "--curve_every=6",
                  "--export=false", f"--model_dir={model_dir}")
  metrics = train.run(f)
  # 18 nominal epochs (the flagfile) laid over 15 s: many short real epochs. The
  # first one traces the step (6-7 s on a slow 2-core CI machine), so a budget of
  # 15 s leaves room for more than one.
  assert metrics["epochs"] > 1
  assert metrics["train_seconds"] >= 15.0
  assert metrics["train_peak_rss_mb"] > 100
  history = json.loads((model_dir / "history.json").read_text())
  assert history["train_seconds"][-1] >= 15.0
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
  # The curve reads its own pipeline: the final evaluation still sees every test
  # example (a partial read of the cached test split once cut it to 517 of 10,000).
  assert metrics["test"]["examples"] == 4


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


def test_k_auto_takes_the_most_points_that_fit_the_memory_budget(parse_flags,
                                                                 capsys):
  from mixtrain_tf import api
  each = 2 * api.per_sample_bytes(networks.build("cifar_large"), "symbolic")
  f = parse_flags("--flagfile=flags/cifar_large.cfg", "--k=auto", "--batch_size=64",
                  f"--bound_memory_mb={int(3.5 * each / 2**20) + 1}",
                  "--model_dir=unused")
  assert train._resolve_k(f, replicas=1) == 3
  assert "--k=auto: k=3 points per replica (symbolic bound" in capsys.readouterr().out
  # Capped by the per-replica batch; a plain --k passes through.
  f = parse_flags("--flagfile=flags/mnist_small.cfg", "--k=auto", "--batch_size=8",
                  "--model_dir=unused")
  assert train._resolve_k(f, replicas=2) == 4
  f = parse_flags("--flagfile=flags/mnist_small.cfg", "--k=7", "--model_dir=unused")
  assert train._resolve_k(f, replicas=1) == 7


def test_k_auto_refuses_a_budget_too_small_for_one_point(parse_flags):
  from absl import app
  f = parse_flags("--flagfile=flags/cifar_large.cfg", "--k=auto",
                  "--bound_memory_mb=1", "--model_dir=unused")
  with pytest.raises(app.UsageError, match="raise the budget or give --k"):
    train._resolve_k(f, replicas=1)
