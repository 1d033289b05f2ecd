r"""Per-channel scale and shift: TensorFlow's broadcast against `ops.per_channel`.

    python benchmarks/per_channel.py [--shapes=32x32x3,28x28x1,16x16x16] [--images=256]

(x - mean) / std with per-channel constants (InputNormalization's forward pass,
and every ScaleShiftOp bound pass) on `images` images of each shape, one thread, in
one run: broadcast over the last axis as written, against `ops.per_channel`,
which broadcasts the constants to one image and works on flattened rows. Prints
the median milliseconds and ours / theirs.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from mixtrain_tf import ops

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["32x32x3", "28x28x1", "16x16x16"], "Image shapes HxWxC.")
flags.DEFINE_integer("images", 256, "Images per call.")
flags.DEFINE_integer("calls", 50, "Timed calls (median reported).")


def _normalize(x, mean, std):
  return (x - mean) / std


def _cases(shape, images: int):
  """(theirs, ours): tf.functions computing the same values."""
  rng = np.random.default_rng(0)
  x = tf.constant(rng.uniform(size=(images, *shape)), tf.float32)
  mean = tf.constant(rng.uniform(size=shape[-1:]), tf.float32)
  std = tf.constant(rng.uniform(0.2, 0.3, size=shape[-1:]), tf.float32)
  theirs = tf.function(lambda: _normalize(x, mean, std))
  ours = tf.function(lambda: ops.per_channel(_normalize, x, mean, std))
  return theirs, ours


def _median_ms(fn, runs: int) -> float:
  fn()
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn().numpy()
    times.append(time.perf_counter() - t)
  return 1000 * statistics.median(times)


def main(argv):
  del argv
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  print("| shape | images | broadcast ms | per_channel ms | ours / theirs |")
  print("|---|---:|---:|---:|---:|")
  for text in FLAGS.shapes:
    shape = tuple(int(d) for d in text.split("x"))
    theirs, ours = _cases(shape, FLAGS.images)
    t, o = _median_ms(theirs, FLAGS.calls), _median_ms(ours, FLAGS.calls)
    print(f"| {text} | {FLAGS.images} | {t:.2f} | {o:.2f} | {o / t:.2f} |")


if __name__ == "__main__":
  app.run(main)
