"""Models of every supported layer kind survive a `.keras` save and load: same
predictions and same bounds (both methods); InputNormalization's config round-trips;
tools/import_authors.py writes a loadable model."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import keras
import numpy as np
import pytest

import mixtrain_tf
from mixtrain_tf import networks, pretrained
from mixtrain_tf.layers import InputNormalization

L = keras.layers
METHODS = ("interval", "symbolic")

REPO = pathlib.Path(__file__).resolve().parents[1]
AUTHORS_CLEAN = REPO.parent / "shared" / "models" / "mnist_small_clean_authors.npz"

_spec = importlib.util.spec_from_file_location(
    "import_authors", REPO / "tools" / "import_authors.py")
import_authors = sys.modules["import_authors"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_authors)


def _randomize(model: keras.Model, seed: int) -> keras.Model:
  """Random non-default values in every weight (BatchNormalization stats included)."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      _randomize(layer, seed + 1)
    elif isinstance(layer, L.BatchNormalization):
      c = layer.moving_mean.shape
      layer.set_weights([rng.uniform(0.5, 2.0, c), rng.normal(0, 0.3, c),
                         rng.normal(0, 0.5, c), rng.uniform(0.2, 3.0, c)])
    elif layer.weights:
      layer.set_weights([rng.normal(0, 1.0 / np.sqrt(max(1, np.prod(w.shape[:-1]))),
                                    w.shape).astype(np.float32)
                         for w in layer.get_weights()])
  return model


def every_layer_functional() -> keras.Model:
  """Every supported layer kind in one functional model."""
  x = inputs = keras.Input((6, 6, 2), name="image")
  x = L.Normalization(mean=[0.4, 0.6], variance=[0.05, 0.1], name="keras_norm")(x)
  x = L.Rescaling(0.9, offset=0.05, name="rescale")(x)
  x = InputNormalization([0.1, -0.1], [0.5, 1.5], name="input_norm")(x)
  x = L.ZeroPadding2D(1, name="pad")(x)                                # 8x8x2
  x = L.Conv2D(4, 3, strides=2, padding="valid", activation="relu", name="c1")(x)
  x = L.BatchNormalization(name="bn")(x)                               # 3x3x4
  x = L.ReLU(name="relu")(x)
  a = L.Conv2D(4, 3, padding="same", name="c2")(x)
  x = L.Add(name="add")([a, x])
  x = L.Activation("relu", name="act")(x)
  x = L.AveragePooling2D(2, padding="same", name="pool")(x)           # 2x2x4
  x = L.Dropout(0.3, name="drop")(x)
  x = L.Reshape((16,), name="reshape")(x)
  x = L.Dense(8, activation="relu", name="fc")(x)
  x = L.Flatten(name="flatten")(L.Reshape((2, 4), name="reshape2")(x))
  return _randomize(keras.Model(inputs, L.Dense(3, name="logits")(x),
                                name="every_layer"), 1)


def sequential_with_nested() -> keras.Model:
  """A Sequential model holding a nested Sequential."""
  inner = keras.Sequential([keras.Input((5,)), L.Dense(6, activation="relu"),
                            L.Dense(4)], name="inner")
  model = keras.Sequential([keras.Input((5,)), InputNormalization([0.5], [0.25]),
                            inner, L.ReLU(), L.Dropout(0.1), L.Dense(3)], name="outer")
  return _randomize(model, 2)


def _inputs(shape, n=3, seed=0):
  return np.random.default_rng(seed).uniform(0, 1, (n,) + tuple(shape)).astype(
      np.float32)


def _assert_same_model(model, loaded, x, methods=METHODS):
  np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                model.predict(x, verbose=0))
  y = np.arange(len(x)) % int(model.outputs[0].shape[-1])
  for method in methods:
    for a, b in zip(mixtrain_tf.compute_bounds(model, x, 0.1, method=method),
                    mixtrain_tf.compute_bounds(loaded, x, 0.1, method=method)):
      np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(
        mixtrain_tf.margin_upper_bounds(loaded, x, y, 0.1, method=method),
        mixtrain_tf.margin_upper_bounds(model, x, y, 0.1, method=method))


@pytest.mark.parametrize("build", [every_layer_functional, sequential_with_nested])
def test_every_layer_kind_round_trips(build, tmp_path):
  model = build()
  path = tmp_path / "model.keras"
  model.save(path)
  loaded = keras.models.load_model(path)
  assert [type(l) for l in loaded.layers] == [type(l) for l in model.layers]
  _assert_same_model(model, loaded, _inputs(model.inputs[0].shape[1:]))


def test_every_layer_model_uses_every_supported_layer_kind():
  kinds = {type(l).__name__ for l in every_layer_functional().layers}
  assert kinds >= {"InputLayer", "Dense", "Conv2D", "ReLU", "Activation", "Flatten",
                   "Reshape", "ZeroPadding2D", "Add", "Rescaling", "Normalization",
                   "InputNormalization", "BatchNormalization", "AveragePooling2D",
                   "Dropout"}


def test_input_normalization_config_round_trips():
  layer = InputNormalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                             name="normalize")
  config = layer.get_config()
  assert config["mean"] == [0.485, 0.456, 0.406]
  assert config["std"] == [0.229, 0.224, 0.225]
  again = InputNormalization.from_config(config)
  assert again.get_config() == config
  # Through Keras' registry, as load_model does.
  restored = keras.layers.deserialize(keras.layers.serialize(layer))
  assert isinstance(restored, InputNormalization)
  assert restored.get_config() == config
  x = _inputs((4, 4, 3))
  np.testing.assert_allclose(restored(x), (x - np.array(config["mean"]))
                             / np.array(config["std"]), rtol=1e-6, atol=1e-6)


def test_input_normalization_rejects_bad_constants():
  with pytest.raises(ValueError, match="same length"):
    InputNormalization([0.1, 0.2], [0.3])
  with pytest.raises(ValueError, match="positive"):
    InputNormalization([0.1], [0.0])


@pytest.mark.parametrize("name, methods", [
    ("mnist_small", METHODS), ("cifar_resnet", ("interval",)),
    ("imagenet200_resnet", ("interval",))])
def test_networks_round_trip(name, methods, tmp_path):
  # Symbolic bounds of the resnets cost seconds each; soundness_test covers them.
  model = networks.build(name)
  path = tmp_path / f"{name}.keras"
  model.save(path)
  loaded = keras.models.load_model(path)
  assert loaded.name == name
  assert [l.name for l in loaded.layers] == [l.name for l in model.layers]
  _assert_same_model(model, loaded, _inputs(networks.INPUT_SHAPES[name], n=2),
                     methods)


def test_import_authors_tool_writes_loadable_model(tmp_path):
  out = import_authors.import_authors(str(AUTHORS_CLEAN), str(tmp_path / "a" /
                                                               "m.keras"))
  loaded = keras.models.load_model(out)
  model = pretrained.load_authors_mnist_small(AUTHORS_CLEAN)
  _assert_same_model(model, loaded, _inputs((28, 28, 1), n=2))
  with pytest.raises(ValueError, match=r"\.keras"):
    import_authors.import_authors(str(AUTHORS_CLEAN), str(tmp_path / "m.h5"))
