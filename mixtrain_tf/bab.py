"""Complete verification by branch and bound over ReLU splits (docs/method.md 2.5).

`verify(model, x, y, epsilon)` answers, per example, "verified" (no point of the
clipped ball changes the label), "falsified" (with a counterexample that a forward
pass confirms) or "unknown" (the time or domain limit was reached first).

1. PGD (restarts, margin objective) looks for a counterexample in the ball.
2. Otherwise the ball is the first domain; alpha-CROWN bounds it (its ReLU input
   bounds optimised layer by layer, which the domains inherit). Domains are then
   bounded in batches with alpha-CROWN and beta-CROWN's split multipliers
   (`alpha_steps` steps; 0, the default, gives one CROWN output pass) under their
   split constraints, starting from the root's optimised slopes and, for ReLU
   splits, from the parent's ReLU input bounds; a domain whose every margin upper
   bound is < 0 is proven. An open
   domain is split in two children that cover it, so proving all leaves proves
   the ball:
   * inputs of at most `INPUT_SPLIT_DIMS` values: the box is bisected along its
     widest side (complete in the limit: bounds of small boxes are tight);
   * larger inputs (images): on an unstable ReLU (BaBSR's intercept score, see
     `_branch`), into "pre-activation >= 0" and "<= 0".
3. A domain with no unstable ReLU left cannot be split further; if it is still not
   proven the answer is "unknown" (its bound is exact only at the optimum of the
   betas, which a few steps need not reach).

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
#: alpha/beta-CROWN steps per batch of split domains. 0 (plain CROWN on the
#: inherited, clamped bounds): on the authors' MNIST_Small at eps 0.3, 5 steps
#: bounded 7x fewer domains in 20 s and proved no more examples.
DOMAIN_ALPHA_STEPS = 0


@dataclasses.dataclass
class Result:
  """The answer for one example."""
  status: str
  counterexample: np.ndarray | None = None
  domains: int = 0
  seconds: float = 0.0


def compiled_attack(model):
  """Margin-loss PGD on `model` as one compiled function, to build once per model
  and pass to `verify_example` (`pgd=`). Run eagerly, 100 steps x 5 restarts took
  ~7 s per example even on a 2-12-12-3 MLP; compiled, 25 ms after a 2.4 s trace.
  `steps` goes in as a tensor, so the graph holds one loop rather than every step
  unrolled (53 s to trace)."""
  def run(x, y, epsilon, steps, step, restarts, clip, seed, start):
    return attacks.pgd(lambda z: model(z, training=False), x, y, epsilon, steps,
                       step, restarts, clip_min=clip[0], clip_max=clip[1],
                       loss="margin", seed=seed, start=start)
  return tf.function(run)


def _attack(pgd, model, x, y, epsilon, clip, restarts, steps, seed, start=None):
  """A counterexample in the ball confirmed by a forward pass, or None. `pgd` is
  `compiled_attack(model)`; `start` (a point of the ball) is where the first
  restart starts."""
  step = max(epsilon / 4.0, 1e-4)
  adv = pgd(tf.constant(x[None]), tf.constant([int(y)]), epsilon,
            tf.constant(steps), step, restarts, clip, tf.constant([seed, 1]),
            None if start is None else tf.constant(start[None], tf.float32))
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
    #: Output-pass slopes {ReLU node: [1, m, *shape]} that every domain starts
    #: from (the root's optimised ones, once set; any slopes are sound).
    self.slopes = None
    #: The optimised slopes of the last call (with alpha_steps > 0).
    self.last_slopes = None

  def __call__(self, lo: np.ndarray, hi: np.ndarray, splits: dict[int, np.ndarray],
               pre: dict | None = None):
    """lo, hi [D, n_in] boxes; splits {z: [D, n_z]}; pre {z: (lower, upper)
    [D, n_z]} the domains' ReLU input bounds if known (a parent's bounds hold on
    its children), else CROWN computes them -> worst margin [D], ReLU input bounds
    (as tightened here), and per domain the point of its box that attains the
    worst margin's linear bound [D, *input_shape] (a candidate counterexample)."""
    d = len(lo)
    shape = (d,) + self.graph.input_shape
    box = IntervalBounds(tf.constant(lo.reshape(shape), tf.float32),
                         tf.constant(hi.reshape(shape), tf.float32))
    shapes = {z: (d,) + self.graph.nodes[z].op.out_shape for z in splits}
    sp = {z: tf.reshape(tf.constant(s, tf.float32), shapes[z])
          for z, s in splits.items()}
    if pre is None:
      bounds = crown.pre_activation_bounds(self.graph, box, "crown", sp,
                                           self.alpha_steps)
    else:
      bounds = {z: crown._apply_split(IntervalBounds(
          tf.reshape(tf.constant(l, tf.float32), shapes[z]),
          tf.reshape(tf.constant(u, tf.float32), shapes[z])), sp[z])
                for z, (l, u) in pre.items()}
    spec = tf.repeat(self.spec, d, 0)
    rows = tf.reshape(spec, tf.concat([tf.shape(spec)[:2], self.graph.output_shape],
                                      0))
    record = {}
    slopes = None if self.slopes is None else {
        i: tf.repeat(a, d, axis=0) for i, a in self.slopes.items()}
    ub = crown.backward_upper(self.graph, self.graph.output, rows, bounds, box,
                              slopes, record=record)
    if self.alpha_steps:
      ub, self.last_slopes = crown._optimise_slopes(
          self.graph, self.graph.output, rows, bounds, box, self.alpha_steps, sp,
          init_slopes=slopes)
    ub = ub.numpy()
    ub[:, self.y] = -np.inf
    worst = np.argmax(ub, axis=1)
    # What each neuron's relaxation costs the worst margin's CROWN bound.
    scores = {z: ops.flat(tf.gather(record[z], worst, axis=1, batch_dims=1)).numpy()
              for z in self.relu_inputs}
    a0 = tf.gather(record["input"], worst, axis=1, batch_dims=1)
    points = tf.where(a0 > 0, box.upper, tf.where(a0 < 0, box.lower, box.center))
    points = points.numpy()
    return ub.max(axis=1), {z: (ops.flat(bounds[z].lower).numpy(),
                                ops.flat(bounds[z].upper).numpy(), scores[z])
                            for z in self.relu_inputs}, points


def _branch(splits_row: dict, bounds_row: dict):
  """(layer, neuron) to split: among the unsplit unstable neurons, the one whose
  upper-line intercept adds most to the worst margin's CROWN bound (BaBSR's
  intercept score), else the widest relaxation (largest u * -l / (u - l)); None
  if no unstable neuron is left. bounds_row {z: (lower, upper, score)}."""
  best, where = (0.0, 0.0), None
  for z, (lo, up, score) in bounds_row.items():
    open_ = (splits_row[z] == 0) & (lo < 0) & (up > 0)
    if not open_.any():
      continue
    gap = np.where(open_, up * -lo / np.where(open_, up - lo, 1.0), -1.0)
    key = np.where(open_, score, -1.0)
    k = int(np.lexsort((gap, key))[-1])  # largest score, then widest gap
    if (key[k], gap[k]) > best:
      best, where = (float(key[k]), float(gap[k])), (z, k)
  return where


def _stack(domains: list[dict], sizes: dict):
  """(lo, hi, splits, pre) of a batch of domains; pre is None unless every domain
  carries its ReLU input bounds."""
  pre = None
  if all("pre" in d for d in domains):
    pre = {z: (np.stack([d["pre"][z][0] for d in domains]),
               np.stack([d["pre"][z][1] for d in domains])) for z in sizes}
  return (np.stack([d["lo"] for d in domains]), np.stack([d["hi"] for d in domains]),
          {z: np.stack([d[z] for d in domains]) for z in sizes}, pre)


def _bisect(domain: dict) -> list[dict]:
  """The two halves of the domain's input box along its widest side."""
  k = int(np.argmax(domain["hi"] - domain["lo"]))
  mid = (domain["lo"][k] + domain["hi"][k]) / 2
  left, right = dict(domain), dict(domain)
  left["hi"], right["lo"] = domain["hi"].copy(), domain["lo"].copy()
  left["hi"][k] = right["lo"][k] = mid
  return [left, right]


def verify_example(model, x, y, epsilon, clip=(0.0, 1.0), time_limit: float = 30.0,
                   max_domains: int = 100_000, batch: int = 64,
                   alpha_steps: int = DOMAIN_ALPHA_STEPS,
                   root_alpha_steps: int | None = None,
                   attack_restarts: int = 5, attack_steps: int = 100,
                   seed: int = 0, pgd=None) -> Result:
  """Branch and bound for one example x [*input_shape] with label y.

  The whole ball is first bounded by alpha-CROWN (`root_alpha_steps`, default
  `crown.DEFAULT_ALPHA_STEPS`); split domains by alpha- and beta-CROWN with
  `alpha_steps` (0: plain CROWN, the fastest per domain). `pgd`: the model's
  `compiled_attack`, built here when not given (pass one to share its trace
  across examples)."""
  start = time.perf_counter()
  x = np.asarray(x, np.float32)
  pgd = compiled_attack(model) if pgd is None else pgd
  adv = _attack(pgd, model, x, y, epsilon, clip, attack_restarts, attack_steps, seed)
  if adv is not None:
    return Result("falsified", adv, 0, time.perf_counter() - start)
  attacker = _Attacker(pgd, model, x, y, epsilon, clip, attack_restarts,
                       attack_steps, seed, time.perf_counter() - start)
  bounder = _Bounder(model, x, y, epsilon, clip, alpha_steps)
  sizes = {z: int(np.prod(bounder.graph.nodes[z].op.out_shape))
           for z in bounder.relu_inputs}
  root = {"lo": bounder.lo, "hi": bounder.hi,
          **{z: np.zeros(n, np.int8) for z, n in sizes.items()}}
  root_steps = crown.DEFAULT_ALPHA_STEPS if root_alpha_steps is None else (
      root_alpha_steps)
  split_input = bounder.lo.size <= INPUT_SPLIT_DIMS
  todo, seen = [root], 0
  if root_steps:
    root_bounder = _Bounder(model, x, y, epsilon, clip, root_steps)
    worst, pre, points = root_bounder(*_stack([root], sizes))
    if worst[0] < 0:
      return Result("verified", None, 1, time.perf_counter() - start)
    adv = attacker.check(points[worst >= 0])
    if adv is not None:
      return Result("falsified", adv, 1, time.perf_counter() - start)
    bounder.slopes = root_bounder.last_slopes  # domains start from them
    seen = 1
    if not split_input:
      todo = _children(root, {z: tuple(b[0] for b in v) for z, v in pre.items()})
      if todo is None:
        return Result("unknown", None, seen, time.perf_counter() - start)
  while todo:
    if time.perf_counter() - start > time_limit or seen >= max_domains:
      return Result("unknown", None, seen, time.perf_counter() - start)
    chunk, todo = todo[:batch], todo[batch:]
    seen += len(chunk)
    worst, pre, points = bounder(*_stack(chunk, sizes))
    adv = attacker.check(points[worst >= 0])
    if adv is None:
      adv = attacker.maybe_attack()
    if adv is not None:
      return Result("falsified", adv, seen, time.perf_counter() - start)
    for i, domain in enumerate(chunk):
      if worst[i] < 0:
        continue  # proven on this domain
      if split_input:
        todo.extend(_bisect(domain))
        continue
      children = _children(domain, {z: tuple(b[i] for b in v) for z, v in pre.items()})
      if children is None:  # nothing left to split
        return Result("unknown", None, seen, time.perf_counter() - start)
      todo.extend(children)
  return Result("verified", None, seen, time.perf_counter() - start)


class _Attacker:
  """Counterexamples found while branching: the points that attain open domains'
  bounds are checked by a forward pass (the most violating one is kept), and PGD
  runs again with a new seed, from that point, whenever branch and bound has had
  four times the last attack's seconds since it: the first attack's 5 restarts
  missed counterexamples that other seeds find (2 of the 5 examples of the
  authors' first 200 left unknown at eps 0.3)."""

  def __init__(self, pgd, model, x, y, epsilon, clip, restarts, steps, seed, spent):
    self.pgd = pgd
    self.model, self.x, self.y, self.epsilon, self.clip = model, x, y, epsilon, clip
    self.restarts, self.steps, self.seed = restarts, steps, seed
    self.best, self.best_margin = None, -np.inf
    self.last = spent
    self.since = time.perf_counter()

  def check(self, points: np.ndarray):
    """A misclassified point of `points` [P, *input_shape], or None."""
    if not len(points):
      return None
    margins = attacks.margin_loss(self.model(points, training=False),
                                   tf.fill([len(points)], int(self.y))).numpy()
    k = int(np.argmax(margins))
    if margins[k] > self.best_margin:
      self.best, self.best_margin = points[k], float(margins[k])
    return points[k] if margins[k] > 0 else None

  def maybe_attack(self):
    """PGD from the most violating point seen, when it is due; a confirmed
    counterexample or None."""
    if time.perf_counter() - self.since < 4 * self.last:
      return None
    self.seed += 1
    t = time.perf_counter()
    adv = _attack(self.pgd, self.model, self.x, self.y, self.epsilon, self.clip,
                  self.restarts, self.steps, self.seed, self.best)
    self.since = time.perf_counter()
    self.last = self.since - t
    return adv


def _children(domain: dict, bounds: dict) -> list[dict] | None:
  """The two subdomains of a ReLU split ("pre-activation >= 0" and "<= 0") of the
  widest unstable relaxation, each carrying the parent's ReLU input bounds (valid
  on them, and tightened by the split where they are bounded); None when no
  unstable ReLU is left."""
  where = _branch(domain, bounds)
  if where is None:
    return None
  z, k = where
  out = []
  for sign in (1, -1):
    child = {key: v.copy() for key, v in domain.items() if key != "pre"}
    child[z][k] = sign
    child["pre"] = {z: (lo, up) for z, (lo, up, _) in bounds.items()}
    out.append(child)
  return out


def verify(model, x, y, epsilon, clip_min: float = 0.0, clip_max: float = 1.0,
           time_limit: float = 30.0, **kwargs) -> list[Result]:
  """`verify_example` for every example of x [N, ...], y [N] (checked ball)."""
  api.check_ball(np.asarray(x), epsilon, clip_min, clip_max)
  kwargs.setdefault("pgd", compiled_attack(model))
  return [verify_example(model, xi, yi, epsilon, (clip_min, clip_max), time_limit,
                         **kwargs) for xi, yi in zip(np.asarray(x), np.asarray(y))]
