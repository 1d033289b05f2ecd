"""Callbacks that steer MixTrain: the epsilon ramp, dynamic alpha (docs/method.md 4), a
wall-clock training budget, and a backup that resumes history and training time.

They assign the model's non-trainable variables (`model.epsilon`, `model.alpha`),
which the compiled train step reads, so a change takes effect at the next step.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable

import keras

from mixtrain_tf import recipes


class EpsilonRamp(keras.callbacks.Callback):
  """Raises epsilon from `start` to `target` over `ramp_epochs` epochs.

  The ramp is linear, or with `shape="smooth"` polynomial then linear
  (`recipes.smooth_fraction`, the IBP recipes' shape). The fraction of the ramp
  done is also assigned to `model.progress` when the model has it (the IBP
  family's kappa, beta and regulariser schedules follow it).

  Args:
    target: final epsilon.
    ramp_epochs: epochs to reach it (0: target from the first step).
    start: epsilon at the first step.
    warmup_epochs: epochs at `start` before the ramp begins.
    per_step: update every step (smooth) or once per epoch.
    shape: "linear" or "smooth".
  """

  SHAPES = ("linear", "smooth")

  def __init__(self, target: float, ramp_epochs: int, start: float = 0.0,
               warmup_epochs: int = 0, per_step: bool = True,
               shape: str = "linear"):
    super().__init__()
    if target < 0 or start < 0:
      raise ValueError(f"epsilon must be >= 0, got start={start} target={target}.")
    if shape not in self.SHAPES:
      raise ValueError(f"unknown ramp shape {shape!r}; choose one of {self.SHAPES}.")
    self.shape = shape
    self.target, self.start = float(target), float(start)
    self.ramp_epochs, self.warmup_epochs = int(ramp_epochs), int(warmup_epochs)
    self.per_step = per_step
    self._epoch = 0

  def fraction(self, epoch: float, step: int = 0, steps_per_epoch: int = 1) -> float:
    """Fraction of the ramp done at `step` of `epoch` (both from 0; `epoch` may be
    fractional), before the ramp's shape."""
    progress = epoch - self.warmup_epochs
    if self.per_step:
      progress += step / max(1, steps_per_epoch)
    if self.ramp_epochs <= 0:
      return 1.0 if progress >= 0 else 0.0
    return min(1.0, max(0.0, progress / self.ramp_epochs))

  def value(self, epoch: float, step: int = 0, steps_per_epoch: int = 1) -> float:
    """Epsilon at `step` of `epoch`."""
    frac = self.fraction(epoch, step, steps_per_epoch)
    if self.shape == "smooth":
      frac = recipes.smooth_fraction(frac)
    return self.start + (self.target - self.start) * frac

  def apply(self, model, epoch: float, step: int = 0, steps_per_epoch: int = 1):
    """Assigns epsilon (and `progress`, when the model has it) for that moment."""
    model.epsilon.assign(self.value(epoch, step, steps_per_epoch))
    if hasattr(model, "progress"):
      model.progress.assign(self.fraction(epoch, step, steps_per_epoch))

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch
    self.apply(self.model, epoch)

  def on_train_batch_begin(self, batch, logs=None):
    if self.per_step:
      steps = (self.params or {}).get("steps") or 1
      self.apply(self.model, self._epoch, batch, steps)


class DynamicAlpha(keras.callbacks.Callback):
  """Adapts alpha (weight of the clean loss) once per epoch from validation metrics.

  Rule (docs/method.md 4, constants configurable): after each epoch from
  `start_epoch` on, compare validation verified accuracy and clean accuracy with
  the previous epoch. If verified accuracy fell by more than `tolerance`, move alpha
  toward the robust term (alpha -= delta); else if clean accuracy fell by more than
  `tolerance`, move it toward the clean term (alpha += delta). Clamp to
  [alpha_min, alpha_max]. The new alpha is written to the logs as `alpha`. The
  previous epoch's metrics are also kept in `model.alpha_rule_memory` (when the
  model has it, as MixTrainModel does), so a run resumed from a backup applies the
  rule from its first epoch. Under a `TimeBudget` (listed before this callback),
  `start_epoch` counts the budget's schedule epochs, not real ones.
  """

  def __init__(self, delta: float = 0.05, alpha_min: float = 0.0,
               alpha_max: float = 1.0, start_epoch: int = 0,
               tolerance: float = 0.0, verified_key: str = "val_verified",
               accuracy_key: str = "val_accuracy"):
    super().__init__()
    if not 0.0 <= alpha_min <= alpha_max <= 1.0:
      raise ValueError(f"need 0 <= alpha_min <= alpha_max <= 1, got "
                       f"{alpha_min}, {alpha_max}.")
    self.delta, self.alpha_min, self.alpha_max = delta, alpha_min, alpha_max
    self.start_epoch, self.tolerance = start_epoch, tolerance
    self.verified_key, self.accuracy_key = verified_key, accuracy_key
    self._previous: tuple[float, float] | None = None

  def on_epoch_end(self, epoch, logs=None):
    logs = logs if logs is not None else {}
    if self.verified_key not in logs or self.accuracy_key not in logs:
      raise ValueError(
          f"DynamicAlpha needs '{self.verified_key}' and '{self.accuracy_key}' in "
          "the epoch logs: pass validation_data to fit().")
    current = (float(logs[self.accuracy_key]), float(logs[self.verified_key]))
    memory = getattr(self.model, "alpha_rule_memory", None)
    if self._previous is None and memory is not None:  # e.g. a resumed run
      saved = memory.numpy()
      if saved.min() >= 0:
        self._previous = (float(saved[0]), float(saved[1]))
    alpha = float(self.model.alpha.numpy())
    # Epochs done; under a TimeBudget, on its schedule (it logs before us).
    done = logs.get("schedule_epoch", epoch + 1)
    if done >= self.start_epoch + 1 and self._previous is not None:
      (acc0, ver0), (acc1, ver1) = self._previous, current
      if ver1 < ver0 - self.tolerance:
        alpha -= self.delta
      elif acc1 < acc0 - self.tolerance:
        alpha += self.delta
      alpha = min(self.alpha_max, max(self.alpha_min, alpha))
      self.model.alpha.assign(alpha)
    self._previous = current
    if memory is not None:
      memory.assign(current)
    logs["alpha"] = alpha


class TimeBudget(keras.callbacks.Callback):
  """Trains for `seconds` of wall time, laying an epoch-based schedule over them.

  Used to compare training methods at equal cost: every method gets the same
  seconds, and the schedule written for `epochs` nominal epochs (the eps ramp, the
  LR decay, when dynamic alpha starts) is stretched over those seconds. At
  training time t the schedule stands at epoch `epochs * t / seconds`. Time spent
  inside `paused()` (e.g. measuring a learning curve) does not count; validation
  does (dynamic alpha needs it). Training stops after the first step at or past
  the budget (Keras still runs that epoch's validation and callbacks).

  Logs `train_seconds` (training time so far) and `schedule_epoch` at each epoch
  end. The clock starts at `on_train_begin`; a run resumed from a backup continues
  its clock when `resume(seconds)` is called (`ResumableBackup` does this), else it
  gets a new full budget.

  Args:
    seconds: training time budget.
    epochs: nominal epochs of the schedule.
    ramp: the epsilon schedule (its `value(epoch)` is read; do not also pass it to
      `fit`).
    learning_rate: optional function from schedule epoch to learning rate; the
      optimizer's learning rate must then be a plain value, not a schedule.
  """

  def __init__(self, seconds: float, epochs: float, ramp: EpsilonRamp,
               learning_rate: Callable[[float], float] | None = None):
    super().__init__()
    if seconds <= 0 or epochs <= 0:
      raise ValueError(f"seconds and epochs must be > 0, got {seconds}, {epochs}.")
    self.seconds, self.epochs = float(seconds), float(epochs)
    self.ramp, self.learning_rate = ramp, learning_rate
    self._start = None
    self._excluded = 0.0
    self._before = 0.0

  def train_seconds(self) -> float:
    """Training seconds so far, including those before a resume."""
    if self._start is None:
      return self._before
    return self._before + time.perf_counter() - self._start - self._excluded

  def resume(self, seconds_before: float):
    """Continues the clock of a run that had trained `seconds_before` seconds."""
    self._before = float(seconds_before)
    if self.model is not None and self._start is not None:
      self._apply()

  def schedule_epoch(self) -> float:
    return self.epochs * min(1.0, self.train_seconds() / self.seconds)

  @contextlib.contextmanager
  def paused(self):
    """Time inside this block is not training time."""
    t = time.perf_counter()
    try:
      yield
    finally:
      self._excluded += time.perf_counter() - t

  def _apply(self):
    e = self.schedule_epoch()
    self.ramp.apply(self.model, e if self.ramp.per_step else int(e))
    if self.learning_rate is not None:
      self.model.optimizer.learning_rate = self.learning_rate(e)

  def on_train_begin(self, logs=None):
    self._start, self._excluded = time.perf_counter(), 0.0
    self._apply()

  def on_train_batch_begin(self, batch, logs=None):
    self._apply()

  def on_train_batch_end(self, batch, logs=None):
    if self.train_seconds() >= self.seconds:
      self.model.stop_training = True

  def on_epoch_end(self, epoch, logs=None):
    if self.train_seconds() >= self.seconds:  # e.g. validation used up the rest
      self.model.stop_training = True
    if logs is not None:
      logs["train_seconds"] = self.train_seconds()
      logs["schedule_epoch"] = self.schedule_epoch()


class ResumableBackup(keras.callbacks.BackupAndRestore):
  """`BackupAndRestore` that also backs up the epoch logs and training seconds.

  A run resumed from the backup then reports its whole history: `history()` holds
  every epoch's logs (the ones before the interruption, read from `progress.json`
  in the backup folder, then this run's), and `train_seconds()` adds the seconds
  trained before. Epochs logged after the last weights backup (a run killed in
  between) are dropped, as Keras retrains them. List it after the callbacks that
  add to the epoch logs, so that the logs it keeps are complete.

  Args:
    backup_dir: As for `BackupAndRestore` (double checkpointing is on).
    paused_seconds: Function returning the seconds of this `fit` that were not
      training (e.g. learning-curve measurements).
    on_resume: Functions called with the seconds trained before, after a restore
      (e.g. `TimeBudget.resume`).
  """

  PROGRESS = "progress.json"

  def __init__(self, backup_dir: str,
               paused_seconds: Callable[[], float] = lambda: 0.0,
               on_resume: tuple[Callable[[float], None], ...] = ()):
    super().__init__(backup_dir, double_checkpoint=True)
    self._paused_seconds, self._on_resume = paused_seconds, on_resume
    self.epochs: list[dict] = []
    self.initial_epoch = 0
    self.seconds_before = 0.0
    self._t0 = None

  def on_train_begin(self, logs=None):
    super().on_train_begin(logs)
    self.initial_epoch = int(getattr(self.model, "_initial_epoch", None) or 0)
    path = os.path.join(self.backup_dir, self.PROGRESS)
    saved = []
    if self.initial_epoch and os.path.exists(path):
      with open(path) as fh:
        saved = json.load(fh)
    self.epochs = [e for e in saved if e["epoch"] < self.initial_epoch]
    self.seconds_before = self.epochs[-1]["train_seconds"] if self.epochs else 0.0
    self._t0 = time.perf_counter()
    if self.initial_epoch:
      for resume in self._on_resume:
        resume(self.seconds_before)

  def train_seconds(self) -> float:
    """Training seconds of the whole run so far (before a resume and since)."""
    if self._t0 is None:
      return self.seconds_before
    return (self.seconds_before + time.perf_counter() - self._t0
            - self._paused_seconds())

  def history(self) -> dict[str, list[float]]:
    """{log name: one value per epoch} over the whole run."""
    keys = []
    for e in self.epochs:
      keys += [k for k in e["logs"] if k not in keys]
    return {k: [e["logs"].get(k, float("nan")) for e in self.epochs] for k in keys}

  def on_epoch_end(self, epoch, logs=None):
    self.epochs.append({
        "epoch": epoch, "train_seconds": self.train_seconds(),
        "logs": {k: float(v) for k, v in (logs or {}).items()}})
    # Written before the weights: a kill in between leaves an extra epoch here,
    # which on_train_begin drops.
    os.makedirs(self.backup_dir, exist_ok=True)
    path = os.path.join(self.backup_dir, self.PROGRESS)
    temp = f"{path}.tmp"
    with open(temp, "w") as fh:
      json.dump(self.epochs, fh)
    os.replace(temp, path)
    super().on_epoch_end(epoch, logs)
