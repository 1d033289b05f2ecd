"""The six networks of docs/method.md 6 (layer structure, shapes, padding, parameter
counts) and the import of the authors' released MNIST_Small weights."""

from __future__ import annotations

import functools
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from mixtrain_tf import data, networks, pretrained
from mixtrain_tf.layers import InputNormalization

L = keras.layers

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
AUTHORS = {name: SHARED / "models" / f"mnist_small_{name}_authors.npz"
           for name in ("clean", "mixtrain_eps0.3")}


@functools.cache
def _model(name: str) -> keras.Model:
  return networks.build(name)


def _weighted(model):
  return [l for l in model.layers if isinstance(l, (L.Conv2D, L.Dense))]


def _out_shape(layer):
  return tuple(layer.output.shape[1:])


def _conv(k, s, filters, in_ch):
  return k * k * in_ch * filters + filters


def _dense(n_in, n_out):
  return n_in * n_out + n_out


# -- plain CNNs ------------------------------------------------------------------------


@pytest.mark.parametrize("name, channels, side", [("mnist_small", 1, 28),
                                                   ("cifar_small", 3, 32)])
def test_small_networks(name, channels, side):
  model = _model(name)
  weighted = _weighted(model)
  assert [type(l) for l in weighted] == [L.Conv2D, L.Conv2D, L.Dense, L.Dense]
  conv1, conv2, fc1, logits = weighted
  for conv, filters in ((conv1, 16), (conv2, 32)):
    assert (conv.filters, conv.kernel_size, conv.strides, conv.padding) == (
        filters, (4, 4), (2, 2), "same")
  h = side // 4
  assert _out_shape(conv1) == (side // 2, side // 2, 16)
  assert _out_shape(conv2) == (h, h, 32)
  assert _out_shape(model.get_layer("flatten")) == (h * h * 32,)  # 1568 / 2048
  assert h * h * 32 == {"mnist_small": 1568, "cifar_small": 2048}[name]
  assert _out_shape(fc1) == (100,) and _out_shape(logits) == (10,)
  assert [keras.activations.serialize(l.activation) for l in weighted] == [
      "relu", "relu", "relu", "linear"]
  assert model.count_params() == (_conv(4, 2, 16, channels) + _conv(4, 2, 32, 16)
                                  + _dense(h * h * 32, 100) + _dense(100, 10))
  assert model.count_params() == {"mnist_small": 166406, "cifar_small": 214918}[name]


@pytest.mark.parametrize("name, channels, side", [("mnist_large", 1, 28),
                                                   ("cifar_large", 3, 32)])
def test_large_networks(name, channels, side):
  model = _model(name)
  weighted = _weighted(model)
  assert [type(l) for l in weighted] == [L.Conv2D] * 4 + [L.Dense] * 3
  convs = weighted[:4]
  assert [(c.filters, c.kernel_size[0], c.strides[0], c.padding) for c in convs] == [
      (32, 3, 1, "same"), (32, 4, 2, "same"), (64, 3, 1, "same"), (64, 4, 2, "same")]
  h = side // 4
  assert [_out_shape(c) for c in convs] == [
      (side, side, 32), (side // 2, side // 2, 32), (side // 2, side // 2, 64),
      (h, h, 64)]
  assert _out_shape(model.get_layer("flatten")) == (h * h * 64,)  # 3136 / 4096
  assert [_out_shape(d) for d in weighted[4:]] == [(512,), (512,), (10,)]
  assert [keras.activations.serialize(l.activation) for l in weighted] == [
      "relu"] * 6 + ["linear"]
  expected = (_conv(3, 1, 32, channels) + _conv(4, 2, 32, 32) + _conv(3, 1, 64, 32)
              + _conv(4, 2, 64, 64) + _dense(h * h * 64, 512) + _dense(512, 512)
              + _dense(512, 10))
  assert model.count_params() == expected
  assert expected == {"mnist_large": 1974762, "cifar_large": 2466858}[name]


# -- residual networks -------------------------------------------------------------


def _inbound_layers(layer):
  node = layer._inbound_nodes[0]
  return [t._keras_history[0] for t in node.input_tensors]


@pytest.mark.parametrize("name", ["cifar_resnet", "imagenet200_resnet"])
def test_resnets(name):
  model = _model(name)
  stem = model.get_layer("stem")
  assert _out_shape(stem) == (32, 32, 16)
  assert stem.activation is keras.activations.relu
  if name == "cifar_resnet":
    assert (stem.kernel_size, stem.strides, stem.padding) == ((3, 3), (1, 1), "same")
  else:  # 7x7/2 with PyTorch padding 3: explicit zero padding, then "valid"
    pad = model.get_layer("stem_pad")
    assert isinstance(pad, L.ZeroPadding2D) and pad.padding == ((3, 3), (3, 3))
    assert _out_shape(pad) == (70, 70, 3)
    assert (stem.kernel_size, stem.strides, stem.padding) == ((7, 7), (2, 2), "valid")
    assert _inbound_layers(stem) == [pad]
  blocks = [("block1", 16, True, 16), ("block2", 16, False, 16),
            ("block3", 32, True, 8), ("block4", 64, True, 4)]
  for block, filters, down, side in blocks:
    a, b = model.get_layer(f"{block}_a"), model.get_layer(f"{block}_b")
    skip, add = model.get_layer(f"{block}_skip"), model.get_layer(f"{block}_add")
    out = model.get_layer(f"{block}_out")
    if down:
      assert (a.kernel_size, a.strides, a.padding) == ((4, 4), (2, 2), "same")
      assert (skip.kernel_size, skip.strides, skip.padding) == ((2, 2), (2, 2),
                                                                "valid")
    else:
      assert (a.kernel_size, a.strides, a.padding) == ((3, 3), (1, 1), "same")
      assert (skip.kernel_size, skip.strides) == ((1, 1), (1, 1))
    assert (b.kernel_size, b.strides, b.padding) == ((3, 3), (1, 1), "same")
    for conv in (a, b, skip):
      assert conv.filters == filters and _out_shape(conv) == (side, side, filters)
      assert conv.activation is keras.activations.linear
    # y = relu(conv_b(relu(conv_a(x))) + skip(x)), with a and skip reading x.
    assert isinstance(_inbound_layers(b)[0], L.ReLU)
    assert _inbound_layers(_inbound_layers(b)[0]) == [a]
    assert _inbound_layers(add) == [b, skip]
    assert _inbound_layers(out) == [add] and isinstance(out, L.ReLU)
    assert _inbound_layers(a) == _inbound_layers(skip)
  assert sum(isinstance(l, L.Add) for l in model.layers) == 4
  fc, classes = (1000, 10) if name == "cifar_resnet" else (512, 200)
  assert _out_shape(model.get_layer("flatten")) == (4 * 4 * 64,)
  assert _out_shape(model.get_layer("fc1")) == (fc,)
  assert _out_shape(model.get_layer("logits")) == (classes,)
  stem_params = _conv(3, 1, 16, 3) if name == "cifar_resnet" else _conv(7, 2, 16, 3)
  block_params = (_conv(4, 2, 16, 16) + _conv(2, 2, 16, 16) + _conv(3, 1, 16, 16)
                  + _conv(3, 1, 16, 16) + _conv(1, 1, 16, 16) + _conv(3, 1, 16, 16)
                  + _conv(4, 2, 32, 16) + _conv(2, 2, 32, 16) + _conv(3, 1, 32, 32)
                  + _conv(4, 2, 64, 32) + _conv(2, 2, 64, 32) + _conv(3, 1, 64, 64))
  expected = stem_params + block_params + _dense(1024, fc) + _dense(fc, classes)
  assert model.count_params() == expected
  assert expected == {"cifar_resnet": 1145410, "imagenet200_resnet": 739720}[name]


# -- all six ---------------------------------------------------------------------


@pytest.mark.parametrize("name", networks.NAMES)
def test_input_shape_normalization_and_no_bn_or_pooling(name):
  model = _model(name)
  assert tuple(model.inputs[0].shape[1:]) == networks.INPUT_SHAPES[name]
  assert not any(isinstance(l, (L.BatchNormalization, L.MaxPooling2D,
                                L.AveragePooling2D)) for l in model.layers)
  first = model.layers[1]
  if name.startswith("mnist"):
    assert not any(isinstance(l, InputNormalization) for l in model.layers)
  else:
    assert isinstance(first, InputNormalization)
    mean, std = ((networks.CIFAR_MEAN, networks.CIFAR_STD) if name.startswith("cifar")
                 else (networks.IMAGENET_MEAN, networks.IMAGENET_STD))
    assert first.mean == list(mean) and first.std == list(std)
    assert list(mean) == [0.485, 0.456, 0.406]
    assert list(std) == ([0.225] * 3 if name.startswith("cifar")
                         else [0.229, 0.224, 0.225])
  x = np.random.default_rng(0).uniform(0, 1, (2,) + networks.INPUT_SHAPES[name])
  assert model.predict(x, verbose=0).shape == (2, 200 if "imagenet" in name else 10)


@pytest.mark.parametrize("name", networks.NAMES)
def test_same_padding_matches_pytorch_padding(name):
  """Each conv equals PyTorch's: explicit zero padding (k - 1) // 2 on every side
  (1 for 3x3 and 4x4, 0 for 1x1 and 2x2, 3 for the 7x7 stem after its
  ZeroPadding2D), then an unpadded convolution."""
  model = _model(name)
  rng = np.random.default_rng(1)
  for conv in (l for l in model.layers if isinstance(l, L.Conv2D)):
    shape = (1,) + tuple(conv.input.shape[1:])
    x = rng.normal(size=shape).astype(np.float32)
    k = conv.kernel_size[0]
    torch_pad = 0 if conv.padding == "valid" else (k - 1) // 2
    padded = np.pad(x, ((0, 0), (torch_pad,) * 2, (torch_pad,) * 2, (0, 0)))
    want = tf.nn.conv2d(padded, conv.kernel, conv.strides, "VALID") + conv.bias
    want = conv.activation(want)
    np.testing.assert_allclose(conv(x), want, rtol=1e-5, atol=1e-5,
                               err_msg=f"{name}/{conv.name}")


def test_num_classes_override():
  assert _out_shape(networks.build("cifar_small", num_classes=7).get_layer(
      "logits")) == (7,)


def test_unknown_network_lists_the_names():
  with pytest.raises(ValueError) as err:
    networks.build("mnist_huge")
  msg = str(err.value)
  assert "'mnist_huge'" in msg
  for name in ("mnist_small", "mnist_large", "cifar_small", "cifar_large",
               "cifar_resnet", "imagenet200_resnet"):
    assert name in msg


# -- the authors' weights ----------------------------------------------------------


@functools.cache
def _mnist_test(n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first n MNIST test images ([n, 28, 28, 1] in [0, 1]) and labels."""
  x, y = next(iter(data.load("mnist", "test", data_dir=SHARED / "tfds",
                             batch_size=n, max_examples=n)))
  return x.numpy(), y.numpy().astype(np.int64)


def _torch_conv(x, w, b, stride, pad):
  """PyTorch's Conv2d in numpy: x [N, C, H, W], w [O, C, kh, kw]."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  win = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
  win = win[:, :, ::stride, ::stride]  # [N, C, Ho, Wo, kh, kw]
  return np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None]


def _torch_mnist_small(npz, images):
  """The authors' nn.Sequential on NCHW float64 inputs, straight from the .npz."""
  p = {k: v.astype(np.float64) for k, v in np.load(npz).items()}
  h = np.transpose(images, (0, 3, 1, 2)).astype(np.float64)  # NHWC -> NCHW
  h = np.maximum(_torch_conv(h, p["0_weight"], p["0_bias"], 2, 1), 0)
  h = np.maximum(_torch_conv(h, p["2_weight"], p["2_bias"], 2, 1), 0)
  h = h.reshape(len(h), -1)  # C, H, W order
  h = np.maximum(h @ p["5_weight"].T + p["5_bias"], 0)
  return h @ p["7_weight"].T + p["7_bias"]


@pytest.mark.parametrize("which", sorted(AUTHORS))
def test_authors_weights_match_pytorch_forward(which):
  model = pretrained.load_authors_mnist_small(AUTHORS[which])
  x, _ = _mnist_test(1000)
  x = x[:64]
  np.testing.assert_allclose(model.predict(x, verbose=0),
                             _torch_mnist_small(AUTHORS[which], x),
                             rtol=1e-4, atol=1e-4)
  npz = np.load(AUTHORS[which])
  np.testing.assert_array_equal(model.get_layer("conv1").kernel.numpy()[:, :, 0, 3],
                                npz["0_weight"][3, 0])
  np.testing.assert_array_equal(model.get_layer("logits").kernel.numpy(),
                                npz["7_weight"].T)


# Measured on the first 1000 MNIST test images: clean model 98.6%, MixTrain eps 0.3
# model 94.0% (a robustly trained model gives up clean accuracy; on all 10,000 test
# images 98.7% and 93.67%). Importing without the C,H,W -> H,W,C permutation of
# FC1 gives under 10%, with flipped kernels 71% / 56%.
@pytest.mark.parametrize("which, at_least", [("clean", 0.95),
                                             ("mixtrain_eps0.3", 0.93)])
def test_authors_models_clean_accuracy(which, at_least):
  model = pretrained.load_authors_mnist_small(AUTHORS[which])
  x, y = _mnist_test(1000)
  accuracy = np.mean(np.argmax(model.predict(x, verbose=0), 1) == y)
  assert accuracy > at_least, f"{which}: accuracy {accuracy:.3f} on 1000 images"


def test_authors_import_rejects_wrong_layout(tmp_path):
  arrays = dict(np.load(AUTHORS["clean"]))
  missing = {k: v for k, v in arrays.items() if k != "5_bias"}
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(ValueError, match="5_bias"):
    pretrained.load_authors_mnist_small(tmp_path / "missing.npz")
  arrays["7_weight"] = arrays["7_weight"].T  # [100, 10] instead of [10, 100]
  np.savez(tmp_path / "transposed.npz", **arrays)
  with pytest.raises(ValueError, match="7_weight"):
    pretrained.load_authors_mnist_small(tmp_path / "transposed.npz")
