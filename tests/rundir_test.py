"""Tests of mixtrain_tf.rundir: the run-directory lock, atomic writes and the
finished-run and flag checks the training CLI builds on (its end-to-end behaviour
is tested in train_cli_test.py)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from mixtrain_tf import callbacks, networks, rundir


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()  # reaped: the pid names no process now
  return proc.pid


def _write_lock(directory, pid, host=None):
  (directory / rundir.LOCK_NAME).write_text(json.dumps(
      {"pid": pid, "host": host or socket.gethostname(), "started": "earlier"}))


# -- the lock ------------------------------------------------------------------------


def test_second_lock_on_a_directory_is_refused_until_the_first_is_released(tmp_path):
  with rundir.RunLock(str(tmp_path), "--model_dir=X") as held:
    owner = json.loads((tmp_path / ".lock").read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(rundir.RunDirError,
                       match=rf"--model_dir=X is in use by another run \(pid "
                       rf"{os.getpid()} on host {socket.gethostname()}, since"):
      rundir.RunLock(str(tmp_path), "--model_dir=X").acquire()
    assert json.loads((tmp_path / ".lock").read_text()) == held.info
  assert not (tmp_path / ".lock").exists()
  with rundir.RunLock(str(tmp_path)):
    pass


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
  _write_lock(tmp_path, _dead_pid())
  with rundir.RunLock(str(tmp_path)):
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
  assert sorted(os.listdir(tmp_path)) == []


def test_lock_of_another_host_is_respected(tmp_path):
  _write_lock(tmp_path, _dead_pid(), host="some-other-host")
  with pytest.raises(rundir.RunDirError, match="on host some-other-host"):
    rundir.RunLock(str(tmp_path)).acquire()
  assert json.loads((tmp_path / ".lock").read_text())["host"] == "some-other-host"


def test_release_leaves_a_lock_taken_over_by_another_run(tmp_path):
  lock = rundir.RunLock(str(tmp_path))
  lock.acquire()
  _write_lock(tmp_path, os.getppid())  # e.g. after a stale-lock takeover
  lock.release()
  assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getppid()


# -- atomic writes -----------------------------------------------------------------


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path,
                                                                 monkeypatch):
  path = tmp_path / "metrics.json"
  rundir.write_json(str(path), {"old": 1})

  def killed(fd):
    raise KeyboardInterrupt  # e.g. a signal between writing and renaming

  monkeypatch.setattr(rundir.os, "fsync", killed)
  with pytest.raises(KeyboardInterrupt):
    rundir.write_json(str(path), {"new": 2})
  assert json.loads(path.read_text()) == {"old": 1}
  assert os.listdir(tmp_path) == ["metrics.json"]


def test_save_keras_replaces_the_file_whole(tmp_path):
  path = tmp_path / "network.keras"
  path.write_bytes(b"an older, different file")
  network = networks.build("mnist_small")
  rundir.save_keras(network, str(path))
  loaded = keras.models.load_model(path)
  for got, want in zip(loaded.get_weights(), network.get_weights(), strict=True):
    np.testing.assert_array_equal(got, want)
  assert os.listdir(tmp_path) == ["network.keras"]
  assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_replace_dir_keeps_the_old_folder_when_writing_fails(tmp_path):
  target = tmp_path / "saved_model"
  target.mkdir()
  (target / "saved_model.pb").write_text("old")

  def broken(path):
    os.makedirs(path)
    raise OSError("disk full")

  with pytest.raises(OSError):
    rundir.replace_dir(broken, str(target))
  assert (target / "saved_model.pb").read_text() == "old"
  assert os.listdir(tmp_path) == ["saved_model"]

  def good(path):
    os.makedirs(path)
    (pathlib.Path(path) / "saved_model.pb").write_text("new")

  rundir.replace_dir(good, str(target))
  assert (target / "saved_model.pb").read_text() == "new"
  assert os.listdir(tmp_path) == ["saved_model"]


# -- what a directory holds ----------------------------------------------------------


def test_directory_problem_names_files_and_creatable_paths(tmp_path):
  (tmp_path / "file").write_text("x")
  assert rundir.directory_problem(str(tmp_path / "new" / "run")) is None
  assert rundir.directory_problem(str(tmp_path)) is None
  assert "is a file, not a directory" in rundir.directory_problem(
      str(tmp_path / "file"))
  assert "is a file, so" in rundir.directory_problem(str(tmp_path / "file" / "run"))


def test_finished_and_clear_outputs(tmp_path):
  assert not rundir.finished(str(tmp_path))
  (tmp_path / "flags.txt").write_text("--epochs=1\n")
  (tmp_path / "backup").mkdir()
  assert not rundir.finished(str(tmp_path))  # an unfinished run
  (tmp_path / "metrics.json").write_text("{}")
  assert rundir.finished(str(tmp_path))
  (tmp_path / "workers").mkdir()
  (tmp_path / "notes.txt").write_text("mine")
  rundir.clear_outputs(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["notes.txt", "workers"]


def test_flag_differences_reads_booleans_and_unset_flags(tmp_path):
  path = tmp_path / "flags.txt"
  path.write_text("--epochs=3\n--noshuffle\n\n--model_dir=/a\n--seed=0\n")
  names = ["epochs", "shuffle", "model_dir", "seed", "data_dir"]
  recorded = rundir.read_flags_file(str(path), names)
  assert recorded == {"epochs": "--epochs=3", "shuffle": "--noshuffle",
                      "model_dir": "--model_dir=/a", "seed": "--seed=0"}
  current = {"epochs": "--epochs=4", "shuffle": "--shuffle",
             "model_dir": "--model_dir=/b", "seed": "--seed=0",
             "data_dir": "--data_dir=/d"}
  assert rundir.flag_differences(recorded, current, ignore=("model_dir",)) == [
      "--data_dir unset (now --data_dir=/d)", "--epochs=3 (now --epochs=4)",
      "--noshuffle (now --shuffle)"]


# -- resuming: the backup's history and clock ------------------------------------------


class _Interrupt(keras.callbacks.Callback):
  def on_epoch_begin(self, epoch, logs=None):
    if epoch == 2:
      raise RuntimeError("killed")


def _tiny_model():
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
  model.epsilon = keras.Variable(0.0, trainable=False, name="epsilon")  # TimeBudget
  model.compile(optimizer="sgd", loss="mse")
  return model


def test_resumed_fit_reports_the_whole_run_and_continues_its_budget(tmp_path):
  x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
  y = x.sum(axis=1, keepdims=True)
  backup_dir = str(tmp_path / "backup")

  def fit(extra=()):
    budget = callbacks.TimeBudget(1000.0, 4, callbacks.EpsilonRamp(0.1, 4))
    backup = callbacks.ResumableBackup(backup_dir, on_resume=(budget.resume,))
    model = _tiny_model()
    model.fit(x, y, epochs=4, verbose=0, callbacks=[budget, backup, *extra])
    return backup, budget

  with pytest.raises(RuntimeError, match="killed"):
    fit([_Interrupt()])
  progress = json.loads((tmp_path / "backup" / "progress.json").read_text())
  assert [e["epoch"] for e in progress] == [0, 1]
  backup, budget = fit()
  assert backup.initial_epoch == 2
  history = backup.history()
  assert len(history["loss"]) == 4
  assert history["loss"][:2] == [e["logs"]["loss"] for e in progress]
  seconds = history["train_seconds"]  # TimeBudget's clock went on
  assert seconds == sorted(seconds) and seconds[2] > progress[-1]["train_seconds"]
  assert backup.seconds_before == progress[-1]["train_seconds"] > 0
  assert backup.train_seconds() > backup.seconds_before
  assert not (tmp_path / "backup").exists()
