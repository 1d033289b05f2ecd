"""Exactness of the bound API (docs/method.md 2): a zero-width box gives the nominal
logits, linear networks get their exact bounds (and input coefficients) from the
symbolic method, and two hand-computed examples give the stated numbers.

Tolerances are for float32 rounding only: zoo.RTOL relative to the bound scale.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
import zoo

import mixtrain_tf
from mixtrain_tf import api
from mixtrain_tf.bounds import SymbolicBounds
from mixtrain_tf.layers import InputNormalization

L = keras.layers


@pytest.mark.parametrize("method", zoo.METHODS)
@pytest.mark.parametrize("net", sorted(zoo.RANDOM_NETS))
def test_zero_width_box_gives_nominal_logits(net, method):
  model = zoo.RANDOM_NETS[net]()
  x = zoo.inputs(model, 3, seed=31)
  logits = model.predict(x, verbose=0)
  lower, upper = mixtrain_tf.compute_bounds(model, x, 0.0, method=method)
  tol = zoo.RTOL * zoo.scale(logits)
  zoo.assert_close(lower, logits, tol)
  zoo.assert_close(upper, logits, tol)
  y = np.arange(3) % logits.shape[1]
  ub = mixtrain_tf.margin_upper_bounds(model, x, y, 0.0, method=method).numpy()
  zoo.assert_close(ub, zoo.margins(logits, y), tol)


def _linear_dense_net():
  model = keras.Sequential([keras.Input((5,)), L.Dense(7), L.Dense(6), L.Dropout(0.1),
                            L.Dense(4)], name="linear_dense")
  return zoo.set_random_weights(model, 41)


def _linear_conv_net():
  x = inputs = keras.Input((5, 5, 2))
  x = InputNormalization([0.2, 0.4], [0.5, 0.25])(x)
  x = L.Conv2D(3, 3, strides=2, padding="same")(x)
  x = L.BatchNormalization()(x)
  a = L.Conv2D(3, 3, padding="same")(x)
  x = L.Add()([a, x])
  x = L.AveragePooling2D(2, padding="same")(x)
  x = L.Flatten()(x)
  return zoo.set_random_weights(keras.Model(inputs, L.Dense(4)(x), name="linear_conv"),
                             42)


def test_linear_dense_network_symbolic_bounds_are_exact():
  model = _linear_dense_net()
  x = zoo.inputs(model, 4, seed=43)
  eps = 0.3
  lo, hi = zoo.box(x, eps)
  ws = [l.get_weights() for l in model.layers if isinstance(l, L.Dense)]
  m = np.eye(5)
  b = np.zeros(5)
  for w, bias in ws:  # composed affine map x -> x @ m + b in float64
    m, b = m @ w.astype(np.float64), b @ w.astype(np.float64) + bias
  c, r = (lo + hi) / 2.0, (hi - lo) / 2.0
  true_max = c @ m + b + r @ np.abs(m)
  true_min = c @ m + b - r @ np.abs(m)
  lower, upper = mixtrain_tf.compute_bounds(model, x, eps, method="symbolic")
  tol = zoo.RTOL * zoo.scale(true_min, true_max)
  zoo.assert_close(upper, true_max, tol)
  zoo.assert_close(lower, true_min, tol)
  # Intervals are sound but lose the cancellations inside the product.
  i_lower, i_upper = mixtrain_tf.compute_bounds(model, x, eps, method="interval")
  assert np.all(i_upper >= true_max - tol) and np.all(i_lower <= true_min + tol)
  assert np.mean(i_upper - i_lower) > 1.05 * np.mean(true_max - true_min)


@pytest.mark.parametrize("net_fn", [_linear_dense_net, _linear_conv_net])
def test_linear_network_exact_bounds_and_input_coeffs(net_fn):
  model = net_fn()
  x = zoo.inputs(model, 3, seed=44)
  eps = 0.25
  lo, hi = zoo.box(x, eps)
  # The exact linear map, from the Jacobian (any point: the network is affine).
  xt = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(xt)
    out = model(xt)
  jac = tape.batch_jacobian(out, xt).numpy().reshape(len(x), out.shape[1], -1)
  r = ((hi - lo) / 2).reshape(len(x), -1)
  center = model.predict((lo + hi) / 2, verbose=0)
  true_max = center + np.einsum("bjk,bk->bj", np.abs(jac), r)
  true_min = center - np.einsum("bjk,bk->bj", np.abs(jac), r)
  tol = zoo.RTOL * zoo.scale(true_min, true_max)
  lower, upper = mixtrain_tf.compute_bounds(model, x, eps, method="symbolic")
  zoo.assert_close(upper, true_max, tol)
  zoo.assert_close(lower, true_min, tol)
  # The container's input coefficients are the linear map times the box radius.
  sb = api.bound_box(model, tf.constant(lo), tf.constant(hi), "symbolic")
  assert isinstance(sb, SymbolicBounds)
  assert sb.relax_coeffs == ()
  coeffs = sb.input_coeffs.numpy().reshape(jac.shape)
  np.testing.assert_allclose(coeffs, jac * r[:, None, :],
                             atol=zoo.RTOL * np.abs(jac).max())
  np.testing.assert_allclose(sb.center.numpy(), center, atol=tol.max())


def _dense_2_2_1():
  """y = 2 relu(x1 + x2 - 1) + relu(x1 - x2 + 2) - 0.5."""
  model = keras.Sequential([keras.Input((2,)), L.Dense(2, activation="relu"),
                            L.Dense(1)], name="hand_dense")
  model.layers[0].set_weights([np.array([[1.0, 1.0], [1.0, -1.0]], np.float32),
                               np.array([-1.0, 2.0], np.float32)])
  model.layers[1].set_weights([np.array([[2.0], [1.0]], np.float32),
                               np.array([-0.5], np.float32)])
  return model


def test_hand_computed_dense_example():
  # Box: x = (0.5, 0.5), eps = 0.5 -> [0, 1]^2; center c = (0.5, 0.5), radius 0.5.
  # h1 = x1 + x2 - 1 = 0 + 0.5 e1 + 0.5 e2 in [-1, 1]: unstable,
  #   lam = u / (u - l) = 1 / 2, mu = -lam * l / 2 = 0.25,
  #   relu(h1) ~ 0.5 h1 + 0.25 + 0.25 h = 0.25 + 0.25 e1 + 0.25 e2 + 0.25 h.
  # h2 = x1 - x2 + 2 = 2 + 0.5 e1 - 0.5 e2 in [1, 3]: active, relu(h2) = h2.
  # y = 2 relu(h1) + relu(h2) - 0.5
  #   = (0.5 + 0.5 e1 + 0.5 e2 + 0.5 h) + (2 + 0.5 e1 - 0.5 e2) - 0.5
  #   = 2 + 1.0 e1 + 0.0 e2 + 0.5 h                -> symbolic [0.5, 3.5].
  # Intervals: relu(h1) in [0, 1], relu(h2) in [1, 3]:
  #   y in [2*0 + 1 - 0.5, 2*1 + 3 - 0.5]          -> interval [0.5, 4.5].
  # True range: max at (1, 1): 2*1 + 2 - 0.5 = 3.5; min at (0, 1): 0 + 1 - 0.5 = 0.5.
  model = _dense_2_2_1()
  x = np.array([[0.5, 0.5]], np.float32)
  lower, upper = mixtrain_tf.compute_bounds(model, x, 0.5, method="symbolic")
  np.testing.assert_allclose(lower, [[0.5]], atol=1e-6)
  np.testing.assert_allclose(upper, [[3.5]], atol=1e-6)
  lower, upper = mixtrain_tf.compute_bounds(model, x, 0.5, method="interval")
  np.testing.assert_allclose(lower, [[0.5]], atol=1e-6)
  np.testing.assert_allclose(upper, [[4.5]], atol=1e-6)
  sb = api.bound_box(model, tf.zeros((1, 2)), tf.ones((1, 2)), "symbolic")
  np.testing.assert_allclose(sb.center, [[2.0]], atol=1e-6)
  np.testing.assert_allclose(sb.input_coeffs, [[[1.0, 0.0]]], atol=1e-6)
  assert len(sb.relax_coeffs) == 1
  np.testing.assert_allclose(sb.relax_coeffs[0], [[[0.5, 0.0]]], atol=1e-6)
  # A smaller box where h1 in [-0.5, 0.5] ... still unstable: x in [0.25, 0.75]^2,
  # h1 = 0 + 0.25 e1 + 0.25 e2, lam = 0.5, mu = 0.125;
  # y = 2 (0.125 + 0.125 e1 + 0.125 e2 + 0.125 h) + (2 + 0.25 e1 - 0.25 e2) - 0.5
  #   = 1.75 + 0.5 e1 + 0.0 e2 + 0.25 h            -> symbolic [1.0, 2.5];
  # intervals: relu(h1) in [0, 0.5], relu(h2) in [1.5, 2.5] -> [1.0, 3.0].
  lower, upper = mixtrain_tf.compute_bounds(model, x, 0.25, method="symbolic")
  np.testing.assert_allclose([lower[0, 0], upper[0, 0]], [1.0, 2.5], atol=1e-6)
  lower, upper = mixtrain_tf.compute_bounds(model, x, 0.25, method="interval")
  np.testing.assert_allclose([lower[0, 0], upper[0, 0]], [1.0, 3.0], atol=1e-6)


def test_hand_computed_conv_example():
  # Input 3x3x1, x = [[.25, .5, .75], [1, 0, .5], [.5, .75, .75]], eps = 0.125.
  # Clipped box: x = 1 -> [.875, 1] (c .9375, r .0625); x = 0 -> [0, .125]
  # (c .0625, r .0625); every other pixel: c = x, r = .125.
  # Conv2D(1 filter, 2x2, valid), kernel [[1, -1], [1, 0]], bias -0.5:
  #   y[i, j] = x[i, j] - x[i, j+1] + x[i+1, j] - 0.5.
  # y00 = .25 - .5 + .9375 - .5 = .1875,  rad .125 + .125 + .0625 = .3125
  #       -> [-.125, .5]   unstable: lam = .5 / .625 = .8, mu = .8 * .125 / 2 = .05
  # y01 = .5 - .75 + .0625 - .5 = -.6875, rad .3125 -> [-1, -.375] dead
  # y10 = .9375 - .0625 + .5 - .5 = .875, rad .0625 + .0625 + .125 = .25
  #       -> [.625, 1.125] active
  # y11 = .0625 - .5 + .75 - .5 = -.1875, rad .0625 + .125 + .125 = .3125
  #       -> [-.5, .125]   unstable: lam = .125 / .625 = .2, mu = .2 * .5 / 2 = .05
  # ReLU, Flatten (y00, y01, y10, y11), Dense(1) weights (1, 1, -1, 2), bias 0.
  # Interval: [0, .5] + 0 - [.625, 1.125] + 2 [0, .125] -> [-1.125, .125].
  # Symbolic (e_ij input symbols, h_ij relaxation symbols):
  #   relu(y00) ~ .8 y00 + .05 + .05 h00 = .2 + .1 e00 - .1 e01 + .05 e10 + .05 h00
  #   relu(y10) = .875 + .0625 e10 - .0625 e11 + .125 e20
  #   relu(y11) ~ .2 y11 + .05 + .05 h11
  #             = .0125 + .0125 e11 - .025 e12 + .025 e21 + .05 h11
  #   out = .2 - .875 + .025 = -.65
  #       + .1 e00 - .1 e01 - .0125 e10 + .0875 e11 - .05 e12 - .125 e20 + .05 e21
  #       + .05 h00 + .1 h11
  #   radius = .1 + .1 + .0125 + .0875 + .05 + .125 + .05 + .05 + .1 = .675
  #   -> symbolic [-1.325, .025]: tighter above, looser below than the interval
  #   (neither bound dominates the other).
  x_in = keras.Input((3, 3, 1))
  conv = L.Conv2D(1, 2, padding="valid", activation="relu")
  dense = L.Dense(1)
  model = keras.Model(x_in, dense(L.Flatten()(conv(x_in))), name="hand_conv")
  conv.set_weights([np.array([[1, -1], [1, 0]], np.float32).reshape(2, 2, 1, 1),
                    np.array([-0.5], np.float32)])
  dense.set_weights([np.array([[1], [1], [-1], [2]], np.float32),
                     np.zeros(1, np.float32)])
  x = np.array([[.25, .5, .75], [1, 0, .5], [.5, .75, .75]], np.float32)
  x = x[None, :, :, None]
  lower, upper = mixtrain_tf.compute_bounds(model, x, 0.125, method="interval")
  np.testing.assert_allclose([lower[0, 0], upper[0, 0]], [-1.125, 0.125], atol=1e-6)
  lower, upper = mixtrain_tf.compute_bounds(model, x, 0.125, method="symbolic")
  np.testing.assert_allclose([lower[0, 0], upper[0, 0]], [-1.325, 0.025], atol=1e-6)
  lo, hi = zoo.box(x, 0.125)
  sb = api.bound_box(model, tf.constant(lo), tf.constant(hi), "symbolic")
  np.testing.assert_allclose(sb.center, [[-0.65]], atol=1e-6)
  np.testing.assert_allclose(
      sb.input_coeffs.numpy().reshape(3, 3),
      [[.1, -.1, 0], [-.0125, .0875, -.05], [-.125, .05, 0]], atol=1e-6)
  np.testing.assert_allclose(sb.relax_coeffs[0].numpy().reshape(2, 2),
                             [[.05, 0], [0, .1]], atol=1e-6)

