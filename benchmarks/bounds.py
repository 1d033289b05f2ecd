"""Benchmark of the bound engines on CPU: clean forward vs interval vs symbolic.

For each network of `mixtrain_tf.networks` it times, in a fresh worker process:

* the clean forward pass, `tf.function(lambda x: model(x, training=False))`;
* verification with interval and with symbolic bounds: a `tf.function` around
  `input_box` -> `bound_box(..., spec=margin_spec(y))` -> "max_{j != y} ub_j < 0",
  as a user's verification loop would write it. Every function is called once to
  trace and warm up (that first call is reported separately), then timed.

Peak memory is TensorFlow's own CPU allocator count,
`tf.config.experimental.get_memory_info('CPU:0')` reset before one steady-state
call: the largest number of tensor bytes alive at once during the call, minus what
was alive before it, divided by the batch. With oneDNN on (TF's default on x86) the
CPU device allocator serves tensors of 256 KiB and more from a counted BFC pool and
smaller ones from an uncounted small-size pool, so this is the peak of the large
tensors (tiny clean/interval batches read 0); it does not count oneDNN/Eigen
scratch buffers or Python objects either. With oneDNN off the stats do not exist
and the column reads n/a. Next to it: the engine's estimate
`mixtrain_tf.per_sample_bytes`, and the worker's whole-process peak RSS (getrusage),
which also holds the TF runtime, the symbolic plan, tracing and graph optimisation.

For MNIST_Small it also times `mixtrain_tf.verified` (symbolic, eps 0.1) on real
MNIST test images, with the authors' trained model when
`mixtrain_tf.pretrained.load_authors_mnist_small` is available.

  python benchmarks/bounds.py
  python benchmarks/bounds.py --networks=mnist_small,cifar_small --batch=50
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
ALL_NETWORKS = ("mnist_small", "mnist_large", "cifar_small", "cifar_large",
                "cifar_resnet", "imagenet200_resnet")
RESULT_TAG = "@@RESULT "
MAX_AUTO_BATCH = 50


# --------------------------------------------------------------------------------
# Worker side (runs in a subprocess, one per network, so that memory is isolated)
# --------------------------------------------------------------------------------

def _import_tf():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel("ERROR")
  stats = _allocator_stats_available(tf)
  sys.path.insert(0, str(REPO))
  return tf, stats


def _allocator_stats_available(tf) -> bool:
  try:
    tf.config.experimental.get_memory_info("CPU:0")
    return True
  except ValueError:  # CPU allocator without stats (e.g. TF_ENABLE_ONEDNN_OPTS=0)
    return False


def _max_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _time_calls(fn, *args, min_time: float):
  """Median wall and process-CPU seconds of one call (result fetched), after the
  warm-up. CPU time (all threads) is less sensitive to other load on the machine."""
  times, cpu = [], []
  start = time.perf_counter()
  while True:
    t, c = time.perf_counter(), time.process_time()
    fn(*args).numpy()
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
    min_reps = 3 if times[0] < 1.0 else 2
    if len(times) >= min_reps and (time.perf_counter() - start >= min_time
                                   or len(times) >= 200):
      break
  return {"median_s": statistics.median(times), "min_s": min(times),
          "cpu_s": statistics.median(cpu), "reps": len(times)}


def _peak_bytes(tf, stats: bool, fn, *args):
  """Extra tensor bytes alive at the peak of one call, from TF's CPU allocator."""
  if not stats:
    return None
  tf.config.experimental.reset_memory_stats("CPU:0")
  before = tf.config.experimental.get_memory_info("CPU:0")["current"]
  fn(*args).numpy()
  return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def _verify_fn(tf, api, model, method, eps, num_classes, input_signature=None):
  """A user's verification step: True where the margin bound proves label y."""
  def verify(x, y):
    lo, hi = api.input_box(x, eps)
    ub = api.bound_box(model, lo, hi, method,
                       spec=api.margin_spec(y, num_classes)).upper
    masked = tf.where(tf.one_hot(y, num_classes) > 0, -float("inf"), ub)
    return tf.reduce_max(masked, axis=1) < 0.0
  return tf.function(verify, input_signature=input_signature)


def worker_network(name: str, batch: int | None, min_time: float) -> dict:
  tf, stats = _import_tf()
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from mixtrain_tf import api, networks  # pylint: disable=g-import-not-at-top

  keras.utils.set_random_seed(0)
  model = networks.build(name)
  num_classes = int(model.output_shape[-1])
  t = time.perf_counter()
  plan = api._plan(api.bound_graph(model))  # pylint: disable=protected-access
  plan_s = time.perf_counter() - t  # built once per model, eagerly, on first use
  est = {m: api.per_sample_bytes(model, m) for m in ("interval", "symbolic")}
  if batch is None:  # what compute_bounds' default memory budget would allow
    budget = api.DEFAULT_MEMORY_BUDGET_MB * 2**20
    batch = int(min(MAX_AUTO_BATCH, max(1, budget // est["symbolic"])))
  eps = 0.1 if name.startswith("mnist") else 2.0 / 255.0
  rng = np.random.default_rng(0)
  x = tf.constant(rng.uniform(size=(batch,) + networks.INPUT_SHAPES[name]),
                  tf.float32)
  y = tf.constant(rng.integers(0, num_classes, size=batch), tf.int32)

  result = {"network": name, "batch": batch, "eps": eps,
            "params": int(model.count_params()), "est_bytes": est,
            "plan": {str(k): t.mode for k, t in plan.targets.items()},
            "allocator_stats": stats, "plan_s": plan_s,
            "rss_after_plan_mb": _max_rss_mb()}
  runs = {"clean": (tf.function(lambda x, y: model(x, training=False)), x, y)}
  if batch != MAX_AUTO_BATCH:  # clean throughput at a full batch, for reference
    x50 = tf.constant(rng.uniform(size=(MAX_AUTO_BATCH,) + networks.INPUT_SHAPES[name]),
                      tf.float32)
    runs["clean@50"] = (tf.function(lambda x, y: model(x, training=False)), x50,
                        tf.zeros([MAX_AUTO_BATCH], tf.int32))
  for method in ("interval", "symbolic"):
    runs[method] = (_verify_fn(tf, api, model, method, eps, num_classes), x, y)
  for key, (fn, xs, ys) in runs.items():
    t = time.perf_counter()
    fn(xs, ys).numpy()  # trace, optimise the graph, first execution
    first = time.perf_counter() - t
    peak = _peak_bytes(tf, stats, fn, xs, ys)
    timing = _time_calls(fn, xs, ys, min_time=min_time)
    n = int(xs.shape[0])
    result[key] = {**timing, "first_call_s": first, "batch": n,
                   "per_sample_s": timing["median_s"] / n,
                   "peak_bytes_per_sample": None if peak is None else peak / n}
  result["max_rss_mb"] = _max_rss_mb()
  return result


def _load_mnist_small(tf, keras):
  """(model, description): the authors' trained model if the loader exists."""
  try:
    from mixtrain_tf import pretrained  # pylint: disable=g-import-not-at-top
    loader = pretrained.load_authors_mnist_small
  except (ImportError, AttributeError) as e:
    from mixtrain_tf import networks  # pylint: disable=g-import-not-at-top
    keras.utils.set_random_seed(0)
    return (networks.build("mnist_small"),
            f"RANDOM WEIGHTS (mixtrain_tf.pretrained.load_authors_mnist_small "
            f"not available: {type(e).__name__})")
  path = REPO.parent / "shared" / "models" / "mnist_small_mixtrain_eps0.3_authors.npz"
  required = [q for q in inspect.signature(loader).parameters.values()
              if q.default is inspect.Parameter.empty
              and q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
  if required:
    return (loader(str(path)), "the authors' MixTrain eps 0.3 model, "
            f"mixtrain_tf.pretrained.load_authors_mnist_small('{path.name}')")
  return loader(), ("the authors' model, "
                    "mixtrain_tf.pretrained.load_authors_mnist_small()")


def worker_mnist_verify(num_images: int, eps: float) -> dict:
  tf, _ = _import_tf()
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  import mixtrain_tf  # pylint: disable=g-import-not-at-top
  from mixtrain_tf import api  # pylint: disable=g-import-not-at-top

  images, labels = tfds.as_numpy(tfds.load(
      "mnist", split=f"test[:{num_images}]", as_supervised=True, batch_size=-1,
      data_dir=str(REPO.parent / "shared" / "tfds"), download=False))
  x = tf.constant(images.astype(np.float32) / 255.0)
  y = tf.constant(labels.astype(np.int32))
  model, source = _load_mnist_small(tf, keras)
  clean_acc = float(np.mean(np.argmax(model(x, training=False).numpy(), 1) == labels))
  out = {"images": num_images, "eps": eps, "model": source, "clean_acc": clean_acc}

  for method in ("symbolic", "interval"):
    times, cpu = [], []
    for _ in range(2 if method == "symbolic" else 3):  # report the warm calls
      t, c = time.perf_counter(), time.process_time()
      ok = mixtrain_tf.verified(model, x, y, eps, method=method).numpy()
      times.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
    out[f"verified_{method}"] = {
        "first_s": times[0], "median_s": statistics.median(times[1:]),
        "cpu_s": statistics.median(cpu[1:]), "verified_acc": float(ok.mean())}
    if method == "symbolic":
      sym_ok = ok

  # The same check as a tf.function loop over batches of 50.
  spec = (tf.TensorSpec([None, 28, 28, 1], tf.float32), tf.TensorSpec([None], tf.int32))
  fn = _verify_fn(tf, api, model, "symbolic", eps, 10, input_signature=spec)
  t = time.perf_counter()
  fn(x[:50], y[:50]).numpy()
  first = time.perf_counter() - t
  t, c = time.perf_counter(), time.process_time()
  ok = np.concatenate([fn(x[i:i + 50], y[i:i + 50]).numpy()
                       for i in range(0, num_images, 50)])
  out["tf_function_b50"] = {"first_s": first, "total_s": time.perf_counter() - t,
                            "cpu_s": time.process_time() - c,
                            "verified_acc": float(ok.mean()),
                            "agrees_with_verified": bool(np.all(ok == sym_ok))}
  out["max_rss_mb"] = _max_rss_mb()
  return out


# --------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------

def _run_worker(argv: list[str], timeout: float) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__)] + argv
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
  return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}


def _cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _ms(s: float) -> str:
  return f"{s * 1e3:.3g}" if s * 1e3 < 100 else f"{s * 1e3:.0f}"


def _mb(b) -> str:
  return "n/a" if b is None else f"{b / 1e6:.3g}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
  line = lambda cells: "| " + " | ".join(  # noqa: E731
      c.rjust(w) if i else c.ljust(w)
      for i, (c, w) in enumerate(zip(cells, widths))) + " |"
  sep = "|" + "|".join(("-" * (w + 1) + ":") if i else "-" * (w + 2)
                       for i, w in enumerate(widths)) + "|"
  return "\n".join([line(headers), sep] + [line(r) for r in rows])


def report(results: list[dict], mnist: dict | None) -> str:
  out = []
  ok = [r for r in results if "error" not in r]
  rows = []
  for r in ok:
    c, i, s = r["clean"], r["interval"], r["symbolic"]
    rows.append([
        r["network"], str(r["batch"]), _ms(c["per_sample_s"]),
        _ms(i["per_sample_s"]), f"{i['per_sample_s'] / c['per_sample_s']:.3g}x",
        _ms(s["per_sample_s"]), f"{s['per_sample_s'] / c['per_sample_s']:.3g}x",
        _ms(s["cpu_s"] / s["batch"]), f"{r['plan_s']:.1f}",
        f"{s['first_call_s']:.1f}", f"{s['reps']}"])
  out.append("Time per sample (ms, wall clock; median of the timed calls after one "
             "warm-up call; ratios to the clean forward at the same batch; "
             "sym CPU = process CPU time of both cores; one-off costs in s: "
             "plan = building the symbolic plan, 1st call = trace + graph "
             "optimisation + first run of the symbolic tf.function)\n")
  out.append(_table(["network", "batch", "clean", "interval", "int/clean",
                     "symbolic", "sym/clean", "sym CPU", "plan s", "sym 1st call s",
                     "sym reps"], rows))
  clean50 = [r for r in ok if "clean@50" in r]
  if clean50:
    out.append("\nClean forward at batch 50 for the nets bounded at a smaller batch "
               "(ms/sample): " + ", ".join(
                   f"{r['network']} {_ms(r['clean@50']['per_sample_s'])}"
                   for r in clean50))
  rows = []
  for r in ok:
    rows.append([
        r["network"], str(r["batch"]),
        _mb(r["clean"]["peak_bytes_per_sample"]),
        _mb(r["interval"]["peak_bytes_per_sample"]),
        _mb(r["est_bytes"]["interval"]),
        _mb(r["symbolic"]["peak_bytes_per_sample"]),
        _mb(r["est_bytes"]["symbolic"]),
        f"{r['rss_after_plan_mb']:.0f}", f"{r['max_rss_mb']:.0f}"])
  out.append("\nPeak memory per sample (MB = 1e6 bytes): meas = peak extra bytes of "
             "tensors >= 256 KiB in TF's CPU allocator during one steady call / batch; "
             "est = mixtrain_tf.per_sample_bytes; RSS = whole-process peak RSS of the "
             "worker after building the plan, and at the end\n")
  out.append(_table(["network", "batch", "clean meas", "interval meas",
                     "interval est", "symbolic meas", "symbolic est",
                     "RSS after plan MB", "RSS peak MB"], rows))
  for r in results:
    if "error" in r:
      out.append(f"\nFAILED {r.get('network', '?')}: {r['error']}")
  if mnist is not None:
    out.append("")
    if "error" in mnist:
      out.append(f"MNIST verification FAILED: {mnist['error']}")
    else:
      n = mnist["images"]
      per_k = 1000.0 / n
      sym, itv = mnist["verified_symbolic"], mnist["verified_interval"]
      tff = mnist["tf_function_b50"]
      out.append(f"MNIST_Small verification of {n} MNIST test images at eps "
                 f"{mnist['eps']} ({mnist['model']}):")
      out.append(f"  clean accuracy                         {mnist['clean_acc']:.1%}")
      out.append(f"  symbolic, mixtrain_tf.verified         "
                 f"{sym['median_s'] * per_k:.2f} s per 1,000 images (CPU "
                 f"{sym['cpu_s'] * per_k:.2f} s; "
                 f"first call {sym['first_s'] * per_k:.2f} s),"
                 f" verified acc {sym['verified_acc']:.1%}")
      out.append(f"  symbolic, tf.function loop, batch 50   "
                 f"{tff['total_s'] * per_k:.2f} s per 1,000 images (CPU "
                 f"{tff['cpu_s'] * per_k:.2f} s; + {tff['first_s']:.1f} s trace), "
                 f"verified acc {tff['verified_acc']:.1%}, same verdicts: "
                 f"{tff['agrees_with_verified']}")
      out.append(f"  interval, mixtrain_tf.verified         "
                 f"{itv['median_s'] * per_k:.3f} s per 1,000 images, "
                 f"verified acc {itv['verified_acc']:.1%}")
      out.append("  goal: symbolic < 10 s per 1,000 images (authors' PyTorch library "
                 "~44 s on this kind of machine)")
  return "\n".join(out)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--networks", default=",".join(ALL_NETWORKS),
                 help="comma-separated subset of " + ",".join(ALL_NETWORKS))
  p.add_argument("--batch", type=int, default=None,
                 help="batch for every network (default: what the 1 GiB default "
                      "memory budget of compute_bounds allows, capped at 50)")
  p.add_argument("--mnist_images", type=int, default=1000,
                 help="MNIST test images to verify with MNIST_Small (0: skip)")
  p.add_argument("--mnist_eps", type=float, default=0.1)
  p.add_argument("--min_time", type=float, default=2.0,
                 help="seconds of timed calls per measurement (at least 2-3 calls)")
  p.add_argument("--worker_timeout", type=float, default=400.0)
  p.add_argument("--json", default=None, help="also write raw results here")
  p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()

  if args._worker:  # pylint: disable=protected-access
    if args._worker == "mnist_verify":  # pylint: disable=protected-access
      res = worker_mnist_verify(args.mnist_images, args.mnist_eps)
    else:
      res = worker_network(args._worker, args.batch, args.min_time)  # pylint: disable=protected-access
    print(RESULT_TAG + json.dumps(res), flush=True)
    return

  names = [n for n in args.networks.split(",") if n]
  bad = [n for n in names if n not in ALL_NETWORKS]
  if bad:
    p.error(f"unknown networks {bad}; choose from {', '.join(ALL_NETWORKS)}")
  start = time.perf_counter()
  print(f"machine: {os.cpu_count()} cores, {_cpu_model()}, {platform.platform()}")
  print(f"python {platform.python_version()}; load average at start: "
        f"{os.getloadavg()}", flush=True)
  results = []
  for name in names:
    argv = [f"--_worker={name}", f"--min_time={args.min_time}"]
    if args.batch:
      argv.append(f"--batch={args.batch}")
    t = time.perf_counter()
    res = _run_worker(argv, args.worker_timeout)
    res.setdefault("network", name)
    results.append(res)
    status = res.get("error", "ok")
    print(f"  {name}: {time.perf_counter() - t:.0f} s ({status}); load average "
          f"{os.getloadavg()}", flush=True)
  mnist = None
  if args.mnist_images > 0:
    t = time.perf_counter()
    mnist = _run_worker(["--_worker=mnist_verify",
                         f"--mnist_images={args.mnist_images}",
                         f"--mnist_eps={args.mnist_eps}"], args.worker_timeout)
    print(f"  mnist verification: {time.perf_counter() - t:.0f} s; load average "
          f"{os.getloadavg()}", flush=True)
  print()
  print(report(results, mnist))
  print(f"\ntotal wall time {time.perf_counter() - start:.0f} s; load average at end: "
        f"{os.getloadavg()}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        {"networks": results, "mnist": mnist}, indent=1))


if __name__ == "__main__":
  main()
