r"""Transposed convolutions: `mixtrain_tf.ops.conv2d_transpose` against TensorFlow's.

    python benchmarks/conv_transpose.py [--networks=mnist_small] [--rows=256,2560]

For every Conv2D layer of each network it times, on one thread, in one run:

* the transpose (CROWN's backward pass, and the input gradient of every bound
  pass): `tf.nn.conv2d_transpose` (TensorFlow's Conv2DBackpropInput kernel)
  against the phase form (one stride-1 convolution of the kernel's phases,
  docs/method.md, "Notes on this implementation" 13);
* a convolution's forward and backward pass with respect to input and kernel:
  `tf.nn.conv2d` against `ops.conv2d`, whose input gradient is
  `ops.conv2d_transpose`: the phase form where `ops._use_phases` picks it (the
  "ops uses" column), TensorFlow's kernel elsewhere.

`rows` is the number of images pushed through: a training batch (256) or a batch's
CROWN rows (10 margins x 256). Prints the median milliseconds and ours / theirs.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from mixtrain_tf import data, networks, ops
from mixtrain_tf.graph import bound_graph

FLAGS = flags.FLAGS
flags.DEFINE_list("networks", ["mnist_small", "cifar_small", "mnist_large"],
                  "Networks whose Conv2D layers are timed.")
flags.DEFINE_list("rows", ["256", "2560"], "Images per call.")
flags.DEFINE_integer("runs", 10, "Timed calls (median reported).")

DATASET = {"mnist_small": "mnist", "mnist_large": "mnist", "cifar_small": "cifar10",
           "cifar_large": "cifar10", "cifar_resnet": "cifar10",
           "imagenet200_resnet": "imagenet200"}


def _median_ms(fn, runs: int) -> float:
  fn()
  fn()
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1000 * statistics.median(times)


def _cases(op, n: int):
  """(what, theirs, ours) callables for one Conv2DOp and n rows."""
  rng = np.random.default_rng(0)
  kernel = tf.constant(op.layer.kernel.numpy())
  s, pad, hw = op.strides, op.padding, tuple(op.in_shape[:2])
  x = tf.constant(rng.uniform(size=(n, *op.in_shape)), tf.float32)
  v = tf.constant(rng.normal(size=(n, *op.out_shape)), tf.float32)

  def transpose(fn):
    return tf.function(lambda: tf.reduce_sum(fn()))

  def both_gradients(conv):
    @tf.function
    def run():
      with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        loss = tf.reduce_sum(conv(x, kernel, s, pad) * v)
      return [tf.reduce_sum(g) for g in tape.gradient(loss, [x, kernel])]
    return run

  return [
      ("transpose (phase form)", transpose(lambda: tf.nn.conv2d_transpose(
          v, kernel, (n, *op.in_shape), s, pad)),
       transpose(lambda: ops._phase_transpose(v, kernel, hw, s, pad))),
      ("conv forward + backward", both_gradients(tf.nn.conv2d),
       both_gradients(ops.conv2d)),
  ]


def main(argv):
  del argv
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  print("| network | layer (in -> out, kernel, stride) | ops uses | rows | what | "
        "TensorFlow ms | ours ms | ours / TensorFlow |")
  print("|---|---|---|---:|---|---:|---:|---:|")
  for name in FLAGS.networks:
    net = networks.build(name, data.num_classes(DATASET[name]))
    for node in bound_graph(net).nodes:
      op = node.op
      if not isinstance(op, ops.Conv2DOp):
        continue
      k = tuple(op.layer.kernel_size)
      where = (f"{node.name} ({'x'.join(map(str, op.in_shape))} -> "
               f"{'x'.join(map(str, op.out_shape))}, {k[0]}x{k[1]}, "
               f"{op.strides[0]})")
      uses = "phases" if ops._use_phases(op.layer.kernel, op.strides) else "TF"
      for n in (int(r) for r in FLAGS.rows):
        for what, theirs, ours in _cases(op, n):
          t, o = _median_ms(theirs, FLAGS.runs), _median_ms(ours, FLAGS.runs)
          print(f"| {name} | {where} | {uses} | {n} | {what} | {t:.2f} | {o:.2f} | "
                f"{o / t:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
