"""Public bound API: logit bounds, margin bounds and verification of Keras models."""

from __future__ import annotations

import dataclasses
import enum
import os

import keras
import numpy as np
import tensorflow as tf

from mixtrain_tf import crown, interval, ops, symbolic
from mixtrain_tf.bounds import IntervalBounds, SymbolicBounds
from mixtrain_tf.graph import BoundGraph, bound_graph


class BoundMethod(str, enum.Enum):
  """Bound methods; the plain strings ("interval", "symbolic") are accepted too."""
  INTERVAL = "interval"
  SYMBOLIC = "symbolic"
  CROWN = "crown"
  CROWN_IBP = "crown_ibp"
  ALPHA_CROWN = "alpha_crown"

  @classmethod
  def _missing_(cls, value):
    raise ValueError(f"unknown bound method {value!r}; choose one of {METHODS}.")


METHODS = tuple(m.value for m in BoundMethod)


def true_float32() -> None:
  """Turns TensorFloat-32 off, process-wide: on Ampere and later GPUs TensorFlow
  runs float32 matmuls and convolutions with 10-bit mantissa inputs by default,
  about 1e-3 relative error, and a bound computed that way is not a proof. Called
  at import and by every bound computation (a user may have turned TF32 back on);
  it logs once when it changes the setting."""
  if tf.config.experimental.tensor_float_32_execution_enabled():
    tf.config.experimental.enable_tensor_float_32_execution(False)
    if not getattr(true_float32, "warned", False):
      true_float32.warned = True
      tf.get_logger().warning(
          "mixtrain_tf turned TensorFloat-32 off: bounds need true float32.")


tf.config.experimental.enable_tensor_float_32_execution(False)


def _default_memory_budget_mb() -> int:
  """A quarter of the machine's memory, at most 4 GiB (at least 256 MiB).

  alpha-CROWN on the authors' MNIST_Small (60 images, eps 0.3) took 42.8 s with
  a 1 GiB budget (one example per call) and 13.0 s with 4 GiB."""
  try:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
  except (ValueError, OSError, AttributeError):
    return 1024
  return int(min(4096, max(256, total // 4)))


#: memory_budget_mb when none is given.
DEFAULT_MEMORY_BUDGET_MB = _default_memory_budget_mb()


def _plan(graph: BoundGraph) -> symbolic.Plan:
  plan = getattr(graph, "_symbolic_plan", None)
  if plan is None:
    plan = graph._symbolic_plan = symbolic.Plan(graph)
  return plan


def per_sample_bytes(model: keras.Model, method: str = "symbolic") -> int:
  """Estimated peak memory of bounding one example (forward, no gradients)."""
  graph = bound_graph(model)
  method = BoundMethod(method).value
  sizes = [int(np.prod(n.op.out_shape)) for n in graph.nodes]
  # Every node's interval bounds are kept (interval, and the CROWN family's
  # intersection), plus centre/radius temporaries of the widest layer (float32).
  intervals = 4 * (2 * sum(sizes) + 4 * max(sizes))
  if method == "interval":
    last_in = sizes[graph.nodes[-1].inputs[0]] if len(sizes) > 1 else 0
    return intervals + 4 * 3 * sizes[-1] * last_in  # the folded margin rows
  if method == "symbolic":
    return int(symbolic._BYTES_PER_VALUE * _plan(graph).values_per_sample)
  values = crown.per_sample_values(graph, method, graph.num_outputs)
  return intervals + int(symbolic._BYTES_PER_VALUE * values)


#: Slack for x outside [clip_min, clip_max]: float32 round-off, relative to the domain.
ROUND_OFF = 1e-6


def _domain(clip_min, clip_max) -> tuple[float, float]:
  """The input domain as floats; a domain that cannot hold a ball is an error."""
  try:
    lo, hi = float(clip_min), float(clip_max)
  except (TypeError, ValueError):
    raise ValueError(f"clip_min and clip_max must be numbers, got {clip_min!r} and "
                     f"{clip_max!r}.") from None
  if not (np.isfinite(lo) and np.isfinite(hi)):
    raise ValueError(f"clip_min and clip_max must be finite, got {lo} and {hi}.")
  if lo > hi:
    raise ValueError(f"clip_min ({lo}) is greater than clip_max ({hi}): the input "
                     "domain is empty; swap them.")
  return lo, hi


def _check_epsilon_eagerly(eps: np.ndarray, batch: int) -> None:
  if eps.ndim > 1 or (eps.ndim == 1 and eps.shape[0] != batch):
    raise ValueError(f"epsilon must be a scalar or one radius per example (shape "
                     f"({batch},)), got shape {eps.shape}.")
  eps = eps.astype(np.float32)
  if not (np.all(np.isfinite(eps)) and np.all(eps >= 0)):
    raise ValueError(f"epsilon must be finite and >= 0 in float32, got {eps!r}.")


def _check_x_eagerly(x: np.ndarray, lo: float, hi: float, tol: float) -> None:
  flat = x.reshape(len(x), int(np.prod(x.shape[1:])))
  if not np.all(np.isfinite(flat)):
    bad = int(np.sum(~np.isfinite(flat).all(axis=1)))
    raise ValueError(f"x contains NaN or infinite values ({bad} examples); clean "
                     "the data before bounding.")
  if flat.size == 0:
    return
  xmin, xmax = float(flat.min()), float(flat.max())
  if xmin >= lo - tol and xmax <= hi + tol:
    return
  outside = int(np.sum((flat < lo - tol).any(1) | (flat > hi + tol).any(1)))
  hint = ""
  if xmax > 1.5 and hi <= 1.0:
    hint = " Images look like 0..255: divide them by 255, or pass clip_max=255."
  elif xmin < 0.0 <= lo:
    hint = (" Images look normalized: bound the raw images and put the "
            "normalization inside the model (e.g. mixtrain_tf.layers."
            "InputNormalization), or pass the clip_min/clip_max of the normalized "
            "domain.")
  raise ValueError(
      f"x has values in [{xmin:.6g}, {xmax:.6g}], outside the input domain "
      f"[clip_min, clip_max] = [{lo:g}, {hi:g}] ({outside} examples): the clipped "
      "ball would not contain x, so a proof would be about other images." + hint)


def _refuse_string(epsilon) -> None:
  if isinstance(epsilon, (str, bytes)):
    raise ValueError(f"epsilon must be a number, got the string {epsilon!r}; pass "
                     "float(...).")


def check_ball(x: np.ndarray, epsilon, clip_min: float = 0.0,
               clip_max: float = 1.0) -> None:
  """Raises ValueError unless the clipped ball around x [batch, ...] can carry a
  proof (see `input_box`); for numpy callers such as the VNNLIB writer."""
  lo, hi = _domain(clip_min, clip_max)
  _refuse_string(epsilon)
  try:
    value = np.asarray(epsilon, np.float64)
  except (TypeError, ValueError):
    raise ValueError(f"epsilon must be a number, got {epsilon!r}.") from None
  x = np.asarray(x)
  _check_epsilon_eagerly(value, len(x) if x.ndim else 0)
  if x.dtype.kind != "f":
    raise ValueError(f"x must be floating point images in [{lo:g}, {hi:g}], got "
                     f"dtype {x.dtype}.")
  _check_x_eagerly(x.astype(np.float32), lo, hi,
                   ROUND_OFF * max(1.0, abs(lo), abs(hi)))


def input_box(x, epsilon, clip_min: float = 0.0, clip_max: float = 1.0
              ) -> tuple[tf.Tensor, tf.Tensor]:
  """The L-inf ball of radius epsilon around x, clipped to [clip_min, clip_max].

  `epsilon` is a scalar or one radius per example ([batch]).

  Refuses a ball that would make a proof meaningless: x outside the domain (beyond
  float32 round-off, `ROUND_OFF`), NaN or infinite x, an empty domain, epsilon
  negative or not finite. Eagerly this is a ValueError that says what to fix; in
  graph mode (tf.function, SavedModel signatures, training steps) the checks are
  assert ops of the graph, which fail the call with the same kind of message.
  """
  lo, hi = _domain(clip_min, clip_max)
  tol = ROUND_OFF * max(1.0, abs(lo), abs(hi))
  _refuse_string(epsilon)  # a string would reach tf.cast in graph mode
  if tf.executing_eagerly():
    check_ball(np.asarray(x), epsilon, lo, hi)
    checks = []
  x = tf.cast(x, tf.float32)
  eps = tf.cast(epsilon, tf.float32)
  if eps.shape.rank is None or eps.shape.rank > 1:
    raise ValueError("epsilon must be a scalar or one radius per example, got shape "
                     f"{eps.shape}.")
  if eps.shape.rank == 1:  # one radius per example
    eps = tf.reshape(eps, [-1] + [1] * (x.shape.rank - 1))
  if not tf.executing_eagerly():
    # Per example: x inside the domain (False for NaN). One comparison pass each
    # serves the assert ops and the NaN poison below.
    axes = list(range(1, x.shape.rank))
    above_lo = tf.reduce_all(x >= lo - tol, axes)
    below_hi = tf.reduce_all(x <= hi + tol, axes)
    domain = f"[clip_min, clip_max] = [{lo:g}, {hi:g}]"
    checks = [
        tf.debugging.Assert(tf.reduce_all(above_lo), [
            f"x has values below the input domain {domain} (or NaN); a proof "
            "needs x inside it"]),
        tf.debugging.Assert(tf.reduce_all(below_hi), [
            f"x has values above the input domain {domain} (or NaN); images in "
            "0..255 must be divided by 255"]),
        tf.debugging.assert_greater_equal(
            eps, tf.constant(0.0), message="epsilon must be >= 0 (and not NaN)"),
        tf.debugging.assert_less(
            eps, tf.constant(np.inf, tf.float32), message="epsilon must be finite"),
    ]
  with tf.control_dependencies(checks):
    lower, upper = tf.clip_by_value(x - eps, lo, hi), tf.clip_by_value(x + eps, lo, hi)
  if tf.executing_eagerly():
    return lower, upper
  # XLA (jit_compile) drops assert ops: a refused ball also becomes a NaN box, whose
  # bounds are NaN, which `is_verified` never counts and a NaN loss stops training.
  ok = tf.logical_and(above_lo, below_hi)
  ok = tf.logical_and(ok, tf.reshape(tf.logical_and(eps >= 0, eps < np.inf), [-1])
                      if eps.shape.rank else tf.logical_and(eps >= 0, eps < np.inf))
  # Added, not selected: a broadcast add costs a fraction of a broadcast select
  # (2.5 ms per side on a CIFAR-10 batch of 256, a sixth of an IBP step).
  poison = tf.reshape(tf.where(ok, 0.0, np.nan), [-1] + [1] * (x.shape.rank - 1))
  return lower + poison, upper + poison


def margin_spec(y: tf.Tensor, num_classes: int) -> tf.Tensor:
  """Rows e_j - e_y for every class j: [batch, classes, classes] (row y is zero).

  A label outside [0, num_classes) would give rows e_j (logit bounds, not margins),
  so it is refused: a ValueError eagerly, an assert op in graph mode.
  """
  y = tf.convert_to_tensor(y)
  if y.dtype.is_floating or y.dtype.is_complex or y.dtype == tf.bool:
    raise ValueError(f"labels must be integer class indices, got dtype "
                     f"{y.dtype.name}; cast them (one-hot labels need argmax first).")
  y = tf.cast(y, tf.int32)
  if tf.executing_eagerly():
    yv = y.numpy()
    if yv.size and (yv.min() < 0 or yv.max() >= num_classes):
      raise ValueError(f"labels must be in [0, {num_classes}), got range "
                       f"[{yv.min()}, {yv.max()}].")
    checks = []
  else:
    checks = [tf.debugging.assert_non_negative(y, message="labels must be >= 0"),
              tf.debugging.assert_less(y, num_classes,
                                       message=f"labels must be < {num_classes}")]
  with tf.control_dependencies(checks):
    onehot = tf.one_hot(y, num_classes)
  spec = tf.eye(num_classes)[None] - onehot[:, None, :]
  if tf.executing_eagerly():
    return spec
  # Under XLA the asserts are gone: a label out of range gets NaN rows (see
  # input_box), not logit rows.
  ok = tf.logical_and(y >= 0, y < num_classes)[:, None, None]
  return tf.where(ok, spec, tf.constant(np.nan, tf.float32))


def ball_margins(model: keras.Model, x, y, epsilon, method: str = "symbolic",
                 clip_min: float = 0.0, clip_max: float = 1.0,
                 alpha_steps: int | None = None) -> tf.Tensor:
  """Upper bounds of z_j - z_y over the checked, clipped ball: [batch, classes].

  The building block of training, evaluation and the SavedModel's `margins`
  signature: works inside `tf.function`, no chunking (see `margin_upper_bounds`).
  alpha_crown optimises only the examples that CROWN does not verify and whose
  centre is classified y (`crown.bounds`' `stop_below` = 0); the others keep
  their CROWN bounds.
  """
  lower, upper = input_box(x, epsilon, clip_min, clip_max)
  n_out = int(np.prod(bound_graph(model).output_shape))
  return bound_box(model, lower, upper, method, spec=margin_spec(y, n_out),
                   alpha_steps=alpha_steps, upper_only=True, stop_below=0.0).upper


@tf.autograph.experimental.do_not_convert
def bound_box(model: keras.Model, lower: tf.Tensor, upper: tf.Tensor,
              method: str = "symbolic", spec: tf.Tensor | None = None,
              alpha_steps: int | None = None, upper_only: bool = False,
              stop_below: float | None = None
              ) -> IntervalBounds | SymbolicBounds:
  """Bounds of the output (or spec @ output) over the box [lower, upper].

  `upper_only`: the caller reads only `.upper` (margins); the CROWN family then
  skips the lower bounds' backward pass and returns -inf lower bounds.
  `stop_below`: see `crown.bounds` (alpha_crown with `upper_only` only).

  No input checks and no chunking: the building block for training steps
  (works inside `tf.function`). `spec` is [batch, m, num_outputs]. `alpha_steps`:
  optimisation steps of alpha_crown (default `crown.DEFAULT_ALPHA_STEPS`). The engines
  have no tensor-dependent Python control flow, so AutoGraph is kept out: it once
  failed converting the bound graph's construction on first use in a trace.
  """
  true_float32()
  graph = bound_graph(model)
  method = BoundMethod(method).value
  # An empty batch runs as one all-zero example, sliced away: the engines'
  # reshapes and einsums assume a non-empty batch.
  n = tf.shape(lower)[0]
  pad = tf.maximum(1 - n, 0)

  def padded(t):
    return tf.concat([t, tf.zeros(tf.concat([[pad], tf.shape(t)[1:]], 0), t.dtype)], 0)

  lower, upper = padded(lower), padded(upper)
  spec = None if spec is None else padded(spec)
  if method == BoundMethod.INTERVAL:
    out = interval.bounds(graph, lower, upper, spec)
  elif method == BoundMethod.SYMBOLIC:
    out = symbolic.bounds(graph, _plan(graph), lower, upper, spec)
  else:
    out = crown.bounds(graph, lower, upper, spec, method, alpha_steps,
                       upper_only=upper_only, stop_below=stop_below)
  return _map_tensors(lambda t: t[:n], out)


def _map_tensors(fn, bounds):
  """Applies fn to every tensor field of a bounds container."""
  fields = {}
  for f in dataclasses.fields(bounds):
    v = getattr(bounds, f.name)
    fields[f.name] = (tuple(fn(t) for t in v) if isinstance(v, tuple)
                      else None if v is None else fn(v))
  return dataclasses.replace(bounds, **fields)


def _check(model, x, method, y=None, clip=(0.0, 1.0)):
  """Checks what does not depend on values (works in graph mode too); input_box
  and margin_spec check the values."""
  BoundMethod(method)
  graph = bound_graph(model)
  x = tf.convert_to_tensor(x)
  if not x.dtype.is_floating:
    raise ValueError(f"x must be floating point images in [{clip[0]}, {clip[1]}], "
                     f"got dtype {x.dtype.name}.")
  if x.shape.rank is None or tuple(x.shape[1:]) != graph.input_shape:
    raise ValueError(
        f"x has shape {tuple(x.shape) if x.shape.rank is not None else 'unknown'}, "
        f"but model '{model.name}' takes inputs of shape (batch,) + "
        f"{graph.input_shape}.")
  if y is not None:
    y = tf.convert_to_tensor(y)
    if y.shape.rank != 1 or (y.shape[0] is not None and x.shape[0] is not None
                             and y.shape[0] != x.shape[0]):
      raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}.")
  return graph, tf.cast(x, tf.float32)


def _per_example(epsilon, x, clip_min, clip_max) -> tf.Tensor:
  """epsilon as one radius per example (checked first), so chunks carry theirs."""
  _refuse_string(epsilon)
  if tf.executing_eagerly():
    check_ball(x.numpy(), epsilon, clip_min, clip_max)
  eps = tf.cast(epsilon, tf.float32)
  return tf.broadcast_to(eps, tf.shape(x)[:1]) if eps.shape.rank == 0 else eps


def _compiled(model: keras.Model, key: tuple, fn):
  """fn as a tf.function kept on the model (so it lives as long as the model),
  one per key, for CROWN only: its backward passes are many small ops, which
  eagerly cost more than the arithmetic (margins of 100 MNIST images: 5.9 s
  eagerly, 2.1 s compiled after a 6 s trace). The other engines gain little or
  nothing after their trace (alpha-CROWN's 20 unrolled steps take a minute to
  trace). Called eagerly only: inputs were checked before (the graph's own checks
  stay)."""
  if not tf.executing_eagerly() or key[1] != BoundMethod.CROWN.value:
    return fn
  cache = model.__dict__.get(_COMPILED_ATTR)
  if cache is None:
    cache = {}
    object.__setattr__(model, _COMPILED_ATTR, cache)
  if key not in cache:
    cache[key] = tf.function(fn, reduce_retracing=True)
  return cache[key]


_COMPILED_ATTR = "_mixtrain_compiled_bounds"


def chunked(fn, model, method, memory_budget_mb, *tensors):
  """fn(*tensors) (a tuple of batched tensors) computed on slices of the batch,
  each small enough that bounding it by `method` stays inside the memory budget
  (`per_sample_bytes`); None takes `DEFAULT_MEMORY_BUDGET_MB`."""
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
                   memory_budget_mb: int | None = None,
                   alpha_steps: int | None = None
                   ) -> tuple[tf.Tensor, tf.Tensor]:
  """Lower and upper bounds of the logits over the clipped L-inf ball.

  Args:
    model: a built Keras model of supported layers (see `graph.supported_layers()`).
    x: [batch, *input_shape] float images in [clip_min, clip_max].
    epsilon: radius of the L-inf ball, in input (pixel) units.
    method: "interval", "symbolic", "crown", "crown_ibp" or "alpha_crown".
    clip_min, clip_max: the valid input domain; the ball is clipped to it.
    memory_budget_mb: peak memory per call; large batches are processed in chunks.

  Returns:
    (lower, upper), each [batch, num_outputs].
  """
  _, x = _check(model, x, method, clip=(clip_min, clip_max))

  def run(xc, ec):
    lo, hi = input_box(xc, ec, clip_min, clip_max)
    b = bound_box(model, lo, hi, method, alpha_steps=alpha_steps).concretize()
    return ops.flat(b.lower), ops.flat(b.upper)

  run = _compiled(model, ("bounds", method, alpha_steps, clip_min, clip_max), run)
  return chunked(run, model, method, memory_budget_mb, x,
                  _per_example(epsilon, x, clip_min, clip_max))


def margin_upper_bounds(model: keras.Model, x, y, epsilon, method: str = "symbolic",
                        clip_min: float = 0.0, clip_max: float = 1.0,
                        memory_budget_mb: int | None = None,
                        alpha_steps: int | None = None) -> tf.Tensor:
  """Upper bounds of z_j - z_y over the ball, [batch, classes] (0 at j = y).

  alpha_crown: CROWN bounds the whole batch first (compiled, in slices of
  CROWN's memory size); only the examples it leaves unproven are then sliced by
  alpha-CROWN's size and optimised (`ball_margins`), so a slice holds only
  examples that need the optimisation."""
  _, x = _check(model, x, method, y=y, clip=(clip_min, clip_max))
  y = tf.convert_to_tensor(y)
  eps = _per_example(epsilon, x, clip_min, clip_max)

  def run(xc, yc, ec):
    return (ball_margins(model, xc, yc, ec, method, clip_min, clip_max,
                         alpha_steps),)

  if BoundMethod(method) is BoundMethod.ALPHA_CROWN and tf.executing_eagerly():
    ub = margin_upper_bounds(model, x, y, eps, "crown", clip_min, clip_max,
                             memory_budget_mb)
    open_ = tf.where(tf.logical_not(is_verified(ub, y)))[:, 0]
    if int(tf.size(open_)) == 0:
      return ub
    sub = chunked(run, model, method, memory_budget_mb, tf.gather(x, open_),
                  tf.gather(y, open_), tf.gather(eps, open_))[0]
    return tf.tensor_scatter_nd_update(ub, open_[:, None], sub)
  run = _compiled(model, ("margins", method, alpha_steps, clip_min, clip_max), run)
  return chunked(run, model, method, memory_budget_mb, x, y, eps)[0]


def verified(model: keras.Model, x, y, epsilon, method: str = "symbolic",
             clip_min: float = 0.0, clip_max: float = 1.0,
             memory_budget_mb: int | None = None,
             alpha_steps: int | None = None) -> tf.Tensor:
  """True where the bound proves no point of the ball changes the label y."""
  ub = margin_upper_bounds(model, x, y, epsilon, method, clip_min, clip_max,
                           memory_budget_mb, alpha_steps)
  return is_verified(ub, tf.convert_to_tensor(y))


def is_verified(margin_upper: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
  """max over j != y of the margin upper bounds [batch, classes] < 0, per example."""
  y = tf.cast(y, tf.int32)
  others = tf.where(tf.one_hot(y, tf.shape(margin_upper)[1]) > 0, -np.inf,
                    margin_upper)
  # A NaN bound (a refused ball under XLA) proves nothing, whatever reduce_max
  # makes of NaN.
  finite = tf.reduce_all(tf.logical_not(tf.math.is_nan(margin_upper)), axis=1)
  return tf.logical_and(tf.reduce_max(others, axis=1) < 0.0, finite)
