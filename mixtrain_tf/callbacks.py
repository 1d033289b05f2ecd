"""Callbacks that steer MixTrain: the epsilon ramp and dynamic alpha (MIXTRAIN.md 4).

Both assign the model's non-trainable variables (`model.epsilon`, `model.alpha`),
which the compiled train step reads, so a change takes effect at the next step.
"""

from __future__ import annotations

import keras


class EpsilonRamp(keras.callbacks.Callback):
  """Raises epsilon linearly from `start` to `target` over `ramp_epochs` epochs.

  Args:
    target: final epsilon.
    ramp_epochs: epochs to reach it (0: target from the first step).
    start: epsilon at the first step.
    warmup_epochs: epochs at `start` before the ramp begins.
    per_step: update every step (smooth) or once per epoch.
  """

  def __init__(self, target: float, ramp_epochs: int, start: float = 0.0,
               warmup_epochs: int = 0, per_step: bool = True):
    super().__init__()
    if target < 0 or start < 0:
      raise ValueError(f"epsilon must be >= 0, got start={start} target={target}.")
    self.target, self.start = float(target), float(start)
    self.ramp_epochs, self.warmup_epochs = int(ramp_epochs), int(warmup_epochs)
    self.per_step = per_step
    self._epoch = 0

  def value(self, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """Epsilon at `step` of `epoch` (both from 0)."""
    progress = epoch - self.warmup_epochs
    if self.per_step:
      progress += step / max(1, steps_per_epoch)
    if self.ramp_epochs <= 0:
      frac = 1.0 if progress >= 0 else 0.0
    else:
      frac = min(1.0, max(0.0, progress / self.ramp_epochs))
    return self.start + (self.target - self.start) * frac

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch
    self.model.epsilon.assign(self.value(epoch))

  def on_train_batch_begin(self, batch, logs=None):
    if self.per_step:
      steps = (self.params or {}).get("steps") or 1
      self.model.epsilon.assign(self.value(self._epoch, batch, steps))


class DynamicAlpha(keras.callbacks.Callback):
  """Adapts alpha (weight of the clean loss) once per epoch from validation metrics.

  Rule (MIXTRAIN.md 4, constants configurable): after each epoch from
  `start_epoch` on, compare validation verified accuracy and clean accuracy with
  the previous epoch. If verified accuracy fell by more than `tolerance`, move alpha
  toward the robust term (alpha -= delta); else if clean accuracy fell by more than
  `tolerance`, move it toward the clean term (alpha += delta). Clamp to
  [alpha_min, alpha_max]. The new alpha is written to the logs as `alpha`. The
  previous epoch's metrics are also kept in `model.alpha_rule_memory` (when the
  model has it, as MixTrainModel does), so a run resumed from a backup applies the
  rule from its first epoch.
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
    if epoch >= self.start_epoch and self._previous is not None:
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
