"""Tests of the IBP-family recipe pieces (mixtrain_tf.recipes, docs/method.md 9):
the smooth ramp shape, the IBP initialisation, interval margins with their
pre-activation bounds, and the warm-up regularisers against a numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
import zoo

import mixtrain_tf
from mixtrain_tf import networks, recipes


def test_smooth_fraction_ends_monotone_and_continuous_slope():
  s = np.linspace(0, 1, 2001)
  f = np.array([recipes.smooth_fraction(v) for v in s])
  assert f[0] == 0.0 and f[-1] == pytest.approx(1.0)
  assert np.all(np.diff(f) >= 0)
  slope = np.diff(f) / np.diff(s)
  # The slope is continuous at the joint (0.25): no jump between neighbours.
  assert np.max(np.abs(np.diff(slope))) < 0.01
  # Polynomial start: far below the linear ramp early on.
  assert recipes.smooth_fraction(0.1) < 0.1 * 0.1
  assert recipes.smooth_fraction(-1) == 0.0 and recipes.smooth_fraction(2) == 1.0


def test_ibp_init_sets_the_published_std_and_leaves_the_output_layer():
  net = networks.build("mnist_large")
  before = net.get_layer("logits").get_weights()
  done = recipes.ibp_init(net, seed=1)
  assert done == ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"]
  for name in done:
    layer = net.get_layer(name)
    kernel = layer.kernel.numpy()
    fan_in = int(np.prod(kernel.shape[:-1]))
    # The sample std of n normal draws is off by about 1/sqrt(2n): allow 4 of those.
    tol = 4 / math.sqrt(2 * kernel.size)
    assert kernel.std() == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=tol)
    assert abs(kernel.mean()) < 4 * kernel.std() / math.sqrt(kernel.size)
    assert not layer.bias.numpy().any()
  for a, b in zip(before, net.get_layer("logits").get_weights()):
    np.testing.assert_array_equal(a, b)


def test_ibp_init_halves_layers_that_read_a_residual_sum():
  net = networks.build("cifar_resnet")
  recipes.ibp_init(net, seed=0)
  # block2_a reads block1's Add (through its ReLU: not halved); fc1 reads Flatten.
  k = net.get_layer("block1_a").kernel.numpy()
  assert k.std() == pytest.approx(math.sqrt(2 * math.pi) / np.prod(k.shape[:-1]),
                                  rel=0.05)


def test_ibp_margins_equal_the_interval_margins(mnist_batch):
  x, y = mnist_batch
  net = zoo.mnist_small()
  ub, box, pre = recipes.ibp_margins(net, x, y, 0.1)
  want = mixtrain_tf.margin_upper_bounds(net, x, y, 0.1, "interval")
  np.testing.assert_allclose(ub, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(box.lower, np.clip(x - 0.1, 0, 1))
  # One pre-activation per ReLU: conv1, conv2, fc1.
  assert [tuple(b.lower.shape[1:]) for b in pre] == [(14, 14, 16), (7, 7, 32), (100,)]
  assert all(np.all(b.lower.numpy() <= b.upper.numpy()) for b in pre)


def _numpy_regularizer(box_radius, pre, tol):
  """Shi et al. 2021's L_tightness + L_relu, written out in numpy (float64)."""
  r0 = box_radius.mean()
  tight, relu = [], []
  for lo, up in pre:
    c, r = (up + lo) / 2, (up - lo) / 2
    tight.append(max(0.0, tol - r0 / max(r.mean(), 1e-12)) / tol)
    act, inact = lo > 0, up < 0
    d = (c - c.mean())**2
    with np.errstate(divide="ignore", invalid="ignore"):
      mean_r = (c * act).mean() / -(c * inact).mean()
      var_r = (d * act).sum() / (d * inact).sum()
    term = sum(max(0.0, tol - min(v, 1 / max(v, 1e-12))) / tol for v in (mean_r, var_r))
    relu.append(term if np.isfinite(term) else 0.0)
  return np.mean(tight) + np.mean(relu)


def test_warmup_regularizer_matches_the_formula(mnist_batch):
  x, y = mnist_batch
  net = zoo.mnist_small(seed=3)
  for eps in (0.02, 0.1, 0.3):
    _, box, pre = recipes.ibp_margins(net, x, y, eps)
    got = float(recipes.warmup_regularizer(box, pre, tol=0.5))
    want = _numpy_regularizer(
        box.radius.numpy().astype(np.float64),
        [(b.lower.numpy().astype(np.float64), b.upper.numpy().astype(np.float64))
         for b in pre], 0.5)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_warmup_regularizer_has_finite_gradients_without_inactive_neurons():
  """A layer with no inactive neuron has an undefined ratio: it adds nothing, and
  no NaN reaches the gradient."""
  net = zoo.mnist_small(seed=0)
  for layer in net.layers:
    if hasattr(layer, "bias") and layer.name != "logits":
      layer.bias.assign(tf.fill(layer.bias.shape, 5.0))  # every neuron active
  x = np.full((2, 28, 28, 1), 0.5, np.float32)
  with tf.GradientTape() as tape:
    _, box, pre = recipes.ibp_margins(net, x, np.array([0, 1]), 0.01)
    reg = recipes.warmup_regularizer(box, pre)
  grads = tape.gradient(reg, net.trainable_variables)
  assert np.isfinite(float(reg))
  assert all(g is None or np.all(np.isfinite(g.numpy())) for g in grads)


def test_warmup_regularizer_reads_the_first_max_examples(mnist_batch):
  x, y = mnist_batch
  net = zoo.mnist_small(seed=3)
  _, box, pre = recipes.ibp_margins(net, x, y, 0.1)
  got = float(recipes.warmup_regularizer(box, pre, max_examples=3))
  _, box3, pre3 = recipes.ibp_margins(net, x[:3], y[:3], 0.1)
  want = float(recipes.warmup_regularizer(box3, pre3, max_examples=None))
  assert got == pytest.approx(want, rel=1e-6)
