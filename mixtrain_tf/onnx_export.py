"""ONNX export for third-party verifiers (VNN-COMP tools such as
alpha-beta-CROWN, NNV, nnenum, Marabou).

`export_onnx(model, path)` writes any model that `mixtrain_tf.graph.bound_graph`
supports (Sequential or functional, residual `Add`s, nested models, normalization
layers) as a plain ONNX graph (opset 13, IR version 7): `Conv`, `Gemm`, `MatMul`,
`Relu`, `Add`, `Mul`, `Pad`, `AveragePool`, `Flatten`, `Reshape` and, only where a
layer needs it, `Transpose`. The graph is written node by node with the `onnx`
package from the bound graph (the same operators the bounds are computed on), and
the weights are float32 initializers read from the live Keras variables.

Input layout (the VNN-COMP convention):

* Image models (Keras input [H, W, C], NHWC): the ONNX input "input" is NCHW,
  float32 [batch, C, H, W], pixel values in the same units as the Keras input
  (in [0, 1] for our datasets; mean/std normalization stays inside the network).
  Feed it `np.transpose(x_nhwc, (0, 3, 1, 2))`.
* Other models (Keras input of rank other than 3): the ONNX input has the Keras
  shape with a leading batch dimension.
* The output "output" is [batch, num_classes], the Keras logits.

Inside the graph, spatial tensors stay NCHW. A Keras `Flatten` of an image
flattens in H, W, C order; the export flattens in C, H, W order instead (a plain
ONNX `Flatten`) and permutes the rows of the following `Dense` kernel (or the
entries of a following per-element scale) to match, so the common
Conv/Relu/Flatten/Gemm networks need no `Transpose`. Other reshapes of images
transpose back to NHWC first.

TensorFlow's "SAME" padding puts the extra row/column of an odd total padding at
the bottom/right (stride 2 with an even kernel); the export writes explicit ONNX
`pads` for it. "SAME" average pooling excludes the padding from the count, as
ONNX `AveragePool` with `count_include_pad=0` does.

VNN-COMP properties for these models are written by `mixtrain_tf.vnnlib`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import numpy as np
import onnx
import tensorflow as tf
from onnx import TensorProto, helper, numpy_helper

from mixtrain_tf import graph as graph_lib
from mixtrain_tf import ops

OPSET = 13
IR_VERSION = 7  # the IR version of opset 13 (onnx 1.8), readable by older tools
INPUT_NAME = "input"
OUTPUT_NAME = "output"

# Layouts of an exported tensor relative to the Keras tensor it stands for.
_KERAS = "keras"        # same shape and element order as in Keras (plus batch)
_NCHW = "nchw"          # a Keras [H, W, C] image stored as [C, H, W]
_FLAT_CHW = "flat_chw"  # a Keras flat vector of an [H, W, C] image, in C, H, W order


def _np(v) -> np.ndarray:
  if isinstance(v, (tf.Tensor, tf.Variable)) or hasattr(v, "numpy"):
    v = v.numpy()
  return np.asarray(v, dtype=np.float32)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow's SAME padding (before, after) of one spatial dimension."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class _Value:
  """An exported tensor: its ONNX name, layout and the Keras shape it stands for."""

  def __init__(self, name: str, layout: str, shape: tuple[int, ...],
               image_shape: tuple[int, int, int] | None = None):
    self.name = name
    self.layout = layout
    self.shape = shape              # Keras shape without batch
    self.image_shape = image_shape  # (H, W, C) for _FLAT_CHW


class _Writer:
  """Builds the ONNX graph from a `BoundGraph`."""

  def __init__(self, bound_graph, batch_size: int | None):
    self.g = bound_graph
    self.batch = batch_size if batch_size is not None else "batch"
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._names: set[str] = {INPUT_NAME}

  # -- helpers ----------------------------------------------------------------

  def _fresh(self, base: str) -> str:
    base = base.replace("/", "_").replace(":", "_") or "t"
    name, k = base, 1
    while name in self._names:
      name, k = f"{base}_{k}", k + 1
    self._names.add(name)
    return name

  def _const(self, base: str, array: np.ndarray) -> str:
    name = self._fresh(base)
    self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
    return name

  def _node(self, op_type: str, inputs: Sequence[str], base: str, **attrs) -> str:
    out = self._fresh(base)
    self.nodes.append(helper.make_node(op_type, list(inputs), [out],
                                       name=self._fresh("n_" + base), **attrs))
    return out

  def _perm_chw(self, hwc: tuple[int, int, int]) -> np.ndarray:
    """perm[j] = HWC flat index of the j-th element in C, H, W order."""
    return np.arange(int(np.prod(hwc))).reshape(hwc).transpose(2, 0, 1).ravel()

  def _to_keras(self, v: _Value, base: str) -> _Value:
    if v.layout == _KERAS:
      return v
    if v.layout == _NCHW:
      name = self._node("Transpose", [v.name], base + "_nhwc", perm=[0, 2, 3, 1])
      return _Value(name, _KERAS, v.shape)
    h, w, c = v.image_shape  # _FLAT_CHW: unflatten, transpose, flatten
    chw = self._node("Reshape", [v.name, self._const(
        base + "_chw_shape", np.array([-1, c, h, w], np.int64))], base + "_chw")
    hwc = self._node("Transpose", [chw], base + "_hwc", perm=[0, 2, 3, 1])
    flat = self._node("Flatten", [hwc], base + "_flat", axis=1)
    return _Value(flat, _KERAS, v.shape)

  def _to_nchw(self, v: _Value, base: str) -> _Value:
    if v.layout == _NCHW:
      return v
    v = self._to_keras(v, base)
    if len(v.shape) != 3:
      raise ValueError(f"'{base}' needs an image [H, W, C], got shape {v.shape}.")
    name = self._node("Transpose", [v.name], base + "_nchw", perm=[0, 3, 1, 2])
    return _Value(name, _NCHW, v.shape)

  def _layout_array(self, array: np.ndarray, v: _Value) -> np.ndarray:
    """A constant broadcast against Keras [1, *shape], laid out like `v`, compacted."""
    a = np.broadcast_to(np.asarray(array, np.float32), (1,) + v.shape)
    if v.layout == _NCHW:
      a = a.transpose(0, 3, 1, 2)
    elif v.layout == _FLAT_CHW:
      a = a[:, self._perm_chw(v.image_shape)]
    for axis in range(1, a.ndim):  # keep only the axes it varies along
      first = np.take(a, [0], axis=axis)
      if np.array_equal(a, np.broadcast_to(first, a.shape)):
        a = first
    return np.ascontiguousarray(a, np.float32)

  # -- operators --------------------------------------------------------------

  def _dense(self, op: ops.DenseOp, v: _Value, base: str) -> _Value:
    layer = op.layer
    kernel = _np(layer.kernel)
    bias = (_np(layer.bias) if layer.use_bias
            else np.zeros(kernel.shape[1], np.float32))
    if v.layout == _FLAT_CHW:
      kernel = kernel[self._perm_chw(v.image_shape)]
    elif v.layout == _NCHW:
      v = self._to_keras(v, base)
    out_shape = op.out_shape
    if len(v.shape) == 1:
      name = self._node("Gemm", [v.name, self._const(base + "_kernel", kernel),
                                 self._const(base + "_bias", bias)], base)
    else:  # Dense on the last axis of a higher-rank tensor
      y = self._node("MatMul", [v.name, self._const(base + "_kernel", kernel)],
                     base + "_matmul")
      name = self._node("Add", [y, self._const(base + "_bias", bias)], base)
    return _Value(name, _KERAS, out_shape)

  def _conv(self, op: ops.Conv2DOp, v: _Value, base: str) -> _Value:
    v = self._to_nchw(v, base)
    layer = op.layer
    kernel = _np(layer.kernel)  # HWIO
    kh, kw = kernel.shape[:2]
    h, w = v.shape[:2]
    sh, sw = op.strides
    if op.padding == "SAME":
      (top, bottom), (left, right) = _same_pads(h, kh, sh), _same_pads(w, kw, sw)
    else:
      top = bottom = left = right = 0
    inputs = [v.name, self._const(base + "_kernel", kernel.transpose(3, 2, 0, 1))]
    if layer.use_bias:
      inputs.append(self._const(base + "_bias", _np(layer.bias)))
    name = self._node("Conv", inputs, base, kernel_shape=[kh, kw], strides=[sh, sw],
                      pads=[top, left, bottom, right], dilations=[1, 1], group=1)
    return _Value(name, _NCHW, op.out_shape)

  def _avg_pool(self, op: ops.AvgPoolOp, v: _Value, base: str) -> _Value:
    v = self._to_nchw(v, base)
    (ph, pw), (sh, sw) = op.pool, op.strides
    h, w = v.shape[:2]
    if op.padding == "SAME":
      (top, bottom), (left, right) = _same_pads(h, ph, sh), _same_pads(w, pw, sw)
    else:
      top = bottom = left = right = 0
    name = self._node("AveragePool", [v.name], base, kernel_shape=[ph, pw],
                      strides=[sh, sw], pads=[top, left, bottom, right],
                      count_include_pad=0)
    return _Value(name, _NCHW, op.out_shape)

  def _zero_pad(self, op: ops.ZeroPadOp, v: _Value, base: str) -> _Value:
    v = self._to_nchw(v, base)
    pads = np.array([0, 0, op.top, op.left, 0, 0, op.bottom, op.right], np.int64)
    name = self._node("Pad", [v.name, self._const(base + "_pads", pads)], base,
                      mode="constant")
    return _Value(name, _NCHW, op.out_shape)

  def _scale_shift(self, op: ops.ScaleShiftOp, v: _Value, base: str) -> _Value:
    scale = self._layout_array(_np(op._scale_fn()), v)
    shift = op.bias()
    name = v.name
    if not np.all(scale == 1.0):
      name = self._node("Mul", [name, self._const(base + "_scale", scale)],
                        base + "_mul")
    if shift is not None:
      shift = self._layout_array(_np(shift), v)
      if np.any(shift != 0.0):
        name = self._node("Add", [name, self._const(base + "_shift", shift)],
                          base + "_add")
    return _Value(name, v.layout, op.out_shape, v.image_shape)

  def _reshape(self, op: ops.ReshapeOp, v: _Value, base: str) -> _Value:
    if v.layout == _NCHW and len(op.out_shape) == 1:  # Flatten of an image
      name = self._node("Flatten", [v.name], base, axis=1)
      return _Value(name, _FLAT_CHW, op.out_shape, image_shape=v.shape)
    v = self._to_keras(v, base)
    if v.shape == op.out_shape:
      return v
    if len(op.out_shape) == 1:
      name = self._node("Flatten", [v.name], base, axis=1)
    else:
      shape = self._const(base + "_shape", np.array((-1,) + op.out_shape, np.int64))
      name = self._node("Reshape", [v.name, shape], base)
    return _Value(name, _KERAS, op.out_shape)

  def _add(self, values: list[_Value], base: str, shape) -> _Value:
    layouts = {(v.layout, v.image_shape) for v in values}
    if len(layouts) > 1:
      if len(shape) == 3:
        values = [self._to_nchw(v, base) for v in values]
      else:
        values = [self._to_keras(v, base) for v in values]
    name = values[0].name
    for i, v in enumerate(values[1:]):
      name = self._node("Add", [name, v.name],
                        base if i == len(values) - 2 else f"{base}_{i}")
    return _Value(name, values[0].layout, shape, values[0].image_shape)

  # -- graph ------------------------------------------------------------------

  def build(self) -> onnx.ModelProto:
    in_shape = self.g.input_shape
    image_input = len(in_shape) == 3
    if image_input:
      h, w, c = in_shape
      onnx_in = [self.batch, c, h, w]
      values = [_Value(INPUT_NAME, _NCHW, in_shape)]
    else:
      onnx_in = [self.batch, *in_shape]
      values = [_Value(INPUT_NAME, _KERAS, in_shape)]
    def relu(i, node, ins):
      a = ins[0]
      return _Value(self._node("Relu", [a.name], node.name), a.layout, a.shape,
                    a.image_shape)

    def writer(method):
      return lambda i, node, ins: method(node.op, ins[0], node.name)

    rules = {
        ops.AddOp: lambda i, node, ins: self._add(ins, node.name, node.op.out_shape),
        ops.ReluOp: relu,
        ops.IdentityOp: lambda i, node, ins: ins[0],
        ops.DenseOp: writer(self._dense), ops.Conv2DOp: writer(self._conv),
        ops.ScaleShiftOp: writer(self._scale_shift),
        ops.ReshapeOp: writer(self._reshape), ops.ZeroPadOp: writer(self._zero_pad),
        ops.AvgPoolOp: writer(self._avg_pool),
    }
    values = self.g.propagate(rules, dict(enumerate(values)))
    values = [values[i] for i in range(len(self.g.nodes))]
    out = self._to_keras(values[-1], "output")
    out_name = self._name_output(out.name)
    graph = helper.make_graph(
        self.nodes, self.g.model.name or "network",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, onnx_in)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT,
                                       [self.batch, *out.shape])],
        initializer=self.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="mixtrain_tf", ir_version=IR_VERSION,
        doc_string=(
            f"Keras model '{self.g.model.name}'. Input '{INPUT_NAME}': "
            + (f"NCHW float32 [N, {c}, {h}, {w}] (Keras NHWC image transposed), "
               if image_input else f"float32 [N, {', '.join(map(str, in_shape))}], ")
            + f"output '{OUTPUT_NAME}': logits."))
    helper.set_model_props(model, {
        "input_layout": "NCHW" if image_input else "keras",
        "keras_input_shape": ",".join(map(str, in_shape))})
    return model

  def _name_output(self, name: str) -> str:
    """Renames the tensor `name` to OUTPUT_NAME (an Identity if it is the input)."""
    for node in self.nodes:
      if name in node.output:
        node.output[list(node.output).index(name)] = OUTPUT_NAME
        return OUTPUT_NAME
    self.nodes.append(helper.make_node("Identity", [name], [OUTPUT_NAME],
                                       name="n_output"))
    return OUTPUT_NAME


def to_onnx(model: keras.Model, batch_size: int | None = 1) -> onnx.ModelProto:
  """The ONNX model of `model` (see the module docstring for the layout).

  Args:
    model: A built Keras model that `mixtrain_tf.graph.bound_graph` supports.
    batch_size: Fixed batch dimension of the ONNX input, or None for a symbolic one.
  """
  with tf.init_scope():
    proto = _Writer(graph_lib.bound_graph(model), batch_size).build()
  onnx.checker.check_model(proto, full_check=True)
  return proto


def export_onnx(model: keras.Model, path: str | os.PathLike[str],
                batch_size: int | None = 1) -> onnx.ModelProto:
  """Writes `model` as ONNX to `path` (NCHW image input; see the module docstring).

  Returns the written `onnx.ModelProto`.
  """
  proto = to_onnx(model, batch_size)
  onnx.save(proto, os.fspath(path))
  return proto


def onnx_input(x: np.ndarray) -> np.ndarray:
  """Keras images [N, H, W, C] -> the ONNX input layout [N, C, H, W] (float32)."""
  x = np.asarray(x, np.float32)
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x)
