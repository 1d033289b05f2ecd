"""Test setup: absl flags marked parsed, quiet TensorFlow, data dir from the repo."""

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("TFDS_DATA_DIR", str(REPO_ROOT.parent / "shared" / "tfds"))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module")
def mnist_batch():
  """zoo.TRAIN_BATCH (8) real MNIST test images [8, 28, 28, 1] in [0, 1] and their
  int32 labels; copies per test module. zoo is imported here, not at the top, so
  that collecting a test does not import TensorFlow early."""
  import numpy as np
  import zoo

  x, y = zoo.mnist_test(zoo.TRAIN_BATCH)
  return x.copy(), y.astype(np.int32)
