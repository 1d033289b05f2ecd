r"""One command that checks a machine with an accelerator, or (--smoke) this CPU.

    python benchmarks/device_check.py --out=runs/device_check          # ~10 min, GPU
    python benchmarks/device_check.py --smoke --out=runs/device_smoke  # ~2 min, CPU

Steps, each in its own process with a time limit (a failed step is recorded, the
others still run):

1. device: TensorFlow's devices and their details, and whether TensorFloat-32 is
   off once mixtrain_tf is imported (it must be: docs/soundness.md);
2. tf32: the symbolic and CROWN margin bounds of cifar_small computed by the
   engines with TF32 forced on and off: the largest change, relative to the
   bound, and how many verdicts change (0 on a CPU, where TF32 does not exist);
3. soundness: the sampled-points soundness tests of every bound method, run on
   the default device;
4. bounds: `benchmarks/bounds.py` (time and memory per example, six networks);
5. train_step: `benchmarks/train_step.py` (step time per method vs clean);
6. train: the cifar_large flagfile for 200 steps under MirroredStrategy
   (--smoke: cifar_small for 2 steps), seconds and peak memory from metrics.json.

Writes `device_check.json` (everything) and `device_check.md` (a summary table)
into --out, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from bounds import _mb as megabytes  # benchmarks/bounds.py ('n/a' without statistics)

REPO = pathlib.Path(__file__).resolve().parents[1]

_DEVICE = r"""
import json, tensorflow as tf, mixtrain_tf
out = {"tensorflow": tf.__version__, "devices": [], "tf32_enabled":
       tf.config.experimental.tensor_float_32_execution_enabled()}
for d in tf.config.list_physical_devices():
  gpu = d.device_type == "GPU"
  details = tf.config.experimental.get_device_details(d) if gpu else {}
  out["devices"].append({"name": d.name, "type": d.device_type,
                         **{k: str(v) for k, v in details.items()}})
print(json.dumps(out))
"""

_TF32 = r"""
import json, numpy as np, tensorflow as tf
from mixtrain_tf import api, crown, networks, symbolic
from mixtrain_tf.graph import bound_graph
keras_seed = 0
import keras; keras.utils.set_random_seed(keras_seed)
model = networks.build("cifar_small")
g = bound_graph(model)
x = np.random.default_rng(0).uniform(0, 1, (8, 32, 32, 3)).astype("float32")
y = np.argmax(model.predict(x, verbose=0), 1)
lo, hi = api.input_box(x, 2 / 255)
spec = api.margin_spec(y, 10)
def margins(method):  # the engines directly: api.bound_box would turn TF32 off
  if method == "symbolic":
    return symbolic.bounds(g, symbolic.Plan(g), lo, hi, spec).upper.numpy()
  return crown.bounds(g, lo, hi, spec, "crown").upper.numpy()
out = {}
for method in ("symbolic", "crown"):
  tf.config.experimental.enable_tensor_float_32_execution(True)
  on = margins(method)
  tf.config.experimental.enable_tensor_float_32_execution(False)
  off = margins(method)
  verdict = lambda ub: np.max(np.where(np.eye(10)[y] > 0, -np.inf, ub), 1) < 0
  out[method] = {"max_rel_change": float(np.max(np.abs(on - off)) /
                                         max(1.0, float(np.max(np.abs(off))))),
                 "verdict_changes": int(np.sum(verdict(on) != verdict(off)))}
print(json.dumps(out))
"""


def _run(name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
    ok, tail, code = proc.returncode == 0, proc.stdout, proc.returncode
    err = proc.stderr[-3000:]
  except subprocess.TimeoutExpired as e:
    ok, tail, code, err = False, (e.stdout or b"").decode()[-3000:], None, "timeout"
  seconds = round(time.perf_counter() - start, 1)
  print(f"  {name}: {'ok' if ok else 'FAILED'} in {seconds} s", flush=True)
  return {"ok": ok, "seconds": seconds, "returncode": code, "stdout": tail[-6000:],
          "stderr": "" if ok else err}


def _last_json(text: str):
  for line in reversed(text.strip().splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  return None


def _steps(smoke: bool, out: pathlib.Path) -> dict:
  py = sys.executable
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  steps = {}
  steps["device"] = _run("device", [py, "-c", _DEVICE], 300, env)
  steps["tf32"] = _run("tf32", [py, "-c", _TF32], 300, env)
  select = "sampled and (dense or conv)" if smoke else "sampled"
  steps["soundness"] = _run("soundness", [
      py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/soundness_test.py",
      "tests/crown_test.py", "-k", select], 300 if smoke else 900, env)
  nets = "mnist_small" if smoke else ("mnist_small,cifar_small,mnist_large,"
                                      "cifar_large,cifar_resnet,imagenet200_resnet")
  bench = [py, "benchmarks/bounds.py", f"--networks={nets}",
           f"--json={out / 'bounds.json'}"]
  if smoke:
    bench += ["--min_time=0.1", "--mnist_images=50"]
  steps["bounds"] = _run("bounds", bench, 300 if smoke else 1200, env)
  steps["train_step"] = _run("train_step", [
      py, "benchmarks/train_step.py",
      "--networks=" + ("mnist_small" if smoke
                       else "mnist_small,cifar_small,cifar_large"),
      f"--steps={2 if smoke else 20}"], 300 if smoke else 1200, env)
  flagfile, batch, steps_n = (("cifar_small", 50, 2) if smoke
                              else ("cifar_large", 50, 200))
  run_dir = out / f"train_{flagfile}"
  steps["train"] = _run("train", [
      py, "-m", "mixtrain_tf.train", f"--flagfile=flags/{flagfile}.cfg",
      f"--model_dir={run_dir}", "--overwrite", "--strategy=mirrored", "--epochs=1",
      f"--batch_size={batch}", f"--max_train_examples={batch * steps_n}",
      "--max_eval_examples=20", "--final_methods=interval", "--export=false",
      "--validation_size=50", "--eval_batch_size=10", "--curve_examples=0"],
      300 if smoke else 1200, env)
  metrics = run_dir / "metrics.json"
  if metrics.exists():
    m = json.loads(metrics.read_text())
    steps["train"]["train_seconds"] = m.get("train_seconds")
    steps["train"]["train_peak_rss_mb"] = m.get("train_peak_rss_mb")
    steps["train"]["steps"] = steps_n
  return steps


def _numbers(tokens: list[str]) -> bool:
  """True for a `method  ms/step  x clean` row of train_step.py."""
  try:
    return len(tokens) == 2 and all(float(t) >= 0 for t in tokens)
  except ValueError:
    return False


def _table(result: dict) -> str:
  rows = ["| step | ok | seconds | result |", "|---|---|---:|---|"]
  for name, step in result["steps"].items():
    what = ""
    parsed = _last_json(step.get("stdout", "")) if name in ("device", "tf32") else None
    if name == "device" and parsed:
      what = (", ".join(d["name"] for d in parsed["devices"])
              + f"; TF32 on after import: {parsed['tf32_enabled']}")
    elif name == "tf32" and parsed:
      what = "; ".join(f"{k}: max change {v['max_rel_change']:.2g}, "
                       f"{v['verdict_changes']} verdicts changed"
                       for k, v in parsed.items())
    elif name == "soundness":
      lines = [ln for ln in step.get("stdout", "").splitlines() if "passed" in ln]
      what = lines[-1] if lines else ""
    elif name == "bounds" and result.get("bounds"):
      what = "; ".join(
          f"{n['network']}: symbolic {n['symbolic']['per_sample_s'] * 1e3:.3g} ms, "
          f"{megabytes(n['symbolic'].get('peak_bytes_per_sample'))} MB per example"
          for n in result["bounds"]["networks"] if "symbolic" in n)
    elif name == "train_step":
      what = "; ".join(" ".join(ln.split()) + "x"
                       for ln in step.get("stdout", "").splitlines()
                       if _numbers(ln.split()[-2:]))[:600]
    elif name == "train" and "train_seconds" in step:
      what = (f"{step['steps']} steps in {step['train_seconds']} s, peak RSS "
              f"{step['train_peak_rss_mb']} MB")
    rows.append(f"| {name} | {'yes' if step['ok'] else 'NO'} | {step['seconds']} | "
                f"{what} |")
  return "\n".join(rows) + "\n"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="runs/device_check", help="output folder")
  parser.add_argument("--smoke", action="store_true",
                      help="small versions of every step (CPU, ~2 minutes)")
  args = parser.parse_args()
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  print(f"device check ({'smoke' if args.smoke else 'full'}) into {out}", flush=True)
  result = {"smoke": args.smoke, "steps": _steps(args.smoke, out)}
  bounds = out / "bounds.json"
  result["bounds"] = json.loads(bounds.read_text()) if bounds.exists() else None
  (out / "device_check.json").write_text(json.dumps(result, indent=1))
  table = _table(result)
  (out / "device_check.md").write_text(table)
  print(table)
  return 0 if all(s["ok"] for s in result["steps"].values()) else 1


if __name__ == "__main__":
  sys.exit(main())
