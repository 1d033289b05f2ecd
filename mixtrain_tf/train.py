r"""Trains a network with MixTrain (or a baseline) and writes everything to --model_dir.

    python -m mixtrain_tf.train --flagfile=flags/mnist_small.cfg --model_dir=runs/m

Outputs: TensorBoard logs (`logs/`), a resumable backup (`backup/`, removed when
training ends; a killed run restarted with the same command continues where it
stopped, and its history, train seconds and curve cover the whole run),
`flags.txt` (resolved flags), `history.json`, `network.keras`, `metrics.json`
(test clean / PGD / verified accuracy, train seconds, peak memory, flags, the steps
done), `saved_model/` (see `mixtrain_tf.export`) and, with --curve_examples,
`curve.json` (accuracy against training seconds). Files are written atomically.

A directory holds one run (see `mixtrain_tf.rundir`): a finished run is never
overwritten (unless --overwrite), an unfinished one is resumed only with the same
flags (except `RESUME_MAY_DIFFER`), and a lock keeps a second run out.

With --time_budget_s, training runs for that many seconds (not counting curve
measurements) and the flagfile's epoch schedule is stretched over them, so that
methods of different cost can be compared at equal time
(`experiments/compare.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
import zipfile

import keras
import tensorflow as tf
from absl import app, flags, logging

from mixtrain_tf import (
  api,
  attacks,
  callbacks,
  data,
  evaluation,
  export,
  networks,
  recipes,
  rundir,
  training,
)

FLAGS = flags.FLAGS
_FLAG_NAMES: list[str] = []
_BUDGET_MAX_EPOCHS = 100_000  # --time_budget_s stops training, not an epoch count
# Flags that may differ when an unfinished run is resumed: they change where
# things are read or written, or the final evaluation's batching, not the result.
RESUME_MAY_DIFFER = ("model_dir", "data_dir", "overwrite", "export",
                     "eval_batch_size")


def define_flags():
  """Defines the training flags (once per process)."""
  before = set(FLAGS)
  _define_method_flags()
  _define_data_flags()
  _define_schedule_flags()
  _define_recipe_flags()
  _define_evaluation_flags()
  _FLAG_NAMES[:] = sorted(set(FLAGS) - before)
  _register_validators()


def _define_method_flags():
  flags.DEFINE_enum("dataset", "mnist", data.DATASETS, "Dataset.")
  flags.DEFINE_enum("network", "mnist_small", networks.NAMES, "Network.")
  flags.DEFINE_enum("method", "mixtrain", training.TRAINING_METHODS,
                    "Training method.")
  flags.DEFINE_float("epsilon", 0.1, "L-inf radius of the final test evaluation, in "
                     "[0, 1] pixel units.")
  flags.DEFINE_float("train_epsilon", None, "Radius that training ramps to "
                     "(default: --epsilon). Training slightly above the test radius "
                     "leaves a margin for verification.")
  flags.DEFINE_string("k", "5", "Robust points sampled per replica batch (mixtrain, "
                      "mixtrain_ibp), or 'auto': the most whose tight bound fits "
                      "--bound_memory_mb (printed at start).")
  flags.DEFINE_integer("bound_memory_mb", 2048, "Memory budget of the k sampled "
                       "points' bound in one train step, for --k=auto.")
  flags.DEFINE_integer("batch_size", 50, "Global batch size.")
  flags.DEFINE_integer("epochs", 20, "Epochs.")
  flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd"], "Optimizer.")
  flags.DEFINE_float("learning_rate", 1e-3, "Learning rate.")
  flags.DEFINE_list("lr_decay_epochs", [], "Epochs after which the LR is multiplied "
                    "by --lr_decay_factor.")
  flags.DEFINE_float("lr_decay_factor", 0.1, "LR decay factor.")


def _define_data_flags():
  flags.DEFINE_string("model_dir", None, "Output directory (required).")
  flags.DEFINE_string("data_dir", None, "Dataset directory (default: TFDS_DATA_DIR "
                      "or ../shared/tfds; for imagenet200 the Tiny ImageNet folder).")
  flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                    "tf.distribute strategy: one device, MirroredStrategy over this "
                    "machine's GPUs, or MultiWorkerMirroredStrategy from TF_CONFIG.")
  flags.DEFINE_boolean("jit_compile", False, "Compile the train step with XLA. Off "
                       "by default: on CPU it is slower (docs/benchmarks.md); try it "
                       "on a GPU. Input checks then poison bounds with NaN instead "
                       "of raising (XLA drops assert ops).")
  flags.DEFINE_boolean("overwrite", False, "Replace a finished (or unfinished) run "
                       "in --model_dir instead of refusing to touch it.")
  flags.DEFINE_integer("max_train_examples", None, "Use only the first N train "
                       "examples (quick runs).")
  flags.DEFINE_integer("max_eval_examples", None, "Use only the first N validation "
                       "and test examples.")
  flags.DEFINE_integer("validation_size", 1000, "Train examples held out for the "
                       "dynamic alpha rule.")
  flags.DEFINE_boolean("shuffle", True, "Reshuffle the training data every epoch.")
  flags.DEFINE_boolean("augment", None, "Augment training data (default: on for "
                       "cifar10 and imagenet200).")


def _define_schedule_flags():
  flags.DEFINE_float("alpha", 0.5, "Initial weight of the clean loss.")
  flags.DEFINE_boolean("dynamic_alpha", True, "Adapt alpha every epoch.")
  flags.DEFINE_float("alpha_delta", 0.05, "Dynamic alpha step.")
  flags.DEFINE_float("alpha_min", 0.05, "Smallest alpha.")
  flags.DEFINE_float("alpha_max", 0.95, "Largest alpha.")
  flags.DEFINE_integer("alpha_start_epoch", None, "First epoch of the alpha rule "
                       "(default: end of the epsilon ramp).")
  flags.DEFINE_float("eps_start", 0.0, "Epsilon at the start of the ramp.")
  flags.DEFINE_integer("eps_ramp_epochs", 10, "Epochs of the linear epsilon ramp.")
  flags.DEFINE_integer("eps_warmup_epochs", 0, "Epochs at eps_start before the ramp.")
  flags.DEFINE_boolean("eps_ramp_per_step", True, "Ramp every step (else per epoch).")


def _define_recipe_flags():
  flags.DEFINE_enum("eps_ramp_shape", "linear", callbacks.EpsilonRamp.SHAPES,
                    "Shape of the epsilon ramp: linear, or smooth (polynomial then "
                    "linear, as the IBP recipes).")
  flags.DEFINE_float("kappa_start", 1.0, "Clean-loss weight at the start of the eps "
                     "ramp (ibp, crown_ibp, mtl_ibp).")
  flags.DEFINE_float("kappa_end", 0.0, "Clean-loss weight at the end of the ramp.")
  flags.DEFINE_float("beta_start", 1.0, "CROWN-IBP weight at the start of the ramp "
                     "(crown_ibp).")
  flags.DEFINE_float("beta_end", 0.0, "CROWN-IBP weight at the end of the ramp.")
  flags.DEFINE_float("ibp_weight", 0.5, "Weight of the IBP loss against the PGD loss "
                     "(mtl_ibp).")
  flags.DEFINE_float("reg_weight", 0.0, "Weight of the warm-up regularisers of Shi et "
                     "al. 2021, fading over the ramp (IBP family; 0: off).")
  flags.DEFINE_float("reg_tol", 0.5, "Tolerance of the warm-up regularisers.")
  flags.DEFINE_enum("tight_bound", "symbolic", list(api.METHODS), "Bound of the k "
                    "sampled points (mixtrain_ibp).")
  flags.DEFINE_enum("init", "default", ["default", "ibp"], "Weight initialisation: "
                    "Keras' default, or the IBP initialisation (Shi et al. 2021).")
  flags.DEFINE_float("clip_norm", None, "Clip the global gradient norm to this.")
  flags.DEFINE_integer("train_pgd_steps", None, "PGD steps of the training attack "
                       "(pgd, mtl_ibp; default: --pgd_steps).")


def _define_evaluation_flags():
  flags.DEFINE_enum("eval_bound", "symbolic", list(api.METHODS),
                    "Bound for validation verified accuracy.")
  flags.DEFINE_integer("pgd_steps", None, "PGD steps (pgd training and evaluation; "
                       "default: per dataset, attacks.PGD_DEFAULTS).")
  flags.DEFINE_float("pgd_step_size", None, "PGD step size (default: per dataset).")
  flags.DEFINE_list("final_methods", ["interval", "symbolic"], "Bound methods for "
                    "the final test evaluation.")
  flags.DEFINE_boolean("final_pgd", True, "PGD accuracy in the final evaluation.")
  flags.DEFINE_integer("eval_batch_size", None, "Batch size of the final evaluation "
                       "(default: --batch_size).")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_boolean("export", True, "Write saved_model/.")
  flags.DEFINE_string("init_weights", None, "Start from the weights of this network "
                      "(a .keras file or a training --model_dir), e.g. to continue "
                      "training with other settings.")
  flags.DEFINE_float("time_budget_s", None, "Train for this many seconds instead of "
                     "--epochs epochs; the schedule written for --epochs (eps ramp, "
                     "LR decay, dynamic alpha start) is stretched over them.")
  flags.DEFINE_integer("curve_examples", 0, "Measure clean and verified accuracy "
                       "(at --epsilon, --final_methods) on the first N test images "
                       "during training, into curve.json; its time is not training "
                       "time.")
  flags.DEFINE_float("curve_every", 1.0, "Epochs (schedule epochs under "
                     "--time_budget_s) between two curve points.")


def _register_validators():
  flags.mark_flag_as_required("model_dir")
  flags.register_validator("epsilon", lambda v: 0 <= v <= 1,
                           "--epsilon must be in [0, 1] (pixel units).")
  flags.register_validator("k", lambda v: v == "auto" or (v.isdigit() and int(v) >= 1),
                           "--k must be an integer >= 1 or 'auto'.")
  flags.register_validator("bound_memory_mb", lambda v: v >= 1,
                           "--bound_memory_mb must be >= 1.")
  flags.register_validator("batch_size", lambda v: v >= 1, "--batch_size must be >= 1.")
  flags.register_validator("epochs", lambda v: v >= 1, "--epochs must be >= 1.")
  flags.register_validator("learning_rate", lambda v: v > 0,
                           "--learning_rate must be > 0.")
  flags.register_validator("alpha", lambda v: 0 <= v <= 1, "--alpha must be in [0, 1].")
  flags.register_validator("eps_start", lambda v: v >= 0, "--eps_start must be >= 0.")
  flags.register_validator("time_budget_s", lambda v: v is None or v > 0,
                           "--time_budget_s must be > 0.")
  flags.register_validator("curve_examples", lambda v: v >= 0,
                           "--curve_examples must be >= 0.")
  flags.register_validator("curve_every", lambda v: v > 0, "--curve_every must be > 0.")
  flags.register_validator("train_epsilon", lambda v: v is None or 0 <= v <= 1,
                           "--train_epsilon must be in [0, 1].")
  flags.register_validator("validation_size", lambda v: v >= 0,
                           "--validation_size must be >= 0.")
  for name in ("kappa_start", "kappa_end", "beta_start", "beta_end", "ibp_weight"):
    flags.register_validator(name, lambda v: 0 <= v <= 1,
                             f"--{name} must be in [0, 1].")
  flags.register_validator("reg_weight", lambda v: v >= 0, "--reg_weight must be >= 0.")
  flags.register_validator("reg_tol", lambda v: v > 0, "--reg_tol must be > 0.")
  flags.register_validator("clip_norm", lambda v: v is None or v > 0,
                           "--clip_norm must be > 0.")
  flags.register_validator("train_pgd_steps", lambda v: v is None or v >= 1,
                           "--train_pgd_steps must be >= 1.")
  for name in ("max_train_examples", "max_eval_examples"):
    flags.register_validator(name, lambda v: v is None or v >= 1,
                             f"--{name} must be >= 1 (or unset for all examples).")
  _register_cross_flag_validators()


def _register_cross_flag_validators():
  flags.register_multi_flags_validator(
      ["k", "batch_size", "method"],
      lambda f: f["method"] not in training.SAMPLING_METHODS or f["k"] == "auto"
      or int(f["k"]) <= f["batch_size"],
      "--k must be <= --batch_size.")
  flags.register_multi_flags_validator(
      ["dataset", "network"],
      lambda f: _network_fits(f["dataset"], f["network"]),
      "--network does not take --dataset's images (mnist_* for mnist/fashion_mnist, "
      "cifar_* for cifar10, imagenet200_resnet for imagenet200).")
  flags.register_multi_flags_validator(
      ["final_methods"], lambda f: set(f["final_methods"]) <= set(api.METHODS),
      f"--final_methods takes {', '.join(api.METHODS)}.")


def _uses_alpha(method: str) -> bool:
  """Whether the method's clean weight is `alpha` (dynamic alpha can steer it);
  the IBP recipes schedule theirs (kappa) with the eps ramp."""
  return method not in ("clean", "pgd", *training.KAPPA_SCHEDULED)


def _network_fits(dataset: str, network: str) -> bool:
  return data.input_shape(dataset) == networks.INPUT_SHAPES[network]


def check_tf_config(text: str | None) -> dict:
  """Parses and checks TF_CONFIG for --strategy=multi_worker; raises UsageError."""
  example = ('e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", '
             '"host2:12345"]}, "task": {"type": "worker", "index": 0}}\'')
  if not text:
    raise app.UsageError("--strategy=multi_worker needs the TF_CONFIG environment "
                         f"variable describing the cluster and this task; {example}.")
  try:
    config = json.loads(text)
  except json.JSONDecodeError as e:
    raise app.UsageError(f"TF_CONFIG is not valid JSON ({e}); {example}.") from None
  cluster = config.get("cluster") if isinstance(config, dict) else None
  task = config.get("task") if isinstance(config, dict) else None
  if not isinstance(cluster, dict) or not isinstance(task, dict):
    raise app.UsageError(f"TF_CONFIG needs a 'cluster' and a 'task' object; {example}.")
  if not cluster.get("chief") and not cluster.get("worker"):
    raise app.UsageError("TF_CONFIG's cluster has no chief: give a 'chief' job or a "
                         f"'worker' job (worker 0 then acts as chief); {example}.")
  kind, index = task.get("type"), task.get("index")
  if kind not in cluster or not isinstance(index, int) or not (
      0 <= index < len(cluster[kind])):
    raise app.UsageError(f"TF_CONFIG's task {task} is not in its cluster "
                         f"{sorted(cluster)}; {example}.")
  return config


def _strategy(name: str):
  """Returns (strategy, is_chief, task name)."""
  if name == "mirrored":
    return tf.distribute.MirroredStrategy(), True, "chief"
  if name == "multi_worker":
    config = check_tf_config(os.environ.get("TF_CONFIG"))
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    kind, index = config["task"]["type"], config["task"]["index"]
    chief = kind == "chief" or (kind == "worker" and index == 0
                                and "chief" not in config["cluster"])
    return strategy, chief, f"{kind}_{index}"
  return tf.distribute.get_strategy(), True, "chief"


def _read_init_weights(f) -> list:
  """Reads the --init_weights network and checks that it fits --network and
  --dataset; returns its weights. Raises UsageError."""
  path = f.init_weights
  if os.path.isdir(path):
    path = os.path.join(path, "network.keras")
  if not os.path.isfile(path):
    raise app.UsageError(f"--init_weights: no network at {path} (give a .keras file "
                         "or a training --model_dir).")
  try:
    if not zipfile.is_zipfile(path):
      raise ValueError("not a zip archive, which a .keras file is")
    source = keras.models.load_model(path, compile=False)
  except Exception as e:  # noqa: BLE001  (any reason is reported, in one line)
    reason = " ".join(str(e).split())[:300] or type(e).__name__
    raise app.UsageError(f"--init_weights: {path} could not be read as a Keras "
                         f"model: {reason}. Give a .keras file written by "
                         "keras (e.g. a training run's network.keras).") from None
  want_input = data.input_shape(f.dataset)
  got_input = tuple(source.inputs[0].shape[1:]) if getattr(
      source, "inputs", None) else None
  # A throwaway network of --network gives the weight shapes wanted.
  want = [tuple(w.shape) for w in networks.build(
      f.network, data.num_classes(f.dataset)).weights]
  got = [tuple(w.shape) for w in source.weights]
  if want != got:
    raise app.UsageError(f"--init_weights: {path} has weights of shapes {got}, "
                         f"--network={f.network} needs {want}.")
  if got_input is not None and got_input != want_input:
    raise app.UsageError(f"--init_weights: {path} takes inputs of shape {got_input}, "
                         f"--dataset={f.dataset} has images of shape {want_input}; "
                         "give a network trained on that dataset.")
  return source.get_weights()


def _check_paths(f):
  """Checks --model_dir and the data directory before any work; UsageError."""
  problem = rundir.directory_problem(f.model_dir)
  if problem:
    raise app.UsageError(f"--model_dir: {problem}; give a writable directory.")
  data_dir = f.data_dir or os.fspath(data.default_data_dir(f.dataset))
  if not os.path.isdir(data_dir):
    variable = "TINY_IMAGENET_DIR" if f.dataset == "imagenet200" else "TFDS_DATA_DIR"
    source = "--data_dir" if f.data_dir else f"the default ({variable} or ../shared)"
    raise app.UsageError(f"--data_dir: {data_dir} (from {source}) is not a "
                         f"directory; pass --data_dir or set {variable} to the "
                         f"folder that holds {f.dataset}.")


def _check_run_dir(f, out_dir: str, chief: bool):
  """Refuses a finished run or an unfinished one with other flags (RunDirError),
  or clears it for --overwrite. Call while holding the directory's lock."""
  shown = f"--model_dir={f.model_dir}" + ("" if chief else f" ({out_dir})")
  # Workers also look at the chief's directory (shared in a multi-worker run).
  done = rundir.finished(out_dir) or rundir.finished(f.model_dir)
  if f.overwrite:
    rundir.clear_outputs(out_dir)
    return
  if done:
    raise rundir.RunDirError(
        f"{shown} already holds a finished run (metrics.json / network.keras); use a "
        "new --model_dir, or --overwrite to replace it (or evaluate it with "
        "python -m mixtrain_tf.evaluate).")
  flags_txt = os.path.join(out_dir, "flags.txt")
  if os.path.exists(flags_txt):
    recorded = rundir.read_flags_file(flags_txt, _FLAG_NAMES)
    current = {name: f[name].serialize() for name in _FLAG_NAMES}
    differ = rundir.flag_differences(recorded, current, RESUME_MAY_DIFFER)
    if differ:
      raise rundir.RunDirError(
          f"{shown} holds an unfinished run with other flags: {'; '.join(differ)}. "
          f"Resume it with its flags (--flagfile={flags_txt}), use a new "
          "--model_dir, or --overwrite to start over.")


class _Curve(keras.callbacks.Callback):
  """Clean and verified accuracy on test images against training seconds.

  Writes curve.json (a list of points) after every point, so a stopped run keeps
  its curve. Evaluation time is excluded from the training seconds (and from the
  budget's clock).
  """

  def __init__(self, network, dataset, epsilon, methods, every, path,
               backup: callbacks.ResumableBackup,
               budget: callbacks.TimeBudget | None = None):
    super().__init__()
    self.network, self.dataset, self.epsilon = network, dataset, epsilon
    self.methods, self.every, self.path, self.budget = methods, every, path, budget
    self.backup = backup  # the run's clock, over a resume too
    self.points: list[dict] = []
    self.eval_seconds = 0.0

  def on_train_begin(self, logs=None):
    self._last, self._epoch, self.points, self._started = 0.0, 0, [], False

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch
    if not self._started:  # a resumed run keeps the points up to its backup
      self._started = True
      if epoch and os.path.exists(self.path):
        with open(self.path) as fh:
          self.points = [p for p in json.load(fh) if p["epoch"] <= epoch]
        if self.points:
          self._last = self.points[-1]["schedule_epoch"]

  def on_train_batch_end(self, batch, logs=None):
    # Under a budget, points are taken every `every` schedule epochs, mid-epoch if
    # need be (an epoch of an expensive method may be most of the budget).
    if self.budget and self.budget.schedule_epoch() >= self._last + self.every - 1e-9:
      self._point(self._epoch, self.budget.schedule_epoch())

  def on_epoch_end(self, epoch, logs=None):
    done = self.budget.schedule_epoch() if self.budget else epoch + 1.0
    last = self.model.stop_training or epoch + 1 == self.params.get("epochs")
    if (done >= self._last + self.every - 1e-9 or last) and (
        not self.points or done > self.points[-1]["schedule_epoch"]):
      self._point(epoch, done)

  def _point(self, epoch, done):
    self._last = done
    train_seconds = (self.budget.train_seconds() if self.budget else
                     self.backup.train_seconds())
    t = time.perf_counter()
    with self.budget.paused() if self.budget else contextlib.nullcontext():
      result = evaluation.evaluate(self.network, self.dataset, self.epsilon,
                                   methods=self.methods, attack_names=(),
                                   verbose=False)
    self.eval_seconds += time.perf_counter() - t
    self.points.append({
        "epoch": epoch + 1, "schedule_epoch": done,
        "train_seconds": round(train_seconds, 2),
        "train_epsilon": float(self.model.epsilon.numpy()),
        "alpha": float(self.model.alpha.numpy()),
        "examples": result["examples"], "clean": result["clean"]["accuracy"],
        "verified": {m: v["accuracy"] for m, v in result["verified"].items()}})
    rundir.write_json(self.path, self.points)


class _EpochSeconds(keras.callbacks.Callback):
  """Adds `epoch_seconds` to the epoch logs (so TensorBoard plots it)."""

  def on_epoch_begin(self, epoch, logs=None):
    self._t = time.perf_counter()

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None:
      logs["epoch_seconds"] = time.perf_counter() - self._t


def run(argv_flags=FLAGS) -> dict:
  """Trains per the flags; returns the metrics written to metrics.json.

  Raises:
    app.UsageError: a flag, --model_dir, the data directory or --init_weights
      cannot work (checked before any work).
    rundir.RunDirError: --model_dir holds a finished run, an unfinished one with
      other flags, or is in use by another run.
    data.DataNotFoundError: the dataset is not in the data directory.
  """
  f = argv_flags
  pgd = attacks.pgd_settings(f.dataset, f.pgd_steps, f.pgd_step_size)
  # A multi-worker strategy must exist before any other TensorFlow work.
  strategy, chief, task = _strategy(f.strategy)
  replicas = strategy.num_replicas_in_sync
  # Only the chief writes to --model_dir; other workers write their (identical)
  # outputs to model_dir/workers/<task>/, which can be deleted after training.
  out_dir = f.model_dir if chief else os.path.join(f.model_dir, "workers", task)
  k = _resolve_k(f, replicas)
  if f.dynamic_alpha and _uses_alpha(f.method) and not f.validation_size:
    raise app.UsageError("--dynamic_alpha needs --validation_size > 0.")
  _check_paths(f)
  init_weights = _read_init_weights(f) if f.init_weights else None
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise app.UsageError(f"--model_dir: cannot create {out_dir} ({e.strerror}); "
                         "give a writable directory.") from None
  describe = f"--model_dir={f.model_dir}" + ("" if chief else f" ({out_dir})")
  with rundir.RunLock(out_dir, describe):
    _check_run_dir(f, out_dir, chief)
    return _train(f, strategy, chief, task, out_dir, init_weights, pgd, k)


def _resolve_k(f, replicas: int) -> int:
  """--k as a number; for 'auto', the most points per replica whose tight bound
  fits --bound_memory_mb (estimated by `api.per_sample_bytes`, doubled for the
  values the gradient tape keeps), at most the per-replica batch."""
  per_replica = f.batch_size // replicas
  if f.method not in training.SAMPLING_METHODS:
    return 1 if f.k == "auto" else int(f.k)
  if f.k != "auto":
    if int(f.k) > per_replica:
      raise app.UsageError(f"--k={f.k} exceeds the per-replica batch "
                           f"{per_replica} ({replicas} replicas).")
    return int(f.k)
  bound = "symbolic" if f.method == "mixtrain" else f.tight_bound
  each = 2 * api.per_sample_bytes(
      networks.build(f.network, data.num_classes(f.dataset)), bound)
  fits = f.bound_memory_mb * 2**20 // each
  if fits < 1:
    raise app.UsageError(
        f"--k=auto: one point's {bound} bound on {f.network} needs about "
        f"{each / 2**20:.0f} MB, more than --bound_memory_mb={f.bound_memory_mb}; "
        "raise the budget or give --k.")
  k = int(min(fits, per_replica))
  print(f"--k=auto: k={k} points per replica ({bound} bound, about "
        f"{each / 2**20:.1f} MB each in a train step, budget "
        f"{f.bound_memory_mb} MB, per-replica batch {per_replica})", flush=True)
  return k


@contextlib.contextmanager
def _step(metrics: dict, path: str, name: str):
  """Runs a late step of the run; records it in metrics.json as done or failed
  (the files already written stay)."""
  try:
    yield
  except BaseException as e:
    metrics["failed"] = {"step": name, "error": f"{type(e).__name__}: {e}"[:2000]}
    rundir.write_json(path, metrics)
    raise
  metrics["done"].append(name)
  rundir.write_json(path, metrics)


def _train(f, strategy, chief: bool, task: str, out_dir: str,
           init_weights: list | None, pgd: dict, k: int) -> dict:
  """Trains into out_dir (checked and locked), evaluates and exports."""
  keras.utils.set_random_seed(f.seed)
  splits = _load_data(f)
  rundir.write_text(os.path.join(out_dir, "flags.txt"),
                    "".join(f[name].serialize() + "\n" for name in _FLAG_NAMES))
  network, model = _compile(f, strategy, init_weights, pgd,
                            int(splits.train.cardinality()), k)
  cbs, epochs, backup = _callbacks(f, network, splits, out_dir, chief)
  model.fit(splits.train, validation_data=splits.validation, epochs=epochs,
            callbacks=cbs, shuffle=False,  # the pipeline shuffles
            verbose=1 if sys.stdout.isatty() else 2)
  train_seconds = backup.train_seconds()
  # Peak resident memory of this process so far (training, data, TensorFlow).
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  rundir.write_json(os.path.join(out_dir, "history.json"), backup.history())
  rundir.save_keras(network, os.path.join(out_dir, "network.keras"))
  if not chief:
    return {"train_seconds": round(train_seconds, 1), "task": task}
  metrics = {
      "train_seconds": round(train_seconds, 1),
      "train_peak_rss_mb": round(peak_mb, 1),
      "epochs": backup.epochs[-1]["epoch"] + 1 if backup.epochs else f.epochs,
      "flags": {name: f[name].value for name in _FLAG_NAMES},
      "done": ["training"],
  }
  return _evaluate_and_export(f, network, splits, metrics, pgd)


def _load_data(f) -> data.Splits:
  augment = f.augment if f.augment is not None else f.dataset in ("cifar10",
                                                                  "imagenet200")
  splits = data.load_splits(
      f.dataset, data_dir=f.data_dir, batch_size=f.batch_size,
      validation_size=f.validation_size, max_train_examples=f.max_train_examples,
      max_eval_examples=f.max_eval_examples, augment=augment, shuffle=f.shuffle,
      seed=f.seed)
  if f.strategy == "multi_worker":  # shard by example: TFDS MNIST is one file
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    splits = data.Splits(*(None if d is None else d.with_options(options)
                           for d in (splits.train, splits.validation, splits.test)))
  return splits


def _compile(f, strategy, init_weights, pgd: dict, steps: int, k: int):
  """The network and its compiled MixTrainModel, built in the strategy's scope."""
  with strategy.scope():
    network = networks.build(f.network, data.num_classes(f.dataset))
    if init_weights is not None:
      network.set_weights(init_weights)
    elif f.init == "ibp":
      recipes.ibp_init(network, seed=f.seed)
    train_pgd = dict(pgd)
    if f.train_pgd_steps:
      train_pgd["pgd_steps"] = f.train_pgd_steps
    model = training.MixTrainModel(
        network, method=f.method, epsilon=f.eps_start, k=k, alpha=f.alpha,
        eval_bound=f.eval_bound, seed=f.seed, kappa=(f.kappa_start, f.kappa_end),
        beta=(f.beta_start, f.beta_end), ibp_weight=f.ibp_weight,
        reg_weight=f.reg_weight, reg_tol=f.reg_tol, tight_bound=f.tight_bound,
        **train_pgd)
    lr = f.learning_rate
    if f.lr_decay_epochs and not f.time_budget_s:
      bounds = [int(e) * steps for e in f.lr_decay_epochs]
      lr = keras.optimizers.schedules.PiecewiseConstantDecay(
          bounds, [f.learning_rate * f.lr_decay_factor**i
                   for i in range(len(bounds) + 1)])
    clip = {"global_clipnorm": f.clip_norm} if f.clip_norm else {}
    opt = (keras.optimizers.Adam(lr, **clip) if f.optimizer == "adam"
           else keras.optimizers.SGD(lr, momentum=0.9, **clip))
    model.compile(optimizer=opt, jit_compile=f.jit_compile)
  return network, model


def _callbacks(f, network, splits, out_dir: str, chief: bool):
  """(callbacks, epochs to fit, the ResumableBackup) of one run."""
  train_epsilon = f.train_epsilon if f.train_epsilon is not None else f.epsilon
  ramp = callbacks.EpsilonRamp(train_epsilon, f.eps_ramp_epochs, start=f.eps_start,
                               warmup_epochs=f.eps_warmup_epochs,
                               per_step=f.eps_ramp_per_step, shape=f.eps_ramp_shape)
  budget, epochs = None, f.epochs
  if f.time_budget_s:
    decay_at = sorted(int(e) for e in f.lr_decay_epochs)
    budget = callbacks.TimeBudget(
        f.time_budget_s, f.epochs, ramp,
        lambda e: f.learning_rate * f.lr_decay_factor**sum(e >= d for d in decay_at))
    epochs = _BUDGET_MAX_EPOCHS
  cbs = [budget or ramp, _EpochSeconds(), keras.callbacks.TerminateOnNaN()]
  if f.dynamic_alpha and _uses_alpha(f.method):
    start = (f.alpha_start_epoch if f.alpha_start_epoch is not None
             else f.eps_warmup_epochs + f.eps_ramp_epochs)
    cbs.append(callbacks.DynamicAlpha(f.alpha_delta, f.alpha_min, f.alpha_max,
                                      start_epoch=start))
  curve = None
  # It backs up the epoch logs and the training seconds with the weights, so a
  # resumed run reports the whole run; listed after the callbacks that add to the
  # epoch logs, and after the curve (whose point of an epoch is then kept on disk
  # before that epoch's backup).
  backup = callbacks.ResumableBackup(
      os.path.join(out_dir, "backup"),
      paused_seconds=lambda: curve.eval_seconds if curve else 0.0,
      on_resume=(budget.resume,) if budget else ())
  if f.curve_examples and chief:
    # Its own pipeline of the first N test images, read whole every time. Reading
    # part of the cached test split (take(N)) once left the cache complete with
    # 517 of 10,000 images, and the final evaluation then ran on those.
    first = data.load(f.dataset, "test", data_dir=f.data_dir,
                      batch_size=f.eval_batch_size or f.batch_size,
                      validation_size=f.validation_size,
                      max_examples=min(f.curve_examples, f.max_eval_examples
                                       or f.curve_examples))
    curve = _Curve(network, first, f.epsilon, tuple(f.final_methods),
        f.curve_every, os.path.join(out_dir, "curve.json"), backup, budget)
    cbs.append(curve)
  cbs.append(backup)
  if chief:
    # Epoch summaries are written at step = epoch, which a resumed fit() continues.
    cbs.append(keras.callbacks.TensorBoard(os.path.join(out_dir, "logs")))
  return cbs, epochs, backup


def _evaluate_and_export(f, network, splits, metrics: dict, pgd: dict) -> dict:
  """The chief's final test evaluation and SavedModel; each step recorded."""
  metrics_path = os.path.join(f.model_dir, "metrics.json")
  rundir.write_json(metrics_path, metrics)  # training's results are kept now
  with _step(metrics, metrics_path, "evaluation"):
    logging.info("final evaluation on the test split at epsilon %g", f.epsilon)
    test = splits.test
    if f.eval_batch_size:
      test = test.unbatch().batch(f.eval_batch_size)
    result = evaluation.evaluate(
        network, test, f.epsilon, methods=tuple(f.final_methods),
        attack_names=("pgd",) if f.final_pgd else (), verbose=True,
        num_examples=data.num_examples(f.dataset, "test", data_dir=f.data_dir,
                                       max_examples=f.max_eval_examples), **pgd)
    metrics["test"] = result
  if f.export:
    with _step(metrics, metrics_path, "export"):
      rundir.replace_dir(lambda path: export.export_saved_model(network, path),
                         os.path.join(f.model_dir, "saved_model"))
  summary = ", ".join([f"clean {result['clean']['accuracy']:.4f}"]
                      + [f"pgd {v['accuracy']:.4f}" for v in result["attacks"].values()]
                      + [f"verified[{k}] {v['accuracy']:.4f}"
                         for k, v in result["verified"].items()]
                      + ([f"verified[any] {result['verified_any']['accuracy']:.4f}"]
                         if "verified_any" in result else []))
  print(f"test ({result['examples']} examples, eps {f.epsilon}): {summary}; "
        f"train {metrics['train_seconds']:.0f} s")
  return metrics


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    run()
  except (app.UsageError, rundir.RunDirError, data.DataNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
