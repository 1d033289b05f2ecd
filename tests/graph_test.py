"""The bound graph reads a Keras model exactly or refuses it (no silent wrong bounds).

Each model here is one a user could build believing it supported; before the exact
layer matching and the self-check, every one of them got bounds that did not
contain its own outputs.
"""

from __future__ import annotations

import gc
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

import mixtrain_tf
from mixtrain_tf import api, export, graph, onnx_export, ops, training
from mixtrain_tf.graph import SelfCheckError, UnsupportedLayerError

L = keras.layers
METHODS = ("interval", "symbolic")


def relu(x):  # a user function that happens to be called relu
  return tf.nn.relu(x) * 3 + 1


def linear(x):  # ... and one called linear
  return tf.abs(x)


class ScaledDense(L.Dense):
  """A subclass of a supported layer that changes what it computes."""

  def call(self, inputs):
    return 2 * super().call(inputs) + 1


class Twice(L.Layer):
  """A layer whose bound_op() lies: it doubles, its operator is the identity."""

  def call(self, inputs):
    return 2.0 * inputs

  def bound_op(self):
    return ops.IdentityOp()


def _dense_model(hidden) -> keras.Model:
  x = inputs = keras.Input((8,))
  x = hidden(x)
  return keras.Model(inputs, L.Dense(3)(x))


def _conv_model(middle) -> keras.Model:
  x = inputs = keras.Input((6, 6, 2))
  x = L.Conv2D(3, 3, activation="relu")(x)
  x = middle(x)
  x = L.Flatten()(x)
  return keras.Model(inputs, L.Dense(3)(x))


def _quantized() -> keras.Model:
  model = _dense_model(L.Dense(5, activation="relu"))
  model.quantize("int8")
  return model


MISREAD_BEFORE = {  # the four cases of the issue: each gave wrong bounds silently
    "user_relu": lambda: _dense_model(L.Dense(5, activation=relu, name="fake")),
    "user_linear": lambda: _dense_model(L.Dense(5, activation=linear, name="fake")),
    "subclass": lambda: _dense_model(ScaledDense(5, name="fake")),
    "channels_first_flatten": lambda: _conv_model(
        L.Flatten(data_format="channels_first", name="fake")),
    "int8": _quantized,
}
EXPECTED_WHY = {"user_relu": "activation", "user_linear": "activation",
                "subclass": "subclasses a supported layer",
                "channels_first_flatten": "data_format",
                "int8": "dtype_policy"}


def _x(model, n=3, seed=0):
  shape = tuple(model.inputs[0].shape[1:])
  return np.random.default_rng(seed).uniform(0, 1, (n,) + shape).astype(np.float32)


@pytest.mark.parametrize("case", sorted(MISREAD_BEFORE))
@pytest.mark.parametrize("method", METHODS)
def test_misread_models_are_refused_by_every_entry_point(case, method):
  model = MISREAD_BEFORE[case]()
  x = _x(model)
  y = np.zeros(3, np.int64)
  for call in (lambda: mixtrain_tf.compute_bounds(model, x, 0.1, method=method),
               lambda: mixtrain_tf.verified(model, x, y, 0.1, method=method),
               lambda: mixtrain_tf.margin_upper_bounds(model, x, y, 0.0, method)):
    with pytest.raises(UnsupportedLayerError) as err:
      call()
    msg = str(err.value)
    assert EXPECTED_WHY[case] in msg, msg
    assert "layer '" in msg and "supported:" in msg, msg


@pytest.mark.parametrize("case", sorted(MISREAD_BEFORE))
def test_misread_models_are_refused_by_training_and_exports(case, tmp_path):
  model = MISREAD_BEFORE[case]()
  with pytest.raises(UnsupportedLayerError):
    training.MixTrainModel(model, epsilon=0.1)
  with pytest.raises(UnsupportedLayerError):
    export.export_saved_model(model, str(tmp_path / "sm"))
  with pytest.raises(UnsupportedLayerError):
    onnx_export.export_onnx(model, str(tmp_path / "m.onnx"))


@pytest.mark.parametrize("act", [keras.activations.relu, tf.nn.relu, "relu"])
def test_keras_and_tensorflow_relu_functions_are_read_as_relu(act):
  model = _dense_model(L.Dense(5, activation=act))
  x = _x(model)
  for method in METHODS:
    lower, upper = mixtrain_tf.compute_bounds(model, x, 0.0, method=method)
    np.testing.assert_allclose(lower, model(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upper, model(x), rtol=1e-5, atol=1e-5)


def test_user_function_in_activation_layer_is_refused():
  model = _dense_model(L.Activation(relu, name="act"))
  with pytest.raises(UnsupportedLayerError, match="'act'.*activation"):
    graph.bound_graph(model)


class _Sub(keras.Model):
  def __init__(self):
    super().__init__()
    self.d = L.Dense(4)

  def call(self, x):
    return self.d(x) * 2


@pytest.mark.parametrize("make, attribute", [
    (lambda: _conv_model(L.Conv2D(2, 3, dilation_rate=2, padding="same")),
     "dilation_rate"),
    (lambda: _conv_model(L.Conv2D(3, 3, groups=3, padding="same")), "groups"),
    (lambda: _conv_model(L.ReLU(negative_slope=0.1)), "negative_slope"),
    (lambda: _conv_model(L.ReLU(threshold=0.5)), "threshold"),
    (lambda: _conv_model(L.ReLU(max_value=6.0)), "max_value"),
    (lambda: _conv_model(L.ZeroPadding2D(1, data_format="channels_first")),
     "data_format"),
    (lambda: _conv_model(L.AveragePooling2D(2, data_format="channels_first")),
     "data_format"),
    (lambda: _conv_model(L.BatchNormalization(axis=1)), "axis"),
    (lambda: _dense_model(L.Normalization(mean=0.5, variance=2.0, invert=True)),
     "invert"),
    (lambda: _dense_model(L.Dense(5, dtype="mixed_float16")), "dtype_policy"),
    (lambda: _dense_model(L.Dense(5, dtype="float64")), "dtype_policy"),
])
def test_configuration_the_engines_do_not_model_is_named(make, attribute):
  with pytest.raises(UnsupportedLayerError, match=attribute):
    graph.bound_graph(make())


def test_layer_called_in_training_mode_inside_the_model_is_refused():
  inputs = keras.Input((8,))
  x = L.Dropout(0.5, name="always_on")(inputs, training=True)
  model = keras.Model(inputs, L.Dense(3)(x))
  with pytest.raises(UnsupportedLayerError, match="'always_on'.*training=True"):
    graph.bound_graph(model)


def test_subclassed_models_are_refused_with_their_name():
  inputs = keras.Input((8,))
  nested = _Sub()
  model = keras.Model(inputs, L.Dense(3)(nested(inputs)))
  with pytest.raises(UnsupportedLayerError, match="subclassed model"):
    graph.bound_graph(model)
  top = _Sub()
  top(np.zeros((1, 8), np.float32))
  with pytest.raises(UnsupportedLayerError, match="subclassed model"):
    graph.bound_graph(top)


def test_unknown_input_dimensions_are_an_error():
  inputs = keras.Input((None, None, 1))
  model = keras.Model(inputs, L.Conv2D(2, 3)(inputs))
  with pytest.raises(ValueError, match="unknown dimensions.*keras.Input"):
    graph.bound_graph(model)


def test_self_check_names_a_layer_whose_operator_lies():
  model = _dense_model(Twice(name="liar"))
  with pytest.raises(SelfCheckError, match="'liar' \\(Twice\\) is misread"):
    mixtrain_tf.compute_bounds(model, _x(model), 0.1)


def test_self_check_catches_an_engine_that_misreads_a_layer(monkeypatch):
  """A planted engine bug (Dense biases dropped) is caught when the graph is built."""
  monkeypatch.setattr(ops.DenseOp, "bias", lambda self: None)
  inputs = keras.Input((8,))
  x = L.Dense(5, activation="relu", bias_initializer="ones", name="biased")(inputs)
  model = keras.Model(inputs, L.Dense(3, name="head")(x))
  with pytest.raises(SelfCheckError, match="'biased' \\(Dense\\) is misread"):
    graph.bound_graph(model)


def test_self_check_is_on_and_passes_on_honest_models():
  model = _dense_model(L.Dense(5, activation="relu"))
  g = graph.bound_graph(model)
  g.self_check()  # idempotent, raises nothing
  assert g is graph.bound_graph(model)


def test_bound_graphs_do_not_keep_models_alive():
  refs = []
  x = np.zeros((1, 8), np.float32)
  for _ in range(30):
    model = _dense_model(L.Dense(5, activation="relu"))
    api.compute_bounds(model, x, 0.1, method="interval")
    refs.append(weakref.ref(model))
    del model
  gc.collect()
  alive = sum(r() is not None for r in refs)
  assert alive <= 1, f"{alive} of 30 bounded models are still alive"


# -- the public registry (README "Extending") ------------------------------------


class ChannelScale(L.Layer):
  """A user's layer: x * w per channel, a trainable weight."""

  def build(self, input_shape):
    self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

  def call(self, x):
    return x * self.w


def test_a_registered_user_layer_is_bounded_soundly():
  mixtrain_tf.register_bound_op(
      ChannelScale, lambda layer: ops.ScaleShiftOp(lambda: layer.w, lambda: 0.0))
  try:
    inputs = keras.Input((8,))
    scale = ChannelScale(name="scale")
    x = L.Dense(6, activation="relu")(scale(inputs))
    model = keras.Model(inputs, L.Dense(3)(x))
    scale.w.assign(np.linspace(-2, 2, 8).astype(np.float32))
    assert "ChannelScale" in mixtrain_tf.supported_layers()
    x0 = _x(model, n=2)
    rng = np.random.default_rng(0)
    pts = np.clip(x0[:, None] + rng.uniform(-0.1, 0.1, (2, 500, 8)), 0, 1)
    out = model(pts.reshape(-1, 8).astype(np.float32)).numpy().reshape(2, 500, 3)
    for method in METHODS:
      lower, upper = mixtrain_tf.compute_bounds(model, x0, 0.1, method)
      assert np.all(out >= lower.numpy()[:, None] - 1e-5)
      assert np.all(out <= upper.numpy()[:, None] + 1e-5)
    # A wrong rule is caught by the self-check, not trusted.
    mixtrain_tf.register_bound_op(ChannelScale, lambda layer: ops.IdentityOp())
    inputs = keras.Input((8,))
    wrong = keras.Model(inputs, L.Dense(3)(ChannelScale(name="wrong")(inputs)))
    wrong.layers[1].w.assign(np.full(8, 3.0, np.float32))
    with pytest.raises(SelfCheckError, match="'wrong'"):
      graph.bound_graph(wrong)
  finally:
    graph._RULES.pop(ChannelScale, None)


def test_register_bound_op_checks_its_arguments():
  with pytest.raises(TypeError, match="Layer class"):
    mixtrain_tf.register_bound_op(object, lambda layer: ops.IdentityOp())
  with pytest.raises(TypeError, match="callable"):
    mixtrain_tf.register_bound_op(ChannelScale, None)
