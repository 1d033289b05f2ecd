"""Turns a Keras model into a small graph of bound operators.

Sequential and functional models (residual graphs and nested models included) built
from the supported standard Keras layers are walked layer by layer. A layer is read
only when its exact class is registered here (a subclass may override `call`, so it
is refused unless it describes itself with `bound_op()`), its activation is one of
Keras' own relu / linear functions (compared by identity, not by name), and every
configuration attribute that changes the maths is one the engines model. Anything
else raises `UnsupportedLayerError` naming the layer and why.

Once built, the graph checks itself: its own forward pass (a zero-radius box) on
probe inputs must reproduce `model(x)`, or the error names the layer that diverges.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras.src.models.functional import Functional

from mixtrain_tf import ops

#: Activation functions read as ReLU / identity: Keras' and TensorFlow's own
#: objects, compared by identity (a user function named "relu" is not one of them).
RELU_FUNCTIONS = (keras.activations.relu, tf.nn.relu, keras.ops.relu)
LINEAR_FUNCTIONS = (keras.activations.linear,)

#: Self-check tolerance: |graph(x) - model(x)| <= SELF_CHECK_RTOL * (1 + max|model(x)|).
SELF_CHECK_RTOL = 1e-4


@dataclasses.dataclass
class Node:
  """One operator applied to the outputs of earlier nodes (indices into the graph)."""
  name: str
  op: ops.BoundOp
  inputs: tuple[int, ...]


@dataclasses.dataclass
class LayerCall:
  """A Keras layer applied to graph nodes `inputs`, its result at node `output`."""
  layer: keras.layers.Layer
  inputs: tuple[int, ...]
  output: int


class UnsupportedLayerError(ValueError):
  pass


class SelfCheckError(ValueError):
  """The bound graph's forward pass does not reproduce the model's outputs."""


def _unsupported(layer, why: str = "has no sound bound here"):
  return UnsupportedLayerError(
      f"layer '{layer.name}' ({type(layer).__name__}) {why}; supported: "
      f"{', '.join(supported_layers())}. Replace it or remove it before bounding.")


def _activation(layer) -> str:
  """'relu' or 'linear' for Keras' own functions; raises for anything else."""
  act = getattr(layer, "activation", None)
  if act is None or any(act is f for f in LINEAR_FUNCTIONS):
    return "linear"
  if any(act is f for f in RELU_FUNCTIONS):
    return "relu"
  name = getattr(act, "__name__", type(act).__name__)
  raise _unsupported(
      layer, f"has activation {name!r} (attribute 'activation'), which is not "
      "Keras' own relu or linear function (activations are matched by identity, "
      "not by name)")


def _require(layer, attribute: str, ok: bool, value=None, fix: str = ""):
  if not ok:
    value = getattr(layer, attribute, None) if value is None else value
    raise _unsupported(layer, f"has {attribute}={value!r}, which the bound engines "
                       f"do not model{'; ' + fix if fix else ''}")


def _channels_last(layer):
  _require(layer, "data_format", layer.data_format == "channels_last",
           fix="use data_format='channels_last' (NHWC)")


def _check_numerics_policy(layer):
  """Bounds are float32 maths on float32 weights: other policies are refused."""
  policy = getattr(getattr(layer, "dtype_policy", None), "name", "float32")
  _require(layer, "dtype_policy", policy == "float32", policy,
           "bound a float32 copy of the model (no quantization, no mixed precision)")
  mode = getattr(layer, "quantization_mode", None)
  _require(layer, "quantization_mode", mode is None, mode,
           "bound the float32 model before quantizing it")


def _check_call_arguments(layer, node):
  args = getattr(node, "arguments", None)
  kwargs = dict(getattr(args, "kwargs", {}) or {})
  training = kwargs.get("training")
  if training is not None and bool(training):
    raise _unsupported(layer, "is called with training=True inside the model, so "
                       "its output is random or batch-dependent at inference")


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


#: A rule turns one layer into the bound operator(s) it applies, in order.
BoundRule = Callable[[keras.layers.Layer], "ops.BoundOp | Sequence[ops.BoundOp]"]

_RULES: dict[type, BoundRule] = {}


def register_bound_op(layer_class: type, rule: BoundRule) -> None:
  """Makes `layer_class` boundable: `rule(layer)` returns the operator(s) it applies.

  Exactly this class is registered (not its subclasses, which may override
  `call`). The rule returns one `ops.BoundOp` or a sequence applied in order, e.g.
  `[ops.DenseOp(layer), ops.ReluOp()]`; it raises `UnsupportedLayerError` (see
  `refuse`) for configurations it does not model. Every graph is self-checked
  against the model, so a wrong rule is caught, not trusted. A layer class of your
  own may instead define `bound_op()`, which is used when no rule is registered.
  """
  if not (isinstance(layer_class, type) and issubclass(layer_class,
                                                       keras.layers.Layer)):
    raise TypeError(f"layer_class must be a keras Layer class, got {layer_class!r}.")
  if not callable(rule):
    raise TypeError(f"rule must be callable, got {rule!r}.")
  _RULES[layer_class] = rule


def supported_layers() -> tuple[str, ...]:
  """Names of the layer classes the engines read (from the registry)."""
  return ("InputLayer", "Add", *(c.__name__ for c in _RULES),
          "Sequential and functional models", "layers with bound_op()")


def _dense_or_conv(layer):
  if type(layer) is keras.layers.Conv2D:
    _require(layer, "dilation_rate", tuple(layer.dilation_rate) == (1, 1))
    _require(layer, "groups", getattr(layer, "groups", 1) == 1)
    _require(layer, "padding", layer.padding in ("valid", "same"))
    _channels_last(layer)
    op = ops.Conv2DOp(layer)
  else:
    op = ops.DenseOp(layer)
  return [op, ops.ReluOp()] if _activation(layer) == "relu" else [op]


def _relu(layer):
  _require(layer, "max_value", layer.max_value is None)
  _require(layer, "negative_slope", float(layer.negative_slope) == 0.0)
  _require(layer, "threshold", float(layer.threshold) == 0.0)
  return ops.ReluOp()


def _activation_layer(layer):
  return ops.ReluOp() if _activation(layer) == "relu" else ops.IdentityOp()


def _flatten(layer):
  _channels_last(layer)
  return ops.ReshapeOp(layer)


def _zero_padding(layer):
  _channels_last(layer)
  return ops.ZeroPadOp(layer.padding)


def _average_pooling(layer):
  _channels_last(layer)
  _require(layer, "padding", layer.padding in ("valid", "same"))
  return ops.AvgPoolOp(layer)


def _scale_shift(scale, shift):
  def rule(layer):
    return ops.ScaleShiftOp(functools.partial(scale, layer),
                            functools.partial(shift, layer))
  return rule


def _normalization(layer):
  _require(layer, "invert", not layer.invert)
  return _scale_shift(_normalization_scale, _normalization_shift)(layer)


def _batch_normalization(layer):
  rank = getattr(layer.input_spec, "ndim", None)
  _require(layer, "axis", isinstance(layer.axis, int) and rank is not None
           and layer.axis in (-1, rank - 1), fix="normalize the last (channels) axis")
  return _scale_shift(_batchnorm_scale, _batchnorm_shift)(layer)


for _cls, _rule in [
    (keras.layers.Dense, _dense_or_conv),
    (keras.layers.Conv2D, _dense_or_conv),
    (keras.layers.ReLU, _relu),
    (keras.layers.Activation, _activation_layer),
    (keras.layers.Flatten, _flatten),
    (keras.layers.Reshape, ops.ReshapeOp),
    (keras.layers.ZeroPadding2D, _zero_padding),
    (keras.layers.AveragePooling2D, _average_pooling),
    (keras.layers.Dropout, lambda layer: ops.IdentityOp()),
    (keras.layers.Rescaling, _scale_shift(_rescaling_scale, _rescaling_shift)),
    (keras.layers.Normalization, _normalization),
    (keras.layers.BatchNormalization, _batch_normalization),
]:
  register_bound_op(_cls, _rule)
_MODELS = (keras.Sequential, Functional)


class BoundGraph:
  """Nodes in topological order; node 0 is the input, the last node the output."""

  def __init__(self, model: keras.Model, self_check: bool = True):
    if type(model) not in _MODELS:
      raise _unsupported(model, "is a subclassed model whose call() cannot be "
                         "read: build it as a Sequential or functional model")
    if not model.built or not getattr(model, "inputs", None):
      raise ValueError(
          f"model '{model.name}' is not built: give it an Input (or call it once on "
          "a batch) before computing bounds.")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
      raise ValueError(
          f"model '{model.name}' has {len(model.inputs)} inputs and "
          f"{len(model.outputs)} outputs; bounds need exactly one of each.")
    shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in shape):
      raise ValueError(
          f"model '{model.name}' takes inputs of shape (batch,) + {shape} with unknown "
          "dimensions; bounds need a fixed shape: build it with keras.Input(shape="
          "(28, 28, 1)) or similar.")
    self.model = model
    self.input_shape = tuple(int(d) for d in shape)
    self.nodes: list[Node] = [Node("input", ops.InputOp(), ())]
    self.nodes[0].op.out_shape = self.input_shape
    self.calls: list[LayerCall] = []
    out = self._walk_model(model, 0)
    if out != len(self.nodes) - 1:  # make the output the last node
      self._add("output", ops.IdentityOp(), (out,))
    with tf.init_scope():
      self.forward(tf.zeros((1,) + self.input_shape), infer_shapes=True)
      if self_check:
        self.self_check()
    self.output_shape = self.nodes[-1].op.out_shape
    self.num_outputs = int(np.prod(self.output_shape))
    self.output = len(self.nodes) - 1  # index of the output node

  # -- building -------------------------------------------------------------

  def _add(self, name, op, inputs) -> int:
    self.nodes.append(Node(name, op, tuple(inputs)))
    return len(self.nodes) - 1

  def _walk_model(self, model, input_index: int) -> int:
    if type(model) is keras.Sequential:
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
      if type(op) is keras.layers.InputLayer:
        raise ValueError(f"model '{model.name}' has more than one input tensor.")
      parents = [visit(t) for t in node.input_tensors]
      _check_call_arguments(op, node)
      out = self._walk_layer(op, parents)
      for t in node.output_tensors:
        memo[id(t)] = out
      return out

    return visit(model.outputs[0])

  def _walk_layer(self, layer, inputs: list[int]) -> int:
    kind = type(layer)
    if isinstance(layer, keras.Model):
      if kind not in _MODELS:
        raise _unsupported(layer, "is a subclassed model whose call() cannot be "
                           "read: build it as a Sequential or functional model")
      if len(inputs) != 1:
        raise _unsupported(layer, "is a nested model with several inputs")
      return self._walk_model(layer, inputs[0])
    if kind is keras.layers.InputLayer:
      return inputs[0]
    _check_numerics_policy(layer)
    if kind is keras.layers.Add:
      out = self._add(layer.name, ops.AddOp(), inputs)
    else:
      if len(inputs) != 1:
        raise _unsupported(layer, f"has {len(inputs)} inputs")
      out = inputs[0]
      for k, op in enumerate(self._rule_ops(layer)):
        name = layer.name if k == 0 else (
            f"{layer.name}/relu" if isinstance(op, ops.ReluOp) else f"{layer.name}/{k}")
        out = self._add(name, op, [out])
    self.calls.append(LayerCall(layer, tuple(inputs), out))
    return out

  @staticmethod
  def _rule_ops(layer) -> list[ops.BoundOp]:
    rule = _RULES.get(type(layer))
    if rule is None and callable(getattr(layer, "bound_op", None)):
      rule = lambda layer: layer.bound_op()  # noqa: E731  (our own layers)
    if rule is None:
      if isinstance(layer, tuple(_RULES) + (keras.layers.Add,)):
        raise _unsupported(layer, "subclasses a supported layer and may change its "
                           "call(); register it (register_bound_op) or give it a "
                           "bound_op() method, or use the Keras class itself")
      raise _unsupported(layer)
    out = rule(layer)
    return list(out) if isinstance(out, (list, tuple)) else [out]

  # -- evaluation ---------------------------------------------------------------

  def propagate(self, rules: dict, values: dict, order=None) -> dict:
    """The one forward traversal every engine uses.

    For each node index in `order` (default: every node after the input), in
    order, `values[i] = rule(i, node, ins)`, where `ins` are the values of the
    node's inputs present in `values` and the rule is `rules[C]` for the most
    specific class C of the node's operator (e.g. `ops.ReluOp`, `ops.AddOp`,
    `ops.AffineOp`, or a subclass such as `ops.DenseOp`). An engine is a rule table.
    """
    order = range(1, len(self.nodes)) if order is None else order
    for i in order:
      node = self.nodes[i]
      rule = next((rules[c] for c in type(node.op).__mro__ if c in rules), None)
      if rule is None:
        raise ValueError(f"no rule for node '{node.name}' ({type(node.op).__name__}).")
      values[i] = rule(i, node, [values[j] for j in node.inputs if j in values])
    return values

  def forward(self, x: tf.Tensor, infer_shapes: bool = False) -> list[tf.Tensor]:
    """Every node's value at input x (the centre of a zero-radius box)."""
    def add(i, node, ins):
      shapes = {tuple(t.shape[1:]) for t in ins}
      if len(shapes) != 1:
        raise ValueError(f"Add '{node.name}' gets tensors of shapes {shapes}.")
      return tf.add_n(ins)

    def affine(i, node, ins):
      op = node.op
      if infer_shapes:
        op.in_shape = tuple(int(d) for d in ins[0].shape[1:])
        if isinstance(op, ops.ReshapeOp):
          op.out_shape = tuple(int(d) for d in op.layer.compute_output_shape(
              (None,) + op.in_shape)[1:])
      return op.affine(ins[0])

    values = self.propagate(
        {ops.ReluOp: lambda i, node, ins: tf.nn.relu(ins[0]), ops.AddOp: add,
         ops.AffineOp: affine}, {0: tf.cast(x, tf.float32)})
    values = [values[i] for i in range(len(self.nodes))]
    if infer_shapes:
      for node, v in zip(self.nodes, values):
        node.op.out_shape = tuple(int(d) for d in v.shape[1:])
    return values

  def self_check(self, num_probes: int = 2) -> None:
    """Raises SelfCheckError unless the graph reproduces the model on probe inputs.

    Probes: uniform [0, 1) and standard normal inputs (fixed seeds). The first
    layer whose Keras output differs from its operator's, on the graph's own
    values, is named.
    """
    shape = (num_probes,) + self.input_shape
    for seed, draw in enumerate((tf.random.stateless_uniform,
                                 tf.random.stateless_normal)):
      x = draw(shape, seed=[seed, 17])
      want = self.model(x, training=False)
      values = self.forward(x)
      if not _close(values[-1], want):
        raise SelfCheckError(self._diagnose(values, want))

  def _diagnose(self, values, want) -> str:
    out = values[-1]
    err = float(tf.reduce_max(tf.abs(out - tf.reshape(want, tf.shape(out)))))
    for call in self.calls:
      ins = [values[i] for i in call.inputs]
      got = values[call.output]
      try:
        ref = call.layer(ins if len(ins) > 1 else ins[0], training=False)
      except Exception as e:  # pylint: disable=broad-except
        return (f"layer '{call.layer.name}' ({type(call.layer).__name__}) could not "
                f"be re-run on its input while checking the bound graph ({e}).")
      if not _close(got, ref):
        gap = float(tf.reduce_max(tf.abs(got - tf.reshape(ref, tf.shape(got)))))
        return (f"layer '{call.layer.name}' ({type(call.layer).__name__}) is misread "
                f"by the bound engines: their forward pass differs from the layer's "
                f"own output by {gap:.3g}. Its bounds would be wrong, so it is "
                "refused; replace the layer or describe it with bound_op().")
    return (f"the bound graph of model '{self.model.name}' differs from the model's "
            f"output by {err:.3g}, though every layer matches on its own: the model "
            "wires its layers in a way the bound engines do not read.")

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


def _close(got, want) -> bool:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  if got.size != want.size:
    return False
  want = want.reshape(got.shape)
  tol = SELF_CHECK_RTOL * (1.0 + np.max(np.abs(want), initial=0.0))
  return bool(np.all(np.isfinite(got) == np.isfinite(want))
              and np.max(np.abs(got - want), initial=0.0, where=np.isfinite(want))
              <= tol)


_ATTR = "_mixtrain_bound_graph"


@tf.autograph.experimental.do_not_convert
def bound_graph(model: keras.Model) -> BoundGraph:
  """The bound graph of `model`, built (and self-checked) on first use.

  The graph is kept on the model itself, so it lives exactly as long as the model
  (a global cache keyed by the model would keep every model alive).
  """
  graph = model.__dict__.get(_ATTR)
  if graph is None:
    graph = BoundGraph(model)
    object.__setattr__(model, _ATTR, graph)
  return graph
