"""The linear operators of mixtrain_tf/ops.py are what they claim: for the dense
matrix M of `op.linear` (rows = inputs, x -> x @ M, read off an identity basis),
`op.transpose(v)` is v @ M^T (so <L x, v> = <x, L^T v>), `op.abs_linear(r)` is
r @ |M|, and operators marked non-mixing have at most one nonzero per row and column.

The operators are those of the zoo networks' bound graphs (in_shape/out_shape set
there), which between them hold every operator kind and configuration listed in
EXPECTED_KINDS. Comparisons are in float64, zoo.RTOL relative to the scale of the
sums (|v| @ |M|^T), so only float32 rounding is allowed.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest
import tensorflow as tf
import zoo

from mixtrain_tf import ops
from mixtrain_tf.graph import bound_graph

EXPECTED_KINDS = {
    "DenseOp", "DenseOp on rank 2",
    "Conv2DOp strides (2, 2) SAME, odd input",
    "Conv2DOp strides (2, 2) VALID, odd output",
    "Conv2DOp strides (2, 1) SAME", "Conv2DOp strides (1, 1) SAME",
    "ScaleShiftOp per channel", "ScaleShiftOp broadcast-shaped",
    "ScaleShiftOp scalar",
    "ReshapeOp Flatten", "ReshapeOp Reshape", "ZeroPadOp", "AvgPoolOp SAME",
    "AvgPoolOp VALID", "IdentityOp",
}


def _kinds(op) -> set[str]:
  """What configuration of its class one operator exercises."""
  name = type(op).__name__
  kinds = {name}
  if isinstance(op, ops.DenseOp) and len(op.in_shape) > 1:
    kinds.add("DenseOp on rank 2")
  if isinstance(op, ops.Conv2DOp):
    kinds.add(f"Conv2DOp strides {op.strides} {op.padding}")
    if op.strides == (2, 2) and op.padding == "SAME" and op.in_shape[0] % 2:
      kinds.add("Conv2DOp strides (2, 2) SAME, odd input")
    if op.strides == (2, 2) and op.padding == "VALID" and op.out_shape[0] % 2:
      kinds.add("Conv2DOp strides (2, 2) VALID, odd output")
  if isinstance(op, ops.ScaleShiftOp):
    shape = tuple(op._scale_fn().shape)  # the layer's scale, as the op reads it
    kinds.add("ScaleShiftOp " + ("scalar" if shape == () else
                                 "per channel" if len(shape) == 1 else
                                 "broadcast-shaped"))
  if isinstance(op, ops.ReshapeOp):
    kinds.add(f"ReshapeOp {type(op.layer).__name__}")
  if isinstance(op, ops.AvgPoolOp):
    kinds.add(f"AvgPoolOp {op.padding}")
  return kinds


def _affine_nodes(net: str):
  nodes = bound_graph(zoo.RANDOM_NETS[net]()).nodes
  return [(f"{net} node {i} '{n.name}' ({type(n.op).__name__})", n.op)
          for i, n in enumerate(nodes) if isinstance(n.op, ops.AffineOp)]


def _matrix(op) -> np.ndarray:
  """M [n_in, n_out] of op.linear, float64: L(x) = x @ M (flattened)."""
  n_in = int(np.prod(op.in_shape))
  eye = tf.reshape(tf.eye(n_in), (n_in,) + tuple(op.in_shape))
  return tf.reshape(op.linear(eye), [n_in, -1]).numpy().astype(np.float64)


def _assert_close(ours, want, scale, what):
  err = np.abs(np.asarray(ours, np.float64) - want)
  tol = zoo.RTOL * np.maximum(1.0, scale)
  assert np.all(err <= tol), (
      f"{what}: differs by up to {err.max():.3g} (tolerance {tol.min():.3g})")


def test_zoo_holds_every_operator_kind():
  found = set().union(*[_kinds(op) for net in zoo.RANDOM_NETS
                        for _, op in _affine_nodes(net)])
  assert EXPECTED_KINDS <= found, f"missing: {sorted(EXPECTED_KINDS - found)}"


@pytest.mark.parametrize("net", sorted(zoo.RANDOM_NETS))
def test_transpose_is_the_adjoint_of_linear(net):
  rng = np.random.default_rng(1)
  for what, op in _affine_nodes(net):
    m = _matrix(op)
    # Two leading dims, as the symbolic engine pulls [batch, rows, *shape] back.
    v = rng.normal(size=(2, 3) + tuple(op.out_shape)).astype(np.float32)
    flat_v = v.reshape(6, -1).astype(np.float64)
    got = op.transpose(tf.constant(v)).numpy()
    assert got.shape == (2, 3) + tuple(op.in_shape), what
    _assert_close(got.reshape(6, -1), flat_v @ m.T, np.abs(flat_v) @ np.abs(m).T,
                  f"{what} transpose")
    x = rng.normal(size=(6,) + tuple(op.in_shape)).astype(np.float32)
    flat_x = x.reshape(6, -1).astype(np.float64)
    lx = op.linear(tf.constant(x)).numpy().reshape(6, -1).astype(np.float64)
    lt_v = got.reshape(6, -1).astype(np.float64)
    _assert_close(np.sum(lx * flat_v, 1), np.sum(flat_x * lt_v, 1),
                  np.einsum("bi,ij,bj->b", np.abs(flat_x), np.abs(m), np.abs(flat_v)),
                  f"{what} <L x, v> = <x, L^T v>")


@pytest.mark.parametrize("net", sorted(zoo.RANDOM_NETS))
def test_abs_linear_is_the_map_with_absolute_weights(net):
  rng = np.random.default_rng(2)
  for what, op in _affine_nodes(net):
    m = _matrix(op)
    r = rng.uniform(0, 1, (5,) + tuple(op.in_shape)).astype(np.float32)
    flat_r = r.reshape(5, -1).astype(np.float64)
    got = op.abs_linear(tf.constant(r)).numpy()
    assert got.shape == (5,) + tuple(op.out_shape), what
    want = flat_r @ np.abs(m)
    _assert_close(got.reshape(5, -1), want, want, f"{what} abs_linear")


@pytest.mark.parametrize("net", sorted(zoo.RANDOM_NETS))
def test_non_mixing_operators_move_single_values(net):
  # |L2 L1| = |L2| |L1| (the "direct" plan of symbolic.py) needs this of them.
  for what, op in _affine_nodes(net):
    if not op.mixing:
      nonzero = _matrix(op) != 0
      assert nonzero.sum(0).max() <= 1 and nonzero.sum(1).max() <= 1, what


CONV_CASES = [  # (input h, w), kernel (h, w), strides, padding
    (hw, k, s, pad)
    for hw in [(7, 7), (8, 5), (14, 14)]
    for k in [(1, 1), (2, 3), (4, 4), (5, 5)]
    for s in [(1, 1), (2, 2), (3, 3), (2, 1)]
    for pad in ["SAME", "VALID"]]


def _conv_case(hw, k, s, pad, seed=0):
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.normal(size=(2, *hw, 2)), tf.float32)
  kernel = tf.constant(rng.normal(size=(*k, 2, 3)), tf.float32)
  v = tf.constant(rng.normal(size=tf.nn.conv2d(x, kernel, s, pad).shape),
                  tf.float32)
  return x, kernel, v


def _kernel_gradient(x, kernel, v, s, pad) -> np.ndarray:
  """d<v, conv2d(x, kernel)>/d kernel from forward convolutions only, one basis
  kernel per entry (TensorFlow's own filter gradient crashes on 1x1 stride 2)."""
  size = int(np.prod(kernel.shape))
  basis = tf.reshape(tf.eye(size), [size, *kernel.shape])
  return np.array([float(tf.reduce_sum(tf.nn.conv2d(x, e, s, pad) * v))
                   for e in basis]).reshape(kernel.shape)


@pytest.mark.parametrize("hw,k,s,pad", CONV_CASES)
def test_conv2d_transpose_equals_tensorflows(hw, k, s, pad):
  x, kernel, v = _conv_case(hw, k, s, pad)
  want = tf.nn.conv2d_transpose(v, kernel, x.shape, s, pad).numpy()
  for got in (ops.conv2d_transpose(v, kernel, hw, s, pad),
              ops._phase_transpose(v, kernel, hw, s, pad)):  # whichever it uses
    np.testing.assert_allclose(got.numpy(), want, rtol=0,
                               atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("hw,k,s,pad", CONV_CASES[::3])
def test_conv2d_and_its_transpose_have_exact_gradients(hw, k, s, pad):
  """Both custom gradients, with respect to the input and to the kernel."""
  x, kernel, v = _conv_case(hw, k, s, pad, seed=1)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([x, kernel, v])
    fwd = tf.reduce_sum(ops.conv2d(x, kernel, s, pad) * v)
    back = tf.reduce_sum(ops.conv2d_transpose(v, kernel, hw, s, pad) * x)
  dk = _kernel_gradient(x, kernel, v, s, pad)  # <v, conv x> = <conv^T v, x>
  scale = np.abs(dk).max()
  for loss in (fwd, back):
    np.testing.assert_allclose(tape.gradient(loss, kernel).numpy(), dk, rtol=0,
                               atol=1e-5 * scale)
  dx = tf.nn.conv2d_transpose(v, kernel, x.shape, s, pad).numpy()
  np.testing.assert_allclose(tape.gradient(fwd, x).numpy(), dx, rtol=0,
                             atol=1e-5 * np.abs(dx).max())
  dv = tf.nn.conv2d(x, kernel, s, pad).numpy()
  np.testing.assert_allclose(tape.gradient(back, v).numpy(), dv, rtol=0,
                             atol=1e-5 * np.abs(dv).max())


def test_conv2d_transpose_keeps_its_shape_on_an_empty_batch():
  """TensorFlow 2.21's oneDNN conv2d returns its input's shape for an empty
  batch; CROWN transposes empty batches of rows when no neuron is unstable."""
  kernel = tf.ones((3, 3, 3, 4))
  run = tf.function(lambda v: ops.conv2d_transpose(v, kernel, (6, 6), (1, 1),
                                                   "SAME"))
  for v in (tf.zeros((0, 6, 6, 4)), tf.zeros((2, 6, 6, 4)), tf.zeros((0, 6, 6, 4))):
    assert ops.conv2d_transpose(v, kernel, (6, 6), (1, 1), "SAME").shape == (
        v.shape[0], 6, 6, 3)
    assert run(v).shape == (v.shape[0], 6, 6, 3)


def test_conv_transpose_benchmark_times_equal_computations():
  """benchmarks/conv_transpose.py compares like with like: each pair it times
  returns the same values (on MNIST_Small's conv2, 3 rows)."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
  import conv_transpose
  op = [n.op for n in bound_graph(zoo.mnist_small()).nodes
        if isinstance(n.op, ops.Conv2DOp)][-1]
  cases = conv_transpose._cases(op, 3)
  assert [what for what, _, _ in cases] == ["transpose (phase form)",
                                            "conv forward + backward"]
  for what, theirs, ours in cases:
    t, o = np.array(theirs()), np.array(ours())
    np.testing.assert_allclose(o, t, rtol=1e-4, err_msg=what)


@pytest.mark.parametrize("const_shape", [(3,), (1, 3), (1, 1, 1, 3), (5, 1, 3), ()])
def test_per_channel_equals_broadcasting(const_shape):
  """ops.per_channel(fn, x, *consts) computes fn(x, *consts) exactly, for per-channel,
  broadcast-shaped, per-position and scalar constants, in eager mode, under a
  tf.function with an unknown batch, and on an empty batch."""
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(size=(4, 5, 6, 3)), tf.float32)
  a = tf.constant(rng.uniform(0.5, 2.0, size=const_shape), tf.float32)
  b = tf.constant(rng.normal(size=const_shape), tf.float32)

  def fn(x, a, b):
    return (x - b) / a

  want = fn(x, a, b).numpy()
  np.testing.assert_array_equal(ops.per_channel(fn, x, a, b).numpy(), want)
  run = tf.function(lambda x: ops.per_channel(fn, x, a, b, shape=(5, 6, 3)),
                    input_signature=[tf.TensorSpec([None, None, None, 3])])
  np.testing.assert_array_equal(run(x).numpy(), want)
  assert run(x[:0]).shape == (0, 5, 6, 3)


def test_scale_shift_affine_is_linear_plus_bias():
  """ScaleShiftOp.affine (one fused pass) equals linear(x) + bias on every zoo
  network's scale-shift operators."""
  rng = np.random.default_rng(1)
  found = 0
  for make in zoo.RANDOM_NETS.values():
    for node in bound_graph(make()).nodes:
      if isinstance(node.op, ops.ScaleShiftOp):
        op = node.op
        x = tf.constant(rng.normal(size=(3, *op.in_shape)), tf.float32)
        want = op.linear(x) + op.bias()
        np.testing.assert_allclose(op.affine(x).numpy(), want.numpy(), rtol=1e-6,
                                   atol=1e-6)
        found += 1
  assert found >= 2


def test_per_channel_benchmark_times_equal_computations():
  """benchmarks/per_channel.py's two timed functions return the same values."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
  import per_channel
  theirs, ours = per_channel._cases((5, 6, 3), 4)
  np.testing.assert_array_equal(ours().numpy(), theirs().numpy())
