"""Peak memory per example of the CROWN family against its estimate.

`mixtrain_tf.per_sample_bytes` decides how many examples one bound call holds
(`api.chunked`: `verified`, `margin_upper_bounds`, the evaluate CLI's
`--memory_budget_mb`). It must not fall below what a call really takes, in the
worst case: every neuron unstable. Each row runs in a fresh process: a network of
`mixtrain_tf.networks` with its seeded initial weights, uniform random inputs
labelled by the network itself (so alpha-CROWN optimises every example), eps 1
(the whole input domain), one untimed call to trace, then the peak RSS increase
of one call (getrusage) divided by the batch.

  python benchmarks/crown_memory.py
  python benchmarks/crown_memory.py --runs=mnist_small:alpha_crown:8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

DEFAULT_RUNS = ("mnist_small:crown:20,mnist_small:alpha_crown:8,"
                "cifar_small:crown:4,cifar_small:alpha_crown:4")


def worker(name: str, method: str, batch: int) -> dict:
  import keras
  import numpy as np

  from mixtrain_tf import api, networks
  keras.utils.set_random_seed(0)
  model = networks.build(name, 10)
  x = np.random.RandomState(0).rand(batch, *model.input_shape[1:]).astype(np.float32)
  y = np.argmax(model(x).numpy(), 1).astype(np.int32)
  budget = 10**6  # one call for the whole batch
  api.margin_upper_bounds(model, x[:1], y[:1], 1.0, method, memory_budget_mb=budget)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  api.margin_upper_bounds(model, x, y, 1.0, method, memory_budget_mb=budget)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {"network": name, "method": method, "batch": batch,
          "measured_mib": (peak - before) / 1024 / batch,
          "estimate_mib": api.per_sample_bytes(model, method) / 2**20}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default=DEFAULT_RUNS,
                      help="network:method:batch, comma-separated")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    name, method, batch = args.worker.split(":")
    print(json.dumps(worker(name, method, int(batch))))
    return
  print("| network | method | batch | measured MiB per example | estimate MiB |")
  print("|---|---|---:|---:|---:|")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  for run in args.runs.split(","):
    out = subprocess.run([sys.executable, __file__, f"--worker={run}"], env=env,
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"| {r['network']} | {r['method']} | {r['batch']} | "
          f"{r['measured_mib']:.0f} | {r['estimate_mib']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
