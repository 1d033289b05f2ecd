"""CROWN-family bounds: backward linear relaxation (docs/method.md 2.4).

For a specification rows c (e.g. margin rows e_j - e_y) the upper bound of
c . f(x) over the box is found by pulling c back through the network: affine
layers transpose it, and each ReLU y = max(x, 0) with pre-activation bounds
l <= x <= u is replaced by linear lines,

* upper line (for positive coefficients): y <= s (x - l), s = u / (u - l);
* lower line (for negative coefficients): y >= a x, any a in [0, 1];

(for l >= 0 both lines are y = x, for u <= 0 both are y = 0). At the input the
remaining linear function is maximised over the box exactly. Every choice of a is
sound, so the result is sound whatever the slopes.

* `crown`: a = 1 where u > -l, else 0 (CROWN's adaptive lower line), and the
  pre-activation bounds of every ReLU are themselves computed by this backward pass
  (intersected with interval bounds, which is still sound).
* `crown_ibp`: the same backward pass for the output, with interval bounds for
  every ReLU (CROWN-IBP, cheap enough for training).
* `alpha_crown`: CROWN's intermediate bounds, then the lower slopes of the output
  pass are optimised per example and per specification row by projected Adam
  steps to tighten the bound; the tightest bound met at any step is kept.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mixtrain_tf import interval, ops
from mixtrain_tf.bounds import IntervalBounds
from mixtrain_tf.graph import BoundGraph

METHODS = ("crown", "crown_ibp", "alpha_crown")
#: alpha-CROWN's optimisation: Adam steps and learning rate (slopes live in [0, 1]).
DEFAULT_ALPHA_STEPS = 20
ALPHA_LEARNING_RATE = 0.1
#: alpha-CROWN also optimises the slopes of the CROWN passes that bound this many
#: of the last ReLU inputs (re-tightening their bounds at every step).
DEFAULT_ALPHA_LAYERS = 1


def _relaxation(pre: IntervalBounds):
  """Upper slope s, upper intercept, CROWN's lower slope a, unstable mask."""
  lo, up = pre.lower, pre.upper
  active = lo >= 0.0
  unstable = tf.logical_and(lo < 0.0, up > 0.0)
  denom = tf.where(unstable, up - lo, tf.ones_like(up))
  s = tf.where(active, tf.ones_like(up), tf.where(unstable, up / denom,
                                                  tf.zeros_like(up)))
  intercept = tf.where(unstable, -s * lo, tf.zeros_like(up))
  a = tf.where(active, tf.ones_like(up),
               tf.where(tf.logical_and(unstable, up > -lo), tf.ones_like(up),
                        tf.zeros_like(up)))
  return s, intercept, a, unstable


def _bias_dot(rows: tf.Tensor, op: ops.AffineOp) -> tf.Tensor | float:
  """rows [B, m, *out_shape] . bias -> [B, m] (0 without bias)."""
  b = op.bias()
  if b is None:
    return 0.0
  flat_b = tf.reshape(tf.broadcast_to(tf.cast(b, tf.float32),
                                      (1,) + tuple(op.out_shape)), [-1])
  return tf.einsum("bmk,k->bm", ops.flat(rows, 2), flat_b)


def backward_upper(graph: BoundGraph, z: int, rows: tf.Tensor, pre: dict,
                   box: IntervalBounds, slopes: dict | None = None,
                   betas: dict | None = None, record: dict | None = None
                   ) -> tf.Tensor:
  """Upper bound of rows . node_z over the box: rows [B, m, *shape_z] -> [B, m].

  `pre[j]` holds interval bounds of the input j of every ReLU between the input and
  z; `slopes[i]` optionally replaces CROWN's lower slope at ReLU node i
  ([B, m, *shape], used where the neuron is unstable). `betas[j]` ([B, m, *shape_j],
  beta-CROWN) is added to the coefficients of the ReLU input j: beta * sign for a
  split neuron with constraint sign * x_j >= 0 and beta >= 0, which makes the bound
  hold on the split subdomain (see `_optimise_slopes`). `record`, when given,
  receives for every ReLU input j what its upper-line intercepts add to the bound
  per neuron, [B, m, *shape_j] (what splitting that neuron could gain).
  """
  nodes = graph.nodes
  adj = {z: rows}
  const = 0.0
  for i in sorted(graph.ancestors(z) - {0}, reverse=True):
    a = adj.pop(i, None)
    if a is None:
      continue
    node = nodes[i]
    op = node.op
    if isinstance(op, ops.ReluOp):
      s, intercept, lower_slope, unstable = _relaxation(pre[node.inputs[0]])
      pos = tf.nn.relu(a)
      neg = a - pos
      lower_slope = lower_slope[:, None]
      if slopes is not None and i in slopes:
        lower_slope = tf.where(unstable[:, None], slopes[i], lower_slope)
      const += ops.rowdot(pos, intercept)
      if record is not None:
        record[node.inputs[0]] = pos * intercept[:, None]
      pulled = [pos * s[:, None] + neg * lower_slope]
      if betas is not None and node.inputs[0] in betas:
        pulled[0] = pulled[0] + betas[node.inputs[0]]
    elif isinstance(op, ops.AddOp):
      pulled = [a] * len(node.inputs)
    else:
      const += _bias_dot(a, op)
      pulled = [op.transpose(a)]
    for j, p in zip(node.inputs, pulled):
      adj[j] = adj[j] + p if j in adj else p
  a0 = adj[0]
  return const + ops.rowdot(a0, box.center) + ops.rowdot(tf.abs(a0), box.radius)


def _identity_rows(shape, batch) -> tf.Tensor:
  """[B, 2n, *shape]: rows e_k then -e_k for every neuron k (upper and -lower)."""
  n = int(np.prod(shape))
  eye = tf.reshape(tf.eye(n), (1, n) + tuple(shape))
  rows = tf.concat([eye, -eye], axis=1)
  return tf.tile(rows, tf.concat([[batch], tf.ones([len(shape) + 1], tf.int32)], 0))


def _has_relu_before(graph: BoundGraph, z: int) -> bool:
  return any(isinstance(graph.nodes[i].op, ops.ReluOp) for i in graph.ancestors(z))


def _apply_split(b: IntervalBounds, split) -> IntervalBounds:
  """Branch-and-bound constraints: +1 keeps x >= 0 (l >= 0), -1 keeps x <= 0."""
  if split is None:
    return b
  lower = tf.where(split > 0, tf.maximum(b.lower, 0.0), b.lower)
  upper = tf.where(split < 0, tf.minimum(b.upper, 0.0), b.upper)
  return IntervalBounds(lower, upper)


def pre_activation_bounds(graph: BoundGraph, box: IntervalBounds, method: str,
                          splits: dict | None = None) -> dict[int, IntervalBounds]:
  """Bounds of every ReLU's input: interval (crown_ibp) or CROWN (crown, alpha).

  `splits[z]` ([B, *shape_z] of -1, 0, +1) restricts the box to the subdomain
  where those pre-activations are <= 0 / >= 0 (branch and bound): bounds are then
  valid on the subdomain only."""
  splits = splits or {}
  itv = interval.node_bounds(graph, box.lower, box.upper)
  pre: dict[int, IntervalBounds] = {}
  for node in graph.nodes:
    if not isinstance(node.op, ops.ReluOp) or node.inputs[0] in pre:
      continue
    z = node.inputs[0]
    if method == "crown_ibp" or not _has_relu_before(graph, z):
      pre[z] = _apply_split(itv[z], splits.get(z))  # exact for an affine map
      continue
    pre[z] = _apply_split(_tighten_unstable(graph, z, itv[z], pre, box),
                          splits.get(z))
  return pre


def _unstable_rows(graph, z, itv_z: IntervalBounds):
  """Rows e_k then -e_k ([B, 2k, *shape_z]) for each example's unstable neurons
  of z (padded with zero rows to the most any example of the batch has), with
  their indices idx [B, k] and the padding mask valid [B, k]."""
  shape = graph.nodes[z].op.out_shape
  n = int(np.prod(shape))
  lo, up = ops.flat(itv_z.lower), ops.flat(itv_z.upper)  # [B, n]
  unstable = tf.logical_and(lo < 0.0, up > 0.0)
  count = tf.reduce_sum(tf.cast(unstable, tf.int32), axis=1)  # [B]
  k = tf.reduce_max(count)
  # Each example's unstable neurons first (a stable sort keeps index order).
  idx = tf.argsort(tf.cast(unstable, tf.int32), axis=1, direction="DESCENDING",
                   stable=True)[:, :k]  # [B, k]
  valid = tf.range(k)[None, :] < count[:, None]  # [B, k]
  batch = tf.shape(lo)[0]
  eye = tf.one_hot(idx, n) * tf.cast(valid, tf.float32)[..., None]  # [B, k, n]
  eye = tf.reshape(eye, tf.concat([[batch, k], shape], 0))
  return tf.concat([eye, -eye], axis=1), idx, valid


def _tightened(itv_z: IntervalBounds, idx, valid, ub) -> IntervalBounds:
  """itv_z intersected with the bounds ub [B, 2k] of the rows of `_unstable_rows`
  (upper bounds of x_k, then of -x_k)."""
  k = tf.shape(idx)[1]
  lo, up = ops.flat(itv_z.lower), ops.flat(itv_z.upper)
  batch = tf.shape(lo)[0]
  where = tf.stack([tf.broadcast_to(tf.range(batch)[:, None], tf.shape(idx)), idx],
                   axis=-1)  # [B, k, 2]

  def merge(base, new, keep):
    old = tf.gather_nd(base, where)
    # new first: at a tie tf.minimum / tf.maximum pass the gradient to their first
    # argument, and alpha-CROWN's intermediate slopes need it from the start.
    value = tf.where(valid, keep(new, old), old)
    return tf.reshape(tf.tensor_scatter_nd_update(base, where, value),
                      tf.shape(itv_z.lower))

  return IntervalBounds(merge(lo, -ub[:, k:], tf.maximum),
                        merge(up, ub[:, :k], tf.minimum))


def _tighten_unstable(graph, z, itv_z: IntervalBounds, pre, box) -> IntervalBounds:
  """CROWN bounds of the neurons of z that interval bounds leave unstable,
  intersected with the interval bounds. The others keep their interval bounds: a
  stable neuron's relaxation (y = x or y = 0) does not depend on its bounds, so
  this loses nothing. Each example gets rows for its own unstable neurons only
  (padded to the most any example of the batch has): the union over the batch
  made a batch of 100 cost 4x its examples one by one."""
  rows, idx, valid = _unstable_rows(graph, z, itv_z)
  return _tightened(itv_z, idx, valid, backward_upper(graph, z, rows, pre, box))


def _output_rows(graph: BoundGraph, spec, batch, upper_only: bool) -> tf.Tensor:
  """[B, 2m, *out_shape]: the spec rows (or identity) and their negatives; only
  the rows themselves ([B, m, ...]) when `upper_only`."""
  if spec is None:
    rows = _identity_rows(graph.output_shape, batch)
    n = int(np.prod(graph.output_shape))
    return rows[:, :n] if upper_only else rows
  rows = tf.reshape(spec, tf.concat([tf.shape(spec)[:2], graph.output_shape], 0))
  return rows if upper_only else tf.concat([rows, -rows], axis=1)


def _relus(graph: BoundGraph, z: int | None = None) -> list[int]:
  """ReLU nodes (those before node z when given), in graph order."""
  before = graph.ancestors(z) if z is not None else range(len(graph.nodes))
  return [i for i in sorted(before) if isinstance(graph.nodes[i].op, ops.ReluOp)]


def _alpha_targets(graph: BoundGraph, layers: int) -> list[int]:
  """The ReLU inputs whose CROWN bounds alpha-CROWN re-optimises: the last
  `layers` of those that CROWN bounds (the ones with a ReLU before them)."""
  zs = []
  for node in graph.nodes:
    z = node.inputs[0] if isinstance(node.op, ops.ReluOp) else None
    if z is not None and z not in zs and _has_relu_before(graph, z):
      zs.append(z)
  return zs[max(0, len(zs) - layers):] if layers > 0 else []


def _slope_gradient(graph: BoundGraph, targets: tuple, split_keys: tuple):
  """One alpha-CROWN step: (output rows, pre-activation (lower, upper) pairs, box
  lower, box upper, target rows [(rows, idx, valid)], splits, variables) ->
  (output upper bounds, the targets' re-tightened (lower, upper), the gradient of
  the bounds' sum per variable). The variables are, in order: the output pass's
  slopes per ReLU, then per target its slopes per ReLU before it and its betas
  per split key before it, then the output pass's betas per split key. Run
  eagerly, it is a tf.function kept on the graph, traced once per shape: eagerly,
  each step cost more in op dispatch than in arithmetic."""
  relus = _relus(graph)
  before = [_relus(graph, z) for z in targets]
  split_before = [[j for j in split_keys if j in graph.ancestors(z)]
                  for z in targets]

  def value_and_grads(rows, pairs, lower, upper, target_rows, splits, variables):
    box = IntervalBounds(lower, upper)
    with tf.GradientTape() as tape:
      tape.watch(variables)
      pre = {j: IntervalBounds(lo, up) for j, (lo, up) in pairs.items()}
      it = iter(variables)
      out_slopes = {i: next(it) for i in relus}
      tightened = []
      for z, relus_z, keys_z, (rows_z, idx, valid) in zip(
          targets, before, split_before, target_rows):
        slopes_z = {i: next(it) for i in relus_z}
        betas_z = {j: next(it) * splits[j][:, None] for j in keys_z}
        ub_z = backward_upper(graph, z, rows_z, pre, box, slopes_z, betas_z)
        pre[z] = _apply_split(_tightened(pre[z], idx, valid, ub_z), splits.get(z))
        tightened.append((pre[z].lower, pre[z].upper))
      betas = {j: next(it) * splits[j][:, None] for j in split_keys}
      ub = backward_upper(graph, graph.output, rows, pre, box, out_slopes, betas)
      loss = tf.reduce_sum(ub)
    grads = tape.gradient(loss, variables)
    grads = [tf.zeros_like(v) if g is None else g for v, g in zip(variables, grads)]
    return ub, tightened, grads

  if not tf.executing_eagerly():
    return value_and_grads
  cache = graph.__dict__.setdefault("_alpha_slope_gradient", {})
  key = (targets, split_keys)
  if key not in cache:
    cache[key] = tf.function(value_and_grads, reduce_retracing=True)
  return cache[key]


def _optimise_slopes(graph, rows, pre, box, steps: int, layers: int = 0,
                     splits: dict | None = None, return_pre: bool = False,
                     init_slopes: dict | None = None):
  """alpha-CROWN (and beta-CROWN under `splits`): the tightest upper bound of
  rows . output over projected Adam steps.

  The variables are the lower slopes of the output pass (per example and row), the
  slopes of the CROWN passes that bound the last `layers` ReLU inputs (per example
  and per row of those passes: their bounds are re-tightened at every step and
  feed the output pass), and, for split neurons, beta >= 0 per example and row of
  every pass (`backward_upper`'s `betas`).
  Every slope in [0, 1] and every beta >= 0 gives a sound bound, so each step's
  bound is sound and the smallest is kept; re-tightened intermediate bounds are
  intersected with the previous ones. `init_slopes` ({ReLU node: [B or 1, m,
  *shape]}) starts the output pass's slopes there instead of at CROWN's choice.
  Returns the bound, and with `return_pre` also the pre-activation bounds as
  re-tightened and the output pass's final slopes."""
  splits = {j: s for j, s in (splits or {}).items() if s is not None}
  targets = tuple(_alpha_targets(graph, layers))
  split_keys = tuple(sorted(splits))
  m = tf.shape(rows)[1]

  def initial_slopes(relus, count):
    out = []
    for i in relus:
      _, _, a, _ = _relaxation(pre[graph.nodes[i].inputs[0]])
      out.append(tf.tile(a[:, None], tf.concat(
          [[1, count], tf.ones([len(graph.nodes[i].op.out_shape)], tf.int32)], 0)))
    return out

  def initial_betas(keys, count):
    return [tf.zeros(tf.concat([[tf.shape(rows)[0], count],
                                tf.shape(splits[j])[1:]], 0)) for j in keys]

  relus = _relus(graph)
  variables = initial_slopes(relus, m)
  if init_slopes is not None:
    variables = [tf.broadcast_to(init_slopes[i], tf.shape(v)) if i in init_slopes
                 else v for i, v in zip(relus, variables)]
  is_beta = [False] * len(variables)
  target_rows = []
  for z in targets:
    rows_z, idx, valid = _unstable_rows(graph, z, pre[z])
    target_rows.append((rows_z, idx, valid))
    count = tf.shape(rows_z)[1]
    slopes_z = initial_slopes(_relus(graph, z), count)
    betas_z = initial_betas([j for j in split_keys if j in graph.ancestors(z)], count)
    variables += slopes_z + betas_z
    is_beta += [False] * len(slopes_z) + [True] * len(betas_z)
  variables += initial_betas(split_keys, m)
  is_beta += [True] * len(split_keys)
  first = [tf.zeros_like(v) for v in variables]
  second = [tf.zeros_like(v) for v in variables]
  pairs = {j: (b.lower, b.upper) for j, b in pre.items()}
  value_and_grads = _slope_gradient(graph, targets, split_keys)
  best = None
  for t in range(1, steps + 2):
    ub, tightened, grads = value_and_grads(rows, pairs, box.lower, box.upper,
                                           target_rows, splits, variables)
    best = ub if best is None else tf.minimum(best, ub)
    pairs.update(zip(targets, tightened))  # sound bounds, tighter or equal
    if t > steps:
      break
    for k, g in enumerate(grads):
      first[k] = 0.9 * first[k] + 0.1 * g
      second[k] = 0.999 * second[k] + 0.001 * g * g
      step = (first[k] / (1 - 0.9**t)) / (tf.sqrt(second[k] / (1 - 0.999**t)) + 1e-8)
      v = variables[k] - ALPHA_LEARNING_RATE * step
      variables[k] = tf.nn.relu(v) if is_beta[k] else tf.clip_by_value(v, 0.0, 1.0)
  if return_pre:
    return (best, {j: IntervalBounds(lo, up) for j, (lo, up) in pairs.items()},
            dict(zip(relus, variables[:len(relus)])))
  return best


def bounds(graph: BoundGraph, lower: tf.Tensor, upper: tf.Tensor,
           spec: tf.Tensor | None = None, method: str = "crown",
           alpha_steps: int | None = None, splits: dict | None = None,
           upper_only: bool = False) -> IntervalBounds:
  """Bounds of the output (or of spec [B, m, n_out] @ output), [B, m].

  With `splits` (see `pre_activation_bounds`) the bounds hold on the subdomain.
  `upper_only` skips the lower bounds' backward pass (half the output pass) and
  returns -inf for them (trivially sound): margins need only upper bounds."""
  if method not in METHODS:
    raise ValueError(f"unknown CROWN method {method!r}; choose one of {METHODS}.")
  box = IntervalBounds(lower, upper)
  pre = pre_activation_bounds(graph, box, method, splits)
  batch = tf.shape(lower)[0]
  rows = _output_rows(graph, spec, batch, upper_only)
  if method == "alpha_crown":
    steps = DEFAULT_ALPHA_STEPS if alpha_steps is None else int(alpha_steps)
    ub = _optimise_slopes(graph, rows, pre, box, steps, DEFAULT_ALPHA_LAYERS, splits)
  else:
    ub = backward_upper(graph, graph.output, rows, pre, box)
  if upper_only:
    return IntervalBounds(tf.fill(tf.shape(ub), -np.inf), ub)
  m = tf.shape(rows)[1] // 2
  return IntervalBounds(-ub[:, m:], ub[:, :m])


def per_sample_values(graph: BoundGraph, method: str, num_rows: int) -> int:
  """Largest number of float32 values one example's backward passes hold."""
  def widest(z):
    return max(int(np.prod(graph.nodes[i].op.out_shape)) for i in graph.ancestors(z))
  out = 2 * num_rows * widest(graph.output)
  if method == "alpha_crown":
    relus = sum(int(np.prod(n.op.out_shape)) for n in graph.nodes
                if isinstance(n.op, ops.ReluOp))
    out += 6 * num_rows * relus  # slopes and Adam moments
  if method == "crown_ibp":
    return out
  for node in graph.nodes:
    if isinstance(node.op, ops.ReluOp) and _has_relu_before(graph, node.inputs[0]):
      z = node.inputs[0]
      out = max(out, 2 * int(np.prod(graph.nodes[z].op.out_shape)) * widest(z))
  return out
