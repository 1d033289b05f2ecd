"""Public bound API: logit bounds, margin bounds and verification of Keras models."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from mixtrain_tf import interval, symbolic
from mixtrain_tf.bounds import IntervalBounds, SymbolicBounds
from mixtrain_tf.graph import BoundGraph, bound_graph

METHODS = ("interval", "symbolic")
DEFAULT_MEMORY_BUDGET_MB = 1024


def _plan(graph: BoundGraph) -> symbolic.Plan:
  plan = getattr(graph, "_symbolic_plan", None)
  if plan is None:
    plan = graph._symbolic_plan = symbolic.Plan(graph)
  return plan


def per_sample_bytes(model: keras.Model, method: str = "symbolic") -> int:
  """Estimated peak memory of bounding one example (forward, no gradients)."""
  graph = bound_graph(model)
  if method == "interval":
    return 3 * 4 * max(int(np.prod(n.op.out_shape)) for n in graph.nodes)
  return int(symbolic._BYTES_PER_VALUE * _plan(graph).values_per_sample)


def input_box(x: tf.Tensor, epsilon, clip_min: float = 0.0,
              clip_max: float = 1.0) -> tuple[tf.Tensor, tf.Tensor]:
  """The L-inf ball of radius epsilon around x, clipped to [clip_min, clip_max]."""
  x = tf.cast(x, tf.float32)
  eps = tf.cast(epsilon, tf.float32)
  return (tf.clip_by_value(x - eps, clip_min, clip_max),
          tf.clip_by_value(x + eps, clip_min, clip_max))


def margin_spec(y: tf.Tensor, num_classes: int) -> tf.Tensor:
  """Rows e_j - e_y for every class j: [batch, classes, classes] (row y is zero)."""
  onehot = tf.one_hot(tf.cast(y, tf.int32), num_classes)
  return tf.eye(num_classes)[None] - onehot[:, None, :]


@tf.autograph.experimental.do_not_convert
def bound_box(model: keras.Model, lower: tf.Tensor, upper: tf.Tensor,
              method: str = "symbolic", spec: tf.Tensor | None = None
              ) -> IntervalBounds | SymbolicBounds:
  """Bounds of the output (or spec @ output) over the box [lower, upper].

  No input checks and no chunking: the building block for training steps
  (works inside `tf.function`). `spec` is [batch, m, num_outputs]. The engines
  have no tensor-dependent Python control flow, so AutoGraph is kept out: it once
  failed converting the bound graph's construction on first use in a trace.
  """
  graph = bound_graph(model)
  if method == "interval":
    return interval.bounds(graph, lower, upper, spec)
  if method == "symbolic":
    return symbolic.bounds(graph, _plan(graph), lower, upper, spec)
  raise ValueError(f"unknown bound method {method!r}; choose one of {METHODS}.")


def _check(model, x, epsilon, method, y=None, clip=(0.0, 1.0)):
  if method not in METHODS:
    raise ValueError(f"unknown bound method {method!r}; choose one of {METHODS}.")
  graph = bound_graph(model)
  x = tf.convert_to_tensor(x)
  if not x.dtype.is_floating:
    raise ValueError(f"x must be floating point images in [{clip[0]}, {clip[1]}], "
                     f"got dtype {x.dtype.name}.")
  if tuple(x.shape[1:]) != graph.input_shape:
    raise ValueError(
        f"x has shape {tuple(x.shape)}, but model '{model.name}' takes inputs of "
        f"shape (batch,) + {graph.input_shape}.")
  if tf.executing_eagerly():
    eps = np.asarray(epsilon, dtype=np.float64)
    if eps.ndim != 0 or not np.isfinite(eps) or eps < 0:
      raise ValueError(f"epsilon must be a finite scalar >= 0, got {epsilon!r}.")
    xv = x.numpy()
    if not np.all(np.isfinite(xv)):
      bad = int(np.sum(~np.isfinite(xv).reshape(len(xv), -1).all(axis=1)))
      raise ValueError(f"x contains NaN or infinite values ({bad} examples); "
                       "clean the data before bounding.")
    if y is not None:
      yv = np.asarray(y)
      n_out = int(np.prod(graph.output_shape))
      if yv.shape != (len(xv),):
        raise ValueError(f"y must have shape ({len(xv)},), got {yv.shape}.")
      if yv.size and (yv.min() < 0 or yv.max() >= n_out):
        raise ValueError(f"labels must be in [0, {n_out}), got range "
                         f"[{yv.min()}, {yv.max()}].")
  return graph, tf.cast(x, tf.float32)


def _chunked(fn, model, method, memory_budget_mb, *tensors):
  """Applies fn to slices of the batch so one call stays inside the budget."""
  if memory_budget_mb is None:
    memory_budget_mb = DEFAULT_MEMORY_BUDGET_MB
  if not memory_budget_mb > 0:
    raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}.")
  budget = memory_budget_mb * 2**20
  chunk = max(1, int(budget // max(1, per_sample_bytes(model, method))))
  n = tensors[0].shape[0]
  if n is None or n <= chunk:
    return fn(*tensors)
  parts = [fn(*[t[i:i + chunk] for t in tensors]) for i in range(0, n, chunk)]
  return tuple(tf.concat(p, 0) for p in zip(*parts))


def compute_bounds(model: keras.Model, x, epsilon, method: str = "symbolic",
                   clip_min: float = 0.0, clip_max: float = 1.0,
                   memory_budget_mb: int | None = None
                   ) -> tuple[tf.Tensor, tf.Tensor]:
  """Lower and upper bounds of the logits over the clipped L-inf ball.

  Args:
    model: a built Keras model of supported layers (see `graph.SUPPORTED_LAYERS`).
    x: [batch, *input_shape] float images in [clip_min, clip_max].
    epsilon: radius of the L-inf ball, in input (pixel) units.
    method: "interval" or "symbolic".
    clip_min, clip_max: the valid input domain; the ball is clipped to it.
    memory_budget_mb: peak memory per call; large batches are processed in chunks.

  Returns:
    (lower, upper), each [batch, num_outputs].
  """
  _, x = _check(model, x, epsilon, method, clip=(clip_min, clip_max))

  def run(xc):
    lo, hi = input_box(xc, epsilon, clip_min, clip_max)
    b = bound_box(model, lo, hi, method).concretize()
    n = tf.shape(xc)[0]
    return tf.reshape(b.lower, [n, -1]), tf.reshape(b.upper, [n, -1])

  return _chunked(run, model, method, memory_budget_mb, x)


def margin_upper_bounds(model: keras.Model, x, y, epsilon, method: str = "symbolic",
                        clip_min: float = 0.0, clip_max: float = 1.0,
                        memory_budget_mb: int | None = None) -> tf.Tensor:
  """Upper bounds of z_j - z_y over the ball, [batch, classes] (0 at j = y)."""
  graph, x = _check(model, x, epsilon, method, y=y, clip=(clip_min, clip_max))
  n_out = int(np.prod(graph.output_shape))
  y = tf.cast(tf.convert_to_tensor(y), tf.int32)

  def run(xc, yc):
    lo, hi = input_box(xc, epsilon, clip_min, clip_max)
    b = bound_box(model, lo, hi, method, spec=margin_spec(yc, n_out))
    return (b.upper,)

  return _chunked(run, model, method, memory_budget_mb, x, y)[0]


def verified(model: keras.Model, x, y, epsilon, method: str = "symbolic",
             clip_min: float = 0.0, clip_max: float = 1.0,
             memory_budget_mb: int | None = None) -> tf.Tensor:
  """True where the bound proves no point of the ball changes the label y."""
  ub = margin_upper_bounds(model, x, y, epsilon, method, clip_min, clip_max,
                           memory_budget_mb)
  return is_verified(ub, tf.convert_to_tensor(y))


def is_verified(margin_upper: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
  """max over j != y of the margin upper bounds [batch, classes] < 0, per example."""
  y = tf.cast(y, tf.int32)
  others = tf.where(tf.one_hot(y, tf.shape(margin_upper)[1]) > 0, -np.inf,
                    margin_upper)
  return tf.reduce_max(others, axis=1) < 0.0
