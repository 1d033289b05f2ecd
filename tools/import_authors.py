r"""Imports the MixTrain authors' released MNIST_Small weights and saves a .keras model.

The .npz holds the authors' PyTorch weights (conv kernels OIHW, FC1 columns in
C,H,W flatten order); see `mixtrain_tf.pretrained`. The saved model takes
[batch, 28, 28, 1] images in [0, 1] and returns logits.

Example:
  python tools/import_authors.py \
      --npz ../shared/models/mnist_small_mixtrain_eps0.3_authors.npz \
      --output runs/mnist_small_mixtrain_eps0.3_authors.keras
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

try:
  from mixtrain_tf import pretrained
except ImportError:  # run as a script from a checkout that is not installed
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from mixtrain_tf import pretrained

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines --npz and --output (once per process; importing defines nothing)."""
  flags.DEFINE_string("npz", None, "The authors' MNIST_Small weights (.npz).")
  flags.DEFINE_string("output", None, "Where to write the model (.keras).")
  flags.mark_flags_as_required(["npz", "output"])


def import_authors(npz: str, output: str) -> pathlib.Path:
  """Loads `npz` into `networks.build("mnist_small")` and saves it to `output`."""
  out = pathlib.Path(output)
  if out.suffix != ".keras":
    raise ValueError(f"output must end in .keras, got {output!r}.")
  model = pretrained.load_authors_mnist_small(npz)
  out.parent.mkdir(parents=True, exist_ok=True)
  model.save(out)
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    out = import_authors(FLAGS.npz, FLAGS.output)
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(f"Saved {out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
