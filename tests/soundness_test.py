"""Soundness of the bound API (docs/method.md 2): every output (and margin) the
network reaches in the box lies inside its bounds, for sampled points, other clip
ranges, all box corners and PGD's strongest margins; the float64 reference is sound
itself; the six networks of docs/method.md 6 bound their outputs.

Tolerances are for float32 rounding only: zoo.RTOL relative to the bound scale.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import reference  # tests/reference.py (conftest puts tests/ on sys.path)
import tensorflow as tf
import zoo

import mixtrain_tf
from mixtrain_tf import networks, ops
from mixtrain_tf.graph import bound_graph


@pytest.mark.parametrize("method", zoo.METHODS)
@pytest.mark.parametrize("net", sorted(zoo.RANDOM_NETS))
def test_sampled_outputs_inside_bounds(net, method):
  model = zoo.RANDOM_NETS[net]()
  rng = np.random.default_rng(10)
  for trial in range(2):
    eps = float(rng.uniform(0.02, 0.4))
    x = zoo.inputs(model, 3, seed=trial)
    lower, upper = mixtrain_tf.compute_bounds(model, x, eps, method=method)
    points = zoo.samples(*zoo.box(x, eps), 2000, seed=trial)
    zoo.assert_inside(zoo.logits_at(model, points), lower, upper,
                   what=f"{net} logits at eps {eps:.3f}")


@pytest.mark.parametrize("method", zoo.METHODS)
@pytest.mark.parametrize("net, lo, hi", [("conv", -1.0, 1.0), ("config", -2.0, 3.0),
                                         ("norm", 0.2, 0.7), ("residual", -0.5, 0.5)])
def test_bounds_sound_with_other_clip_range(net, lo, hi, method):
  model = zoo.RANDOM_NETS[net]()
  shape = bound_graph(model).input_shape
  x = np.random.default_rng(3).uniform(lo, hi, (3,) + shape).astype(np.float32)
  eps = 0.15 * (hi - lo)
  lower, upper = mixtrain_tf.compute_bounds(model, x, eps, method=method,
                                            clip_min=lo, clip_max=hi)
  points = zoo.samples(*zoo.box(x, eps, lo, hi), 2000, seed=1)
  zoo.assert_inside(zoo.logits_at(model, points), lower, upper,
                    what=f"{net} [{lo}, {hi}]")
  y = np.argmax(model.predict(x, verbose=0), 1)
  ub = mixtrain_tf.margin_upper_bounds(model, x, y, eps, method=method, clip_min=lo,
                                       clip_max=hi).numpy()
  zoo.assert_inside(zoo.margins(zoo.logits_at(model, points), y), None, ub,
                 what=f"{net} margins [{lo}, {hi}]")


@pytest.mark.parametrize("method", zoo.METHODS)
@pytest.mark.parametrize("net", ["corner", "dense", "config_corner"])
def test_all_box_corners_inside_bounds(net, method):
  model = zoo.RANDOM_NETS[net]()
  x = zoo.inputs(model, 4, seed=7)
  x[0] = 0.0  # the box of example 0 is clipped on every side
  eps = 0.35
  lo, hi = zoo.box(x, eps)
  d = int(np.prod(x.shape[1:]))
  bits = np.array(list(itertools.product([0.0, 1.0], repeat=d)), np.float32)  # [2^d, d]
  flat_lo, flat_hi = lo.reshape(len(x), 1, d), hi.reshape(len(x), 1, d)
  corners = (flat_lo + bits[None] * (flat_hi - flat_lo)).reshape(
      (len(x), len(bits)) + x.shape[1:])
  lower, upper = mixtrain_tf.compute_bounds(model, x, eps, method=method)
  zoo.assert_inside(zoo.logits_at(model, corners), lower, upper, what=f"{net} corners")
  y = np.arange(len(x)) % lower.shape[1]
  ub = mixtrain_tf.margin_upper_bounds(model, x, y, eps, method=method).numpy()
  margins = zoo.margins(zoo.logits_at(model, corners), y)
  zoo.assert_inside(margins, None, ub, what=f"{net} corner margins")


def _pgd_margins(model, x, y, eps, steps=60, restarts=2, seed=0):
  """Max of z_j - z_y found by signed gradient ascent in the clipped box, [B, classes].

  Every (example, class j) pair runs its own ascent from a random start.
  """
  rng = np.random.default_rng(seed)
  lo, hi = zoo.box(x, eps)
  n_out = zoo.n_out(model)
  def rep(t):
    return np.repeat(t, n_out, axis=0)
  lo_r, hi_r = tf.constant(rep(lo)), tf.constant(rep(hi))
  sel = tf.constant(np.tile(np.eye(n_out, dtype=np.float32), (len(x), 1)))
  y_hot = tf.one_hot(rep(y), n_out)
  step = (hi_r - lo_r) / 8.0
  best = np.full((len(x) * n_out,), -np.inf)
  for _ in range(restarts):
    z = tf.Variable(rep(lo) + rng.uniform(0, 1, rep(lo).shape).astype(np.float32)
                    * (rep(hi) - rep(lo)))
    for _ in range(steps):
      with tf.GradientTape() as tape:
        out = model(z)
        objective = tf.reduce_sum(out * sel, 1) - tf.reduce_sum(out * y_hot, 1)
      best = np.maximum(best, objective.numpy())
      z.assign(tf.clip_by_value(z + step * tf.sign(tape.gradient(objective, z)),
                                lo_r, hi_r))
    out = model(z)
    best = np.maximum(best, (tf.reduce_sum(out * sel, 1)
                             - tf.reduce_sum(out * y_hot, 1)).numpy())
  return best.reshape(len(x), n_out)


@pytest.mark.parametrize("net", sorted(zoo.RANDOM_NETS))
def test_pgd_margins_below_margin_upper_bounds(net):
  model = zoo.RANDOM_NETS[net]()
  x = zoo.inputs(model, 3, seed=11)
  eps = 0.15
  y = np.argmax(model.predict(x, verbose=0), 1)
  found = _pgd_margins(model, x, y, eps)
  assert np.all(found[np.arange(3), y] == 0)
  for method in zoo.METHODS:
    ub = mixtrain_tf.margin_upper_bounds(model, x, y, eps, method=method).numpy()
    np.testing.assert_array_equal(ub[np.arange(3), y], 0.0)
    zoo.assert_inside(found[:, None], None, ub,
                   what=f"{net} PGD margins ({method})")


def _float64_outputs(model, points):
  """The network in numpy float64 on [B, n, *s] points, from the same dense
  matrices as the reference. [B, n, classes]."""
  graph = bound_graph(model)
  values = [points.reshape(points.shape[:2] + (-1,)).astype(np.float64)]
  for node in graph.nodes[1:]:
    op = node.op
    if isinstance(op, ops.ReluOp):
      values.append(np.maximum(values[node.inputs[0]], 0.0))
    elif isinstance(op, ops.AddOp):
      values.append(sum(values[j] for j in node.inputs))
    else:
      m, b = reference.affine_matrix(op)
      values.append(values[node.inputs[0]] @ m + b)
  return values[-1]


@pytest.mark.parametrize("net", sorted(zoo.RANDOM_NETS))
def test_float64_reference_is_sound(net):
  model = zoo.RANDOM_NETS[net]()
  x = zoo.inputs(model, 2, seed=21)
  eps = 0.2
  lo, hi = zoo.box(x, eps)
  ref_lower, ref_upper = reference.symbolic_reference(model, lo, hi)
  points = zoo.samples(lo, hi, 3000, seed=5).astype(np.float64)
  out = _float64_outputs(model, points)
  # The float64 network agrees with the Keras model (same weights) ...
  np.testing.assert_allclose(out[:, :50], zoo.logits_at(model, points[:, :50]),
                             rtol=1e-4, atol=1e-4)
  # ... and its outputs stay inside the float64 bounds up to float64 rounding.
  zoo.assert_inside(out, ref_lower, ref_upper, rtol=1e-12,
                    what=f"{net} float64 outputs")



# -- the six networks --------------------------------------------------------------


@pytest.mark.parametrize("name", networks.NAMES)
def test_six_networks_bound_their_outputs(name):
  model = networks.build(name)
  small = name.endswith("small")
  x = zoo.inputs(model, 2 if small else 1, seed=91)
  logits = model.predict(x, verbose=0)
  y = np.argmax(logits, 1)
  eps = 1 / 255
  for method in zoo.METHODS:
    lower, upper = mixtrain_tf.compute_bounds(model, x, eps, method=method)
    assert lower.shape == logits.shape == upper.shape
    assert np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))
    zoo.assert_inside(logits[:, None], lower, upper, what=f"{name} logits ({method})")
    if small:  # margins of the big networks cost a second symbolic pass
      ub = mixtrain_tf.margin_upper_bounds(model, x, y, eps, method=method).numpy()
      zoo.assert_inside(zoo.margins(logits, y)[:, None], None, ub,
                     what=f"{name} margins ({method})")

