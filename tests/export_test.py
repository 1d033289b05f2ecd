"""Tests of the SavedModel export (mixtrain_tf.export) and of evaluation.evaluate.

The SavedModel is loaded in a fresh Python process that never imports mixtrain_tf,
as a third party would load it, and its three signatures are compared with the
library's own bounds.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import mixtrain_tf
from mixtrain_tf import api, data, evaluation, export, networks, pretrained
from mixtrain_tf import evaluate as evaluate_cli

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
AUTHORS_CLEAN = SHARED / "models" / "mnist_small_clean_authors.npz"
AUTHORS_MIXTRAIN = SHARED / "models" / "mnist_small_mixtrain_eps0.3_authors.npz"
EPS = 0.02
TOL = 1e-5

needs_authors_models = pytest.mark.skipif(
    not (AUTHORS_CLEAN.is_file() and AUTHORS_MIXTRAIN.is_file()),
    reason=f"the authors' MNIST_Small models are not in {AUTHORS_CLEAN.parent}")


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
  """16 MNIST test images [16, 28, 28, 1] in [0, 1] and int32 labels."""
  x, y = next(iter(data.load("mnist", "test", batch_size=16, max_examples=16)))
  return x.numpy(), y.numpy()


@pytest.fixture(scope="module")
def network() -> keras.Model:
  """A random MNIST_Small."""
  keras.utils.set_random_seed(3)
  return networks.build("mnist_small")


# -- SavedModel in a process without mixtrain_tf ---------------------------------

_LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    saved_model, inputs, outputs = sys.argv[1:4]
    arrays = np.load(inputs)
    x, y, eps = arrays["x"], arrays["y"], arrays["eps"]
    loaded = tf.saved_model.load(saved_model)
    sigs = loaded.signatures
    result = {}
    for n in (len(x), 3):  # any batch size
      result[f"logits_{n}"] = sigs["serving_default"](images=tf.constant(x[:n]))[
          "logits"].numpy()
    bounds = sigs["bounds"](images=tf.constant(x), epsilon=tf.constant(eps))
    result["lower"], result["upper"] = bounds["lower"].numpy(), bounds["upper"].numpy()
    result["margin_upper"] = sigs["margins"](
        images=tf.constant(x), labels=tf.constant(y),
        epsilon=tf.constant(eps))["margin_upper"].numpy()
    np.savez(outputs, **result)
    info = {
        "mixtrain_tf_imported": any(m.split(".")[0] == "mixtrain_tf"
                                    for m in sys.modules),
        "signatures": {
            name: {"inputs": sorted(fn.structured_input_signature[1]),
                   "outputs": sorted(fn.structured_outputs)}
            for name, fn in sigs.items()},
    }
    json.dump(info, sys.stdout)
    """)


@pytest.fixture(scope="module")
def saved_model_dir(network, tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("export") / "saved_model"
  export.export_saved_model(network, str(path))
  return str(path)


@pytest.fixture(scope="module")
def loaded_elsewhere(saved_model_dir, mnist, tmp_path_factory):
  """Loads the export in a fresh process; returns (info, outputs)."""
  tmp = tmp_path_factory.mktemp("load")
  x, y = mnist
  np.savez(tmp / "inputs.npz", x=x, y=y, eps=np.float32(EPS))
  (tmp / "load.py").write_text(_LOAD_SCRIPT)
  # No PYTHONPATH to the repository and a working directory outside it.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
      [sys.executable, str(tmp / "load.py"), saved_model_dir,
       str(tmp / "inputs.npz"), str(tmp / "outputs.npz")],
      cwd=tmp, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with np.load(tmp / "outputs.npz") as outputs:
    return json.loads(proc.stdout), dict(outputs)


def test_saved_model_loads_without_mixtrain_tf(loaded_elsewhere):
  info, _ = loaded_elsewhere
  assert not info["mixtrain_tf_imported"]
  assert info["signatures"] == {
      "serving_default": {"inputs": ["images"], "outputs": ["logits"]},
      "bounds": {"inputs": ["epsilon", "images"], "outputs": ["lower", "upper"]},
      "margins": {"inputs": ["epsilon", "images", "labels"],
                  "outputs": ["margin_upper"]},
  }


def test_serving_default_matches_the_network(loaded_elsewhere, network, mnist):
  _, out = loaded_elsewhere
  x, _ = mnist
  logits = network.predict(x, verbose=0)
  np.testing.assert_allclose(out["logits_16"], logits, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(out["logits_3"], logits[:3], rtol=TOL, atol=TOL)


def test_bounds_signature_matches_compute_bounds(loaded_elsewhere, network, mnist):
  _, out = loaded_elsewhere
  x, _ = mnist
  lower, upper = mixtrain_tf.compute_bounds(network, x, EPS, "symbolic")
  np.testing.assert_allclose(out["lower"], lower, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(out["upper"], upper, rtol=TOL, atol=TOL)
  logits = out["logits_16"]
  assert np.all(out["lower"] <= logits + TOL) and np.all(logits <= out["upper"] + TOL)
  assert np.all(out["upper"] - out["lower"] > 0)


def test_margins_signature_matches_margin_upper_bounds(loaded_elsewhere, network,
                                                       mnist):
  _, out = loaded_elsewhere
  x, y = mnist
  expected = mixtrain_tf.margin_upper_bounds(network, x, y, EPS, "symbolic")
  np.testing.assert_allclose(out["margin_upper"], expected, rtol=TOL, atol=TOL)
  margins = out["logits_16"] - out["logits_16"][np.arange(len(y)), y][:, None]
  assert np.all(out["margin_upper"] >= margins - TOL)
  np.testing.assert_allclose(out["margin_upper"][np.arange(len(y)), y], 0.0,
                             atol=TOL)


# -- evaluation.evaluate ------------------------------------------------------------


def _batches(x, y, size):
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(size)


@needs_authors_models
def test_evaluate_fields_and_counts(mnist):
  """The authors' MixTrain model at eps 0.1: counts agree with the bound API."""
  x, y = mnist
  model = pretrained.load_authors_mnist_small(AUTHORS_MIXTRAIN)
  result = evaluation.evaluate(model, _batches(x, y, 5), 0.1, pgd_steps=5,
                               num_examples=12, verbose=False)
  assert set(result) == {"examples", "epsilon", "clean", "attacks", "verified",
                         "verified_any"}
  assert result["examples"] == 12 and result["epsilon"] == pytest.approx(0.1)
  assert set(result["attacks"]) == {"pgd"}
  assert set(result["verified"]) == {"interval", "symbolic"}
  leaves = [result["clean"], result["attacks"]["pgd"], *result["verified"].values(),
            result["verified_any"]]
  for leaf in leaves:
    assert set(leaf) == {"accuracy", "count", "seconds"}
    assert leaf["accuracy"] == pytest.approx(leaf["count"] / 12)
    assert leaf["seconds"] >= 0
  correct = model.predict(x[:12], verbose=0).argmax(1) == y[:12]
  assert result["clean"]["count"] == int(correct.sum())
  for method in ("interval", "symbolic"):
    ok = np.logical_and(correct, mixtrain_tf.verified(model, x[:12], y[:12], 0.1,
                                                      method))
    assert result["verified"][method]["count"] == int(ok.sum()), method
  pgd = result["attacks"]["pgd"]["count"]
  assert max(v["count"] for v in result["verified"].values()) <= pgd
  assert pgd <= result["clean"]["count"]
  assert result["verified"]["symbolic"]["count"] > 0  # a robust model: not vacuous


def test_evaluate_with_saved_model_margins(saved_model_dir, network, mnist):
  """`margins_fn` may be a SavedModel's signature: same counts as the library."""
  x, y = mnist
  margins = tf.saved_model.load(saved_model_dir).signatures["margins"]

  def margins_fn(images, labels, epsilon, method):
    assert method == "symbolic"
    return margins(images=images, labels=labels,
                   epsilon=tf.constant(epsilon, tf.float32))["margin_upper"]

  for eps in (0.0, EPS):
    kwargs = dict(methods=("symbolic",), attack_names=(), verbose=False)
    ours = evaluation.evaluate(network, _batches(x, y, 8), eps, **kwargs)
    theirs = evaluation.evaluate(network, _batches(x, y, 8), eps,
                                 margins_fn=margins_fn, **kwargs)
    assert ours["attacks"] == {} and theirs["clean"]["count"] == ours["clean"]["count"]
    assert theirs["verified"]["symbolic"]["count"] == (
        ours["verified"]["symbolic"]["count"])
    if eps == 0.0:  # zero width: the bounds are the margins, verified = correct
      assert ours["verified"]["symbolic"]["count"] == ours["clean"]["count"]


@needs_authors_models
def test_evaluate_detects_unsound_margins():
  """A fake bound that verifies every point it is shown beats PGD: RuntimeError.

  The authors' clean MNIST model is accurate but not robust at eps 0.3, so PGD
  breaks most points that a margins_fn returning all -1 "verifies".
  """
  x, y = next(iter(data.load("mnist", "test", batch_size=8, max_examples=8)))
  model = pretrained.load_authors_mnist_small(AUTHORS_CLEAN)

  def unsound(images, labels, epsilon, method):
    return -tf.ones([tf.shape(images)[0], 10])

  with pytest.raises(RuntimeError, match="unsound"):
    evaluation.evaluate(model, _batches(x, y, 4), 0.3, methods=("symbolic",),
                        pgd_steps=10, pgd_step_size=0.05, verbose=False,
                        margins_fn=unsound)


def test_evaluate_detects_unsound_margins_on_a_random_network(network, mnist):
  """The same check without the shared models: a random network at eps 0.3."""
  x, y = mnist
  clean = evaluation.evaluate(network, _batches(x, y, 8), 0.3, methods=(),
                              pgd_steps=10, pgd_step_size=0.05, verbose=False)
  assert clean["attacks"]["pgd"]["count"] < clean["clean"]["count"], (
      "PGD broke no point: the check below would not be exercised")
  with pytest.raises(RuntimeError, match="unsound"):
    evaluation.evaluate(network, _batches(x, y, 8), 0.3, methods=("interval",),
                        pgd_steps=10, pgd_step_size=0.05, verbose=False,
                        margins_fn=lambda images, *_: -tf.ones(
                            [tf.shape(images)[0], 10]))


@pytest.mark.parametrize("kwargs,match", [(dict(methods=("deeppoly",)), "deeppoly"),
                                          (dict(attack_names=("fgsm",)), "fgsm")])
def test_evaluate_rejects_unknown_names(kwargs, match, network, mnist):
  x, y = mnist
  with pytest.raises(ValueError, match=match):
    evaluation.evaluate(network, _batches(x, y, 8), 0.1, verbose=False, **kwargs)


def test_export_uses_clip_range(network, mnist, tmp_path):
  """clip_min/clip_max of export_saved_model bound the ball like compute_bounds,
  and both refuse images outside that domain."""
  x, _ = mnist
  export.export_saved_model(network, str(tmp_path / "sm"), clip_min=0.2,
                            clip_max=0.8)
  bounds = tf.saved_model.load(str(tmp_path / "sm")).signatures["bounds"]
  inside = np.clip(x[:4], 0.2, 0.8)
  out = bounds(images=tf.constant(inside), epsilon=tf.constant(0.05))
  lower, upper = api.compute_bounds(network, inside, 0.05, "symbolic", clip_min=0.2,
                                    clip_max=0.8)
  np.testing.assert_allclose(out["lower"], lower, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(out["upper"], upper, rtol=TOL, atol=TOL)
  with pytest.raises(tf.errors.InvalidArgumentError, match="input domain"):
    bounds(images=tf.constant(x[:4]), epsilon=tf.constant(0.05))
  with pytest.raises(ValueError, match="input domain"):
    api.compute_bounds(network, x[:4], 0.05, "symbolic", clip_min=0.2, clip_max=0.8)


def test_saved_model_with_crown_bounds_records_its_method(network, mnist, tmp_path):
  x, y = mnist
  x, y = x[:4], y[:4]
  export.export_saved_model(network, str(tmp_path / "sm"), method="crown")
  loaded = tf.saved_model.load(str(tmp_path / "sm"))
  assert evaluate_cli.saved_bound_method(loaded) == "crown"
  out = loaded.signatures["margins"](images=tf.constant(x), labels=tf.constant(
      y, tf.int32), epsilon=tf.constant(0.1))["margin_upper"]
  np.testing.assert_allclose(out, api.margin_upper_bounds(network, x, y, 0.1, "crown"),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="unknown bound method"):
    export.export_saved_model(network, str(tmp_path / "bad"), method="deeppoly")
