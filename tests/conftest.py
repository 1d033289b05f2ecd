"""Test setup: absl flags marked parsed, quiet TensorFlow, data dir from the repo."""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("TFDS_DATA_DIR", str(REPO_ROOT.parent / "shared" / "tfds"))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
