"""Test-set metrics of a network: clean, attacked and verified accuracy."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import keras
import tensorflow as tf

from mixtrain_tf import api, attacks, bab, bound_layer

ATTACKS = ("pgd", "interval")


class EvaluationError(RuntimeError):
  """Evaluation stopped or found a bug; `partial_result` holds what was measured."""

  def __init__(self, message: str, partial_result: dict):
    super().__init__(message)
    self.partial_result = partial_result


def _progress(total: int | None, verbose: bool):
  return keras.utils.Progbar(total, unit_name="example") if verbose else None


def evaluate(network: keras.Model, dataset: Iterable, epsilon: float,
             methods: tuple[str, ...] = ("interval", "symbolic"),
             attack_names: tuple[str, ...] = ("pgd",), pgd_steps: int = 40,
             pgd_step_size: float = 0.01, pgd_restarts: int = 1,
             num_examples: int | None = None, verbose: bool = True,
             predict_fn: Callable | None = None,
             margins_fn: Callable | None = None, seed: int = 0,
             alpha_steps: int | None = None, bab_time_limit: float = 30.0,
             jit_compile: bool = False,
             memory_budget_mb: int | None = None) -> dict:
  """Clean accuracy, accuracy under each attack and verified accuracy per method.

  Args:
    network: a Keras model (images -> logits) of supported layers, or None when
      `predict_fn` and `margins_fn` are given (e.g. a SavedModel's signatures).
    dataset: batches of (images in [0, 1], labels).
    epsilon: L-inf radius.
    methods: bound methods for verified accuracy (`api.METHODS`), or "bab":
      complete verification by branch and bound (`mixtrain_tf.bab`), whose leaf
      also counts "falsified" and "unknown" (time limit `bab_time_limit` seconds
      per example). It runs after the other methods and only on the examples they
      left: one that another method proved counts as verified, one misclassified
      or broken by an attack as falsified. With two methods or more,
      "verified_any" counts the examples proved by at least one.
    attack_names: attacks for attacked accuracy: "pgd" and/or "interval"
      (docs/method.md 5; needs `network`). Both use pgd_steps, pgd_step_size and
      pgd_restarts.
    num_examples: stop after this many examples.
    predict_fn: optional images -> logits replacing `network`.
    margins_fn: optional (images, labels, epsilon, method) -> margin upper bounds,
      e.g. a SavedModel's `margins` signature.
    jit_compile: compile the bound methods' margins with XLA (which drops assert
      ops: a refused ball then has NaN bounds, which are never verified).
    memory_budget_mb: peak memory of one bound call: each batch is bounded in
      slices that fit (`api.per_sample_bytes`, a worst-case estimate); None takes
      `api.DEFAULT_MEMORY_BUDGET_MB`. Not applied to `margins_fn`.

  Returns:
    {"examples", "epsilon", "clean": {...}, "attacks": {name: {...}},
     "verified": {method: {...}}, "verified_any": {...}}, each leaf with
    accuracy, count and seconds.
    Raises RuntimeError if verified <= attacked <= clean is violated (a bug).
  """
  _check_names(network, methods, attack_names)
  predict, attack_fns, margin_fns = _functions(
      network, epsilon, methods, attack_names, predict_fn, margins_fn,
      dict(steps=pgd_steps, step_size=pgd_step_size, restarts=pgd_restarts,
           seed=tf.constant([seed, 0], tf.int32)), alpha_steps, bab_time_limit,
      jit_compile, memory_budget_mb)
  counts = {"clean": 0, **{f"attack/{a}": 0 for a in attack_names},
            **{f"verified/{m}": 0 for m in methods}}
  if len(methods) > 1:
    counts["verified/any"] = 0
  if "bab" in methods:
    counts.update({"bab/falsified": 0, "bab/unknown": 0})
  seconds = dict.fromkeys(counts, 0.0)
  total = 0
  bar = _progress(num_examples, verbose)
  try:
    for x, y in _limited(dataset, num_examples):
      _count_batch(x, y, predict, attack_fns, margin_fns, counts, seconds)
      total += int(x.shape[0])
      if bar:
        bar.update(total)
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise EvaluationError(
        f"evaluation stopped after {total} examples: {reason}",
        _result(counts, seconds, total, epsilon, attack_names, methods,
                complete=False)) from e
  result = _result(counts, seconds, total, epsilon, attack_names, methods)
  _check_invariant(counts, total, attack_names, methods, result)
  return result


def _functions(network, epsilon, methods, attack_names, predict_fn, margins_fn,
               pgd: dict, alpha_steps: int | None, bab_time_limit: float,
               jit_compile: bool = False, memory_budget_mb: int | None = None):
  """The compiled prediction, attack and margin functions of one evaluation."""
  predict = predict_fn or tf.function(lambda x: network(x, training=False))
  attack_fns = {
      "pgd": lambda: tf.function(lambda x, y: attacks.pgd(
          predict, x, y, epsilon, pgd["steps"], pgd["step_size"], pgd["restarts"],
          seed=pgd["seed"])),
      "interval": lambda: tf.function(lambda x, y: attacks.interval_attack(
          network, x, y, float(epsilon), pgd["steps"], pgd["step_size"],
          pgd["restarts"], seed=pgd["seed"])),
  }
  attack_fns = {a: attack_fns[a]() for a in attack_names}
  if margins_fn is None:
    layers = {m: bound_layer.BoundLayer(network, m)
              for m in methods if m not in ("bab", "alpha_crown")}
    # A batch is bounded in slices that fit the memory budget: the CROWN family
    # holds a row per neuron, and a whole batch of them can exhaust the machine.
    margin_fns = {m: _sliced(tf.function(
        lambda x, y, m=m: layers[m](x, epsilon, y)["margin_upper"],
        jit_compile=jit_compile, reduce_retracing=True), network, m,
        memory_budget_mb) for m in layers}
    if "alpha_crown" in methods:
      # Eager: its steps are tf.functions already (crown._slope_gradient), and
      # tracing the unrolled optimisation cost more than running it.
      # margin_upper_bounds runs CROWN on the batch, then alpha-CROWN on the
      # examples left open, each in slices of its own memory size.
      margin_fns["alpha_crown"] = lambda x, y: api.margin_upper_bounds(
          network, x, y, epsilon, "alpha_crown", alpha_steps=alpha_steps,
          memory_budget_mb=memory_budget_mb)
    if "bab" in methods:
      margin_fns["bab"] = _bab_verdicts(network, epsilon, bab_time_limit)
  else:
    margin_fns = {m: (lambda x, y, m=m: margins_fn(x, y, epsilon, m)) for m in methods}
  return predict, attack_fns, margin_fns


def _sliced(margins, network, method, memory_budget_mb):
  def run(x, y):
    return api.chunked(lambda xc, yc: (margins(xc, yc),), network, method,
                       memory_budget_mb, x, y)[0]
  return run


def _check_invariant(counts, total, attack_names, methods, result) -> None:
  """verified <= attacked <= clean, or a bound is unsound."""
  ceiling = min([counts["clean"]] + [counts[f"attack/{a}"] for a in attack_names])
  for m in list(methods) + (["any"] if len(methods) > 1 else []):
    if counts[f"verified/{m}"] > ceiling:
      raise EvaluationError(
          f"verified accuracy ({m}: {counts[f'verified/{m}']}) exceeds attacked or "
          f"clean accuracy ({ceiling}) on {total} examples: a bound is unsound.",
          result)


def _bab_verdicts(network, epsilon, time_limit):
  """Branch and bound as a verdict function: returns the bab.Result list; an
  example misclassified at x is its own counterexample ("falsified")."""
  pgd = bab.compiled_attack(network)  # one trace for every example

  def run(x, y, known):
    """known[i]: "verified" or "falsified" when decided before branch and bound
    (another method's proof, a misclassified x, an attack's counterexample),
    else None."""
    out = []
    for xi, yi, k in zip(x.numpy(), y.numpy(), known):
      out.append(bab.Result(k, None) if k else bab.verify_example(
          network, xi, yi, float(epsilon), time_limit=time_limit, pgd=pgd))
    return out
  run.is_bab = True
  return run


def _check_names(network, methods, attack_names) -> None:
  for m in methods:
    if m == "bab":
      if network is None:
        raise ValueError("branch and bound (bab) needs the network's layers.")
      continue
    api.BoundMethod(m)
  for a in attack_names:
    if a not in ATTACKS:
      raise ValueError(f"unknown attack {a!r}; choose from {ATTACKS}.")
    if a == "interval" and network is None:
      raise ValueError("the interval attack needs the network's layers (a Keras "
                       "model), not only its signatures.")


def _limited(dataset: Iterable, num_examples: int | None):
  """(float32 images, int32 labels) batches, cut after num_examples."""
  total = 0
  for x, y in dataset:
    if num_examples is not None and total >= num_examples:
      return
    if num_examples is not None:
      x, y = x[: num_examples - total], y[: num_examples - total]
    total += int(x.shape[0])
    yield tf.cast(x, tf.float32), tf.cast(y, tf.int32)


def _count_batch(x, y, predict, attack_fns, margin_fns, counts, seconds) -> None:
  """Adds one batch's counts and seconds; counts change only if all of it ran."""
  step = {}
  t = time.perf_counter()
  correct = tf.equal(tf.argmax(predict(x), 1, tf.int32), y)
  seconds["clean"] += time.perf_counter() - t
  step["clean"] = correct
  for a, attack in attack_fns.items():
    t = time.perf_counter()
    x_adv = attack(x, y)
    still = tf.equal(tf.argmax(predict(x_adv), 1, tf.int32), y)
    seconds[f"attack/{a}"] += time.perf_counter() - t
    step[f"attack/{a}"] = tf.logical_and(correct, still)
  # Branch and bound runs last, only where nothing else decided: an example that
  # a bound method proved is verified, one that an attack broke is falsified.
  proved = tf.zeros_like(correct)
  unbroken = correct
  for a in attack_fns:
    unbroken = tf.logical_and(unbroken, step[f"attack/{a}"])
  for m, margins in sorted(margin_fns.items(),
                           key=lambda item: getattr(item[1], "is_bab", False)):
    t = time.perf_counter()
    if getattr(margins, "is_bab", False):
      known = ["verified" if p else "falsified" if not u else None
               for p, u in zip(proved.numpy(), unbroken.numpy())]
      results = margins(x, y, known)
      ok = tf.constant([r.status == "verified" for r in results])
      for status in ("falsified", "unknown"):
        step[f"bab/{status}"] = tf.constant([r.status == status for r in results])
    else:
      ok = tf.logical_and(correct, api.is_verified(margins(x, y), y))
    seconds[f"verified/{m}"] += time.perf_counter() - t
    step[f"verified/{m}"] = ok
    proved = tf.logical_or(proved, ok)
  if "verified/any" in counts:
    step["verified/any"] = proved
  for key, ok in step.items():
    counts[key] += int(tf.reduce_sum(tf.cast(ok, tf.int32)))


def _result(counts, seconds, total, epsilon, attack_names, methods,
            complete=True) -> dict:
  def leaf(key):
    return {"accuracy": counts[key] / max(1, total), "count": counts[key],
            "seconds": round(seconds[key], 3)}
  out = {"examples": total, "epsilon": float(epsilon), "clean": leaf("clean"),
         "attacks": {a: leaf(f"attack/{a}") for a in attack_names},
         "verified": {m: leaf(f"verified/{m}") for m in methods}}
  if len(methods) > 1:
    # Proved by at least one method: each proof is sound, so their union is.
    out["verified_any"] = leaf("verified/any")
  if "bab" in methods:  # complete verification: every correct point is one of 3
    out["verified"]["bab"].update(falsified=counts["bab/falsified"],
                                  unknown=counts["bab/unknown"])
  if not complete:
    out["complete"] = False
  return out
