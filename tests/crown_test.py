"""CROWN, CROWN-IBP and alpha-CROWN: sound on sampled points and box corners, equal
to an independent float64 reference, exact where they must be, and as tight as
the method says on a real trained model."""

from __future__ import annotations

import itertools
import pathlib
import sys

import keras
import numpy as np
import pytest
import reference
import tensorflow as tf
import zoo

import mixtrain_tf
from mixtrain_tf import api, attacks, crown, interval, networks, patches
from mixtrain_tf.bounds import IntervalBounds
from mixtrain_tf.graph import bound_graph

CROWN = ("crown", "crown_ibp", "alpha_crown")


@pytest.mark.parametrize("method", CROWN)
@pytest.mark.parametrize("net", sorted(zoo.RANDOM_NETS))
def test_sampled_outputs_and_margins_inside_bounds(net, method):
  model = zoo.RANDOM_NETS[net]()
  eps = 0.15
  x = zoo.inputs(model, 2, seed=3)
  lower, upper = mixtrain_tf.compute_bounds(model, x, eps, method=method,
                                            alpha_steps=5)
  points = zoo.samples(*zoo.box(x, eps), 1500, seed=4)
  logits = zoo.logits_at(model, points)
  zoo.assert_inside(logits, lower, upper, what=f"{net} logits ({method})")
  y = np.arange(2) % zoo.n_out(model)
  ub = mixtrain_tf.margin_upper_bounds(model, x, y, eps, method, alpha_steps=5)
  zoo.assert_inside(zoo.margins(logits, y), None, ub, what=f"{net} margins")


@pytest.mark.parametrize("method", CROWN)
@pytest.mark.parametrize("net", ["corner", "config_corner"])
def test_all_box_corners_inside_bounds(net, method):
  model = zoo.RANDOM_NETS[net]()
  x = zoo.inputs(model, 3, seed=7)
  eps = 0.3
  lo, hi = zoo.box(x, eps)
  d = int(np.prod(x.shape[1:]))
  bits = np.array(list(itertools.product([0.0, 1.0], repeat=d)), np.float32)
  flat_lo, flat_hi = lo.reshape(len(x), 1, d), hi.reshape(len(x), 1, d)
  corners = (flat_lo + bits[None] * (flat_hi - flat_lo)).reshape(
      (len(x), len(bits)) + x.shape[1:])
  lower, upper = mixtrain_tf.compute_bounds(model, x, eps, method, alpha_steps=5)
  zoo.assert_inside(zoo.logits_at(model, corners), lower, upper,
                    what=f"{net} corners ({method})")


@pytest.mark.parametrize("method", ["crown", "crown_ibp"])
@pytest.mark.parametrize("net", sorted(zoo.RANDOM_NETS))
def test_agrees_with_the_float64_reference(net, method):
  model = zoo.RANDOM_NETS[net]()
  x = zoo.inputs(model, 2, seed=51)
  n = zoo.n_out(model)
  y = np.arange(2) % n
  for eps in (0.02, 0.2):
    lo, hi = zoo.box(x, eps)
    ref_l, ref_u = reference.crown_reference(model, lo, hi, method=method)
    lower, upper = mixtrain_tf.compute_bounds(model, x, eps, method)
    tol = zoo.RTOL * zoo.scale(ref_l, ref_u)
    zoo.assert_close(lower, ref_l, tol)
    zoo.assert_close(upper, ref_u, tol)
    spec = api.margin_spec(y, n).numpy()
    _, ref_m = reference.crown_reference(model, lo, hi, spec, method=method)
    ub = mixtrain_tf.margin_upper_bounds(model, x, y, eps, method)
    zoo.assert_close(ub, ref_m, zoo.RTOL * zoo.scale(ref_m))


@pytest.mark.parametrize("method", CROWN)
@pytest.mark.parametrize("net", ["dense", "residual", "norm"])
def test_zero_width_box_gives_the_logits(net, method):
  model = zoo.RANDOM_NETS[net]()
  x = zoo.inputs(model, 3, seed=31)
  logits = model.predict(x, verbose=0)
  lower, upper = mixtrain_tf.compute_bounds(model, x, 0.0, method, alpha_steps=3)
  tol = zoo.RTOL * zoo.scale(logits)
  zoo.assert_close(lower, logits, tol)
  zoo.assert_close(upper, logits, tol)


@pytest.mark.parametrize("net", ["dense", "conv", "residual", "config"])
def test_alpha_crown_is_never_looser_than_crown(net):
  model = zoo.RANDOM_NETS[net]()
  x = zoo.inputs(model, 3, seed=9)
  y = np.arange(3) % zoo.n_out(model)
  c = mixtrain_tf.margin_upper_bounds(model, x, y, 0.1, "crown").numpy()
  a = mixtrain_tf.margin_upper_bounds(model, x, y, 0.1, "alpha_crown",
                                      alpha_steps=10).numpy()
  zero = mixtrain_tf.margin_upper_bounds(model, x, y, 0.1, "alpha_crown",
                                         alpha_steps=0).numpy()
  assert np.all(a <= c + 1e-6 * np.maximum(1, np.abs(c)))
  np.testing.assert_allclose(zero, c, rtol=1e-6, atol=1e-6)


def test_margins_optimise_exactly_the_examples_crown_leaves_open():
  # ball_margins runs alpha-CROWN only on examples that CROWN does not verify and
  # whose centre is classified y; the others keep CROWN's bounds.
  model = zoo.mlp(24, (32, 32), 4, 0)
  x = np.random.default_rng(0).uniform(0.2, 0.8, (16, 24)).astype(np.float32)
  y = np.argmax(model.predict(x, verbose=0), 1)
  y[:3] = (y[:3] + 1) % 4  # misclassified centres: no bound can verify them
  lo, hi = api.input_box(x, 0.04)
  full = crown.bounds(bound_graph(model), lo, hi, api.margin_spec(y, 4),
                      "alpha_crown", alpha_steps=5, upper_only=True).upper.numpy()
  skip = mixtrain_tf.margin_upper_bounds(model, x, y, 0.04, "alpha_crown",
                                         alpha_steps=5).numpy()
  c = mixtrain_tf.margin_upper_bounds(model, x, y, 0.04, "crown").numpy()
  proved = api.is_verified(c, y).numpy()
  open_ = ~proved & (np.arange(16) >= 3)
  assert proved.sum() >= 3 and open_.sum() >= 3, (proved, open_)
  np.testing.assert_allclose(skip[open_], full[open_], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(skip[~open_], c[~open_], rtol=1e-5, atol=1e-5)
  assert np.all(full <= c + 1e-5) and np.any(full[open_] < c[open_] - 1e-3)


def test_alpha_crown_optimises_inside_tf_function():
  model = zoo.RANDOM_NETS["conv"]()
  x = zoo.inputs(model, 2, seed=1)
  y = np.array([0, 1])
  fn = tf.function(lambda x, y: api.ball_margins(model, x, y, 0.1, "alpha_crown",
                                                 alpha_steps=4))
  np.testing.assert_allclose(
      fn(tf.constant(x), tf.constant(y)),
      mixtrain_tf.margin_upper_bounds(model, x, y, 0.1, "alpha_crown",
                                      alpha_steps=4), rtol=1e-5, atol=1e-5)


def test_crown_ibp_training_gradients_reach_the_weights():
  model = zoo.RANDOM_NETS["conv"]()
  x = tf.constant(zoo.inputs(model, 2, seed=1))
  with tf.GradientTape() as tape:
    ub = api.ball_margins(model, x, tf.constant([0, 1]), 0.1, "crown_ibp")
    loss = tf.reduce_sum(ub)
  grads = tape.gradient(loss, model.trainable_variables)
  assert all(g is not None for g in grads)
  assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)


def test_memory_estimate_covers_every_crown_method():
  model = zoo.RANDOM_NETS["residual"]()
  sizes = {m: api.per_sample_bytes(model, m) for m in CROWN}
  assert sizes["crown_ibp"] <= sizes["crown"] <= sizes["alpha_crown"]
  assert crown.per_sample_values(bound_graph(model), "crown", 3) > 0


@pytest.mark.parametrize("name,method,measured_mib", [
    ("mnist_small", "crown", 18), ("mnist_small", "alpha_crown", 53),
    ("cifar_small", "crown", 30), ("cifar_small", "alpha_crown", 85)])
def test_memory_estimate_covers_the_measured_worst_case(name, method, measured_mib):
  """The largest peak RSS per example that benchmarks/crown_memory.py measured
  (every neuron unstable, every example optimised; the authors' MNIST_Small at
  eps 1 gave the crown figure): the estimate that slices batches (`api.chunked`,
  the evaluate CLI) must cover it."""
  model = networks.build(name, 10)
  assert api.per_sample_bytes(model, method) >= measured_mib * 2**20


def test_memory_benchmark_measures_a_call_and_reports_the_estimate():
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
  import crown_memory
  r = crown_memory.worker("mnist_small", "crown", 2)
  assert r["estimate_mib"] * 2**20 == api.per_sample_bytes(
      networks.build("mnist_small", 10), "crown")
  assert 0 <= r["measured_mib"] <= r["estimate_mib"]


@pytest.mark.skipif(not zoo.AUTHORS_MIXTRAIN.is_file(),
                    reason="the authors' model is not in ../shared")
def test_tightness_order_on_the_authors_model_at_eps_03():
  """First 100 TFDS-order MNIST test images, eps 0.3 (measured: symbolic 66,
  crown_ibp 66, CROWN 76, alpha-CROWN with 20 steps 84)."""
  model = zoo.authors_model()
  x, y = zoo.mnist_test(100)
  counts = {m: int(np.sum(mixtrain_tf.verified(model, x, y, 0.3, m)))
            for m in ("symbolic", "crown", "alpha_crown")}
  assert counts["crown"] >= counts["symbolic"] + 5, counts
  assert counts["alpha_crown"] >= counts["crown"] + 4, counts
  correct = np.argmax(model.predict(x, verbose=0), 1) == y
  assert counts["alpha_crown"] <= correct.sum()


@pytest.mark.skipif(not zoo.AUTHORS_MIXTRAIN.is_file(),
                    reason="the authors' model is not in ../shared")
def test_attacks_never_beat_crown_margins_on_the_authors_model():
  """eps 0.3, 10 real test images: the margins PGD (margin objective, 3 restarts of
  100 steps) and 2,000 random points reach stay below CROWN's and alpha-CROWN's
  margin upper bounds, and no point either method verifies is broken."""
  model = zoo.authors_model()
  x, y = zoo.mnist_test(10)
  eps = 0.3
  adv = attacks.pgd(lambda z: model(z, training=False), x, y, eps, 100, 0.02, 3,
                    loss="margin", seed=tf.constant([3, 4])).numpy()
  points = np.concatenate([adv[:, None], zoo.samples(*zoo.box(x, eps), 2000, 5)], 1)
  found = zoo.margins(zoo.logits_at(model, points), y)
  broken = np.argmax(model.predict(adv, verbose=0), 1) != y
  for method in ("crown", "alpha_crown"):
    ub = mixtrain_tf.margin_upper_bounds(model, x, y, eps, method).numpy()
    zoo.assert_inside(found, None, ub, what=f"authors' model margins ({method})")
    proven = mixtrain_tf.verified(model, x, y, eps, method).numpy()
    assert not np.any(proven & broken)


@pytest.mark.parametrize("method", CROWN)
def test_upper_only_gives_the_same_upper_bounds_and_no_lower(method):
  """Margins read only upper bounds: the halved backward pass must not change them."""
  model = zoo.RANDOM_NETS["residual"]()
  x = zoo.inputs(model, 3, seed=2)
  y = np.array([0, 1, 2]) % zoo.n_out(model)
  lo, hi = api.input_box(x, 0.1)
  spec = api.margin_spec(tf.constant(y), zoo.n_out(model))
  full = api.bound_box(model, lo, hi, method, spec=spec, alpha_steps=3)
  half = api.bound_box(model, lo, hi, method, spec=spec, alpha_steps=3,
                       upper_only=True)
  np.testing.assert_allclose(half.upper, full.upper, rtol=1e-5, atol=1e-5)
  assert np.all(np.isneginf(half.lower.numpy()))


def test_beta_crown_bounds_hold_on_split_subdomains():
  """Under ReLU split constraints, alpha-CROWN with beta multipliers stays above the
  exact maximum margin on the subdomain (a MILP), is never looser than CROWN with
  the same splits, and its multipliers tighten some bounds."""
  import milp  # highspy only here
  model = zoo.mlp(24, (16, 16), 3, seed=4)
  layers = milp.dense_layers(model)
  graph = bound_graph(model)
  relu_inputs = sorted({n.inputs[0] for n in graph.nodes
                        if isinstance(n.op, crown.ops.ReluOp)})
  rng = np.random.default_rng(0)
  x = rng.uniform(0.2, 0.8, (1, 24)).astype(np.float32)
  y = int(np.argmax(model.predict(x, verbose=0)[0]))
  lo, hi = zoo.box(x, 0.1)
  box = crown.IntervalBounds(tf.constant(lo), tf.constant(hi))
  pre = crown.pre_activation_bounds(graph, box, "crown")
  unstable = [(li, k) for li, z in enumerate(relu_inputs)
              for k in np.flatnonzero((pre[z].lower.numpy()[0] < 0)
                                      & (pre[z].upper.numpy()[0] > 0))]
  assert len(unstable) >= 6
  spec = api.margin_spec(tf.constant([y]), 3)
  checked = tightened = 0
  for _ in range(8):
    chosen = rng.choice(len(unstable), 4, replace=False)
    signs = {}
    arrays = {z: np.zeros((1, 16), np.float32) for z in relu_inputs}
    for c in chosen:
      li, k = unstable[c]
      sign = int(rng.choice([-1, 1]))
      signs.setdefault(li, {})[int(k)] = sign
      arrays[relu_inputs[li]][0, k] = sign
    exact = milp.max_margins(layers, lo[0], hi[0], y, signs)
    if exact is None:
      continue  # an empty subdomain: every bound holds
    splits = {z: tf.constant(a) for z, a in arrays.items()}
    beta = crown.bounds(graph, lo, hi, spec, "alpha_crown", alpha_steps=20,
                        splits=splits, upper_only=True).upper.numpy()[0]
    plain = crown.bounds(graph, lo, hi, spec, "crown", splits=splits,
                         upper_only=True).upper.numpy()[0]
    others = np.arange(3) != y
    tol = 1e-5 * max(1.0, np.abs(exact[0]).max())
    assert np.all(beta[others] >= exact[0][others] - tol), (beta, exact[0])
    assert np.all(beta <= plain + tol)
    checked += 1
    tightened += int(np.any(beta[others] < plain[others] - 1e-4))
  assert checked >= 4 and tightened >= 1, (checked, tightened)


@pytest.mark.parametrize("seed,eps", [(0, 0.06), (2, 0.15)])
def test_every_bound_is_above_the_exact_maximum_margin(seed, eps):
  """Against a MILP's exact worst margin over the ball (24-input networks with
  many unstable ReLUs): every method's margin bound is above it, and the CROWN
  family is ordered exact <= alpha_crown <= crown."""
  import milp  # highspy only here
  model = zoo.mlp(24, (16, 16), 3, seed=seed)
  layers = milp.dense_layers(model)
  x = np.random.default_rng(seed).uniform(0.2, 0.8, (6, 24)).astype(np.float32)
  y = np.argmax(model.predict(x, verbose=0), 1)
  lo, hi = zoo.box(x, eps)
  exact = np.stack([milp.max_margins(layers, lo[i], hi[i], int(y[i]))[0]
                    for i in range(len(x))])
  bounds = {m: mixtrain_tf.margin_upper_bounds(model, x, y, eps, m).numpy()
            for m in ("interval", "symbolic", "crown_ibp", "crown", "alpha_crown")}
  others = np.arange(3)[None, :] != y[:, None]
  tol = 1e-5 * np.maximum(1.0, np.abs(exact))
  for m, ub in bounds.items():
    assert np.all((ub >= exact - tol)[others]), (m, ub - exact)
  assert np.all((bounds["alpha_crown"] <= bounds["crown"] + tol)[others])
  # Not vacuous: alpha-CROWN closes much of the interval bound's gap.
  gap = {m: np.mean((ub - exact)[others]) for m, ub in bounds.items()}
  assert gap["alpha_crown"] < 0.5 * gap["interval"], gap


def _conv_pair(shape, c1, k1, s1, p1, c2, k2, s2, p2, seed, normalise=False):
  inputs = x = keras.Input(shape)
  if normalise:
    x = keras.layers.Normalization(mean=[0.4] * shape[-1],
                                   variance=[0.09] * shape[-1])(x)
  x = keras.layers.Conv2D(c1, k1, s1, padding=p1, activation="relu")(x)
  x = keras.layers.Conv2D(c2, k2, s2, padding=p2)(x)
  x = keras.layers.ReLU()(keras.layers.Flatten()(x))
  return zoo.set_random_weights(keras.Model(inputs, keras.layers.Dense(3)(x)), seed)


@pytest.mark.parametrize("config", [
    ((12, 11, 3), 5, 3, 1, "valid", 6, 3, 2, "same", False),
    ((13, 13, 2), 4, 5, 2, "same", 7, 3, 1, "valid", True),
    ((10, 9, 1), 3, 2, 2, "valid", 4, 3, 2, "same", False),
    ((9, 9, 3), 4, 3, 3, "same", 5, 2, 2, "same", True)])
def test_local_pass_equals_the_dense_pass(config):
  """The patch form of the second convolution's CROWN pass (`patches`): odd
  sizes, strides 1-3, same and valid padding, with and without a normalisation
  before the first convolution; bounds of every unstable neuron equal the dense
  backward pass's, and so do alpha-CROWN's starting slopes' bounds."""
  *geometry, normalise = config
  model = _conv_pair(*geometry, seed=1, normalise=normalise)
  graph = bound_graph(model)
  z = next(i for i, n in enumerate(graph.nodes) if i > 2
           and type(n.op).__name__ == "Conv2DOp")
  local = patches.local_pass(graph, z)
  assert local is not None
  x = np.random.default_rng(0).uniform(0, 1, (3,) + geometry[0]).astype(np.float32)
  lo, hi = api.input_box(x, 0.05)
  box = IntervalBounds(lo, hi)
  pre = crown.pre_activation_bounds(graph, box, "crown")
  pre = {j: b for j, b in pre.items() if j < z}
  itv = interval.node_bounds(graph, lo, hi)
  rows, idx, valid = crown._unstable_rows(graph, z, itv[z])
  assert int(tf.reduce_sum(tf.cast(valid, tf.int32))) > 0
  dense = crown.backward_upper(graph, z, rows, pre, box).numpy()
  windows = local.gather(idx, pre, box, crown._relaxation)
  both = np.concatenate([valid, valid], axis=1)
  np.testing.assert_allclose(local.upper(windows).numpy()[both], dense[both],
                             rtol=1e-5, atol=1e-5)
  start = tf.concat([windows["lower"], windows["lower"]], axis=1)
  np.testing.assert_allclose(local.upper(windows, start).numpy()[both],
                             dense[both], rtol=1e-5, atol=1e-5)


def test_local_pass_applies_to_the_second_conv_of_the_small_networks():
  for name, second in (("mnist_small", 3), ("cifar_small", 4)):
    graph = bound_graph(networks.build(name, 10))
    assert patches.local_pass(graph, second) is not None, name
    assert all(patches.local_pass(graph, z) is None for z in range(len(graph.nodes))
               if z != second), name
