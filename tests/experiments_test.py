"""Tests of the experiment scripts: experiments/compare.py (methods at an equal time
budget) and experiments/robust_loss_distribution.py (the paper's Figure 5), each
run end to end on a tiny subset of real MNIST, plus their helpers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mixtrain_tf import networks, training

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module(name: str):
  spec = importlib.util.spec_from_file_location(
      name, REPO_ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


compare = _module("compare")
distribution = _module("robust_loss_distribution")


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
         "PYTHONPATH": os.pathsep.join([str(REPO_ROOT),
                                        os.environ.get("PYTHONPATH", "")])}
  return subprocess.run([sys.executable, f"experiments/{script}.py", *args],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


TINY = ("--max_train_examples=40 --batch_size=10 --validation_size=10 "
        "--max_eval_examples=6 --eval_batch_size=3 --pgd_steps=2")


def test_compare_trains_each_run_with_its_flagfile_for_the_budget(tmp_path):
  out = tmp_path / "compare"
  # ibp twice at 0.1 (its own schedule and MixTrain's): method@flagfile-stem dirs.
  args = ["--runs=0.1:mixtrain:flags/mnist_small.cfg,"
          "0.1:ibp:flags/mnist_small_ibp_eps0.1.cfg,0.1:ibp:flags/mnist_small.cfg",
          "--budget_s=4", "--jobs=2", "--curve_examples=3", "--curve_every=6",
          "--levels=0,0.99", f"--train_args={TINY}", f"--out={out}"]
  result = _run("compare", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads((out / "results.json").read_text())["runs"]
  assert [(r["epsilon"], r["method"], r["flagfile"], r["name"]) for r in rows] == [
      (0.1, "mixtrain", "flags/mnist_small.cfg", "mixtrain"),
      (0.1, "ibp", "flags/mnist_small_ibp_eps0.1.cfg", "ibp@mnist_small_ibp_eps0.1"),
      (0.1, "ibp", "flags/mnist_small.cfg", "ibp@mnist_small")]
  for r in rows:
    assert pathlib.Path(r["run"]) == out / "eps0.1" / r["name"]
    assert r["train_seconds"] >= 4.0
    assert r["peak_rss_mb"] > 100
    assert r["examples"] == 6
    assert {"interval", "symbolic"} <= set(r["verified"])
    assert 0.0 <= r["pgd"] <= r["clean"] <= 1.0
    # The run's own schedule is stretched over the budget: the curve ends at its
    # flagfile's last epoch (18 for MixTrain's, 70 for the IBP recipe).
    ibp_recipe = "ibp_eps" in r["flagfile"]
    assert r["curve"] and r["curve"][-1]["schedule_epoch"] == pytest.approx(
        70.0 if ibp_recipe else 18.0)
    # Level 0 is reached at the first curve point; 99% verified is not.
    assert r["seconds_to_level"]["0"] == r["curve"][0]["train_seconds"]
    assert r["seconds_to_level"]["0.99"] is None
    flags_txt = (pathlib.Path(r["run"]) / "flags.txt").read_text()
    assert f"--method={r['method']}" in flags_txt
    assert "--time_budget_s=4.0" in flags_txt
    assert "--epsilon=0.1" in flags_txt
    assert ("--init=ibp" in flags_txt) == ibp_recipe
    assert ("--kappa_end=0.5" in flags_txt) == ibp_recipe
  table = (out / "results.md").read_text().splitlines()
  assert table[0].startswith("| eps | method | flagfile |") and len(table) == 5
  assert "| 0.1 | mixtrain | flags/mnist_small.cfg |" in table[2]
  assert "never" in table[2]
  assert "| 0.1 | ibp | flags/mnist_small_ibp_eps0.1.cfg |" in table[3]
  assert "| 0.1 | ibp | flags/mnist_small.cfg |" in table[4]
  for png in ("verified_vs_time.png", "alpha_epsilon.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # Run again: finished runs are skipped, the report is rebuilt (plots elsewhere,
  # the schedule of a chosen run).
  plots = tmp_path / "plots"
  again = _run("compare", *args, f"--plot_dir={plots}",
               f"--schedule_runs={out / 'eps0.1' / 'ibp@mnist_small'}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("skip (done)") == 3
  assert {p.name for p in plots.iterdir()} == {"verified_vs_time.png",
                                               "alpha_epsilon.png"}


def test_parse_runs_names_unique_run_dirs(tmp_path):
  ibp3, ibp1 = "flags/mnist_small_ibp_eps0.3.cfg", "flags/mnist_small_ibp_eps0.1.cfg"
  runs = compare.parse_runs([
      f"0.3:ibp:{ibp3}", "0.3:mixtrain:flags/mnist_small_eps0.3.cfg",
      "0.3:ibp:flags/mnist_small_eps0.3.cfg", f"0.1:ibp:{ibp1}",
      f"0.3:crown_ibp:{ibp3}"])
  assert [(r.epsilon, r.method, r.flagfile, r.name) for r in runs] == [
      ("0.3", "ibp", ibp3, "ibp@mnist_small_ibp_eps0.3"),
      ("0.3", "mixtrain", "flags/mnist_small_eps0.3.cfg", "mixtrain"),
      ("0.3", "ibp", "flags/mnist_small_eps0.3.cfg", "ibp@mnist_small_eps0.3"),
      ("0.1", "ibp", ibp1, "ibp"),  # once at 0.1: just the method
      ("0.3", "crown_ibp", ibp3, "crown_ibp")]
  out = pathlib.Path("/o")
  assert [str(r.dir(out)) for r in runs] == [
      "/o/eps0.3/ibp@mnist_small_ibp_eps0.3", "/o/eps0.3/mixtrain",
      "/o/eps0.3/ibp@mnist_small_eps0.3", "/o/eps0.1/ibp", "/o/eps0.3/crown_ibp"]
  # The defaults: every method on its own schedule, at 0.3 and 0.1, unique dirs.
  defaults = compare.parse_runs(compare.DEFAULT_RUNS)
  assert len({r.dir(out) for r in defaults}) == len(defaults) == 18
  assert {r.name for r in defaults} == set(training.TRAINING_METHODS)
  for r in defaults:
    ibp = r.method in ("ibp", "crown_ibp", "mtl_ibp", "mixtrain_ibp")
    assert r.flagfile == {
        ("0.3", False): "flags/mnist_small_eps0.3.cfg",
        ("0.3", True): ibp3,
        ("0.1", False): "flags/mnist_small.cfg",
        ("0.1", True): ibp1}[(r.epsilon, ibp)]
  # Two flagfiles with one stem for one method and epsilon: same dir, refused.
  (tmp_path / "flags").mkdir()
  (tmp_path / "other").mkdir()
  for f in ("flags/a.cfg", "other/a.cfg"):
    (tmp_path / f).write_text("--epochs=1\n")
  with pytest.raises(compare.app.UsageError,
                     match="'0.1:ibp:flags/a.cfg': another flagfile of ibp at 0.1 "
                     "has the same stem"):
    compare.parse_runs(["0.1:ibp:flags/a.cfg", "0.1:ibp:other/a.cfg"], tmp_path)
  assert [r.name for r in compare.parse_runs(
      ["0.1:ibp:flags/a.cfg", "0.3:ibp:other/a.cfg"], tmp_path)] == ["ibp", "ibp"]


@pytest.mark.parametrize("entry, message", [
    ("0.1:flags/mnist_small.cfg", "is not epsilon:method:flagfile"),
    ("0.1::flags/mnist_small.cfg", "is not epsilon:method:flagfile"),
    ("abc:ibp:flags/mnist_small.cfg", "epsilon 'abc' is not a number >= 0"),
    ("-0.1:ibp:flags/mnist_small.cfg", "epsilon '-0.1' is not a number >= 0"),
    ("nan:ibp:flags/mnist_small.cfg", "epsilon 'nan' is not a number >= 0"),
    ("0.1:ibpp:flags/mnist_small.cfg", "unknown method 'ibpp'; choose one of "
     "mixtrain, clean, pgd, interval, symbolic, ibp, crown_ibp"),
    ("0.1:ibp:flags/no_such.cfg", "no flagfile"),
])
def test_parse_runs_names_the_bad_entry(entry, message):
  with pytest.raises(compare.app.UsageError, match="--runs entry") as error:
    compare.parse_runs(["0.1:clean:flags/mnist_small.cfg", entry])
  assert f"--runs entry {entry!r}" in str(error.value)
  assert message in str(error.value)


def test_parse_runs_refuses_an_entry_given_twice():
  with pytest.raises(compare.app.UsageError, match="given twice"):
    compare.parse_runs(["0.1:ibp:flags/mnist_small.cfg",
                        "0.1:ibp:./flags/mnist_small.cfg"])


def test_speedups_compare_times_to_the_symbolic_level():
  def row(method, points, name=None):
    return {"epsilon": 0.1, "method": method, "name": name or method, "curve": [
        {"train_seconds": t, "verified": {"symbolic": v}} for t, v in points]}
  rows = [row("symbolic", [(100, 0.3), (400, 0.6), (500, 0.5)]),
          row("mixtrain", [(20, 0.4), (50, 0.65)]), row("clean", [(10, 0.0)]),
          # A second symbolic run (another flagfile) is measured against the first.
          row("symbolic", [(200, 0.6)], "symbolic@other")]
  items = {s["method"]: s for s in compare.speedups(rows)}
  assert set(items) == {"mixtrain", "clean", "symbolic@other"}
  assert items["symbolic@other"]["speedup"] == 2.0
  assert items["symbolic@other"]["reference"] == "symbolic"
  assert items["mixtrain"]["level"] == 0.6
  assert items["mixtrain"]["reference_seconds"] == 400
  assert items["mixtrain"]["seconds"] == 50 and items["mixtrain"]["speedup"] == 8.0
  assert items["clean"]["seconds"] is None and items["clean"]["speedup"] is None
  text = compare.speedup_table(list(items.values()))
  assert "| 0.1 | 60.0% | mixtrain | 50 | 400 | 8.0x |" in text
  assert "| 0.1 | 60.0% | clean | never | 400 | - |" in text


def test_compare_rejects_a_bad_run():
  result = _run("compare", "--runs=0.1:ibp:flags/no_such.cfg", "--out=/nonexistent")
  assert result.returncode != 0
  assert "--runs entry '0.1:ibp:flags/no_such.cfg': no flagfile" in result.stderr
  assert not pathlib.Path("/nonexistent").exists()


def test_first_time_reads_the_curve():
  curve = [{"train_seconds": 10.0, "verified": {"symbolic": 0.2, "interval": 0.5}},
           {"train_seconds": 20.0, "verified": {"symbolic": 0.7, "interval": 0.1}}]
  assert compare.first_time(curve, 0.5) == 10.0  # the best bound method counts
  assert compare.first_time(curve, 0.6) == 20.0
  assert compare.first_time(curve, 0.8) is None
  assert compare.first_time([], 0.0) is None


def test_mixtrain_sample_draws_k_distinct_points_per_batch():
  losses = np.arange(1000, dtype=np.float64)  # a point's loss is its index
  sampled, estimates, batch_means = distribution.mixtrain_sample(losses, 50, 5, 0)
  assert sampled.shape == (100,) and estimates.shape == batch_means.shape == (20,)
  picks = sampled.reshape(20, 5).astype(int)
  assert all(len(set(row)) == 5 for row in picks)
  assert len(set(picks.ravel())) == 100  # batches partition the set
  np.testing.assert_allclose(estimates, picks.mean(1))
  # k = B: the estimate is the batch mean.
  _, full, means = distribution.mixtrain_sample(losses, 50, 50, 0)
  np.testing.assert_allclose(full, means)
  np.testing.assert_allclose(np.sort(means * 50).sum(), losses.sum())


def test_ks_distance():
  a = np.array([0.0, 1.0, 2.0, 3.0])
  assert distribution.ks_distance(a, a) == 0.0
  assert distribution.ks_distance(a, a + 10) == 1.0
  assert distribution.ks_distance(a, np.array([0.0, 1.0])) == pytest.approx(0.5)


def test_robust_loss_distribution_end_to_end(tmp_path):
  model = tmp_path / "net.keras"
  networks.build("mnist_small").save(model)
  out = tmp_path / "fig5_eps0.05"  # the ".05" stays in the file names
  result = _run("robust_loss_distribution", f"--model={model}", "--epsilon=0.05",
                "--k=2", "--batch_size=10", "--max_examples=60", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  stats = json.loads(pathlib.Path(f"{out}.json").read_text())
  assert stats["examples"] == 60 and stats["k"] == 2
  assert stats["mean_all"] > 0 and 0 <= stats["ks_distance"] <= 1
  assert pathlib.Path(f"{out}.png").read_bytes()[:4] == b"\x89PNG"


def test_robust_loss_distribution_says_when_the_model_is_missing(tmp_path):
  result = _run("robust_loss_distribution", f"--model={tmp_path}")
  assert result.returncode != 0
  assert "no network at" in result.stderr
