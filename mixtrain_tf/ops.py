"""Bound operators: what each supported Keras layer hands to the bound engines.

A Keras layer only hands over its weights; the maths of each bound method lives in
`mixtrain_tf.interval` and `mixtrain_tf.symbolic`. Every operator here is one of

* `AffineOp`: y = L(x) + b for a linear map L (Dense, Conv2D, normalization,
  Flatten, Reshape, ZeroPadding2D, AveragePooling2D, identity layers);
* `ReluOp`: y = max(x, 0);
* `AddOp`: y = x1 + x2 + ... (residual connections).

Affine operators expose the linear map on a batch (`linear`), its transpose
(`transpose`, the vector-Jacobian product), the map with absolute weights
(`abs_linear`, for interval radii) and, for spatial operators, the structural
(which-position-feeds-which) map used to compress symbolic bounds.

All tensors are float32 with a leading batch dimension; weights are read from the
layer's variables at call time, so gradients reach them.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def _f32(v) -> tf.Tensor:
  return tf.cast(tf.convert_to_tensor(v), tf.float32)


def _merge(x: tf.Tensor, rank: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Folds all leading dims of `x` except the last `rank` into one batch dim."""
  shape = tf.shape(x)
  lead = shape[: tf.rank(x) - rank]
  tail = shape[tf.rank(x) - rank :]
  return tf.reshape(x, tf.concat([[-1], tail], 0)), lead


def _split(x: tf.Tensor, lead: tf.Tensor) -> tf.Tensor:
  return tf.reshape(x, tf.concat([lead, tf.shape(x)[1:]], 0))


def flat(t: tf.Tensor, lead: int = 1) -> tf.Tensor:
  """t reshaped to [*t.shape[:lead], prod(t.shape[lead:])], empty batches included
  (a -1 in a reshape cannot be inferred when the batch is 0)."""
  shape = tf.shape(t)
  return tf.reshape(t, tf.concat([shape[:lead], [tf.reduce_prod(shape[lead:])]], 0))


def per_channel(fn, x: tf.Tensor, *consts: tf.Tensor, shape=None) -> tf.Tensor:
  """fn(x, *consts), the consts broadcast against x's per-example shape (default:
  x's static shape past the batch), computed on x flattened to rows [N, size].

  The same values as fn(x, *consts), faster: TF on CPU broadcasts a short last axis
  slowly, 5.9 against 0.65 ms for (x - mean) / std on 256 CIFAR-10 images, one
  core (benchmarks/per_channel.py, docs/benchmarks.md).
  """
  shape = tuple(x.shape[1:]) if shape is None else tuple(shape)
  if len(shape) < 2 or None in shape or shape[-1] == 1:
    return fn(x, *consts)  # nothing to gain: no short last axis
  rows = []
  for c in consts:
    c = tf.convert_to_tensor(c, x.dtype)
    lead = [1] * max(0, c.shape.rank - len(shape))
    rows.append(tf.reshape(tf.broadcast_to(c, lead + list(shape)), [-1]))
  return tf.reshape(fn(flat(x), *rows), tf.shape(x))


def rowdot(rows: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
  """sum over the trailing dims of rows [B, m, *s] * x [B, *s] -> [B, m]."""
  return tf.einsum("bmk,bk->bm", flat(rows, 2), flat(x))


class BoundOp:
  """Base class of bound operators. `in_shape`/`out_shape` exclude the batch."""

  in_shape: tuple[int, ...] = ()
  out_shape: tuple[int, ...] = ()


class ReluOp(BoundOp):
  pass


class AddOp(BoundOp):
  pass


class InputOp(BoundOp):
  pass


class AffineOp(BoundOp):
  """y = L(x) + b. Subclasses implement `_linear`, `_transpose`, `_abs_linear`."""

  #: False for operators that move or scale single values (permutations,
  #: padding, per-channel scaling): |L2 L1| = |L2| |L1| when one of them is such.
  mixing = True

  def linear(self, x: tf.Tensor) -> tf.Tensor:
    """L(x) for x of shape [..., *in_shape] (any number of leading dims)."""
    x2, lead = _merge(x, len(self.in_shape))
    return _split(self._linear(x2), lead)

  def transpose(self, v: tf.Tensor) -> tf.Tensor:
    """L^T(v) for v of shape [..., *out_shape]."""
    v2, lead = _merge(v, len(self.out_shape))
    return _split(self._transpose(v2), lead)

  def abs_linear(self, r: tf.Tensor) -> tf.Tensor:
    """|L|(r): the linear map with absolute weights, r of shape [N, *in_shape]."""
    return self._abs_linear(r)

  def bias(self) -> tf.Tensor | None:
    return None

  def affine(self, x: tf.Tensor) -> tf.Tensor:
    y = self._linear(x)
    b = self.bias()
    return y if b is None else y + b

  def structural(self, x: np.ndarray) -> np.ndarray | None:
    """Spatial dependency map on [N, H, W, 1] float arrays, or None if not spatial."""
    return None

  def flops(self) -> int:
    """Multiply-adds of `linear` for one row."""
    return int(np.prod(self.out_shape))

  def _transpose(self, v: tf.Tensor) -> tf.Tensor:
    n = tf.shape(v)[0]
    x0 = tf.zeros(tf.concat([[n], self.in_shape], 0), tf.float32)
    with tf.GradientTape() as tape:
      tape.watch(x0)
      y = self._linear(x0)
    return tape.gradient(y, x0, output_gradients=v)

  def _abs_linear(self, r: tf.Tensor) -> tf.Tensor:
    return self._linear(r)


class DenseOp(AffineOp):

  def __init__(self, layer):
    self.layer = layer

  def _w(self):
    return _f32(self.layer.kernel)

  def _linear(self, x):
    return tf.matmul(x, self._w())

  def _transpose(self, v):
    return tf.matmul(v, self._w(), transpose_b=True)

  def _abs_linear(self, r):
    return tf.matmul(r, tf.abs(self._w()))

  def bias(self):
    return _f32(self.layer.bias) if self.layer.use_bias else None

  def flops(self):
    return int(np.prod(self.in_shape) * np.prod(self.out_shape))


def _out_size(size: int, kernel: int, stride: int, padding: str) -> int:
  """Output rows of a convolution over `size` input rows."""
  return -(-(size if padding == "SAME" else size - kernel + 1) // stride)


def _same_pad_before(size: int, kernel: int, stride: int, padding: str) -> int:
  """Zeros TensorFlow pads before the first input row (0 for VALID)."""
  if padding == "VALID":
    return 0
  out = -(-size // stride)
  return max((out - 1) * stride + kernel - size, 0) // 2


def conv2d_transpose(v: tf.Tensor, kernel: tf.Tensor, in_hw: tuple[int, int],
                     strides: tuple[int, int], padding: str) -> tf.Tensor:
  """The transpose of `tf.nn.conv2d(x, kernel, strides, padding)` applied to v
  [N, Ho, Wo, out_channels]: [N, *in_hw, in_channels].

  Where it measured faster on one CPU core (`_use_phases`), it is computed as
  one stride-1 convolution (docs/method.md, "Notes on this implementation" 13):
  input row p = s*a + d takes kernel rows s*m + d only, so the s*s phases d of
  the input are one convolution of v with the kernel split into s*s sub-kernels
  of ceil(k/s) taps (zero-padded, flipped), whose channels are then interleaved
  back into rows and columns. Same values as `tf.nn.conv2d_transpose` (up to the
  order of float32 sums), 2-3x faster into 1-3 channels
  (benchmarks/conv_transpose.py). Elsewhere it is `tf.nn.conv2d_transpose`. Its
  gradients are a forward convolution and a filter gradient.
  """
  return _conv2d_transpose(v, kernel, tuple(in_hw), tuple(strides), padding)


def _use_phases(kernel: tf.Tensor, strides: tuple[int, int]) -> bool:
  """The phase form where it beat Conv2DBackpropInput on one CPU core
  (benchmarks/conv_transpose.py, docs/benchmarks.md): strided convolutions
  whose input has at most 16 channels (0.4-0.95x its time). With 32 or 64 it
  took 1.05-1.6x, at stride 1 1.2x. Not on a GPU, where it was not measured."""
  if getattr(_use_phases, "gpu", None) is None:
    _use_phases.gpu = bool(tf.config.list_physical_devices("GPU"))
  return strides != (1, 1) and kernel.shape[2] <= 16 and not _use_phases.gpu


def _phase_kernel(kernel: tf.Tensor, strides: tuple[int, int]) -> tf.Tensor:
  """[kh, kw, C, O] -> [Mh, Mw, O, sh*sw*C]: tap (m', n') of phase (dy, dx) is
  kernel[sh*(Mh-1-m') + dy, sw*(Mw-1-n') + dx]."""
  kh, kw, c, o = kernel.shape
  sh, sw = strides
  mh, mw = -(-kh // sh), -(-kw // sw)
  k = tf.pad(kernel, [[0, mh * sh - kh], [0, mw * sw - kw], [0, 0], [0, 0]])
  k = tf.reverse(tf.reshape(k, [mh, sh, mw, sw, c, o]), [0, 2])
  return tf.reshape(tf.transpose(k, [0, 2, 5, 1, 3, 4]), [mh, mw, o, sh * sw * c])


def _phase_transpose(v, kernel, in_hw, strides, padding):
  kh, kw, c, o = kernel.shape
  (h, w), (sh, sw) = in_hw, strides
  mh, mw = -(-kh // sh), -(-kw // sw)
  # Static sizes (a batch folded from several dims may have lost them).
  ho, wo = _out_size(h, kh, sh, padding), _out_size(w, kw, sw, padding)
  v = tf.reshape(v, [-1, ho, wo, o])
  vp = tf.pad(v, [[0, 0], [mh - 1, mh - 1], [mw - 1, mw - 1], [0, 0]])
  a, b = ho + mh - 1, wo + mw - 1
  z = tf.nn.conv2d(vp, _phase_kernel(kernel, strides), 1, "VALID")
  n = tf.shape(z)[0]
  if sh == sw:
    z = tf.nn.depth_to_space(z, sh) if sh > 1 else z
  else:
    z = tf.reshape(tf.transpose(tf.reshape(z, [n, a, b, sh, sw, c]),
                                [0, 1, 3, 2, 4, 5]), [n, a * sh, b * sw, c])
  top = _same_pad_before(h, kh, sh, padding)
  left = _same_pad_before(w, kw, sw, padding)
  # Input rows no output reads (past the last window) get zeros.
  z = tf.pad(z, [[0, 0], [0, max(top + h - a * sh, 0)],
                 [0, max(left + w - b * sw, 0)], [0, 0]])
  return z[:, top:top + h, left:left + w, :]


def _filter_grad(x, kernel, g, strides, padding):
  """d<g, conv2d(x, kernel)>/d kernel. A 1x1 kernel with stride 2 is an einsum:
  TensorFlow 2.21's oneDNN Conv2DBackpropFilter corrupts the heap there (CPU)."""
  if tuple(kernel.shape[:2]) == (1, 1):
    sh, sw = strides
    return tf.einsum("nhwc,nhwo->co", x[:, ::sh, ::sw, :], g)[None, None]
  return tf.compat.v1.nn.conv2d_backprop_filter(
      x, tf.shape(kernel), g, [1, *strides, 1], padding)


def _conv2d_transpose(v, kernel, in_hw, strides, padding):
  @tf.custom_gradient
  def run(v, kernel):
    def grad(g):
      dv = tf.nn.conv2d(g, kernel, strides, padding)
      dk = _filter_grad(g, kernel, v, strides, padding)
      return dv, dk
    if not _use_phases(kernel, strides):
      n = tf.shape(v)[0]
      return tf.nn.conv2d_transpose(v, kernel, [n, *in_hw, kernel.shape[2]],
                                    strides, padding), grad
    # An empty batch (CROWN's rows where no neuron is unstable) skips the
    # convolution: TensorFlow 2.21's oneDNN conv2d returns its input's shape
    # for one.
    out = tf.cond(tf.shape(v)[0] > 0,
                  lambda: _phase_transpose(v, kernel, in_hw, strides, padding),
                  lambda: tf.zeros([0, *in_hw, kernel.shape[2]], v.dtype))
    return out, grad
  return run(v, kernel)


def conv2d(x: tf.Tensor, kernel: tf.Tensor, strides: tuple[int, int],
           padding: str) -> tf.Tensor:
  """`tf.nn.conv2d` whose gradient with respect to x is `conv2d_transpose` (the
  same values, faster than Conv2DBackpropInput)."""
  strides, (h, w) = tuple(strides), tuple(x.shape[1:3])

  @tf.custom_gradient
  def run(x, kernel):
    def grad(g):
      dx = _conv2d_transpose(g, kernel, (h, w), strides, padding)
      dk = _filter_grad(x, kernel, g, strides, padding)
      return dx, dk
    return tf.nn.conv2d(x, kernel, strides, padding), grad
  return run(x, kernel)


class Conv2DOp(AffineOp):

  def __init__(self, layer):
    self.layer = layer
    self.strides = tuple(layer.strides)
    self.padding = layer.padding.upper()

  def _k(self):
    return _f32(self.layer.kernel)

  def _conv(self, x, k):
    # Static spatial sizes (a batch folded from several dims may have lost them).
    x = tf.reshape(x, [-1, *self.in_shape])
    return conv2d(x, k, self.strides, self.padding)

  def _linear(self, x):
    return self._conv(x, self._k())

  def _abs_linear(self, r):
    return self._conv(r, tf.abs(self._k()))

  def _transpose(self, v):
    return conv2d_transpose(v, self._k(), self.in_shape[:2], self.strides,
                            self.padding)

  def bias(self):
    return _f32(self.layer.bias) if self.layer.use_bias else None

  def structural(self, x):
    kh, kw = self.layer.kernel_size
    ones = tf.ones((kh, kw, 1, 1), tf.float32)
    return tf.nn.conv2d(x, ones, self.strides, self.padding).numpy()

  def flops(self):
    kh, kw = self.layer.kernel_size
    return int(np.prod(self.out_shape) * kh * kw * self.in_shape[-1])


class ScaleShiftOp(AffineOp):
  """y = x * scale + shift, per channel (last axis) or per element."""

  mixing = False

  def __init__(self, scale_fn, shift_fn):
    self._scale_fn = scale_fn
    self._shift_fn = shift_fn

  def _linear(self, x):
    return per_channel(tf.multiply, x, self._scale_fn(), shape=self.in_shape)

  _transpose = _linear  # a diagonal map is its own transpose

  def _abs_linear(self, r):
    return per_channel(tf.multiply, r, tf.abs(self._scale_fn()), shape=self.in_shape)

  def bias(self):
    return self._shift_fn()

  def affine(self, x):
    return per_channel(lambda x, a, b: x * a + b, x, self._scale_fn(),
                       self._shift_fn(), shape=self.in_shape)

  def structural(self, x):
    return x


class ReshapeOp(AffineOp):
  """Flatten and Reshape (row-major, NHWC order)."""

  mixing = False

  def __init__(self, layer):
    self.layer = layer

  def _linear(self, x):
    return tf.reshape(x, tf.concat([[-1], self.out_shape], 0))

  def _transpose(self, v):
    return tf.reshape(v, tf.concat([[-1], self.in_shape], 0))


class IdentityOp(AffineOp):
  """Dropout, linear activations and other layers that are the identity at test time."""

  mixing = False

  def _linear(self, x):
    return x

  def _transpose(self, v):
    return v

  def structural(self, x):
    return x


class ZeroPadOp(AffineOp):

  mixing = False

  def __init__(self, padding):
    (self.top, self.bottom), (self.left, self.right) = padding

  def _pads(self):
    return [[0, 0], [self.top, self.bottom], [self.left, self.right], [0, 0]]

  def _linear(self, x):
    return tf.pad(x, self._pads())

  def _transpose(self, v):
    h, w = self.in_shape[0], self.in_shape[1]
    return v[:, self.top : self.top + h, self.left : self.left + w, :]

  def structural(self, x):
    return np.pad(x, self._pads())


class AvgPoolOp(AffineOp):
  """AveragePooling2D: a linear map with non-negative weights (|L| = L)."""

  def __init__(self, layer):
    self.pool = tuple(layer.pool_size)
    self.strides = tuple(layer.strides)
    self.padding = layer.padding.upper()

  def _linear(self, x):
    return tf.nn.avg_pool2d(x, self.pool, self.strides, self.padding)

  def structural(self, x):
    return tf.nn.avg_pool2d(
        tf.convert_to_tensor(x, tf.float32), self.pool, self.strides,
        self.padding).numpy()

  def flops(self):
    return int(np.prod(self.out_shape) * self.pool[0] * self.pool[1])
