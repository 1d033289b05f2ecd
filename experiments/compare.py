r"""Training methods compared at equal time, each with its own schedule.

    python experiments/compare.py --out=runs/compare --budget_s=600 --jobs=2

Every run is an `epsilon:method:flagfile` entry of --runs, and trains with
`python -m mixtrain_tf.train --flagfile=<flagfile> --epsilon=<epsilon>
--method=<method> --time_budget_s=<budget>`: each run gets the same training
seconds, and its own flagfile's epoch schedule (eps ramp, LR decay, start of
dynamic alpha, kappa, warm-up) is stretched over them. So each method is compared
with its own schedule: by default MixTrain and the 2019 baselines (interval,
symbolic, PGD, clean) on MixTrain's flagfile, and the IBP family (ibp, crown_ibp,
mtl_ibp, mixtrain_ibp) on the IBP flagfile of the same epsilon. During training a
learning curve (clean and verified accuracy on the first --curve_examples test
images) is measured without counting its time; after training, the train CLI
measures clean, PGD-40 and verified accuracy (the flagfile's --final_methods) on
the full test split, and the peak memory of the process.

A run's directory is <out>/eps<epsilon>/<method>; when one method appears more
than once at one epsilon (with different flagfiles), each of those is
<out>/eps<epsilon>/<method>@<flagfile stem>, so run directories are unique (an
entry given twice, or two flagfiles of one such method with the same stem, is a
usage error).

--jobs=N runs N trainings at once, each pinned to its own share of the CPU cores
(so their timings stay comparable). A run whose metrics.json exists is skipped:
re-running the command resumes a stopped comparison. Then writes
<out>/results.json, <out>/results.md (the table, with each run's flagfile) and,
with --plots, PNG plots (needs matplotlib: pip install -e ".[experiments]").
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import threading
import time
from typing import NamedTuple

from absl import app, flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS

# The 2019 baselines keep MixTrain's schedule; the IBP family has its own.
BASELINES = ("mixtrain", "interval", "symbolic", "pgd", "clean")
IBP_METHODS = ("ibp", "crown_ibp", "mtl_ibp", "mixtrain_ibp")
DEFAULT_RUNS = [
    f"{eps}:{method}:{flagfile}"
    for eps, baseline_flags, ibp_flags in (
        ("0.3", "flags/mnist_small_eps0.3.cfg", "flags/mnist_small_ibp_eps0.3.cfg"),
        ("0.1", "flags/mnist_small.cfg", "flags/mnist_small_ibp_eps0.1.cfg"))
    for methods, flagfile in ((BASELINES, baseline_flags), (IBP_METHODS, ibp_flags))
    for method in methods]


def define_flags():
  """Defines the flags (in main only, so tests can import this module)."""
  flags.DEFINE_list("runs", DEFAULT_RUNS,
                    "epsilon:method:flagfile entries, one per training run; the "
                    "epsilon is the test radius, the method one of "
                    "mixtrain_tf.training.TRAINING_METHODS, the flagfile (relative "
                    "to the repository) the run's schedule.")
  flags.DEFINE_float("budget_s", 600, "Training seconds per run.")
  flags.DEFINE_integer("jobs", 1, "Runs at once, each on its own share of the cores.")
  flags.DEFINE_list("cores", None, "CPU cores to use (default: all this process may "
                    "use).")
  flags.DEFINE_integer("curve_examples", 1000, "Test images of the learning curve.")
  flags.DEFINE_float("curve_every", 1.0, "Schedule epochs between curve points.")
  flags.DEFINE_string("train_args", "", "Extra flags for every training run.")
  flags.DEFINE_string("out", "runs/compare", "Output directory.")
  flags.DEFINE_list("levels", ["0.5", "0.8", "0.9", "0.95"], "Verified accuracies "
                    "(fractions) whose first time on the curve is reported.")
  flags.DEFINE_boolean("plots", True, "Write PNG plots (needs matplotlib).")
  flags.DEFINE_string("plot_dir", None, "Where the plots go (default: --out).")
  flags.DEFINE_list("schedule_runs", None, "Training model_dirs whose alpha and eps "
                    "are plotted (default: the comparison's mixtrain runs).")


class Run(NamedTuple):
  """One training run: `epsilon` as given (it names the directory), `name` its
  directory's name (the method, or method@flagfile-stem; see parse_runs)."""
  epsilon: str
  method: str
  flagfile: str
  name: str

  def dir(self, out: pathlib.Path) -> pathlib.Path:
    return out / f"eps{self.epsilon}" / self.name


def parse_runs(entries: list[str], root: pathlib.Path = REPO_ROOT) -> list[Run]:
  """The --runs entries (epsilon:method:flagfile) as Runs, in their order.

  A method that appears more than once at one epsilon is named
  <method>@<flagfile stem> in each of those runs (otherwise just <method>), so run
  directories are unique. Raises app.UsageError naming the entry when it is not
  three fields, its epsilon is not a number >= 0, its method is not in
  mixtrain_tf.training.TRAINING_METHODS or its flagfile (relative to `root`) does
  not exist; when an entry is given twice; or when two flagfiles of one method at
  one epsilon share a stem.
  """
  # Imported here: TensorFlow loads only when the runs are parsed.
  from mixtrain_tf.training import TRAINING_METHODS

  example = "(e.g. 0.3:ibp:flags/mnist_small_ibp_eps0.3.cfg)"
  parsed, seen = [], {}
  for entry in entries:
    fields = entry.split(":", 2)
    if len(fields) != 3 or not all(fields):
      raise app.UsageError(f"--runs entry {entry!r} is not epsilon:method:flagfile "
                           f"{example}.")
    epsilon, method, flagfile = fields
    try:
      value = float(epsilon)
    except ValueError:
      value = math.nan
    if not (math.isfinite(value) and value >= 0):
      raise app.UsageError(f"--runs entry {entry!r}: epsilon {epsilon!r} is not a "
                           "number >= 0.")
    if method not in TRAINING_METHODS:
      raise app.UsageError(f"--runs entry {entry!r}: unknown method {method!r}; "
                           f"choose one of {', '.join(TRAINING_METHODS)}.")
    path = root / flagfile
    if not path.is_file():
      raise app.UsageError(f"--runs entry {entry!r}: no flagfile {path}.")
    key = (epsilon, method, path.resolve())
    if key in seen:
      raise app.UsageError(f"--runs entry {entry!r} is given twice (as "
                           f"{seen[key]!r}).")
    seen[key] = entry
    parsed.append((entry, epsilon, method, flagfile))
  runs = []
  for entry, epsilon, method, flagfile in parsed:
    stems = [pathlib.Path(f).stem for _, e, m, f in parsed
             if (e, m) == (epsilon, method)]
    if len(stems) == 1:
      name = method
    elif stems.count(pathlib.Path(flagfile).stem) > 1:
      raise app.UsageError(
          f"--runs entry {entry!r}: another flagfile of {method} at {epsilon} has "
          "the same stem, and their runs (<method>@<flagfile stem>) would share a "
          "directory; rename one.")
    else:
      name = f"{method}@{pathlib.Path(flagfile).stem}"
    runs.append(Run(epsilon, method, flagfile, name))
  return runs


def train_command(flagfile: str, epsilon: str, method: str, model_dir: pathlib.Path,
                  budget_s: float, curve_examples: int, curve_every: float,
                  train_args: str) -> list[str]:
  return [sys.executable, "-m", "mixtrain_tf.train", f"--flagfile={flagfile}",
          f"--epsilon={epsilon}", f"--method={method}", f"--model_dir={model_dir}",
          f"--time_budget_s={budget_s}", f"--curve_examples={curve_examples}",
          f"--curve_every={curve_every}", "--export=false",
          *shlex.split(train_args)]


def _pinned(command: list[str], cores: set[int]) -> list[str]:
  """`command` (a Python command) run on `cores` only (TensorFlow then sizes its
  thread pools to them)."""
  pin = (f"import os, sys; os.sched_setaffinity(0, {sorted(cores)}); "
         "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")
  return [command[0], "-c", pin, *command[1:]]


def _run_all(jobs: list[tuple[list[str], pathlib.Path]], workers: int,
             cores: list[int]):
  """Runs the commands, `workers` (at most one per core) at a time, each pinned to
  its share of cores."""
  workers = max(1, min(workers, len(cores)))
  share = len(cores) // workers
  queue, lock, failed = list(jobs), threading.Lock(), []

  def worker(i: int):
    mine = set(cores[i * share:(i + 1) * share])
    while True:
      with lock:
        if not queue:
          return
        command, model_dir = queue.pop(0)
      model_dir.mkdir(parents=True, exist_ok=True)
      print(f"[{time.strftime('%H:%M:%S')}] cores {sorted(mine)}: "
            f"{shlex.join(command)}", flush=True)
      with open(model_dir / "train.log", "w") as log:
        rc = subprocess.call(_pinned(command, mine), cwd=REPO_ROOT, stdout=log,
                             stderr=subprocess.STDOUT)
      if rc != 0:
        with lock:
          failed.append(f"{model_dir} (exit {rc}, see {model_dir / 'train.log'})")

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if failed:
    sys.exit("error: runs failed: " + "; ".join(failed))


def curve_verified(point: dict) -> float:
  """Verified accuracy of a curve point: the best of its bound methods (a point
  proven by either sound method is verified; per-image union not stored)."""
  return max(point["verified"].values(), default=0.0)


def first_time(curve: list[dict], level: float) -> float | None:
  """Training seconds at the first curve point with verified accuracy >= level."""
  for p in curve:
    if curve_verified(p) >= level - 1e-12:
      return p["train_seconds"]
  return None


def collect(out: pathlib.Path, runs: list[Run], levels: list[float]) -> list[dict]:
  rows = []
  for run in runs:
    d = run.dir(out)
    metrics = json.loads((d / "metrics.json").read_text())
    curve_path = d / "curve.json"
    curve = json.loads(curve_path.read_text()) if curve_path.exists() else []
    test = metrics["test"]
    rows.append({
        "epsilon": float(run.epsilon), "flagfile": run.flagfile,
        "method": run.method, "name": run.name, "run": str(d),
        "epochs": metrics["epochs"], "train_seconds": metrics["train_seconds"],
        "peak_rss_mb": metrics["train_peak_rss_mb"],
        "examples": test["examples"], "clean": test["clean"]["accuracy"],
        "pgd": test["attacks"].get("pgd", {}).get("accuracy"),
        "verified": {m: v["accuracy"] for m, v in test["verified"].items()},
        "curve": curve,
        "seconds_to_level": {f"{lv:g}": first_time(curve, lv) for lv in levels},
    })
  return rows


def _pct(v) -> str:
  return "-" if v is None else f"{100 * v:.2f}"


def _sec(v) -> str:
  return "never" if v is None else f"{v:.0f}"


def table(rows: list[dict], levels: list[float]) -> str:
  head = ["eps", "method", "flagfile", "epochs", "train s", "peak MB", "clean",
          "PGD-40", "verified sym", "verified int"] + [
              f"s to {100 * lv:g}% ver." for lv in levels]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    v = r["verified"]
    lines.append("| " + " | ".join([
        f"{r['epsilon']:g}", r["method"], r["flagfile"], str(r["epochs"]),
        f"{r['train_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}", _pct(r["clean"]),
        _pct(r["pgd"]), _pct(v.get("symbolic")), _pct(v.get("interval"))] + [
            _sec(r["seconds_to_level"][f"{lv:g}"]) for lv in levels]) + " |")
  return "\n".join(lines) + "\n"


def speedups(rows: list[dict], reference: str = "symbolic") -> list[dict]:
  """Per epsilon: each other run's time to reach the best curve verified accuracy
  of the (first) run of the reference method, and the reference's time over it
  (how many times faster). Runs are named by their run names."""
  out = []
  for eps in sorted({r["epsilon"] for r in rows}):
    ref = next((r for r in rows if r["epsilon"] == eps and r["method"] == reference
                and r["curve"]), None)
    if ref is None:
      continue
    level = max(curve_verified(p) for p in ref["curve"])
    t_ref = first_time(ref["curve"], level)
    for r in rows:
      if r["epsilon"] == eps and r is not ref:
        t = first_time(r["curve"], level)
        out.append({"epsilon": eps, "method": r["name"], "level": level,
                    "reference": ref["name"], "reference_seconds": t_ref,
                    "seconds": t, "speedup": (t_ref / t if t else None)})
  return out


def speedup_table(items: list[dict]) -> str:
  lines = ["| eps | level (best verified of symbolic on the curve) | method | "
           "s to level | symbolic s | times faster |", "|---|---|---|---|---|---|"]
  for s in items:
    times = "-" if s["speedup"] is None else f"{s['speedup']:.1f}x"
    lines.append(
        f"| {s['epsilon']:g} | {100 * s['level']:.1f}% | {s['method']} | "
        f"{_sec(s['seconds'])} | {_sec(s['reference_seconds'])} | {times} |")
  return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict], path: pathlib.Path):
  """Verified accuracy (curve subset) against training seconds, a panel per eps."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  epsilons = sorted({r["epsilon"] for r in rows})
  fig, axes = plt.subplots(1, len(epsilons), figsize=(6 * len(epsilons), 4.2),
                           squeeze=False)
  for ax, eps in zip(axes[0], epsilons):
    for r in (r for r in rows if r["epsilon"] == eps):
      if r["curve"]:
        ax.plot([p["train_seconds"] for p in r["curve"]],
                [100 * curve_verified(p) for p in r["curve"]], marker="o",
                markersize=3, label=r["name"])
    ax.set(title=f"MNIST, eps {eps:g}", xlabel="training seconds",
           ylabel="verified accuracy (%)", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_schedule(run_dirs: list[pathlib.Path], path: pathlib.Path):
  """Alpha and training epsilon at the end of every epoch of MixTrain runs."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_a, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
  for d in run_dirs:
    history = json.loads((d / "history.json").read_text())
    x = history.get("schedule_epoch") or list(range(1, len(history["alpha"]) + 1))
    label = f"{d.parent.name}/{d.name}" if d.parent.name.startswith("eps") else d.name
    ax_a.plot(x, history["alpha"], marker=".", label=label)
    ax_e.plot(x, history["epsilon"], marker=".", label=label)
  ax_a.set(xlabel="epoch (schedule)", ylabel="alpha (weight of the clean loss)",
           ylim=(0, 1))
  ax_e.set(xlabel="epoch (schedule)", ylabel="training epsilon (mean over the epoch)")
  for ax in (ax_a, ax_e):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runs = parse_runs(FLAGS.runs)
  levels = [float(v) for v in FLAGS.levels]
  out = pathlib.Path(FLAGS.out).resolve()
  jobs = []
  for run in runs:
    d = run.dir(out)
    if (d / "metrics.json").exists():
      print(f"skip (done): {d}")
      continue
    jobs.append((train_command(run.flagfile, run.epsilon, run.method, d,
                               FLAGS.budget_s, FLAGS.curve_examples,
                               FLAGS.curve_every, FLAGS.train_args), d))
  cores = (sorted(int(c) for c in FLAGS.cores) if FLAGS.cores
           else sorted(os.sched_getaffinity(0)))
  _run_all(jobs, max(1, FLAGS.jobs), cores)
  rows = collect(out, runs, levels)
  fast = speedups(rows)
  (out / "results.json").write_text(json.dumps({"runs": rows, "speedups": fast},
                                               indent=1))
  text = table(rows, levels) + ("\n" + speedup_table(fast) if fast else "")
  (out / "results.md").write_text(text)
  print(text)
  if FLAGS.plots:
    plot_dir = pathlib.Path(FLAGS.plot_dir or out)
    plot_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(rows, plot_dir / "verified_vs_time.png")
    schedule = ([pathlib.Path(d) for d in FLAGS.schedule_runs] if FLAGS.schedule_runs
                else [run.dir(out) for run in runs if run.method == "mixtrain"])
    if schedule:
      plot_schedule(schedule, plot_dir / "alpha_epsilon.png")
  print(f"wrote {out / 'results.json'}, {out / 'results.md'}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
