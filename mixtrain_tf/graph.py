"""Turns a Keras model into a small graph of bound operators.

Sequential and functional models (residual graphs and nested models included) built
from the supported standard Keras layers are walked layer by layer. An unsupported
layer raises a `ValueError` naming it, its class and the supported set.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import keras
import tensorflow as tf

from mixtrain_tf import ops

SUPPORTED_LAYERS = (
    "InputLayer", "Dense", "Conv2D", "ReLU", "Activation('relu'|'linear')",
    "Flatten", "Reshape", "ZeroPadding2D", "Add", "Rescaling", "Normalization",
    "InputNormalization", "BatchNormalization (inference)", "AveragePooling2D",
    "Dropout")


@dataclasses.dataclass
class Node:
  """One operator applied to the outputs of earlier nodes (indices into the graph)."""
  name: str
  op: ops.BoundOp
  inputs: tuple[int, ...]


class UnsupportedLayerError(ValueError):
  pass


def _unsupported(layer, why: str = "has no sound bound here"):
  return UnsupportedLayerError(
      f"layer '{layer.name}' ({type(layer).__name__}) {why}; supported: "
      f"{', '.join(SUPPORTED_LAYERS)}. Replace it or remove it before bounding.")


def _activation_name(layer) -> str:
  act = getattr(layer, "activation", None)
  if act is None:
    return "linear"
  name = keras.activations.serialize(act)
  if isinstance(name, dict):
    name = name.get("config", name.get("class_name"))
  return str(name)


# Per-channel affine forms y = x * scale + shift of the normalization layers,
# read from the layers' variables at call time.
def _rescaling_scale(layer):
  return ops._f32(layer.scale)


def _rescaling_shift(layer):
  return ops._f32(layer.offset)


def _normalization_scale(layer):
  return 1.0 / tf.maximum(tf.sqrt(ops._f32(layer.variance)), keras.config.epsilon())


def _normalization_shift(layer):
  return -ops._f32(layer.mean) * _normalization_scale(layer)


def _batchnorm_scale(layer):
  s = tf.math.rsqrt(ops._f32(layer.moving_variance) + layer.epsilon)
  return s * ops._f32(layer.gamma) if layer.scale else s


def _batchnorm_shift(layer):
  b = -ops._f32(layer.moving_mean) * _batchnorm_scale(layer)
  return b + ops._f32(layer.beta) if layer.center else b


class BoundGraph:
  """Nodes in topological order; node 0 is the input, the last node the output."""

  def __init__(self, model: keras.Model):
    if not model.built or not getattr(model, "inputs", None):
      raise ValueError(
          f"model '{model.name}' is not built: give it an Input (or call it once on "
          "a batch) before computing bounds.")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
      raise ValueError(
          f"model '{model.name}' has {len(model.inputs)} inputs and "
          f"{len(model.outputs)} outputs; bounds need exactly one of each.")
    self.model = model
    self.input_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    self.nodes: list[Node] = [Node("input", ops.InputOp(), ())]
    self.nodes[0].op.out_shape = self.input_shape
    self._cache: dict[int, int] = {}
    out = self._walk_model(model, 0)
    if out != len(self.nodes) - 1:  # make the output the last node
      self._add("output", ops.IdentityOp(), (out,))
    self._infer_shapes()
    self.output_shape = self.nodes[-1].op.out_shape

  # -- building -------------------------------------------------------------

  def _add(self, name, op, inputs) -> int:
    self.nodes.append(Node(name, op, tuple(inputs)))
    return len(self.nodes) - 1

  def _walk_model(self, model, input_index: int) -> int:
    if isinstance(model, keras.Sequential):
      idx = input_index
      for layer in model.layers:
        idx = self._walk_layer(layer, [idx])
      return idx
    # Functional: follow each output tensor back to the model input.
    memo = {id(model.inputs[0]): input_index}

    def visit(tensor):
      if id(tensor) in memo:
        return memo[id(tensor)]
      op, node_index, _ = tensor._keras_history
      node = op._inbound_nodes[node_index]
      if isinstance(op, keras.layers.InputLayer):
        raise ValueError(f"model '{model.name}' has more than one input tensor.")
      parents = [visit(t) for t in node.input_tensors]
      out = self._walk_layer(op, parents)
      for t in node.output_tensors:
        memo[id(t)] = out
      return out

    return visit(model.outputs[0])

  def _walk_layer(self, layer, inputs: list[int]) -> int:
    L = keras.layers
    if isinstance(layer, keras.Model):
      if len(inputs) != 1:
        raise _unsupported(layer, "is a nested model with several inputs")
      return self._walk_model(layer, inputs[0])
    if isinstance(layer, L.InputLayer):
      return inputs[0]
    if isinstance(layer, L.Add):
      return self._add(layer.name, ops.AddOp(), inputs)
    if len(inputs) != 1:
      raise _unsupported(layer, f"has {len(inputs)} inputs")
    (x,) = inputs
    if isinstance(layer, (L.Dense, L.Conv2D)):
      if isinstance(layer, L.Conv2D):
        if tuple(layer.dilation_rate) != (1, 1) or getattr(layer, "groups", 1) != 1:
          raise _unsupported(layer, "uses dilation or groups")
        if layer.data_format != "channels_last":
          raise _unsupported(layer, "is channels_first (use NHWC)")
        op = ops.Conv2DOp(layer)
      else:
        op = ops.DenseOp(layer)
      act = _activation_name(layer)
      if act not in ("relu", "linear"):
        raise _unsupported(layer, f"has activation '{act}' (only relu or linear)")
      idx = self._add(layer.name, op, [x])
      if act == "relu":
        idx = self._add(layer.name + "/relu", ops.ReluOp(), [idx])
      return idx
    if isinstance(layer, L.ReLU):
      if (layer.max_value is not None or float(layer.negative_slope) != 0.0
          or float(layer.threshold) != 0.0):
        raise _unsupported(layer, "is a ReLU with max_value/negative_slope/threshold")
      return self._add(layer.name, ops.ReluOp(), [x])
    if isinstance(layer, L.Activation):
      act = _activation_name(layer)
      if act == "relu":
        return self._add(layer.name, ops.ReluOp(), [x])
      if act == "linear":
        return self._add(layer.name, ops.IdentityOp(), [x])
      raise _unsupported(layer, f"is activation '{act}'")
    if isinstance(layer, (L.Flatten, L.Reshape)):
      return self._add(layer.name, ops.ReshapeOp(layer), [x])
    if isinstance(layer, L.ZeroPadding2D):
      if layer.data_format != "channels_last":
        raise _unsupported(layer, "is channels_first (use NHWC)")
      return self._add(layer.name, ops.ZeroPadOp(layer.padding), [x])
    if isinstance(layer, L.AveragePooling2D):
      if layer.data_format != "channels_last":
        raise _unsupported(layer, "is channels_first (use NHWC)")
      return self._add(layer.name, ops.AvgPoolOp(layer), [x])
    if isinstance(layer, L.Dropout):
      return self._add(layer.name, ops.IdentityOp(), [x])
    if isinstance(layer, L.Rescaling):
      return self._add(layer.name, ops.ScaleShiftOp(
          functools.partial(_rescaling_scale, layer),
          functools.partial(_rescaling_shift, layer)), [x])
    if isinstance(layer, L.Normalization):
      if layer.invert:
        raise _unsupported(layer, "is an inverting Normalization")
      return self._add(layer.name, ops.ScaleShiftOp(
          functools.partial(_normalization_scale, layer),
          functools.partial(_normalization_shift, layer)), [x])
    if isinstance(layer, L.BatchNormalization):
      if layer.axis not in (-1, len(layer.input.shape) - 1):
        raise _unsupported(layer, "normalizes an axis other than the last")
      return self._add(layer.name, ops.ScaleShiftOp(
          functools.partial(_batchnorm_scale, layer),
          functools.partial(_batchnorm_shift, layer)), [x])
    bound_op = getattr(layer, "bound_op", None)
    if callable(bound_op):  # our own layers describe themselves
      return self._add(layer.name, bound_op(), [x])
    raise _unsupported(layer)

  def _infer_shapes(self):
    """Runs a zero sample through the graph to fix every node's shape."""
    with tf.init_scope():
      values = []
      for node in self.nodes:
        op = node.op
        if isinstance(op, ops.InputOp):
          v = tf.zeros((1,) + self.input_shape)
        elif isinstance(op, ops.AddOp):
          shapes = {tuple(values[i].shape) for i in node.inputs}
          if len(shapes) != 1:
            raise ValueError(f"Add '{node.name}' gets tensors of shapes {shapes}.")
          v = values[node.inputs[0]]
        else:
          op.in_shape = tuple(int(d) for d in values[node.inputs[0]].shape[1:])
          if isinstance(op, ops.ReshapeOp):
            op.out_shape = tuple(int(d) for d in op.layer.compute_output_shape(
                (None,) + op.in_shape)[1:])
          v = values[node.inputs[0]] if isinstance(op, ops.ReluOp) else op.affine(
              values[node.inputs[0]])
        op.out_shape = tuple(int(d) for d in v.shape[1:])
        values.append(v)

  # -- queries ----------------------------------------------------------------

  def consumers(self) -> list[list[int]]:
    out = [[] for _ in self.nodes]
    for i, node in enumerate(self.nodes):
      for j in node.inputs:
        out[j].append(i)
    return out

  def ancestors(self, index: int) -> set[int]:
    seen = {index}
    stack = [index]
    while stack:
      for j in self.nodes[stack.pop()].inputs:
        if j not in seen:
          seen.add(j)
          stack.append(j)
    return seen


_GRAPHS: "weakref.WeakKeyDictionary[keras.Model, BoundGraph]" = (
    weakref.WeakKeyDictionary())


@tf.autograph.experimental.do_not_convert
def bound_graph(model: keras.Model) -> BoundGraph:
  """The bound graph of `model`, built on first use and cached with the model."""
  graph = _GRAPHS.get(model)
  if graph is None:
    graph = _GRAPHS[model] = BoundGraph(model)
  return graph
