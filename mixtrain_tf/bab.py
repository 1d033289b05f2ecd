"""Complete verification by branch and bound over ReLU splits (docs/method.md 2.5).

`verify(model, x, y, epsilon)` answers, per example, "verified" (no point of the
clipped ball changes the label), "falsified" (with a counterexample that a forward
pass confirms) or "unknown" (the time or domain limit was reached first).

1. PGD (restarts, margin objective) looks for a counterexample in the ball.
2. Otherwise the ball is the first domain; alpha-CROWN bounds it. Domains are then
   bounded in batches with CROWN (optionally alpha-CROWN) under their split
   constraints; a domain whose every margin upper bound is < 0 is proven. An open
   domain is split in two children that cover it, so proving all leaves proves
   the ball:
   * inputs of at most `INPUT_SPLIT_DIMS` values: the box is bisected along its
     widest side (complete in the limit: bounds of small boxes are tight);
   * larger inputs (images): on the unstable ReLU with the widest relaxation
     (largest u * -l / (u - l), the gap of the triangle), into "pre-activation
     >= 0" and "<= 0".
3. A domain with no unstable ReLU left cannot be split further; if it is still not
   proven the answer is "unknown" (its split constraints restrict the ReLUs, not
   the input box, so its bound is not exact; beta-CROWN's constraint multipliers
   would tighten it, and are not implemented).

Like every bound here this is float32 arithmetic without outward rounding.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import tensorflow as tf

from mixtrain_tf import api, attacks, crown, ops
from mixtrain_tf.bounds import IntervalBounds
from mixtrain_tf.graph import bound_graph

STATUSES = ("verified", "falsified", "unknown")
#: Inputs with at most this many values are split on the input, others on ReLUs.
INPUT_SPLIT_DIMS = 16


@dataclasses.dataclass
class Result:
  """The answer for one example."""
  status: str
  counterexample: np.ndarray | None = None
  domains: int = 0
  seconds: float = 0.0


def _attack(model, x, y, epsilon, clip, restarts, steps, seed):
  """A counterexample in the ball confirmed by a forward pass, or None."""
  step = max(epsilon / 4.0, 1e-4)
  adv = attacks.pgd(lambda z: model(z, training=False), x[None], y[None], epsilon,
                    steps, step, restarts, clip_min=clip[0], clip_max=clip[1],
                    loss="margin", seed=tf.constant([seed, 1]))
  adv = adv.numpy()[0]
  inside = (np.all(np.abs(adv - x) <= epsilon + 1e-6)
            and np.all(adv >= clip[0]) and np.all(adv <= clip[1]))
  wrong = int(np.argmax(model(adv[None], training=False).numpy()[0])) != int(y)
  return adv if inside and wrong else None


class _Bounder:
  """Bounds of a batch of domains of one example: worst margin and ReLU bounds."""

  def __init__(self, model, x, y, epsilon, clip, alpha_steps):
    self.graph = bound_graph(model)
    self.relu_inputs = sorted({n.inputs[0] for n in self.graph.nodes
                               if isinstance(n.op, ops.ReluOp)})
    lo, hi = api.input_box(x[None], epsilon, *clip)
    self.lo, self.hi = lo.numpy()[0].ravel(), hi.numpy()[0].ravel()
    self.spec = api.margin_spec(tf.constant([int(y)]), self.graph.num_outputs)
    self.y = int(y)
    self.alpha_steps = alpha_steps

  def __call__(self, lo: np.ndarray, hi: np.ndarray, splits: dict[int, np.ndarray]):
    """lo, hi [D, n_in] boxes; splits {z: [D, n_z]} -> worst margin [D], bounds."""
    d = len(lo)
    shape = (d,) + self.graph.input_shape
    box = IntervalBounds(tf.constant(lo.reshape(shape), tf.float32),
                         tf.constant(hi.reshape(shape), tf.float32))
    sp = {z: tf.reshape(tf.constant(s, tf.float32),
                        (d,) + self.graph.nodes[z].op.out_shape)
          for z, s in splits.items()}
    pre = crown.pre_activation_bounds(self.graph, box, "crown", sp)
    spec = tf.repeat(self.spec, d, 0)
    rows = tf.reshape(spec, tf.concat([tf.shape(spec)[:2], self.graph.output_shape],
                                      0))
    if self.alpha_steps:
      ub = crown._optimise_slopes(self.graph, rows, pre, box, self.alpha_steps)
    else:
      ub = crown.backward_upper(self.graph, self.graph.output, rows, pre, box)
    ub = ub.numpy()
    ub[:, self.y] = -np.inf
    return ub.max(axis=1), {z: (ops.flat(pre[z].lower).numpy(),
                                ops.flat(pre[z].upper).numpy())
                            for z in self.relu_inputs}


def _branch(splits_row: dict, bounds_row: dict):
  """(layer, neuron) of the widest unstable relaxation, or None if none is left."""
  best, where = 0.0, None
  for z, (lo, up) in bounds_row.items():
    open_ = (splits_row[z] == 0) & (lo < 0) & (up > 0)
    if not open_.any():
      continue
    gap = np.where(open_, up * -lo / np.where(open_, up - lo, 1.0), -1.0)
    k = int(np.argmax(gap))
    if gap[k] > best:
      best, where = float(gap[k]), (z, k)
  return where


def _stack(domains: list[dict], sizes: dict):
  return (np.stack([d["lo"] for d in domains]), np.stack([d["hi"] for d in domains]),
          {z: np.stack([d[z] for d in domains]) for z in sizes})


def _bisect(domain: dict) -> list[dict]:
  """The two halves of the domain's input box along its widest side."""
  k = int(np.argmax(domain["hi"] - domain["lo"]))
  mid = (domain["lo"][k] + domain["hi"][k]) / 2
  left, right = dict(domain), dict(domain)
  left["hi"], right["lo"] = domain["hi"].copy(), domain["lo"].copy()
  left["hi"][k] = right["lo"][k] = mid
  return [left, right]


def verify_example(model, x, y, epsilon, clip=(0.0, 1.0), time_limit: float = 30.0,
                   max_domains: int = 20000, batch: int = 64,
                   alpha_steps: int = 0, root_alpha_steps: int | None = None,
                   attack_restarts: int = 5, attack_steps: int = 100,
                   seed: int = 0) -> Result:
  """Branch and bound for one example x [*input_shape] with label y.

  The whole ball is first bounded by alpha-CROWN (`root_alpha_steps`, default
  `crown.DEFAULT_ALPHA_STEPS`); split domains by CROWN with `alpha_steps` (0: no
  optimisation, the fastest per domain)."""
  start = time.perf_counter()
  x = np.asarray(x, np.float32)
  adv = _attack(model, x, y, epsilon, clip, attack_restarts, attack_steps, seed)
  if adv is not None:
    return Result("falsified", adv, 0, time.perf_counter() - start)
  bounder = _Bounder(model, x, y, epsilon, clip, alpha_steps)
  sizes = {z: int(np.prod(bounder.graph.nodes[z].op.out_shape))
           for z in bounder.relu_inputs}
  root = {"lo": bounder.lo, "hi": bounder.hi,
          **{z: np.zeros(n, np.int8) for z, n in sizes.items()}}
  root_steps = crown.DEFAULT_ALPHA_STEPS if root_alpha_steps is None else (
      root_alpha_steps)
  if root_steps:
    worst, _ = _Bounder(model, x, y, epsilon, clip, root_steps)(
        *_stack([root], sizes))
    if worst[0] < 0:
      return Result("verified", None, 1, time.perf_counter() - start)
  split_input = bounder.lo.size <= INPUT_SPLIT_DIMS
  todo = [root]
  seen = 0
  while todo:
    if time.perf_counter() - start > time_limit or seen >= max_domains:
      return Result("unknown", None, seen, time.perf_counter() - start)
    chunk, todo = todo[:batch], todo[batch:]
    seen += len(chunk)
    worst, pre = bounder(*_stack(chunk, sizes))
    for i, domain in enumerate(chunk):
      if worst[i] < 0:
        continue  # proven on this domain
      if split_input:
        todo.extend(_bisect(domain))
        continue
      where = _branch(domain, {z: (lo[i], up[i]) for z, (lo, up) in pre.items()})
      if where is None:  # nothing left to split
        return Result("unknown", None, seen, time.perf_counter() - start)
      z, k = where
      for sign in (1, -1):
        child = {key: v.copy() for key, v in domain.items()}
        child[z][k] = sign
        todo.append(child)
  return Result("verified", None, seen, time.perf_counter() - start)


def verify(model, x, y, epsilon, clip_min: float = 0.0, clip_max: float = 1.0,
           time_limit: float = 30.0, **kwargs) -> list[Result]:
  """`verify_example` for every example of x [N, ...], y [N] (checked ball)."""
  api.check_ball(np.asarray(x), epsilon, clip_min, clip_max)
  return [verify_example(model, xi, yi, epsilon, (clip_min, clip_max), time_limit,
                         **kwargs) for xi, yi in zip(np.asarray(x), np.asarray(y))]
