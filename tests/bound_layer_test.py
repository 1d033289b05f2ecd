"""BoundLayer: bounds as a Keras layer that saves, loads, exports and agrees with
compute_bounds."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import mixtrain_tf
from mixtrain_tf import BoundLayer, networks
from mixtrain_tf.graph import UnsupportedLayerError

METHODS = ("interval", "symbolic")


def _x(shape, n, seed=0):
  return np.random.default_rng(seed).uniform(0, 1, (n,) + shape).astype(np.float32)


def _close(a, b, rtol=1e-6):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  tol = rtol * np.maximum(1.0, np.abs(b).max())
  assert np.abs(a - b).max() <= tol, (np.abs(a - b).max(), tol)


@pytest.mark.parametrize("name", networks.NAMES)
def test_same_numbers_as_compute_bounds_on_the_six_networks(name):
  net = networks.build(name)
  shape = tuple(net.inputs[0].shape[1:])
  n = 2 if name.endswith("small") else 1
  x, eps = _x(shape, n), 2 / 255
  y = np.arange(n)
  for method in METHODS:
    layer = BoundLayer(net, method)
    out = layer(x, eps)
    lower, upper = mixtrain_tf.compute_bounds(net, x, eps, method)
    _close(out["lower"], lower)
    _close(out["upper"], upper)
    if n == 2:  # margins of the big networks cost a second symbolic pass
      _close(layer(x, eps, y)["margin_upper"],
             mixtrain_tf.margin_upper_bounds(net, x, y, eps, method))


@pytest.fixture(scope="module")
def functional():
  """Two BoundLayers in one model, each with its own network (weights equal).

  A saved model holds one copy of each layer's network; wrap a shared network once
  per saved model (see BoundLayer's docstring)."""
  net = networks.build("mnist_small")
  twin = keras.models.clone_model(net)
  twin.set_weights(net.get_weights())
  images = keras.Input((28, 28, 1))
  eps = keras.Input(())
  labels = keras.Input((), dtype="int32")
  sym = BoundLayer(net, "symbolic", name="sym")(images, eps, labels)
  itv = BoundLayer(twin, "interval", name="itv")(images, eps)
  outs = {"sym_margin_upper": sym["margin_upper"], "itv_lower": itv["lower"],
          "itv_upper": itv["upper"]}
  return net, keras.Model([images, eps, labels], outs)


def _inputs():
  return [_x((28, 28, 1), 3, seed=4), np.array([0.0, 0.05, 0.1], np.float32),
          np.array([1, 2, 3], np.int32)]


def _check_outputs(net, out):
  x, eps, y = _inputs()
  for i in range(3):
    ub = mixtrain_tf.margin_upper_bounds(net, x[i:i + 1], y[i:i + 1], float(eps[i]))
    lo, hi = mixtrain_tf.compute_bounds(net, x[i:i + 1], float(eps[i]), "interval")
    _close(out["sym_margin_upper"][i], ub[0], rtol=1e-5)
    _close(out["itv_lower"][i], lo[0], rtol=1e-5)
    _close(out["itv_upper"][i], hi[0], rtol=1e-5)


def test_functional_model_predicts_the_bounds(functional):
  net, model = functional
  _check_outputs(net, model.predict(_inputs(), verbose=0))


def test_round_trips_through_a_keras_file(functional, tmp_path):
  net, model = functional
  model.save(tmp_path / "bounds.keras")
  loaded = keras.models.load_model(tmp_path / "bounds.keras")
  _check_outputs(net, loaded.predict(_inputs(), verbose=0))
  layer = loaded.get_layer("sym")
  assert layer.method == "symbolic" and layer.dtype_policy.name == "float32"


def test_round_trips_through_model_export(functional, tmp_path):
  net, model = functional
  model.export(str(tmp_path / "exported"))
  loaded = tf.saved_model.load(str(tmp_path / "exported"))
  _check_outputs(net, loaded.serve([tf.constant(t) for t in _inputs()]))


def test_symbolic_equation_concretizes_to_the_bounds():
  net = networks.build("cifar_small")
  x = _x((32, 32, 3), 2)
  out = BoundLayer(net, return_equation=True)(x, 0.01)
  rad = sum(tf.reduce_sum(tf.abs(tf.reshape(v, [2, 10, -1])), -1)
            for k, v in out.items() if k == "input_coeffs" or k.startswith("relax"))
  _close(out["center"] - rad, out["lower"], rtol=1e-5)
  _close(out["center"] + rad, out["upper"], rtol=1e-5)
  assert sum(k.startswith("relax_coeffs_") for k in out) == 3


def test_refuses_what_cannot_be_a_proof():
  net = networks.build("mnist_small")
  with pytest.raises(ValueError, match="return_equation needs method='symbolic'"):
    BoundLayer(net, "interval", return_equation=True)
  with pytest.raises(ValueError, match="unknown bound method 'deeppoly'"):
    BoundLayer(net, "deeppoly")
  with pytest.raises(ValueError, match="greater than clip_max"):
    BoundLayer(net, clip_min=1.0, clip_max=0.0)
  with pytest.raises(ValueError, match="divide them by 255"):
    BoundLayer(net)(_x((28, 28, 1), 2) * 255, 0.1)
  inputs = keras.Input((4,))
  bad = keras.Model(inputs, keras.layers.Dense(2, activation="tanh")(inputs))
  with pytest.raises(UnsupportedLayerError, match="tanh"):
    BoundLayer(bad)


def test_stays_float32_under_a_mixed_precision_policy():
  net = networks.build("mnist_small")  # built under float32
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    layer = BoundLayer(net)
    out = layer(_x((28, 28, 1), 2), 0.1)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  assert layer.compute_dtype == "float32" and out["lower"].dtype == tf.float32
