"""The CROWN pass of a second convolution's neurons in local (patch) form.

The rows that bound neuron k = (h, w, c) of a Conv2D node z (docs/method.md 2.4)
are, after z's own transpose, its kernel slice: nonzero only on the kh x kw x C
window of z's input that the neuron reads. When z reads a ReLU of a Conv2D that
reads the network's input, possibly through elementwise maps such as a
normalisation (conv -> ReLU -> conv: the second conv layer of every
convolutional network here), the whole backward pass stays inside windows:

* the ReLU's relaxation (upper slope, intercept, lower slope) is needed only on
  that window;
* the first convolution's transpose maps the window to an input window of
  ((kh - 1) * stride1 + kh1) x ... values (a VALID transposed convolution of the
  window), which is concretised against the box's window.

The dense pass holds [B, rows, H1, W1, C1] coefficients (14 x 14 x 16 on
MNIST_Small) where this holds [B, rows, kh, kw, C1] (4 x 4 x 16), and alpha-CROWN's
slopes shrink the same way. Positions outside the image (padding) get zero
relaxation and zero box, so they add nothing, as in the dense pass; the result
equals `crown.backward_upper` on the same rows up to float32 round-off
(tests/crown_test.py).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mixtrain_tf import ops
from mixtrain_tf.bounds import IntervalBounds
from mixtrain_tf.graph import BoundGraph


def _pads(size: int, kernel: int, stride: int, padding: str) -> int:
  """Top (left) zero padding of a convolution along one dimension."""
  if padding == "VALID":
    return 0
  out = -(-size // stride)
  return max((out - 1) * stride + kernel - size, 0) // 2


class LocalPass:
  """Geometry of the local pass for node z, or `applies` False."""

  def __init__(self, graph: BoundGraph, z: int):
    self.applies = False
    node = graph.nodes[z]
    if not isinstance(node.op, ops.Conv2DOp) or len(node.inputs) != 1:
      return
    r = node.inputs[0]
    if not isinstance(graph.nodes[r].op, ops.ReluOp):
      return
    j = graph.nodes[r].inputs[0]
    first = graph.nodes[j]
    if not isinstance(first.op, ops.Conv2DOp) or len(first.inputs) != 1:
      return
    # Between the input and the first convolution only elementwise maps
    # (normalisation): the box's image under them is a box, exactly.
    self.elementwise = []
    q = first.inputs[0]
    while q != 0:
      op = graph.nodes[q].op
      if (not isinstance(op, (ops.ScaleShiftOp, ops.IdentityOp))
          or len(graph.nodes[q].inputs) != 1):
        return
      self.elementwise.insert(0, op)
      q = graph.nodes[q].inputs[0]
    self.applies = True
    self.j = j
    conv2, conv1 = node.op, first.op
    self.conv1 = conv1
    kh2, kw2 = conv2.layer.kernel_size
    kh1, kw1 = conv1.layer.kernel_size
    s2h, s2w = conv2.strides
    s1h, s1w = conv1.strides
    h0, w0, _ = conv1.in_shape
    h1, w1, c1 = conv2.in_shape
    self.h2, self.w2, self.c2 = conv2.out_shape
    self.window = (kh2, kw2, c1)
    p2t = _pads(h1, kh2, s2h, conv2.padding)
    p2l = _pads(w1, kw2, s2w, conv2.padding)
    p1t = _pads(h0, kh1, s1h, conv1.padding)
    p1l = _pads(w0, kw1, s1w, conv1.padding)
    # z's input (the ReLU's), padded so that neuron (h, w)'s window starts at
    # (h * s2h, w * s2w).
    self.pad_mid = [[0, 0], [p2t, max(0, (self.h2 - 1) * s2h + kh2 - h1 - p2t)],
                    [p2l, max(0, (self.w2 - 1) * s2w + kw2 - w1 - p2l)], [0, 0]]
    self.mid_args = dict(sizes=[1, kh2, kw2, 1], strides=[1, s2h, s2w, 1],
                         rates=[1, 1, 1, 1], padding="VALID")
    # The input, padded so that the window starts at (h * s2h * s1h, ...).
    ih, iw = (kh2 - 1) * s1h + kh1, (kw2 - 1) * s1w + kw1
    top, left = p2t * s1h + p1t, p2l * s1w + p1l
    self.pad_in = [[0, 0], [top, max(0, (self.h2 - 1) * s2h * s1h + ih - h0 - top)],
                   [left, max(0, (self.w2 - 1) * s2w * s1w + iw - w0 - left)], [0, 0]]
    self.in_args = dict(sizes=[1, ih, iw, 1], strides=[1, s2h * s1h, s2w * s1w, 1],
                        rates=[1, 1, 1, 1], padding="VALID")
    self.in_window = (ih, iw, conv1.in_shape[-1])
    self.conv2 = conv2  # weights are read at each use (they train)

  def _windows(self, t: tf.Tensor, pad, args, loc: tf.Tensor) -> tf.Tensor:
    """t [B, H, W, C] -> the window of each row's location loc [B, k]: [B, k, D]."""
    patches = tf.image.extract_patches(tf.pad(t, pad), **args)
    patches = tf.reshape(patches, [tf.shape(t)[0], self.h2 * self.w2, -1])
    return tf.gather(patches, loc, axis=1, batch_dims=1)

  def gather(self, idx: tf.Tensor, pre: dict, box: IntervalBounds,
             slope_fn, splits: dict | None = None):
    """What the pass needs for neurons idx [B, k] of z: a dict of windows."""
    loc, channel = idx // self.c2, idx % self.c2
    kernel = tf.reshape(tf.transpose(tf.cast(self.conv2.layer.kernel, tf.float32),
                                     [3, 0, 1, 2]), [self.c2, -1])
    out = {"coeff": tf.gather(kernel, channel)}  # [B, k, D]
    bias2, bias1 = self.conv2.bias(), self.conv1.bias()
    out["const"] = 0.0 if bias2 is None else tf.gather(bias2, channel)
    s, intercept, lower_slope, unstable = slope_fn(pre[self.j])
    for name, t in (("s", s), ("intercept", intercept), ("lower", lower_slope),
                    ("unstable", tf.cast(unstable, tf.float32))):
      out[name] = self._windows(t, self.pad_mid, self.mid_args, loc)
    split = (splits or {}).get(self.j)
    if split is not None:
      out["split"] = self._windows(tf.cast(split, tf.float32), self.pad_mid,
                                   self.mid_args, loc)
    if bias1 is not None:
      # Coefficients are 0 outside the image (zero relaxation there), so the
      # first layer's bias can be read at every window position.
      out["bias1"] = tf.tile(bias1, [self.window[0] * self.window[1]])
    centre, radius = box.center, box.radius
    for op in self.elementwise:
      centre, radius = op.affine(centre), op.abs_linear(radius)
    out["centre"] = self._windows(centre, self.pad_in, self.in_args, loc)
    out["radius"] = self._windows(radius, self.pad_in, self.in_args, loc)
    return out

  def upper(self, w: dict, slopes: tf.Tensor | None = None,
            betas: tf.Tensor | None = None) -> tf.Tensor:
    """Upper bounds [B, 2k] of x_k (first k) and -x_k (last k) from `gather`'s
    windows; slopes [B, 2k, D] replace CROWN's lower slopes where unstable,
    betas [B, 2k, D] >= 0 add beta * split (beta-CROWN)."""
    def both(t):
      return tf.concat([t, t], axis=1)
    coeff = tf.concat([w["coeff"], -w["coeff"]], axis=1)  # [B, 2k, D]
    const = 0.0 if isinstance(w["const"], float) else tf.concat(
        [w["const"], -w["const"]], axis=1)
    pos = tf.nn.relu(coeff)
    neg = coeff - pos
    lower = both(w["lower"])
    if slopes is not None:
      lower = tf.where(both(w["unstable"]) > 0, slopes, lower)
    const += tf.reduce_sum(pos * both(w["intercept"]), axis=2)
    a = pos * both(w["s"]) + neg * lower
    if betas is not None and "split" in w:
      a += betas * both(w["split"])
    if "bias1" in w:
      const += tf.einsum("bmd,d->bm", a, w["bias1"])
    b, m = tf.shape(a)[0], tf.shape(a)[1]
    kh, kw, c1 = self.window
    ih, iw, c0 = self.in_window
    a0 = ops.conv2d_transpose(
        tf.reshape(a, [b * m, kh, kw, c1]),
        tf.cast(self.conv1.layer.kernel, tf.float32), (ih, iw),
        self.conv1.strides, "VALID")
    a0 = tf.reshape(a0, [b, m, ih * iw * c0])
    return (const + tf.reduce_sum(a0 * both(w["centre"]), axis=2)
            + tf.reduce_sum(tf.abs(a0) * both(w["radius"]), axis=2))


def local_pass(graph: BoundGraph, z: int) -> LocalPass | None:
  """The local pass of node z, kept on the graph; None where it does not apply."""
  cache = graph.__dict__.setdefault("_local_passes", {})
  if z not in cache:
    p = LocalPass(graph, z)
    cache[z] = p if p.applies else None
  return cache[z]


def window_values(graph: BoundGraph, z: int) -> tuple[int, int]:
  """Values of one row's window of z's input and of the network's input (for
  the memory estimate); (0, 0) where the local pass does not apply."""
  p = local_pass(graph, z)
  if p is None:
    return 0, 0
  return int(np.prod(p.window)), int(np.prod(p.in_window))
