r"""The robust loss over the whole training set vs over MixTrain's k sampled points.

    python experiments/robust_loss_distribution.py \
        --model=runs/compare/eps0.1/mixtrain \
        --epsilon=0.1 --k=10 --batch_size=50 --out=runs/robust_loss_distribution

MixTrain (docs/method.md 3) bounds only k points drawn uniformly from each batch of B;
the mean over them is an unbiased estimate of the batch's robust loss. This computes
the robust loss (cross-entropy of the symbolic margin upper bounds) of every
training image under a trained network, then draws the points MixTrain would draw
in one epoch (a shuffled pass in batches of B, k per batch), and compares: the two
loss distributions (the paper's Figure 5) and the per-batch estimates against the
batch means. Writes <out>.json (statistics) and <out>.png.
"""

from __future__ import annotations

import json
import pathlib
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from mixtrain_tf import data, training

FLAGS = flags.FLAGS
def define_flags():
  """Defines the flags (in main only, so tests can import this module)."""
  flags.DEFINE_string("model", None, "Training model_dir (with network.keras) or a "
                      ".keras file.")
  flags.DEFINE_string("dataset", "mnist", "Dataset of the training images.")
  flags.DEFINE_string("data_dir", None, "Dataset directory (default: TFDS_DATA_DIR).")
  flags.DEFINE_float("epsilon", 0.1, "L-inf radius of the robust loss.")
  flags.DEFINE_enum("bound", "symbolic", ["symbolic", "interval"], "Bound method.")
  flags.DEFINE_integer("k", 10, "Points sampled per batch.")
  flags.DEFINE_integer("batch_size", 50, "MixTrain's batch size B.")
  flags.DEFINE_integer("max_examples", None, "Use only the first N training images.")
  flags.DEFINE_integer("seed", 0, "Seed of the sampling.")
  flags.DEFINE_string("out", "runs/robust_loss_distribution", "Output path prefix.")
  flags.mark_flag_as_required("model")


def robust_losses(network: keras.Model, dataset, epsilon: float, bound: str
                  ) -> np.ndarray:
  """Per-example robust cross-entropy over a dataset of (images, labels)."""
  loss = tf.function(lambda x, y: training.robust_loss(network, x, y, epsilon,
                                                      bound)[0])

  bar = keras.utils.Progbar(None, unit_name="example")
  out, seen = [], 0
  for x, y in dataset:
    out.append(loss(tf.cast(x, tf.float32), tf.cast(y, tf.int32)).numpy())
    seen += len(out[-1])
    bar.update(seen)
  return np.concatenate(out)


def mixtrain_sample(losses: np.ndarray, batch_size: int, k: int, seed: int):
  """One epoch of MixTrain's sampling: (sampled losses, per-batch k-mean, batch
  mean) over a shuffled pass in full batches."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(losses))
  batches = order[: len(order) // batch_size * batch_size].reshape(-1, batch_size)
  picks = np.stack([rng.choice(b, size=k, replace=False) for b in batches])
  return losses[picks].ravel(), losses[picks].mean(1), losses[batches].mean(1)


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Largest gap between the two empirical CDFs (Kolmogorov-Smirnov statistic)."""
  grid = np.sort(np.concatenate([a, b]))
  cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
  cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
  return float(np.max(np.abs(cdf_a - cdf_b)))


def plot(losses, sampled, estimates, batch_means, title, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_h, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
  # Log-spaced bins: the losses span orders of magnitude (tiny for points verified
  # with room to spare). Values below `low` are counted in the first bin.
  low, top = 1e-4, max(float(losses.max()), 1e-3)
  bins = np.geomspace(low, top, 60)
  for values, label in [(losses, f"all {len(losses)} training points"),
                        (sampled, f"{len(sampled)} points sampled (k per batch)")]:
    ax_h.hist(np.clip(values, low, top), bins=bins, alpha=0.5, label=label,
              weights=np.full(len(values), 1.0 / len(values)))
  ax_h.set(xscale="log", xlabel="robust loss (CE of margin upper bounds)",
           ylabel="fraction of points", title=title)
  ax_h.legend()
  ax_s.scatter(batch_means, estimates, s=4, alpha=0.4)
  lim = [0.0, float(max(batch_means.max(), estimates.max()))]
  ax_s.plot(lim, lim, color="k", linewidth=1)
  ax_s.set(xlabel="robust loss, mean over the batch",
           ylabel="MixTrain estimate (mean over k points)",
           title="per-batch estimate vs batch mean")
  for ax in (ax_h, ax_s):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  path = pathlib.Path(FLAGS.model)
  if path.is_dir():
    path = path / "network.keras"
  if not path.is_file():
    raise app.UsageError(f"--model: no network at {path} (give a training "
                         "model_dir or a .keras file).")
  network = keras.models.load_model(path)
  try:
    train = data.load(FLAGS.dataset, "train", data_dir=FLAGS.data_dir,
                      batch_size=250, max_examples=FLAGS.max_examples)
  except data.DataNotFoundError as e:
    raise SystemExit(f"error: {e}") from None
  t = time.perf_counter()
  losses = robust_losses(network, train, FLAGS.epsilon, FLAGS.bound)
  seconds = time.perf_counter() - t
  sampled, estimates, batch_means = mixtrain_sample(losses, FLAGS.batch_size,
                                                    FLAGS.k, FLAGS.seed)
  stats = {
      "model": str(path), "epsilon": FLAGS.epsilon, "bound": FLAGS.bound,
      "k": FLAGS.k, "batch_size": FLAGS.batch_size, "examples": int(len(losses)),
      "seconds": round(seconds, 1),
      "mean_all": float(losses.mean()), "mean_sampled": float(sampled.mean()),
      "median_all": float(np.median(losses)),
      "median_sampled": float(np.median(sampled)),
      "ks_distance": ks_distance(losses, sampled),
      "batch_estimate_abs_error_mean": float(np.mean(np.abs(estimates - batch_means))),
      "batch_mean_std": float(batch_means.std()),
  }
  out = pathlib.Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  # Appended, not with_suffix: "--out=runs/eps0.1" must not lose its ".1".
  pathlib.Path(f"{out}.json").write_text(json.dumps(stats, indent=1))
  plot(losses, sampled, estimates, batch_means,
       f"{FLAGS.dataset}, eps {FLAGS.epsilon:g}, k={FLAGS.k} of {FLAGS.batch_size}",
       pathlib.Path(f"{out}.png"))
  print(json.dumps(stats, indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
