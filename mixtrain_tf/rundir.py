"""Run directories of the training CLI: locks, atomic writes, finished runs.

A run directory (`--model_dir`) holds one training run. This module keeps it
whole:

* `RunLock`: one run per directory at a time. The lock file `.lock` records the
  owner's pid, host and start time; a lock whose pid is dead on this host is stale
  and taken over.
* `write_text`, `write_json`, `save_keras`, `replace_dir`: outputs appear whole or
  not at all (written next to their final name, then `os.replace`d), so a killed
  run never leaves a half-written file.
* `finished`, `flag_differences`, `clear_outputs`: what a directory holds, for the
  CLI to refuse to overwrite a finished run or to resume one with other flags.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time

LOCK_NAME = ".lock"
# Files and folders a training run writes into its directory (--overwrite removes
# them; `workers/` of a multi-worker run is each worker's own).
OUTPUTS = ("flags.txt", "history.json", "network.keras", "metrics.json",
           "curve.json", "saved_model", "logs", "backup")
# Any of these means training finished: the run is not resumed or retrained.
FINISHED_MARKERS = ("metrics.json", "network.keras")


class RunDirError(Exception):
  """The run directory cannot be used as asked; the message says what to do."""


# -- atomic writes ------------------------------------------------------------------


def _temp_path(path: str, suffix: str = "") -> str:
  directory, name = os.path.split(os.path.abspath(path))
  fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}",
                              dir=directory)
  os.close(fd)
  return temp


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (a temporary file, then os.replace)."""
  temp = _temp_path(path)
  try:
    with open(temp, "w") as fh:
      fh.write(text)
      fh.flush()
      os.fsync(fh.fileno())
    os.chmod(temp, 0o644)
    os.replace(temp, path)
  except BaseException:
    _remove(temp)
    raise


def write_json(path: str, value) -> None:
  """Writes `value` as indented JSON to `path` atomically."""
  write_text(path, json.dumps(value, indent=1))


def save_keras(model, path: str) -> None:
  """Saves a Keras model to the `.keras` file `path` atomically."""
  temp = _temp_path(path, suffix=".keras")  # Keras wants the .keras suffix
  try:
    model.save(temp)
    os.chmod(temp, 0o644)
    os.replace(temp, path)
  except BaseException:
    _remove(temp)
    raise


def replace_dir(write, path: str) -> None:
  """Calls `write(temp_dir)` and then moves the folder it wrote to `path`.

  An old `path` is removed only once the new folder is complete.
  """
  parent, name = os.path.split(os.path.abspath(path))
  temp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
  try:
    os.rmdir(temp)  # writers such as SavedModel export want to create it
    write(temp)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(temp, path)
  except BaseException:
    shutil.rmtree(temp, ignore_errors=True)
    raise


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


# -- what a directory holds --------------------------------------------------------


def directory_problem(path: str) -> str | None:
  """Why `path` cannot become a writable run directory, or None if it can.

  Creates nothing: a missing `path` is fine if its nearest existing parent is a
  writable folder.
  """
  path = os.path.abspath(path)
  if os.path.exists(path):
    if not os.path.isdir(path):
      return f"{path} is a file, not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
      return f"{path} is not writable (read-only)"
    return None
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f"{parent} is a file, so {path} cannot be created"
  if not os.access(parent, os.W_OK | os.X_OK):
    return f"{path} cannot be created: {parent} is not writable (read-only)"
  return None


def finished(path: str) -> bool:
  """Whether `path` holds a run whose training finished."""
  return any(os.path.exists(os.path.join(path, m)) for m in FINISHED_MARKERS)


def clear_outputs(path: str) -> None:
  """Removes a previous run's outputs (`OUTPUTS`) from `path`."""
  for name in OUTPUTS:
    target = os.path.join(path, name)
    if os.path.isdir(target) and not os.path.islink(target):
      shutil.rmtree(target)
    elif os.path.lexists(target):
      os.remove(target)


def read_flags_file(path: str, names: list[str]) -> dict[str, str]:
  """Reads a flags.txt (`--name=value` / `--name` / `--noname` lines).

  Returns:
    {flag name: its line} for the lines naming one of `names`.
  """
  recorded = {}
  with open(path) as fh:
    for line in fh:
      line = line.strip()
      if not line.startswith("--"):
        continue
      key = line[2:].split("=", 1)[0]
      if key not in names and key.startswith("no") and key[2:] in names:
        key = key[2:]
      if key in names:
        recorded[key] = line
  return recorded


def flag_differences(recorded: dict[str, str], current: dict[str, str],
                     ignore=()) -> list[str]:
  """Flags whose serialized value differs, as 'was X, now Y' phrases.

  Args:
    recorded: {name: serialized flag} as read by `read_flags_file` (a flag
      missing here was unset, i.e. serialized as "").
    current: {name: serialized flag} of this run.
    ignore: names that may differ.
  """
  out = []
  for name in sorted(current):
    if name in ignore:
      continue
    was, now = recorded.get(name, ""), current[name]
    if was != now:
      out.append(f"{was or f'--{name} unset'} (now {now or 'unset'})")
  return out


# -- one run per directory ---------------------------------------------------------


def _read_lock(path: str) -> dict | None:
  try:
    with open(path) as fh:
      info = json.load(fh)
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) else None


def _alive(info: dict) -> bool:
  """Whether the lock's owner may still run (unknown hosts count as alive)."""
  if info.get("host") != socket.gethostname():
    return True
  pid = info.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


class RunLock:
  """Holds `<directory>/.lock` while training; a second holder gets RunDirError.

  Use as a context manager. The directory must exist.
  """

  # An unreadable lock (being written, or corrupt) younger than this is held.
  UNREADABLE_GRACE_S = 30.0

  def __init__(self, directory: str, describe: str = ""):
    self.path = os.path.join(directory, LOCK_NAME)
    self.describe = describe or directory
    self.info = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    self._held = False

  def acquire(self) -> None:
    for _ in range(5):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        owner = _read_lock(self.path)
        if owner is None:
          try:
            age = time.time() - os.path.getmtime(self.path)
          except FileNotFoundError:
            continue
          if age < self.UNREADABLE_GRACE_S:
            raise RunDirError(
                f"{self.describe} is in use by another run (its lock {self.path} "
                "is being written); wait for it, or use another --model_dir."
            ) from None
        elif _alive(owner):
          raise RunDirError(
              f"{self.describe} is in use by another run (pid {owner.get('pid')} on "
              f"host {owner.get('host')}, since {owner.get('started')}); wait for "
              f"it to finish or use another --model_dir (if that run is gone, "
              f"delete {self.path})."
          ) from None
        self._break(owner)
        continue
      with os.fdopen(fd, "w") as fh:
        json.dump(self.info, fh)
      self._held = True
      return
    raise RunDirError(f"could not take the lock {self.path}: other runs keep "
                      "taking it; use another --model_dir.")

  def _break(self, stale: dict | None) -> None:
    """Removes a stale lock, unless another run replaced it meanwhile."""
    aside = f"{self.path}.stale-{os.getpid()}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # another run broke it first
    if _read_lock(aside) != stale:  # a live lock taken since we read it: restore
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
    _remove(aside)

  def release(self) -> None:
    if self._held and _read_lock(self.path) == self.info:
      _remove(self.path)
    self._held = False

  def __enter__(self) -> RunLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
