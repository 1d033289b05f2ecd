r"""Clean, attacked and verified accuracy of a trained model on a test set.

    python -m mixtrain_tf.evaluate --model=runs/m --dataset=mnist --epsilon=0.1 \
        --methods=interval,symbolic --attacks=pgd,interval --output=eval.json

--model is a training run's --model_dir (its network.keras), a `.keras` file, or a
SavedModel directory written by `mixtrain_tf.export` (then only the bound method it
was exported with, symbolic by default, and the PGD attack are available: the
SavedModel carries the bounds, not layers).
The JSON holds, per method and attack: accuracy, count and seconds; the invariant
verified <= attacked <= clean is checked (a violation means a bug and is an error).
"""

from __future__ import annotations

import json
import os
import sys

import keras
import tensorflow as tf
from absl import app, flags

from mixtrain_tf import api, attacks, data, evaluation
from mixtrain_tf import layers as _layers  # noqa: F401  (registers custom layers)

FLAGS = flags.FLAGS


def define_flags():
  """Defines the evaluation flags (once per process)."""
  flags.DEFINE_string("model", None, "Training --model_dir, .keras file or "
                      "SavedModel directory.")
  flags.DEFINE_enum("dataset", "mnist", data.DATASETS, "Dataset.")
  flags.DEFINE_string("data_dir", None, "Dataset directory (as for training).")
  flags.DEFINE_float("epsilon", 0.1, "L-inf radius in [0, 1] pixel units.")
  flags.DEFINE_list("methods", ["interval", "symbolic"], "Bound methods.")
  flags.DEFINE_list("attacks", ["pgd"], "Attacks: pgd, interval.")
  flags.DEFINE_integer("num_examples", None, "Evaluate the first N test examples.")
  flags.DEFINE_integer("batch_size", 100, "Batch size.")
  flags.DEFINE_integer("pgd_steps", None, "PGD steps per restart (default: per "
                       "dataset, attacks.PGD_DEFAULTS).")
  flags.DEFINE_float("pgd_step_size", None, "PGD step size (default: per dataset).")
  flags.DEFINE_integer("restarts", 1, "Attack restarts.")
  flags.DEFINE_string("output", None, "Write the JSON result here.")
  flags.mark_flag_as_required("model")
  flags.register_validator("epsilon", lambda v: 0 <= v <= 1,
                           "--epsilon must be in [0, 1] (pixel units).")
  flags.DEFINE_integer("alpha_steps", None, "Optimisation steps of alpha_crown "
                       "(default: mixtrain_tf.crown.DEFAULT_ALPHA_STEPS).")
  flags.DEFINE_boolean("jit_compile", False, "Compile the bound methods' margins "
                       "with XLA (off: slower on CPU; try it on a GPU). Refused "
                       "inputs then give NaN bounds, never counted as verified.")
  flags.DEFINE_float("bab_time_limit", 30.0, "Seconds per example for "
                     "--methods=bab (complete verification by branch and bound).")
  flags.DEFINE_integer("memory_budget_mb", api.DEFAULT_MEMORY_BUDGET_MB,
                       "Peak memory (MiB) of one bound call: each batch is bounded "
                       "in slices that fit (a worst-case estimate per example). "
                       "Raise it on a large machine for speed.")
  flags.register_validator("memory_budget_mb", lambda v: v > 0,
                           "--memory_budget_mb must be > 0.")
  flags.register_validator("methods", lambda v: set(v) <= {*api.METHODS, "bab"},
                           f"--methods takes {', '.join(api.METHODS)}, bab.")
  flags.register_validator("bab_time_limit", lambda v: v > 0,
                           "--bab_time_limit must be > 0.")
  flags.register_validator("alpha_steps", lambda v: v is None or v >= 0,
                           "--alpha_steps must be >= 0.")
  flags.register_validator("attacks", lambda v: set(v) <= set(evaluation.ATTACKS),
                           f"--attacks takes {', '.join(evaluation.ATTACKS)}.")
  flags.register_validator("batch_size", lambda v: v >= 1, "--batch_size must be >= 1.")
  flags.register_validator("restarts", lambda v: v >= 1, "--restarts must be >= 1.")
  flags.register_validator("num_examples", lambda v: v is None or v >= 1,
                           "--num_examples must be >= 1 (or left out for the whole "
                           "test set).")


class EvaluateError(Exception):
  """A problem the user can fix; printed as one line, exit code 1."""


def load_model(path: str):
  """Returns (keras model or None, predict_fn or None, margins_fn or None)."""
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "network.keras")):
    path = os.path.join(path, "network.keras")
  if path.endswith(".keras") and os.path.isfile(path):
    try:
      return keras.models.load_model(path, compile=False), None, None
    except Exception as e:  # pylint: disable=broad-except
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise EvaluateError(f"--model={path} could not be read as a Keras model: "
                          f"{reason}") from None
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
    loaded = tf.saved_model.load(path)
    serve, margins = loaded.signatures["serving_default"], loaded.signatures["margins"]

    def predict_fn(x):
      return serve(images=x)["logits"]

    saved_method = saved_bound_method(loaded)

    def margins_fn(x, y, epsilon, method):
      if method != saved_method:
        raise ValueError(f"this SavedModel carries {saved_method} bounds, not "
                         f"{method!r}; use --methods={saved_method} or pass the "
                         "network.keras file.")
      return margins(images=x, labels=tf.cast(y, tf.int32),
                     epsilon=tf.constant(epsilon, tf.float32))["margin_upper"]

    predict_fn.saved_model = loaded  # the signatures need the loaded variables
    predict_fn.bound_method = saved_method
    predict_fn.input_shape = tuple(serve.structured_input_signature[1][
        "images"].shape[1:])
    return None, predict_fn, margins_fn
  raise EvaluateError(f"--model={path}: not a training --model_dir (with "
                      "network.keras), a .keras file or a SavedModel directory.")


def saved_bound_method(loaded) -> str:
  """The bound method a SavedModel's signatures compute ("symbolic" before it was
  recorded)."""
  var = getattr(loaded, "bound_method", None)
  return var.numpy().decode() if var is not None else "symbolic"


def check_output(path: str | None) -> None:
  """Fails at once (before any work) if --output cannot be written."""
  if not path:
    return
  if os.path.isdir(path):
    raise EvaluateError(f"--output={path} is a directory; give a file path, e.g. "
                        f"--output={os.path.join(path, 'eval.json')}.")
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise EvaluateError(f"--output={path}: cannot create its directory ({e.strerror}"
                        "); choose a writable path.") from None
  if not os.access(parent, os.W_OK) or (os.path.exists(path)
                                         and not os.access(path, os.W_OK)):
    raise EvaluateError(f"--output={path} is not writable; choose a writable path.")


def _write(path: str | None, result: dict) -> str:
  text = json.dumps(result, indent=1)
  if path:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
      fh.write(text)
    os.replace(tmp, path)
  return text


def run() -> dict:
  """Checks every flag, the data and the model, then evaluates; see module doc."""
  check_output(FLAGS.output)
  test = data.load(FLAGS.dataset, "test", data_dir=FLAGS.data_dir,
                   batch_size=FLAGS.batch_size, max_examples=FLAGS.num_examples)
  network, predict_fn, margins_fn = load_model(FLAGS.model)
  if network is None and (set(FLAGS.methods) - {predict_fn.bound_method}
                          or "interval" in FLAGS.attacks):
    raise EvaluateError(f"this SavedModel supports --methods="
                        f"{predict_fn.bound_method} and --attacks=pgd only; pass "
                        "network.keras for the rest.")
  want = tuple(data.input_shape(FLAGS.dataset))
  got = (tuple(network.inputs[0].shape[1:]) if network is not None
         else predict_fn.input_shape)
  if got != want:
    raise EvaluateError(
        f"--model={FLAGS.model} takes inputs of shape {got}, but --dataset="
        f"{FLAGS.dataset} has images of shape {want}: pass the dataset the model was "
        "trained on.")
  if network is not None:
    try:
      api.bound_graph(network)
    except ValueError as e:
      raise EvaluateError(f"--model={FLAGS.model}: {e}") from None
  header = {"model": FLAGS.model, "dataset": FLAGS.dataset}
  try:
    result = evaluation.evaluate(
        network, test, FLAGS.epsilon, methods=tuple(FLAGS.methods),
        attack_names=tuple(FLAGS.attacks),
        **attacks.pgd_settings(FLAGS.dataset, FLAGS.pgd_steps, FLAGS.pgd_step_size),
        pgd_restarts=FLAGS.restarts,
        num_examples=data.num_examples(FLAGS.dataset, "test", data_dir=FLAGS.data_dir,
                                       max_examples=FLAGS.num_examples),
        predict_fn=predict_fn,
        margins_fn=margins_fn, alpha_steps=FLAGS.alpha_steps,
        bab_time_limit=FLAGS.bab_time_limit, jit_compile=FLAGS.jit_compile,
        memory_budget_mb=FLAGS.memory_budget_mb)
  except evaluation.EvaluationError as e:  # keep what was measured
    _write(FLAGS.output, {**e.partial_result, **header})
    where = f"; the partial results are in {FLAGS.output}" if FLAGS.output else ""
    raise EvaluateError(f"{e}{where}") from None
  result.update(header)
  print(_write(FLAGS.output, result))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    run()
  except (EvaluateError, data.DataNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
