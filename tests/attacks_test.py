"""PGD and the interval attack, and the evaluate CLI (on a really trained model)."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import mixtrain_tf
from mixtrain_tf import attacks, data, pretrained

ROOT = pathlib.Path(__file__).resolve().parents[1]
AUTHORS = ROOT.parent / "shared" / "models" / "mnist_small_mixtrain_eps0.3_authors.npz"


@pytest.fixture(scope="module")
def trained():
  """The MixTrain authors' released MNIST_Small and 60 MNIST test images."""
  if not AUTHORS.exists():
    pytest.skip(f"{AUTHORS} is missing")
  x, y = next(iter(data.load("mnist", "test", batch_size=60, max_examples=60)))
  return pretrained.load_authors_mnist_small(AUTHORS), x, y


def _in_ball(x_adv, x, eps):
  x_adv, x = np.asarray(x_adv), np.asarray(x)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert np.abs(x_adv - x).max() <= eps + 1e-6


def test_pgd_stays_in_the_clipped_ball(trained):
  model, x, y = trained
  for eps in (0.05, 0.3):
    _in_ball(attacks.pgd(model, x, y, eps, steps=5, restarts=2), x, eps)


def test_pgd_finds_the_known_worst_point_of_a_linear_model():
  # logits = [w . x, 0] with label 0: the margin z_1 - z_0 = -w . x is largest at
  # the corner x - eps * sign(w), clipped to [0, 1].
  w = np.array([[1.0, 0.0], [-2.0, 0.0], [0.5, 0.0]], np.float32)
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
  model.layers[0].set_weights([w])
  x = tf.constant([[0.5, 0.5, 0.05]])
  adv = attacks.pgd(model, x, tf.constant([0]), 0.1, steps=20, step_size=0.02,
                    random_start=False)
  np.testing.assert_allclose(adv.numpy(), [[0.4, 0.6, 0.0]], atol=1e-6)


def test_pgd_first_restart_starts_at_the_given_point_clipped_to_the_ball():
  # The same linear model: with no steps, the start (clipped to the ball) is
  # returned when it is worse for the label than x.
  w = np.array([[1.0, 0.0], [-2.0, 0.0], [0.5, 0.0]], np.float32)
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
  model.layers[0].set_weights([w])
  x = tf.constant([[0.5, 0.5, 0.05]])
  start = tf.constant([[0.0, 0.9, 0.5]])  # outside the ball: clipped
  adv = attacks.pgd(model, x, tf.constant([0]), 0.1, steps=0, restarts=1,
                    start=start)
  np.testing.assert_allclose(adv.numpy(), [[0.4, 0.6, 0.15]], atol=1e-6)


def test_interval_attack_stays_in_the_ball_and_never_breaks_verified_points(trained):
  model, x, y = trained
  eps = 0.1
  proven = mixtrain_tf.verified(model, x, y, eps).numpy()
  assert proven.sum() >= 40  # the authors' model verifies ~90% at eps 0.1
  for adv in (attacks.pgd(model, x, y, eps, steps=20, restarts=2),
              attacks.interval_attack(model, x, y, eps, pgd_steps=10, restarts=2)):
    _in_ball(adv, x, eps)
    broken = np.argmax(model(adv).numpy(), 1) != y.numpy()
    assert not np.any(broken & proven), "an attack broke a verified point"
    assert broken.sum() >= (np.argmax(model(x).numpy(), 1) != y.numpy()).sum()


def test_interval_step_moves_where_the_box_is_not_proven():
  # One linear logit difference: the box around x is never proven at a large
  # radius, so the step jumps to the corner the interval gradient points at.
  w = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
  model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, use_bias=False)])
  model.layers[0].set_weights([w])
  x = tf.constant([[0.5, 0.5]])
  out = attacks.interval_step(model, x, x, tf.constant([0]), 0.2, estep=0.2)
  # z_1 - z_0 = -(x0 - x1) grows along (-1, +1): the corner (0.3, 0.7)
  np.testing.assert_allclose(out.numpy(), [[0.3, 0.7]], atol=1e-6)


def _cli(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  return subprocess.run([sys.executable, "-m", "mixtrain_tf.evaluate", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def test_evaluate_cli_writes_all_fields(trained, tmp_path):
  model, _, _ = trained
  path = tmp_path / "authors.keras"
  model.save(path)
  out = tmp_path / "eval.json"
  run = _cli(f"--model={path}", "--dataset=mnist", "--epsilon=0.1",
             "--num_examples=20", "--batch_size=10", "--attacks=pgd,interval",
             "--pgd_steps=5", f"--output={out}")
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["examples"] == 20
  for leaf in [result["clean"], *result["attacks"].values(),
               *result["verified"].values()]:
    assert set(leaf) == {"accuracy", "count", "seconds"}
  assert set(result["attacks"]) == {"pgd", "interval"}
  assert set(result["verified"]) == {"interval", "symbolic"}
  ceiling = min(result["attacks"]["pgd"]["count"], result["clean"]["count"])
  assert result["verified"]["symbolic"]["count"] <= ceiling


@pytest.mark.parametrize("args, message", [
    (["--epsilon=-1"], "--epsilon must be in [0, 1]"),
    (["--methods=deeppoly"], "--methods takes interval, symbolic, crown"),
    (["--attacks=fgsm"], "--attacks takes pgd, interval"),
    ([], "--model"),
])
def test_evaluate_cli_bad_flags_are_one_line_errors(args, message, tmp_path):
  base = [] if not args else [f"--model={tmp_path}"]
  run = _cli(*base, *args)
  assert run.returncode != 0
  assert message in run.stderr
  assert "Traceback" not in run.stderr


def test_pgd_settings_default_per_dataset_and_keep_given_values():
  assert attacks.pgd_settings("mnist") == {"pgd_steps": 40, "pgd_step_size": 0.01}
  cifar = attacks.pgd_settings("cifar10")
  assert cifar["pgd_step_size"] == pytest.approx(0.5 / 255)
  assert attacks.pgd_settings("cifar10", 7, 0.003) == {"pgd_steps": 7,
                                                       "pgd_step_size": 0.003}
