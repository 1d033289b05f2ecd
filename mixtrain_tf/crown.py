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
* `alpha_crown`: the lower slopes are optimised by projected Adam steps, per
  example and row, to tighten each bound; the tightest bound met at any step is
  kept. Layer by layer, each ReLU input's neurons that CROWN leaves unstable are
  bounded again with their own optimised slopes, then the output rows.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from mixtrain_tf import interval, ops, patches
from mixtrain_tf.bounds import IntervalBounds
from mixtrain_tf.graph import BoundGraph

METHODS = ("crown", "crown_ibp", "alpha_crown")
#: alpha-CROWN's optimisation: Adam steps and learning rate (slopes live in [0, 1]).
DEFAULT_ALPHA_STEPS = 20
ALPHA_LEARNING_RATE = 0.1


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
  per neuron, [B, m, *shape_j] (what splitting that neuron could gain), and under
  the key "input" the coefficients of the input, [B, m, *input_shape] (the box's
  point sign(them) * radius + centre attains each row's bound).
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
  if record is not None:
    record["input"] = a0
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
                          splits: dict | None = None,
                          alpha_steps: int = 0) -> dict[int, IntervalBounds]:
  """Bounds of every ReLU's input: interval (crown_ibp) or CROWN (crown, alpha).

  `alpha_steps` > 0 (alpha-CROWN): the neurons CROWN leaves unstable are then
  bounded again with their own lower slopes (per example and neuron, for each of
  its two bounds) optimised by that many steps (`_optimise_slopes`), layer by
  layer, each layer's pass using the layers before as tightened.
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
    b = _apply_split(_tighten_unstable(graph, z, itv[z], pre, box), splits.get(z))
    if alpha_steps and patches.local_pass(graph, z) is not None:
      idx, valid = _unstable_idx(b)
      ub = _optimise_local(graph, z, idx, pre, box, alpha_steps, splits)
      b = _apply_split(_tightened(b, idx, valid, ub), splits.get(z))
    elif alpha_steps:
      rows, idx, valid = _unstable_rows(graph, z, b)
      ub, _ = _optimise_slopes(graph, z, rows, pre, box, alpha_steps, splits)
      b = _apply_split(_tightened(b, idx, valid, ub), splits.get(z))
    pre[z] = b
  return pre


def _unstable_idx(itv_z: IntervalBounds):
  """Each example's unstable neurons of z, idx [B, k] (padded with stable ones to
  the most any example of the batch has), and the padding mask valid [B, k]."""
  lo, up = ops.flat(itv_z.lower), ops.flat(itv_z.upper)  # [B, n]
  unstable = tf.logical_and(lo < 0.0, up > 0.0)
  count = tf.reduce_sum(tf.cast(unstable, tf.int32), axis=1)  # [B]
  k = tf.reduce_max(count)
  # Each example's unstable neurons first (a stable sort keeps index order).
  idx = tf.argsort(tf.cast(unstable, tf.int32), axis=1, direction="DESCENDING",
                   stable=True)[:, :k]  # [B, k]
  return idx, tf.range(k)[None, :] < count[:, None]


def _unstable_rows(graph, z, itv_z: IntervalBounds):
  """Rows e_k then -e_k ([B, 2k, *shape_z]) for each example's unstable neurons
  of z (padded with zero rows to the most any example of the batch has), with
  their indices idx [B, k] and the padding mask valid [B, k]."""
  shape = graph.nodes[z].op.out_shape
  n = int(np.prod(shape))
  idx, valid = _unstable_idx(itv_z)
  k = tf.shape(idx)[1]
  batch = tf.shape(idx)[0]
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
  local = patches.local_pass(graph, z)
  if local is not None:
    idx, valid = _unstable_idx(itv_z)
    return _tightened(itv_z, idx, valid,
                      local.upper(local.gather(idx, pre, box, _relaxation)))
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


def _gradient_fn(graph: BoundGraph, key: tuple, bound):
  """One alpha/beta-CROWN step: a tf.function kept on the graph (traced once per
  shape; eagerly, each step cost more in op dispatch than in arithmetic),
  (args, variables) -> (bound(args, variables), the upper bounds [B, m]; the
  gradient of their sum per variable, zeros where it does not depend on one)."""
  cache = graph.__dict__.setdefault("_alpha_gradients", {})
  if key not in cache:
    def value_and_grads(args, variables):
      with tf.GradientTape() as tape:
        tape.watch(variables)
        ub = bound(args, variables)
        loss = tf.reduce_sum(ub)
      grads = tape.gradient(loss, variables)
      return ub, [tf.zeros_like(v) if g is None else g
                  for v, g in zip(variables, grads)]
    cache[key] = tf.function(value_and_grads, reduce_retracing=True)
  return cache[key]


def _slope_gradient(graph: BoundGraph, z: int, split_keys: tuple):
  """`_gradient_fn` of the backward pass from node z: args = (rows, {ReLU input:
  (lower, upper)}, box lower, box upper, splits); the variables are the lower
  slopes per ReLU before z, then the betas per split key."""
  relus = _relus(graph, z)

  def bound(args, variables):
    rows, pairs, lower, upper, splits = args
    pre = {j: IntervalBounds(lo, up) for j, (lo, up) in pairs.items()}
    slopes = dict(zip(relus, variables))
    betas = {j: b * splits[j][:, None]
             for j, b in zip(split_keys, variables[len(relus):])}
    return backward_upper(graph, z, rows, pre, IntervalBounds(lower, upper),
                          slopes, betas)

  return _gradient_fn(graph, ("dense", z, split_keys), bound)


def _optimise_slopes(graph, z, rows, pre, box, steps: int,
                     splits: dict | None = None, init_slopes: dict | None = None):
  """alpha-CROWN (and beta-CROWN under `splits`): the tightest upper bound of
  rows . node_z over projected Adam steps on the backward pass from z.

  The variables are the lower slopes of the ReLUs before z, per example and row,
  and, for split neurons before z, beta >= 0 per example and row
  (`backward_upper`'s `betas`). Every slope in [0, 1] and every beta >= 0 gives a
  sound bound, so each step's bound is sound and the smallest is kept.
  `init_slopes` ({ReLU node: [B or 1, m, *shape]}) starts the slopes there
  instead of at CROWN's choice. Returns the bound [B, m] and the final slopes."""
  # z's own affine map does not depend on slopes or betas: rows are pulled
  # through it once here, not at every step (a quarter of a conv layer's pass).
  z, rows, const = _pull_through(graph, z, rows)
  ancestors = graph.ancestors(z)
  splits = {j: s for j, s in (splits or {}).items()
            if s is not None and j in ancestors}
  split_keys = tuple(sorted(splits))
  relus = _relus(graph, z)
  batch, m = tf.shape(rows)[0], tf.shape(rows)[1]
  variables = []
  for i in relus:
    shape = graph.nodes[i].op.out_shape
    if init_slopes is not None and i in init_slopes:
      a = init_slopes[i]
    else:
      a = _relaxation(pre[graph.nodes[i].inputs[0]])[2][:, None]
    variables.append(tf.broadcast_to(a, tf.concat([[batch, m], shape], 0)))
  variables += [tf.zeros(tf.concat([[batch, m], tf.shape(splits[j])[1:]], 0))
                for j in split_keys]
  pairs = {graph.nodes[i].inputs[0]: (pre[graph.nodes[i].inputs[0]].lower,
                                      pre[graph.nodes[i].inputs[0]].upper)
           for i in relus}
  value_and_grads = _slope_gradient(graph, z, split_keys)
  best, variables = _minimise(
      lambda v: value_and_grads((rows, pairs, box.lower, box.upper, splits), v),
      variables, steps, len(relus))
  return best + const, dict(zip(relus, variables[:len(relus)]))


def _minimise(value_and_grads, variables: list, steps: int, num_slopes: int):
  """Projected Adam on the upper bounds [B, m] that value_and_grads(variables)
  returns with their gradients: the first num_slopes variables are slopes, kept
  in [0, 1], the rest betas, kept >= 0. Returns the smallest bound met at any
  step (each is sound) and the final variables."""
  first = [tf.zeros_like(v) for v in variables]
  second = [tf.zeros_like(v) for v in variables]
  best = None
  for t in range(1, steps + 2):
    ub, grads = value_and_grads(variables)
    best = ub if best is None else tf.minimum(best, ub)
    if t > steps:
      break
    for k, g in enumerate(grads):
      first[k] = 0.9 * first[k] + 0.1 * g
      second[k] = 0.999 * second[k] + 0.001 * g * g
      step = (first[k] / (1 - 0.9**t)) / (tf.sqrt(second[k] / (1 - 0.999**t)) + 1e-8)
      v = variables[k] - ALPHA_LEARNING_RATE * step
      variables[k] = (tf.nn.relu(v) if k >= num_slopes
                      else tf.clip_by_value(v, 0.0, 1.0))
  return best, variables


def _optimise_local(graph, z, idx, pre, box, steps: int, splits: dict | None):
  """`_optimise_slopes` for the unstable neurons idx [B, k] of a conv node with
  a local pass (`patches`): the slopes (and betas) live on each row's window.
  Returns upper bounds [B, 2k] (x_k, then -x_k)."""
  local = patches.local_pass(graph, z)
  windows = local.gather(idx, pre, box, _relaxation, splits)
  has_split = "split" in windows
  start = tf.concat([windows["lower"], windows["lower"]], axis=1)
  variables = [start] + ([tf.zeros_like(start)] if has_split else [])
  step = _local_gradient(graph, z, has_split)
  best, _ = _minimise(lambda v: step(windows, v), variables, steps, 1)
  return best


def _local_gradient(graph: BoundGraph, z: int, has_split: bool):
  """`_gradient_fn` of node z's local pass: args = its windows, variables =
  [slopes(, betas)]."""
  local = patches.local_pass(graph, z)
  return _gradient_fn(graph, ("local", z, has_split), lambda windows, v: local.upper(
      windows, v[0], v[1] if has_split else None))


def _pull_through(graph: BoundGraph, z: int, rows: tf.Tensor):
  """(j, rows at j, constant [B, m] or 0): rows . node_z = rows_j . node_j +
  constant when z is an affine node of one input j (z itself otherwise)."""
  node = graph.nodes[z]
  if not isinstance(node.op, ops.AffineOp) or len(node.inputs) != 1:
    return z, rows, 0.0
  return node.inputs[0], node.op.transpose(rows), _bias_dot(rows, node.op)


def bounds(graph: BoundGraph, lower: tf.Tensor, upper: tf.Tensor,
           spec: tf.Tensor | None = None, method: str = "crown",
           alpha_steps: int | None = None, splits: dict | None = None,
           upper_only: bool = False, stop_below: float | None = None
           ) -> IntervalBounds:
  """Bounds of the output (or of spec [B, m, n_out] @ output), [B, m].

  With `splits` (see `pre_activation_bounds`) the bounds hold on the subdomain.
  `upper_only` skips the lower bounds' backward pass (half the output pass) and
  returns -inf for them (trivially sound): margins need only upper bounds.
  `stop_below` (alpha_crown, with `upper_only`): an example is optimised only if
  CROWN leaves one of its upper bounds >= stop_below and none of its rows is
  >= stop_below at the box's centre (no bound could then bring it below); the
  others keep their CROWN bounds. Verification (margins < 0) needs no more."""
  if method not in METHODS:
    raise ValueError(f"unknown CROWN method {method!r}; choose one of {METHODS}.")
  box = IntervalBounds(lower, upper)
  steps = 0
  if method == "alpha_crown":
    steps = DEFAULT_ALPHA_STEPS if alpha_steps is None else int(alpha_steps)
  batch = tf.shape(lower)[0]
  rows = _output_rows(graph, spec, batch, upper_only)
  if steps and not (upper_only and stop_below is not None):
    ub = _alpha_crown(graph, box, rows, steps, splits)
  else:
    pre = pre_activation_bounds(graph, box, method, splits)
    ub = backward_upper(graph, graph.output, rows, pre, box)
    if steps:  # only the examples this CROWN bound leaves open
      ub = _alpha_crown(graph, box, rows, steps, splits, ub, stop_below)
  if upper_only:
    return IntervalBounds(tf.fill(tf.shape(ub), -np.inf), ub)
  m = tf.shape(rows)[1] // 2
  return IntervalBounds(-ub[:, m:], ub[:, :m])


def _alpha_crown(graph, box, rows, steps, splits, crown_ub=None, stop_below=None):
  """alpha-CROWN's upper bounds [B, m] of the rows; given CROWN's (`crown_ub`)
  and `stop_below` (see `bounds`), computed only on the examples left open."""
  splits = {j: s for j, s in (splits or {}).items() if s is not None}
  if crown_ub is None:
    pre = pre_activation_bounds(graph, box, "alpha_crown", splits, steps)
    return _optimise_slopes(graph, graph.output, rows, pre, box, steps, splits)[0]
  zero_row = tf.reduce_all(tf.equal(ops.flat(rows, 2), 0.0), axis=2)
  centre = interval.node_bounds(graph, box.center, box.center)[graph.output]
  at_centre = ops.rowdot(rows, centre.upper)
  done = tf.reduce_all(tf.logical_or(crown_ub < stop_below, zero_row), axis=1)
  hopeless = tf.reduce_any(tf.logical_and(at_centre >= stop_below,
                                          tf.logical_not(zero_row)), axis=1)
  idx = tf.cast(tf.where(tf.logical_not(tf.logical_or(done, hopeless)))[:, 0],
                tf.int32)
  n = tf.size(idx)
  # The engines need a non-empty batch: with nothing open, example 0 is bounded
  # and thrown away.
  take = tf.concat([idx, tf.zeros([1], tf.int32)], 0)[:tf.maximum(n, 1)]
  sub = IntervalBounds(tf.gather(box.lower, take), tf.gather(box.upper, take))
  ub = _alpha_crown(graph, sub, tf.gather(rows, take), steps,
                    {j: tf.gather(s, take) for j, s in splits.items()})
  return tf.tensor_scatter_nd_update(crown_ub, idx[:, None], ub[:n])


def per_sample_values(graph: BoundGraph, method: str, num_rows: int) -> int:
  """Largest number of values one example's backward passes hold, in units of
  `symbolic._BYTES_PER_VALUE` (room for a float32 value and its temporaries).

  Worst case: every neuron unstable. alpha-CROWN's slopes, their Adam moments,
  best copy, gradient and the temporaries of its steps (about a dozen float32
  copies of the slopes) count two units per slope, three on a local pass's
  windows (`patches`). Peaks measured by benchmarks/crown_memory.py are in
  tests/crown_test.py."""
  def widest(z):
    return max(int(np.prod(graph.nodes[i].op.out_shape)) for i in graph.ancestors(z))
  out = 2 * num_rows * widest(graph.output)
  if method == "alpha_crown":
    out += 2 * num_rows * sum(int(np.prod(n.op.out_shape)) for n in graph.nodes
                              if isinstance(n.op, ops.ReluOp))
  if method == "crown_ibp":
    return out
  for node in graph.nodes:
    if isinstance(node.op, ops.ReluOp) and _has_relu_before(graph, node.inputs[0]):
      z = node.inputs[0]
      rows = 2 * int(np.prod(graph.nodes[z].op.out_shape))
      window, in_window = patches.window_values(graph, z)
      if window:  # the local pass: rows hold windows (and slopes on them)
        here = rows * (window + in_window) + (3 * rows * window
                                              if method == "alpha_crown" else 0)
        out = max(out, here)
        continue
      here = rows * widest(z)
      if method == "alpha_crown":  # this pass's own slopes
        here += 2 * rows * sum(int(np.prod(graph.nodes[i].op.out_shape))
                               for i in _relus(graph, z))
      out = max(out, here)
  return out
