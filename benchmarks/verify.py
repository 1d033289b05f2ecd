r"""Seconds per 1,000 MNIST test images: interval and symbolic verification, PGD-40
and the interval attack, on MNIST_Small (the authors' released MixTrain model unless
--model names another .keras file or training model_dir).

    python benchmarks/verify.py [--num_examples=1000] [--epsilon=0.1] [--model=...]
"""

from __future__ import annotations

import os
import pathlib

from absl import app, flags

from mixtrain_tf import data, evaluate, evaluation, pretrained

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_examples", 1000, "MNIST test images.")
flags.DEFINE_float("epsilon", 0.1, "L-inf radius.")
flags.DEFINE_integer("batch_size", 100, "Batch size.")
flags.DEFINE_string("model", None, "A .keras file or training model_dir (default: "
                    "the authors' MixTrain MNIST_Small from ../shared/models).")

AUTHORS = (pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "models"
           / "mnist_small_mixtrain_eps0.3_authors.npz")


def main(argv):
  del argv
  if FLAGS.model:
    network = evaluate.load_model(FLAGS.model)[0]
  else:
    network = pretrained.load_authors_mnist_small(AUTHORS)
  test = data.load("mnist", "test", batch_size=FLAGS.batch_size,
                   max_examples=FLAGS.num_examples)
  warm = data.load("mnist", "test", batch_size=FLAGS.batch_size,
                   max_examples=FLAGS.batch_size)
  runs = [("interval", ("interval",), ()), ("symbolic", ("symbolic",), ()),
          ("pgd-40", (), ("pgd",)), ("interval attack", (), ("interval",))]
  print(f"load average at start: {os.getloadavg()}")
  print(f"{'what':<18}{'s / 1,000 images':>18}{'accuracy':>10}")
  for label, methods, attacks in runs:
    kwargs = dict(methods=methods, attack_names=attacks, verbose=False)
    evaluation.evaluate(network, warm, FLAGS.epsilon, **kwargs)  # trace
    result = evaluation.evaluate(network, test, FLAGS.epsilon, **kwargs)
    leaf = (result["verified"][methods[0]] if methods
            else result["attacks"][attacks[0]])
    per_1000 = leaf["seconds"] * 1000 / result["examples"]
    print(f"{label:<18}{per_1000:>18.2f}{leaf['accuracy']:>10.4f}")
  print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
