"""A quiet start for the command-line tools.

`python -m mixtrain_tf.train` / `mixtrain_tf.evaluate` would otherwise print about
20 lines of TensorFlow C++ start-up logging (oneDNN, CUDA, CPU features) and TFDS
INFO lines before any work. Unless the command line asks with `--verbosity=1` (or
higher) or `TF_CPP_MIN_LOG_LEVEL` is set, the package is imported with those
silenced; errors and warnings of this project still print. Importing mixtrain_tf as
a library changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys

CLI_MODULES = ("mixtrain_tf.train", "mixtrain_tf.evaluate")


def cli_wants_quiet(argv: list[str] | None = None,
                    environ: dict | None = None) -> bool:
  """True when this process is one of our CLIs without a request for logs."""
  argv = list(getattr(sys, "orig_argv", sys.argv) if argv is None else argv)
  environ = os.environ if environ is None else environ
  if not any(a in CLI_MODULES for a in argv) or "TF_CPP_MIN_LOG_LEVEL" in environ:
    return False
  for i, a in enumerate(argv):
    value = None
    if a.startswith("--verbosity="):
      value = a.split("=", 1)[1]
    elif a in ("--verbosity", "-v") and i + 1 < len(argv):
      value = argv[i + 1]
    if value is not None:
      try:
        return int(value) < 1
      except ValueError:
        return False
  return True


@contextlib.contextmanager
def stderr_silenced():
  """Sends file descriptor 2 (C++ logging included) to /dev/null meanwhile."""
  sys.stderr.flush()
  saved = os.dup(2)
  null = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(null, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


def quiet_start() -> None:
  """Imports TensorFlow silently and lowers TF/TFDS logging, for a quiet CLI."""
  if not cli_wants_quiet():
    return
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # errors reach Python as exceptions
  with stderr_silenced():
    import tensorflow  # noqa: F401  (loads the C++ libraries, which log)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
