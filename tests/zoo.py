"""The shared model zoo of the bound tests: small random networks of every supported
layer kind, the authors' MNIST_Small, and the helpers the bound tests share (boxes,
samples in them, tolerance-aware comparisons), and the builders and loss helpers
that the MixTrainModel and callback tests share.

Every random network has random weights with many unstable ReLUs and is built once
(`functools.cache`); the training builders return a fresh, seeded network each
call. Tolerances are for float32 rounding only: RTOL relative to the
scale of the bounds.
"""

from __future__ import annotations

import functools
import pathlib

import keras
import numpy as np
import tensorflow as tf

from mixtrain_tf import data, networks, pretrained, training
from mixtrain_tf.graph import bound_graph
from mixtrain_tf.layers import InputNormalization

L = keras.layers
METHODS = ("interval", "symbolic")
RTOL = 1e-5  # float32 rounding, relative to the bound scale

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
AUTHORS_MIXTRAIN = SHARED / "models" / "mnist_small_mixtrain_eps0.3_authors.npz"


# -- helpers -------------------------------------------------------------------


def scale(*bounds: np.ndarray) -> np.ndarray:
  """Per-example bound scale [batch, 1]: max(1, largest |bound|)."""
  m = np.max([np.abs(np.asarray(b)).reshape(len(b), -1).max(1) for b in bounds], 0)
  return np.maximum(1.0, m)[:, None]


def assert_inside(values, lower, upper, rtol=RTOL, what="outputs"):
  """values [batch, points, n] inside [lower, upper] ([batch, n]) up to rounding.

  lower=None checks the upper bound only (margins).
  """
  values = np.asarray(values, np.float64)
  upper = np.asarray(upper, np.float64)
  lower = None if lower is None else np.asarray(lower, np.float64)
  tol = rtol * scale(upper, *([] if lower is None else [lower]))[:, :, None]
  above = values - upper[:, None, :]
  below = np.zeros_like(above) if lower is None else lower[:, None, :] - values
  assert np.all(np.isfinite(tol)), what
  worst = max(below.max(), above.max())
  assert np.all(below <= tol) and np.all(above <= tol), (
      f"{what} leave the bounds by up to {worst:.3g} (tolerance {tol.max():.3g})")


def assert_close(a, b, tol):
  """|a - b| <= tol elementwise (tol broadcasts, e.g. [batch, 1])."""
  err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  assert np.all(err <= tol), (
      f"differ by up to {err.max():.3g} (tolerance {np.min(tol):.3g})")


def set_random_weights(model: keras.Model, seed: int, gain: float = 1.3,
                        bias_std: float = 0.3) -> keras.Model:
  """Random weights with many unstable ReLUs and non-trivial normalization stats."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      set_random_weights(layer, seed + 1, gain, bias_std)
    elif isinstance(layer, (L.Dense, L.Conv2D)):
      k = layer.kernel
      fan_in = int(np.prod(k.shape[:-1]))
      new = [rng.normal(0, gain / np.sqrt(fan_in), k.shape)]
      if layer.use_bias:
        new.append(rng.normal(0, bias_std, layer.bias.shape))
      layer.set_weights([w.astype(np.float32) for w in new])
    elif isinstance(layer, L.BatchNormalization):
      c = layer.moving_mean.shape
      new = [rng.uniform(0.5, 2.0, c)] if layer.scale else []  # gamma
      new += [rng.normal(0, 0.3, c)] if layer.center else []  # beta
      new += [rng.normal(0, 0.5, c), rng.uniform(0.2, 3.0, c)]  # moving mean, var
      layer.set_weights(new)
  return model


def inputs(model, n, seed):
  shape = bound_graph(model).input_shape
  return np.random.default_rng(seed).uniform(0, 1, (n,) + shape).astype(np.float32)


def n_out(model) -> int:
  return int(np.prod(bound_graph(model).output_shape))


def box(x, eps, lo=0.0, hi=1.0):
  return np.clip(x - eps, lo, hi), np.clip(x + eps, lo, hi)


def samples(lower, upper, n, seed):
  """n points per example in the box: uniform, plus random vertices. [B, n, *s]."""
  rng = np.random.default_rng(seed)
  lower, upper = np.asarray(lower), np.asarray(upper)
  u = rng.uniform(0, 1, (len(lower), n) + lower.shape[1:])
  u[:, : n // 4] = np.round(u[:, : n // 4])  # vertices of the box
  return (lower[:, None] + u * (upper - lower)[:, None]).astype(np.float32)


def logits_at(model, points):
  """model on [B, n, *s] points -> [B, n, classes] (float32)."""
  b, n = points.shape[:2]
  out = model.predict(points.reshape((b * n,) + points.shape[2:]), verbose=0,
                      batch_size=4096)
  return out.reshape(b, n, -1)


def margins(logits, y):
  """z_j - z_y: logits [..., classes], y [batch] aligned with the leading dim."""
  zy = np.take_along_axis(logits, y.reshape((-1,) + (1,) * (logits.ndim - 1)),
                          axis=-1)
  return logits - zy


# -- random networks of every supported layer kind ---------------------------------


@functools.cache
def dense_net() -> keras.Model:
  """Sequential: Dense with relu activation, ReLU layer, Dropout. 6 inputs."""
  model = keras.Sequential([
      keras.Input((6,)), L.Dense(10, activation="relu"), L.Dense(8), L.ReLU(),
      L.Dropout(0.5), L.Dense(8, activation="relu"), L.Dense(4)], name="dense_net")
  return set_random_weights(model, 1)


@functools.cache
def mlp(n_in: int, widths: tuple, n_out: int, seed: int) -> keras.Model:
  """Dense layers with ReLU (the kind tests/milp.py solves exactly), weights
  N(0, 1.5 / sqrt(fan_in)), biases N(0, 0.3)."""
  keras.utils.set_random_seed(seed)
  model = keras.Sequential([keras.Input((n_in,))]
                           + [L.Dense(w, activation="relu") for w in widths]
                           + [L.Dense(n_out)], name=f"mlp_{seed}")
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    k, b = layer.get_weights()
    layer.set_weights([rng.normal(0, 1.5 / np.sqrt(k.shape[0]), k.shape),
                       rng.normal(0, 0.3, b.shape)])
  return model


@functools.cache
def conv_net() -> keras.Model:
  """Conv2D with strides 1 and 2, same and valid (odd sizes), Activation('relu')."""
  x = inputs = keras.Input((8, 8, 2))
  x = L.Conv2D(4, 3, padding="same", activation="relu")(x)            # 8x8x4
  x = L.Conv2D(6, 3, strides=2, padding="valid")(x)                    # 3x3x6
  x = L.ReLU()(x)
  x = L.Conv2D(5, 2, strides=2, padding="same")(x)                     # 2x2x5
  x = L.Activation("relu")(x)
  x = L.Flatten()(x)
  x = L.Dense(7, activation="relu")(x)
  return set_random_weights(keras.Model(inputs, L.Dense(5)(x), name="conv_net"), 2)


@functools.cache
def residual_net() -> keras.Model:
  """Residual Adds (conv skip and identity skip), AveragePooling2D."""
  x = inputs = keras.Input((6, 6, 3))
  x = L.Conv2D(4, 3, padding="same", activation="relu")(x)
  a = L.Conv2D(4, 3, padding="same", activation="relu")(x)
  b = L.Conv2D(4, 3, padding="same")(a)
  skip = L.Conv2D(4, 1)(x)
  y = L.ReLU()(L.Add()([b, skip]))
  a = L.Conv2D(4, 3, strides=1, padding="same", activation="relu")(y)
  y = L.ReLU()(L.Add()([L.Conv2D(4, 3, padding="same")(a), y]))
  y = L.AveragePooling2D(2)(y)                                         # 3x3x4
  y = L.Flatten()(y)
  y = L.Dense(6, activation="relu")(y)
  return set_random_weights(keras.Model(inputs, L.Dense(3)(y), name="residual_net"),
                             3)


@functools.cache
def wide_residual_net() -> keras.Model:
  """Residual blocks on a wide map with few channels, so that the symbolic engine
  pushes (coloured) basis images forward through the Adds, as in the resnets."""
  x = inputs = keras.Input((12, 12, 1))
  x = L.Conv2D(2, 3, padding="same", activation="relu")(x)
  a = L.Conv2D(2, 3, padding="same", activation="relu")(x)
  y = L.Add()([L.Conv2D(2, 3, padding="same")(a), L.Conv2D(2, 1)(x)])
  y = L.ReLU()(y)
  a = L.Conv2D(2, 3, padding="same", activation="relu")(y)
  y = L.ReLU()(L.Add()([L.Conv2D(2, 3, padding="same")(a), y]))
  y = L.Conv2D(4, 4, strides=4, activation="relu")(y)                  # 3x3x4
  y = L.Flatten()(y)
  return set_random_weights(
      keras.Model(inputs, L.Dense(3)(y), name="wide_residual_net"), 11)


@functools.cache
def norm_net() -> keras.Model:
  """Normalization, Rescaling, InputNormalization, ZeroPadding2D, BatchNormalization
  (inference form), Reshape, Dropout, a nested Sequential."""
  x = inputs = keras.Input((5, 5, 2))
  x = L.Normalization(mean=[0.3, 0.6], variance=[0.04, 0.09])(x)
  x = L.Rescaling(1.5, offset=-0.2)(x)
  x = InputNormalization([0.1, -0.2], [0.5, 2.0])(x)
  x = L.ZeroPadding2D(((1, 0), (2, 1)))(x)                             # 6x8x2
  x = L.Conv2D(3, 3, strides=2, padding="valid")(x)                    # 2x3x3
  x = L.BatchNormalization()(x)
  x = L.ReLU()(x)
  x = L.Reshape((18,))(x)
  head = keras.Sequential([keras.Input((18,)), L.Dense(8), L.BatchNormalization(),
                           L.ReLU(), L.Dropout(0.2), L.Dense(4)], name="head")
  return set_random_weights(keras.Model(inputs, head(x), name="norm_net"), 4,
                             gain=1.0)


@functools.cache
def corner_net() -> keras.Model:
  """A conv net on 2x2x2 inputs: 8 input dims, 256 box corners."""
  x = inputs = keras.Input((2, 2, 2))
  x = L.Conv2D(5, 2, padding="same", activation="relu")(x)
  x = L.Conv2D(4, 2, strides=2, padding="valid", activation="relu")(x)
  x = L.Flatten()(x)
  x = L.Dense(6, activation="relu")(x)
  return set_random_weights(keras.Model(inputs, L.Dense(3)(x), name="corner_net"),
                             5, gain=2.0)


@functools.cache
def misc_net() -> keras.Model:
  """Less common forms: scalar Normalization, per-channel Rescaling, no biases,
  BatchNormalization without scale/center, Activation('linear'), same-padded
  strided average pooling, Dense on a rank-3 tensor, a layer called twice, and a
  ReLU on the output."""
  x = inputs = keras.Input((5, 5, 2))
  x = L.Normalization(axis=None, mean=0.5, variance=0.25)(x)
  x = L.Rescaling([2.0, -1.0], offset=[0.5, 0.1])(x)
  x = L.Conv2D(3, 2, use_bias=False)(x)                                # 4x4x3
  x = L.BatchNormalization(center=False, scale=False)(x)
  x = L.ReLU()(L.Activation("linear")(x))
  x = L.AveragePooling2D(3, strides=2, padding="same")(x)              # 2x2x3
  x = L.Reshape((4, 3))(x)
  x = L.Dense(5, activation="relu")(x)                                 # 4x5
  shared = L.Dense(5, activation="relu")
  x = L.Flatten()(shared(shared(x)))
  out = L.Dense(3, activation="relu")(x)
  return set_random_weights(keras.Model(inputs, out, name="misc_net"), 8)


def negate_some_gammas(model: keras.Model, seed: int) -> keras.Model:
  """BatchNormalization with negative gamma on half its channels."""
  rng = np.random.default_rng(seed)
  for layer in model._flatten_layers():  # nested models included
    if isinstance(layer, L.BatchNormalization) and layer.scale:
      gamma = layer.gamma.numpy()
      gamma[::2] *= -rng.uniform(0.5, 1.5, gamma[::2].shape)
      layer.gamma.assign(gamma)
  return model


@functools.cache
def config_net() -> keras.Model:
  """Non-default configurations of every layer kind: strides (2, 1), non-square
  and even kernels with same padding, asymmetric padding, average pooling with
  stride != pool, per-channel Normalization, negative BN gamma, tf.nn.relu and
  keras.activations.relu as activations, a three-branch Add, a functional model
  nested twice, Dense without bias on a rank-3 tensor."""
  x = inputs = keras.Input((7, 6, 3))
  x = L.Normalization(mean=[0.2, 0.5, 0.7], variance=[0.05, 0.2, 1.5])(x)
  x = L.Conv2D(4, (3, 2), strides=(2, 1), padding="same",
               activation=tf.nn.relu)(x)                                # 4x6x4
  x = L.BatchNormalization()(x)
  x = L.ZeroPadding2D(((0, 1), (2, 0)))(x)                             # 5x8x4
  a = L.Conv2D(3, 2, padding="same", activation=keras.activations.relu)(x)
  b = L.Conv2D(3, (1, 3), padding="same")(x)
  c = L.Conv2D(3, 1, use_bias=False)(x)
  x = L.ReLU()(L.Add()([a, b, c]))                                     # 5x8x3
  x = L.AveragePooling2D((2, 3), strides=(1, 2))(x)                    # 4x3x3
  inner_in = keras.Input((4, 3, 3))
  inner = L.Conv2D(2, 2, strides=(1, 2), activation="relu")(inner_in)  # 3x1x2
  inner = keras.Model(inner_in, L.BatchNormalization()(inner), name="inner")
  mid_in = keras.Input((4, 3, 3))
  mid = keras.Model(mid_in, L.Dropout(0.3)(inner(mid_in)), name="mid")
  x = L.Reshape((3, 2))(mid(x))
  x = L.Dense(4, use_bias=False, activation="relu")(x)                 # 3x4
  x = L.Flatten()(x)
  x = L.Rescaling(-0.7, offset=0.3)(x)
  out = L.Dense(4)(L.Dense(6, activation="relu")(x))
  model = keras.Model(inputs, out, name="config_net")
  return negate_some_gammas(set_random_weights(model, 12), 13)


@functools.cache
def config_corner_net() -> keras.Model:
  """config_net's less common forms on 2x3x2 inputs (12 dims, 4096 corners)."""
  x = inputs = keras.Input((2, 3, 2))
  x = L.Normalization(mean=[0.4, 0.6], variance=[0.1, 0.5])(x)
  x = L.Conv2D(3, (2, 2), strides=(1, 2), padding="same",
               activation=tf.nn.relu)(x)                               # 2x2x3
  x = L.BatchNormalization()(x)
  y = L.Conv2D(3, 1, activation="relu")(x)
  x = L.ReLU()(L.Add()([x, y, L.Conv2D(3, 2, padding="same")(x)]))
  x = L.AveragePooling2D((1, 2))(x)                                    # 2x1x3
  x = L.Flatten()(x)
  x = L.Dense(5, activation="relu")(x)
  model = keras.Model(inputs, L.Dense(3)(x), name="config_corner_net")
  return negate_some_gammas(set_random_weights(model, 14, gain=2.0), 15)


RANDOM_NETS = {"dense": dense_net, "conv": conv_net, "residual": residual_net,
               "wide_residual": wide_residual_net, "norm": norm_net,
               "corner": corner_net, "misc": misc_net, "config": config_net,
               "config_corner": config_corner_net}


# -- the authors' model and MNIST --------------------------------------------------


@functools.cache
def mnist_test(n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first n MNIST test images ([n, 28, 28, 1] in [0, 1]) and labels."""
  x, y = next(iter(data.load("mnist", "test", data_dir=SHARED / "tfds",
                             batch_size=n, max_examples=n)))
  return x.numpy(), y.numpy().astype(np.int64)


@functools.cache
def authors_model() -> keras.Model:
  """The authors' MixTrain eps 0.3 MNIST_Small (docs/method.md 6)."""
  return pretrained.load_authors_mnist_small(AUTHORS_MIXTRAIN)


# -- MixTrainModel builders and losses (training_test, callbacks_test) -------------

TRAIN_EPS = 0.1  # the default radius of mixtrain_model
TRAIN_BATCH = 8  # the size of the conftest mnist_batch fixture


def mnist_small(seed: int = 0) -> keras.Model:
  """A fresh MNIST_Small with seeded initial weights (not cached: training mutates)."""
  keras.utils.set_random_seed(seed)
  return networks.build("mnist_small")


def linear_net() -> keras.Model:
  """A fresh tiny supported network (flatten + dense) on MNIST-shaped inputs."""
  keras.utils.set_random_seed(1)
  inputs = keras.Input((28, 28, 1))
  out = L.Dense(10)(L.Flatten()(inputs))
  return keras.Model(inputs, out)


def mixtrain_model(method: str, network: keras.Model | None = None, lr: float = 0.1,
                   **kwargs) -> training.MixTrainModel:
  """A MixTrainModel compiled with SGD(lr); epsilon TRAIN_EPS and 2 PGD steps unless
  given, on network or a fresh mnist_small()."""
  kwargs.setdefault("epsilon", TRAIN_EPS)
  kwargs.setdefault("pgd_steps", 2)
  model = training.MixTrainModel(network or mnist_small(), method=method, **kwargs)
  model.compile(optimizer=keras.optimizers.SGD(lr))
  return model


def cross_entropy(y: np.ndarray, logits: np.ndarray) -> np.ndarray:
  """Per-example softmax cross-entropy, float64."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  return -log_p[np.arange(len(y)), y]


def zero_width_robust_loss(network, x, y) -> float:
  """Cross-entropy of the margins z_j - z_y at x (the robust loss at eps = 0)."""
  z = np.asarray(network(x, training=False), np.float64)
  margins = z - z[np.arange(len(y)), y][:, None]
  return float(cross_entropy(y, margins).mean())
