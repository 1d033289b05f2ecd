r"""Time of one training step per method, as a ratio to the clean step (same run).

    python benchmarks/train_step.py [--networks=mnist_small,cifar_small] [--steps=20]

Each method trains a fresh copy of the network on one fixed real batch (50 images)
through the compiled Keras train function, after one warm-up step; the median step
time is reported. MixTrain's claim to check: its step costs far less than the
`symbolic` (k = batch) and `pgd` (40 steps) steps.
"""

from __future__ import annotations

import os
import statistics
import time

import keras
import tensorflow as tf
from absl import app, flags

from mixtrain_tf import data, networks, training

FLAGS = flags.FLAGS
flags.DEFINE_list("networks", ["mnist_small", "cifar_small"], "Networks to time.")
flags.DEFINE_integer("steps", 20, "Timed steps per method (median reported).")
flags.DEFINE_integer("batch_size", 50, "Batch size.")

DATASET = {"mnist_small": "mnist", "mnist_large": "mnist", "cifar_small": "cifar10",
           "cifar_large": "cifar10", "cifar_resnet": "cifar10",
           "imagenet200_resnet": "imagenet200"}
EPSILON = {"mnist": 0.1, "cifar10": 2 / 255, "imagenet200": 1.785 / 255}
# (label, method, k, pgd steps)
CASES = [("clean", "clean", 1, 0), ("mixtrain k=1", "mixtrain", 1, 0),
         ("mixtrain k=5", "mixtrain", 5, 0), ("mixtrain k=10", "mixtrain", 10, 0),
         ("interval", "interval", 1, 0), ("pgd-40", "pgd", 1, 40),
         ("symbolic k=batch", "symbolic", 1, 0)]


def _batch(dataset: str, size: int):
  ds = data.load(dataset, "test", batch_size=size, max_examples=size)
  return next(iter(ds))


def _step_seconds(name, method, k, pgd_steps, x, y, eps, steps):
  keras.utils.set_random_seed(0)
  net = networks.build(name, data.num_classes(DATASET[name]))
  model = training.MixTrainModel(net, method=method, epsilon=eps, k=k,
                                 pgd_steps=max(pgd_steps, 1),
                                 pgd_step_size=eps / 4)
  model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
  model.make_train_function()
  ds = tf.data.Dataset.from_tensors((x, y)).repeat()
  it = iter(ds)
  model.train_function(it)  # trace + warm-up
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    out = model.train_function(it)
    float(out["loss"])  # wait for the step
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(argv):
  del argv
  print(f"load average at start: {os.getloadavg()}")
  for name in FLAGS.networks:
    dataset = DATASET[name]
    x, y = _batch(dataset, FLAGS.batch_size)
    eps = EPSILON[dataset]
    rows = []
    for label, method, k, pgd_steps in CASES:
      steps = FLAGS.steps if method not in ("pgd", "symbolic") else max(
          3, FLAGS.steps // 5)
      sec = _step_seconds(name, method, k, pgd_steps, x, y, eps, steps)
      rows.append((label, sec))
    clean = rows[0][1]
    print(f"\n{name} ({dataset}, batch {FLAGS.batch_size}, eps {eps:.4f})")
    print(f"{'method':<18}{'ms/step':>10}{'x clean':>10}")
    for label, sec in rows:
      print(f"{label:<18}{1000 * sec:>10.1f}{sec / clean:>10.2f}")
  print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
