"""Imports the MixTrain authors' released PyTorch weights into our Keras networks.

The authors' MNIST_Small (docs/method.md 6) is a PyTorch `nn.Sequential`:

    0 Conv2d(1, 16, 4, stride=2, padding=1), 1 ReLU,
    2 Conv2d(16, 32, 4, stride=2, padding=1), 3 ReLU, 4 Flatten,
    5 Linear(1568, 100), 6 ReLU, 7 Linear(100, 10)

saved as an .npz with keys `<index>_weight` / `<index>_bias`. Three layout changes
turn it into `networks.build("mnist_small")` (NHWC):

* conv kernels OIHW -> HWIO (both frameworks compute a cross-correlation);
* PyTorch's padding 1 with a 4x4 kernel and stride 2 on 28x28 and 14x14 maps pads
  one row/column on each side, which is exactly what Keras "same" does there;
* FC1's input columns are in PyTorch's C,H,W flatten order; Keras flattens NHWC
  maps in H,W,C order, so the columns are permuted, then every Linear weight
  [out, in] is transposed to a Keras kernel [in, out].
"""

from __future__ import annotations

import os

import keras
import numpy as np

from mixtrain_tf import networks

#: (npz prefix, Keras layer name) of the authors' MNIST_Small.
_MNIST_SMALL_LAYERS = (("0", "conv1"), ("2", "conv2"), ("5", "fc1"), ("7", "logits"))


def conv_kernel_from_torch(w: np.ndarray) -> np.ndarray:
  """PyTorch conv weight [out, in, kh, kw] -> Keras kernel [kh, kw, in, out]."""
  return np.transpose(w, (2, 3, 1, 0))


def dense_kernel_from_torch(w: np.ndarray,
                            chw: tuple[int, int, int] | None = None) -> np.ndarray:
  """PyTorch Linear weight [out, in] -> Keras kernel [in, out].

  Args:
    w: [out, in] weight.
    chw: when the layer follows a Flatten of a (C, H, W) feature map, its shape;
      the input columns are then permuted from C,H,W order to Keras' H,W,C order.
  """
  if chw is not None:
    c, h, wd = chw
    if w.shape[1] != c * h * wd:
      raise ValueError(f"weight has {w.shape[1]} input columns, but the flattened "
                       f"map {chw} has {c * h * wd}.")
    w = w.reshape(w.shape[0], c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
  return np.ascontiguousarray(w.T)


def load_authors_mnist_small(path: str | os.PathLike) -> keras.Model:
  """Builds `networks.build("mnist_small")` with the authors' weights from `path`.

  Args:
    path: .npz in PyTorch layout with keys 0_weight [16, 1, 4, 4], 0_bias,
      2_weight [32, 16, 4, 4], 2_bias, 5_weight [100, 1568] (C,H,W columns), 5_bias,
      7_weight [10, 100], 7_bias.

  Returns:
    The Keras model; it takes [batch, 28, 28, 1] images in [0, 1] (no
    normalization) and returns [batch, 10] logits.

  Raises:
    ValueError: a key is missing or an array has the wrong shape.
  """
  model = networks.build("mnist_small")
  with np.load(path) as npz:
    arrays = {k: np.asarray(npz[k], np.float32) for k in npz.files}
  missing = [f"{p}_{s}" for p, _ in _MNIST_SMALL_LAYERS for s in ("weight", "bias")
             if f"{p}_{s}" not in arrays]
  if missing:
    raise ValueError(f"{os.fspath(path)} lacks keys {missing}; expected the authors' "
                     f"MNIST_Small layout, found keys {sorted(arrays)}.")
  flat = model.get_layer("flatten").input.shape[1:]  # (H, W, C) in Keras
  chw = (int(flat[2]), int(flat[0]), int(flat[1]))
  for prefix, name in _MNIST_SMALL_LAYERS:
    layer = model.get_layer(name)
    w, b = arrays[f"{prefix}_weight"], arrays[f"{prefix}_bias"]
    k = tuple(layer.kernel.shape)  # Keras: (kh, kw, in, out) or (in, out)
    conv = isinstance(layer, keras.layers.Conv2D)
    torch_shape = (k[3], k[2]) + k[:2] if conv else k[::-1]
    if w.shape != torch_shape or b.shape != tuple(layer.bias.shape):
      raise ValueError(
          f"{os.fspath(path)}: {prefix}_weight {w.shape} / {prefix}_bias {b.shape} do "
          f"not fit layer '{name}': expected {torch_shape} / "
          f"{tuple(layer.bias.shape)} (PyTorch layout).")
    if conv:
      kernel = conv_kernel_from_torch(w)
    else:
      kernel = dense_kernel_from_torch(w, chw if name == "fc1" else None)
    layer.set_weights([kernel, b])
  return model
