"""The six networks of docs/method.md section 6, as Keras functional models (NHWC).

ReLU after every layer but the last; no batch norm, no pooling. PyTorch's padding 1
on these even-sized maps equals Keras "same"; the 7x7/2 ImageNet stem uses explicit
zero padding 3 and "valid".
"""

from __future__ import annotations

import keras

from mixtrain_tf.layers import InputNormalization

L = keras.layers

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.225, 0.225, 0.225)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INPUT_SHAPES = {
    "mnist_small": (28, 28, 1), "mnist_large": (28, 28, 1),
    "cifar_small": (32, 32, 3), "cifar_large": (32, 32, 3),
    "cifar_resnet": (32, 32, 3), "imagenet200_resnet": (64, 64, 3),
}
NAMES = tuple(INPUT_SHAPES)


def _small(x, classes):
  x = L.Conv2D(16, 4, strides=2, padding="same", activation="relu", name="conv1")(x)
  x = L.Conv2D(32, 4, strides=2, padding="same", activation="relu", name="conv2")(x)
  x = L.Flatten(name="flatten")(x)
  x = L.Dense(100, activation="relu", name="fc1")(x)
  return L.Dense(classes, name="logits")(x)


def _large(x, classes):
  for i, (filters, k, s) in enumerate(
      [(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)], 1):
    x = L.Conv2D(filters, k, strides=s, padding="same", activation="relu",
                 name=f"conv{i}")(x)
  x = L.Flatten(name="flatten")(x)
  x = L.Dense(512, activation="relu", name="fc1")(x)
  x = L.Dense(512, activation="relu", name="fc2")(x)
  return L.Dense(classes, name="logits")(x)


def _block(x, filters, down, name):
  if down:
    a = L.Conv2D(filters, 4, strides=2, padding="same", name=f"{name}_a")(x)
    skip = L.Conv2D(filters, 2, strides=2, padding="valid", name=f"{name}_skip")(x)
  else:
    a = L.Conv2D(filters, 3, padding="same", name=f"{name}_a")(x)
    skip = L.Conv2D(filters, 1, name=f"{name}_skip")(x)
  a = L.ReLU(name=f"{name}_a_relu")(a)
  b = L.Conv2D(filters, 3, padding="same", name=f"{name}_b")(a)
  return L.ReLU(name=f"{name}_out")(L.Add(name=f"{name}_add")([b, skip]))


def _resnet_body(x, fc, classes):
  for i, (filters, down) in enumerate(
      [(16, True), (16, False), (32, True), (64, True)], 1):
    x = _block(x, filters, down, f"block{i}")
  x = L.Flatten(name="flatten")(x)
  x = L.Dense(fc, activation="relu", name="fc1")(x)
  return L.Dense(classes, name="logits")(x)


def build(name: str, num_classes: int | None = None) -> keras.Model:
  """Builds one of `NAMES` with fresh weights. `num_classes` defaults per dataset."""
  if name not in INPUT_SHAPES:
    raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NAMES)}.")
  classes = num_classes or (200 if name.startswith("imagenet") else 10)
  inputs = keras.Input(INPUT_SHAPES[name], name="image")
  x = inputs
  if name.startswith("cifar"):
    x = InputNormalization(CIFAR_MEAN, CIFAR_STD, name="normalize")(x)
  elif name.startswith("imagenet"):
    x = InputNormalization(IMAGENET_MEAN, IMAGENET_STD, name="normalize")(x)
  if name in ("mnist_small", "cifar_small"):
    out = _small(x, classes)
  elif name in ("mnist_large", "cifar_large"):
    out = _large(x, classes)
  elif name == "cifar_resnet":
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="stem")(x)
    out = _resnet_body(x, 1000, classes)
  else:
    x = L.ZeroPadding2D(3, name="stem_pad")(x)
    x = L.Conv2D(16, 7, strides=2, padding="valid", activation="relu", name="stem")(x)
    out = _resnet_body(x, 512, classes)
  return keras.Model(inputs, out, name=name)
