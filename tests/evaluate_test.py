"""The evaluate CLI checks everything before any work and never loses results."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import mixtrain_tf
from mixtrain_tf import evaluation, networks

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  return subprocess.run([sys.executable, "-m", "mixtrain_tf.evaluate", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.fixture(scope="module")
def mnist_model(tmp_path_factory):
  path = tmp_path_factory.mktemp("model") / "net.keras"
  networks.build("mnist_small").save(path)
  return str(path)


def _one_line_error(run, message):
  assert run.returncode != 0
  assert message in run.stderr, run.stderr[-2000:]
  assert "Traceback" not in run.stderr, run.stderr[-2000:]


@pytest.mark.parametrize("value", ["0", "-5"])
def test_num_examples_below_one_is_refused(value, mnist_model):
  _one_line_error(_cli(f"--model={mnist_model}", f"--num_examples={value}"),
                  "--num_examples must be >= 1")


def test_memory_budget_below_one_is_refused(mnist_model):
  _one_line_error(_cli(f"--model={mnist_model}", "--memory_budget_mb=0"),
                  "--memory_budget_mb must be > 0")


def test_bad_outputs_fail_before_any_work(mnist_model, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  run = _cli(f"--model={mnist_model}", f"--output={blocker}/eval.json",
             "--num_examples=5")
  _one_line_error(run, "cannot create its directory")
  _one_line_error(_cli(f"--model={mnist_model}", f"--output={tmp_path}",
                       "--num_examples=5"), "is a directory")
  # A missing directory is created.
  out = tmp_path / "new" / "dir" / "eval.json"
  run = _cli(f"--model={mnist_model}", f"--output={out}", "--num_examples=5",
             "--methods=interval", "--attacks=pgd", "--pgd_steps=1")
  assert run.returncode == 0, run.stderr[-2000:]
  assert out.exists()


def test_model_of_another_dataset_is_refused(mnist_model):
  _one_line_error(_cli(f"--model={mnist_model}", "--dataset=cifar10",
                       "--num_examples=5"),
                  "takes inputs of shape (28, 28, 1), but --dataset=cifar10 has "
                  "images of shape (32, 32, 3)")


def test_missing_data_is_one_line(mnist_model, tmp_path):
  _one_line_error(_cli(f"--model={mnist_model}", f"--data_dir={tmp_path}/none",
                       "--num_examples=5"), "error: dataset 'mnist' was not found")


def test_corrupt_keras_file_says_so(tmp_path):
  bad = tmp_path / "broken.keras"
  bad.write_bytes(b"not a zip file at all")
  _one_line_error(_cli(f"--model={bad}", "--num_examples=5"),
                  "could not be read as a Keras model")


def test_a_failing_batch_keeps_the_results_of_the_batches_before():
  model = networks.build("mnist_small")
  rng = np.random.default_rng(0)
  good = rng.uniform(0, 1, (4, 28, 28, 1)).astype(np.float32)
  batches = [(good, np.zeros(4, np.int64)), (good * 255, np.zeros(4, np.int64))]
  with pytest.raises(evaluation.EvaluationError) as err:
    evaluation.evaluate(model, batches, 0.1, methods=("interval",), attack_names=(),
                        verbose=False)
  assert "stopped after 4 examples" in str(err.value)
  partial = err.value.partial_result
  assert partial["examples"] == 4 and partial["complete"] is False
  assert partial["verified"]["interval"]["count"] <= partial["clean"]["count"] <= 4


def test_verified_any_is_the_union_of_the_methods_proofs():
  import zoo
  model = zoo.mnist_small()
  x, y = zoo.mnist_test(40)
  out = evaluation.evaluate(model, [(x, y)], 0.02,
                            methods=("interval", "symbolic", "crown"),
                            attack_names=(), verbose=False)
  per = {m: np.asarray(mixtrain_tf.verified(model, x, y, 0.02, m)) for m in
         ("interval", "symbolic", "crown")}
  correct = np.argmax(model.predict(x, verbose=0), 1) == y
  union = correct & (per["interval"] | per["symbolic"] | per["crown"])
  assert out["verified_any"]["count"] == int(union.sum())
  assert out["verified_any"]["count"] >= max(
      v["count"] for v in out["verified"].values())


def test_xla_evaluation_counts_the_same_proofs():
  import zoo
  model = zoo.mnist_small()
  x, y = zoo.mnist_test(20)
  kwargs = dict(methods=("interval", "crown_ibp"), attack_names=(), verbose=False)
  plain = evaluation.evaluate(model, [(x, y)], 0.02, **kwargs)
  xla = evaluation.evaluate(model, [(x, y)], 0.02, jit_compile=True, **kwargs)
  for m in ("interval", "crown_ibp"):
    assert xla["verified"][m]["count"] == plain["verified"][m]["count"], m


def test_a_batch_is_bounded_in_slices_that_fit_the_memory_budget(monkeypatch):
  """A batch whose bounds would not fit the budget is bounded slice by slice
  (the CROWN family holds a row per neuron: 100 MNIST images at eps 0.3 took
  6 GB and 500 crashed the machine), with the same proofs."""
  import zoo

  from mixtrain_tf import api
  model = zoo.mnist_small()
  x, y = zoo.mnist_test(10)
  kwargs = dict(methods=("symbolic", "crown"), attack_names=(), verbose=False)
  whole = evaluation.evaluate(model, [(x, y)], 0.02, memory_budget_mb=10**6,
                              **kwargs)
  monkeypatch.setattr(api, "per_sample_bytes", lambda *a: 2**20)  # 1 MiB each
  seen = []

  def margins(xc, yc):
    seen.append(int(xc.shape[0]))
    return mixtrain_tf.margin_upper_bounds(model, xc, yc, 0.02, "crown")

  ub = evaluation._sliced(margins, model, "crown", 4)(x, y)
  assert seen == [4, 4, 2]
  np.testing.assert_allclose(
      ub, mixtrain_tf.margin_upper_bounds(model, x, y, 0.02, "crown"), atol=1e-5)
  sliced = evaluation.evaluate(model, [(x, y)], 0.02, memory_budget_mb=3, **kwargs)
  for m in ("symbolic", "crown"):
    assert sliced["verified"][m]["count"] == whole["verified"][m]["count"], m
