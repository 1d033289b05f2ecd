r"""Seconds per 1,000 MNIST test images and verified / attacked accuracy of every
bound method (interval, symbolic, crown_ibp, crown, alpha_crown), PGD-40 and the
interval attack, on MNIST_Small (the authors' released MixTrain model unless
--model names another .keras file or training model_dir). TFDS test order.

    python benchmarks/verify.py [--num_examples=1000] [--epsilon=0.1] [--model=...]
    python benchmarks/verify.py --runs=symbolic,crown,alpha_crown --alpha_steps=20
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
flags.DEFINE_list("runs", ["interval", "symbolic", "crown_ibp", "crown",
                           "alpha_crown", "pgd", "interval_attack"],
                  "What to time: bound methods, pgd, interval_attack.")
flags.DEFINE_integer("alpha_steps", None, "alpha_crown steps (default: the "
                     "library's).")
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
  attacks = {"pgd": "pgd", "interval_attack": "interval"}
  runs = [(r, () if r in attacks else (r,), (attacks[r],) if r in attacks else ())
          for r in FLAGS.runs]
  print(f"load average at start: {os.getloadavg()}")
  print(f"{'what':<18}{'s / 1,000 images':>18}{'accuracy':>10}")
  for label, methods, attack_names in runs:
    kwargs = dict(methods=methods, attack_names=attack_names, verbose=False,
                  alpha_steps=FLAGS.alpha_steps)
    evaluation.evaluate(network, warm, FLAGS.epsilon, **kwargs)  # trace
    result = evaluation.evaluate(network, test, FLAGS.epsilon, **kwargs)
    leaf = (result["verified"][methods[0]] if methods
            else result["attacks"][attack_names[0]])
    per_1000 = leaf["seconds"] * 1000 / result["examples"]
    print(f"{label:<18}{per_1000:>18.2f}{leaf['accuracy']:>10.4f}")
  print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
