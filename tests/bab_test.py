"""Branch and bound: its verdicts are right (checked by dense grids and forward
passes on 2-input networks) and it decides points CROWN alone cannot."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import zoo

import mixtrain_tf
from mixtrain_tf import bab, evaluation


def _two_input_net(seed: int) -> keras.Model:
  return zoo.mlp(2, (12, 12), 3, seed)


def _grid_labels(model, x, eps, n=301):
  lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
  g0, g1 = np.meshgrid(np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n))
  pts = np.stack([g0.ravel(), g1.ravel()], 1).astype(np.float32)
  return np.argmax(model.predict(pts, verbose=0, batch_size=100000), 1)


@functools.cache
def _verdicts(seed: int):
  """8 points of a random 2-input network at eps 0.08: x, y, bab results and
  alpha-CROWN's verdicts."""
  model = _two_input_net(seed)
  x = np.random.default_rng(seed).uniform(0.2, 0.8, (8, 2)).astype(np.float32)
  y = np.argmax(model.predict(x, verbose=0), 1)
  # A generous limit: the verdicts, not the speed, are checked (a busy machine
  # once timed out the one point that needs 13 domains).
  results = bab.verify(model, x, y, 0.08, time_limit=30)
  alpha = mixtrain_tf.verified(model, x, y, 0.08, "alpha_crown").numpy()
  return x, y, results, alpha


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_verdicts_agree_with_a_dense_grid(seed):
  model = _two_input_net(seed)
  x, y, results, _ = _verdicts(seed)
  decided = 0
  for xi, yi, r in zip(x, y, results):
    labels = _grid_labels(model, xi, 0.08)
    if r.status == "verified":
      assert np.all(labels == yi), "branch and bound proved a non-robust point"
      decided += 1
    elif r.status == "falsified":
      adv = r.counterexample
      assert np.all(np.abs(adv - xi) <= 0.08 + 1e-6)
      assert np.argmax(model.predict(adv[None], verbose=0)[0]) != yi
      decided += 1
  assert decided >= 7, [r.status for r in results]


def test_decides_points_crown_cannot():
  """Over 3 networks x 8 points, branch and bound verifies points alpha-CROWN
  alone leaves open, and every point alpha-CROWN proves."""
  gained = 0
  for seed in range(3):
    _, _, results, alpha = _verdicts(seed)
    ok = np.array([r.status == "verified" for r in results])
    assert np.all(ok[alpha]), "a point alpha-CROWN proves must be verified"
    gained += int(np.sum(ok & ~alpha))
  assert gained >= 1


@pytest.mark.parametrize("seed,eps", [(0, 0.06), (2, 0.15)])
def test_relu_split_verdicts_agree_with_milp(seed, eps):
  """24 inputs: branch and bound splits ReLUs (with beta-CROWN on the domains).
  Its verdicts match the exact answer of a MILP: verified only where no point of
  the ball changes the label, falsified only with a checked counterexample."""
  import milp  # highspy only here
  model = zoo.mlp(24, (16, 16), 3, seed=seed)
  layers = milp.dense_layers(model)
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.2, 0.8, (8, 24)).astype(np.float32)
  y = np.argmax(model.predict(x, verbose=0), 1)
  results = bab.verify(model, x, y, eps, time_limit=30, alpha_steps=5)
  decided, robust_count = 0, 0
  for xi, yi, r in zip(x, y, results):
    values, points = milp.max_margins(layers, np.clip(xi - eps, 0, 1),
                                      np.clip(xi + eps, 0, 1), int(yi))
    worst = int(np.argmax(np.where(np.arange(3) == yi, -np.inf, values)))
    # The MILP's maximiser reproduces its value (the exact answer is exact).
    margin = milp.forward(layers, points[worst])
    np.testing.assert_allclose(margin[worst] - margin[yi], values[worst], atol=1e-5)
    robust = values[worst] < 0
    robust_count += int(robust)
    if r.status == "verified":
      assert robust, f"verified a point with exact worst margin {values[worst]}"
      decided += 1
    elif r.status == "falsified":
      assert not robust
      assert np.all(np.abs(r.counterexample - xi) <= eps + 1e-6)
      assert np.argmax(model.predict(r.counterexample[None], verbose=0)[0]) != yi
      decided += 1
  assert decided >= 7, [r.status for r in results]
  assert 0 < robust_count < 8, "the points should mix both answers"


@pytest.mark.parametrize("seed,eps", [(0, 0.06), (2, 0.15)])
def test_points_attaining_open_bounds_falsify_without_pgd(seed, eps):
  """With PGD switched off (no restarts), the non-robust points of the MILP
  test are still falsified: the point of each open domain's box that attains its
  bound is checked by a forward pass. Every counterexample is in the ball and
  misclassified, and nothing is verified that the full run does not verify."""
  model = zoo.mlp(24, (16, 16), 3, seed=seed)
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.2, 0.8, (8, 24)).astype(np.float32)
  y = np.argmax(model.predict(x, verbose=0), 1)
  full = bab.verify(model, x, y, eps, time_limit=30, alpha_steps=5)
  blind = bab.verify(model, x, y, eps, time_limit=30, alpha_steps=5,
                     attack_restarts=0)
  falsified = 0
  for xi, yi, r, f in zip(x, y, blind, full):
    assert r.status != "verified" or f.status == "verified"
    if r.status == "falsified":
      falsified += 1
      assert np.all(np.abs(r.counterexample - xi) <= eps + 1e-6)
      assert np.all((r.counterexample >= 0) & (r.counterexample <= 1))
      assert np.argmax(model.predict(r.counterexample[None], verbose=0)[0]) != yi
  assert falsified >= 1
  assert falsified == sum(f.status == "falsified" for f in full)


def test_one_compiled_attack_serves_every_example():
  """The attack is traced once per start kind (random, or from a point), not per
  example: eager PGD cost ~7 s per example, an unrolled trace 53 s."""
  model = _two_input_net(1)
  x = np.random.default_rng(3).uniform(0.2, 0.8, (4, 2)).astype(np.float32)
  y = np.argmax(model.predict(x, verbose=0), 1)
  pgd = bab.compiled_attack(model)
  results = bab.verify(model, x, y, 0.08, time_limit=30, pgd=pgd)
  assert len(results) == 4
  assert 1 <= pgd.experimental_get_tracing_count() <= 2


def test_evaluate_reports_the_three_verdicts():
  model = _two_input_net(0)
  x = np.random.default_rng(5).uniform(0.2, 0.8, (6, 2)).astype(np.float32)
  y = np.argmax(model.predict(x, verbose=0), 1)
  y[0] = (y[0] + 1) % 3  # misclassified: its own counterexample
  out = evaluation.evaluate(model, [(x, y)], 0.08, methods=("crown", "bab"),
                            attack_names=("pgd",), pgd_steps=10,
                            pgd_step_size=0.02, verbose=False, bab_time_limit=5)
  leaf = out["verified"]["bab"]
  assert leaf["count"] + leaf["falsified"] + leaf["unknown"] == 6
  assert leaf["falsified"] >= 1
  assert out["verified"]["crown"]["count"] <= leaf["count"]
  # Branch and bound counts CROWN's proofs as its own (it ran only on the rest).
  assert out["verified_any"]["count"] == leaf["count"]


def test_bad_balls_are_refused():
  model = _two_input_net(0)
  with pytest.raises(ValueError, match="epsilon"):
    bab.verify(model, np.full((1, 2), 0.5, np.float32), [0], -0.1)
  with pytest.raises(ValueError, match="outside the input domain"):
    bab.verify(model, np.full((1, 2), 3.0, np.float32), [0], 0.1)
