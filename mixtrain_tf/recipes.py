"""Pieces of the IBP-family training recipes (docs/method.md 9).

* `ibp_init`: the IBP initialisation of Shi et al. 2021 (Fast certified robust
  training with short warmup): kernels N(0, 2*pi / fan_in^2), so that at
  initialisation the interval width neither explodes nor vanishes with depth.
* `warmup_regularizer`: their two warm-up regularisers, on the interval bounds of
  the pre-activations: bound tightness (a layer's mean radius should not grow past
  the input's by more than 1/tol) and ReLU balance (active and inactive neurons
  should have comparable mean and spread of their centres).
* `smooth_fraction`: the eps ramp shape they use (polynomial, then linear, with a
  continuous slope), instead of a linear ramp whose first steps jolt the network.
* `ibp_margins`: interval margin bounds and the node bounds behind them, in one
  pass, so the regulariser costs no second propagation.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from mixtrain_tf import api, interval, ops
from mixtrain_tf.bounds import IntervalBounds


def smooth_fraction(s: float, mid: float = 0.25, power: float = 4.0) -> float:
  """Ramp fraction in [0, 1] at progress s in [0, 1]: a * s**power up to `mid`,
  then linear to 1, the slope continuous at `mid`."""
  s = min(1.0, max(0.0, float(s)))
  a = 1.0 / (mid ** (power - 1) * (power * (1 - mid) + mid))
  if s <= mid:
    return a * s**power
  at_mid = a * mid**power
  return at_mid + (1 - at_mid) * (s - mid) / (1 - mid)


def _kernel_layers(network: keras.Model) -> list:
  """Dense and Conv layers, in graph order (nested models included)."""
  out = []
  for layer in network._flatten_layers(include_self=False, recursive=True):
    if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
      out.append(layer)
  return out


def ibp_init(network: keras.Model, seed: int = 0) -> list[str]:
  """Re-initialises every Dense/Conv2D kernel but the output layer's with
  N(0, 2*pi / fan_in^2) and zero biases (Shi et al. 2021). A layer that reads an
  Add (a residual sum of two branches) gets half that, as in their code.
  Returns the names of the layers re-initialised."""
  layers = _kernel_layers(network)
  out_layer = network.layers[-1]
  rng = np.random.default_rng(seed)
  done = []
  for layer in layers:
    if layer is out_layer:
      continue
    shape = tuple(layer.kernel.shape)
    fan_in = int(np.prod(shape[:-1]))
    std = math.sqrt(2 * math.pi) / fan_in
    inbound = getattr(layer, "_inbound_nodes", [])
    reads_add = any(isinstance(getattr(t, "_keras_history", (None,))[0],
                               keras.layers.Add)
                    for n in inbound for t in n.input_tensors)
    if reads_add:
      std /= 2
    layer.kernel.assign(rng.normal(0.0, std, shape).astype("float32"))
    if getattr(layer, "bias", None) is not None:
      layer.bias.assign(np.zeros(tuple(layer.bias.shape), "float32"))
    done.append(layer.name)
  return done


def ibp_margins(network: keras.Model, x, y, epsilon, clip_min: float = 0.0,
                clip_max: float = 1.0
                ) -> tuple[tf.Tensor, list[IntervalBounds], list[IntervalBounds]]:
  """(margin upper bounds [batch, classes], the input box, pre-activation bounds):
  interval bounds of z_j - z_y over the checked, clipped ball, with the interval
  bounds of each ReLU's input computed on the way."""
  graph = api.bound_graph(network)
  lower, upper = api.input_box(x, epsilon, clip_min, clip_max)
  n_out = int(np.prod(graph.output_shape))
  api.true_float32()
  out, nodes = interval.bounds_and_nodes(graph, lower, upper,
                                         api.margin_spec(y, n_out))
  pre = [nodes[node.inputs[0]] for node in graph.nodes
         if isinstance(node.op, ops.ReluOp) and node.inputs[0] < len(nodes)]
  return out.upper, IntervalBounds(lower, upper), pre


def warmup_regularizer(box: IntervalBounds, pre: list[IntervalBounds],
                       tol: float = 0.5, max_examples: int | None = 32
                       ) -> tf.Tensor:
  """Shi et al. 2021's L_tightness + L_relu (each averaged over the ReLU layers).

  Its statistics (means and spreads over the batch and the neurons) are taken on
  the first `max_examples` examples of the batch (None: all): the terms are a
  few elementwise passes over every pre-activation, memory-bound, and on the whole
  batch they cost more than the interval bounds themselves (mnist_large, batch
  256, one core: 2.6 s a step against 0.6 s)."""
  if not pre:
    return tf.constant(0.0)
  if max_examples is not None:
    def head(b):
      return IntervalBounds(b.lower[:max_examples], b.upper[:max_examples])
    box, pre = head(box), [head(b) for b in pre]
  radius0 = tf.reduce_mean(box.radius)
  tightness, balance = [], []
  for b in pre:
    center, radius = b.center, b.radius
    tightness.append(tf.nn.relu(tol - radius0 / tf.maximum(
        tf.reduce_mean(radius), 1e-12)) / tol)
    active = tf.cast(b.lower > 0, tf.float32)
    inactive = tf.cast(b.upper < 0, tf.float32)
    spread = tf.square(center - tf.reduce_mean(center))
    ratios = [(tf.reduce_mean(center * active), -tf.reduce_mean(center * inactive)),
              (tf.reduce_sum(spread * active), tf.reduce_sum(spread * inactive))]
    term, valid = tf.zeros(()), tf.constant(True)
    for num, den in ratios:
      # No inactive neuron: the ratio is undefined and the layer adds nothing
      # (safe division, so no NaN reaches the gradient either).
      valid = tf.logical_and(valid, den > 0)
      r = num / tf.where(den > 0, den, tf.ones_like(den))
      r = tf.minimum(r, 1.0 / tf.maximum(r, 1e-12))
      term += tf.nn.relu(tol - r) / tol
    balance.append(tf.where(valid, term, tf.zeros_like(term)))
  return tf.add_n(tightness) / len(pre) + tf.add_n(balance) / len(pre)
