"""Tests of the training callbacks (mixtrain_tf.callbacks, docs/method.md 4):
EpsilonRamp, DynamicAlpha, TimeBudget.

The in-fit checks train on a tiny batch of real MNIST (the conftest mnist_batch
fixture) with the builders of tests/zoo.py; the rest drive the callbacks on stand-in
models. MixTrainModel itself is tested in training_test.py.
"""

from __future__ import annotations

import types

import keras
import numpy as np
import pytest
import tensorflow as tf
import zoo  # tests/zoo.py: the shared networks and helpers

from mixtrain_tf import callbacks, recipes

BATCH = zoo.TRAIN_BATCH


# -- EpsilonRamp ------------------------------------------------------------------


def test_epsilon_ramp_value_per_step():
  ramp = callbacks.EpsilonRamp(0.1, ramp_epochs=4)
  assert ramp.value(0) == 0.0
  assert ramp.value(0, 5, 10) == pytest.approx(0.1 * 0.5 / 4)
  assert ramp.value(1) == pytest.approx(0.025)
  assert ramp.value(2, 5, 10) == pytest.approx(0.1 * 2.5 / 4)
  assert ramp.value(4) == pytest.approx(0.1)
  assert ramp.value(9, 3, 10) == pytest.approx(0.1)
  values = [ramp.value(e, s, 10) for e in range(6) for s in range(10)]
  assert all(b >= a for a, b in zip(values, values[1:])), "not monotone"


def test_epsilon_ramp_value_start_warmup_and_per_epoch():
  ramp = callbacks.EpsilonRamp(0.3, ramp_epochs=3, start=0.03, warmup_epochs=2)
  assert ramp.value(0) == pytest.approx(0.03)
  assert ramp.value(1, 9, 10) == pytest.approx(0.03)
  assert ramp.value(2) == pytest.approx(0.03)
  assert ramp.value(3) == pytest.approx(0.03 + 0.27 / 3)
  assert ramp.value(3, 5, 10) == pytest.approx(0.03 + 0.27 * 1.5 / 3)
  assert ramp.value(5) == pytest.approx(0.3)
  assert ramp.value(50) == pytest.approx(0.3)
  per_epoch = callbacks.EpsilonRamp(0.3, ramp_epochs=3, start=0.03,
                                    warmup_epochs=2, per_step=False)
  for epoch in range(7):
    for step in (0, 4, 9):
      assert per_epoch.value(epoch, step, 10) == pytest.approx(ramp.value(epoch))


def test_epsilon_ramp_zero_epochs():
  ramp = callbacks.EpsilonRamp(0.2, ramp_epochs=0)
  assert ramp.value(0) == pytest.approx(0.2)
  assert ramp.value(0, 3, 10) == pytest.approx(0.2)
  warm = callbacks.EpsilonRamp(0.2, ramp_epochs=0, start=0.05, warmup_epochs=1)
  assert warm.value(0) == pytest.approx(0.05)
  assert warm.value(0, 9, 10) == pytest.approx(0.05)
  assert warm.value(1) == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs", [dict(target=-0.1, ramp_epochs=2),
                                    dict(target=0.1, ramp_epochs=2, start=-0.01)])
def test_epsilon_ramp_rejects_negative_epsilon(kwargs):
  with pytest.raises(ValueError, match="epsilon"):
    callbacks.EpsilonRamp(**kwargs)


class _EpsilonRecorder(keras.callbacks.Callback):

  def __init__(self):
    super().__init__()
    self.seen = []

  def on_train_batch_begin(self, batch, logs=None):
    self.seen.append(float(self.model.epsilon.numpy()))


@pytest.mark.parametrize("per_step", [True, False])
def test_epsilon_ramp_assigns_model_epsilon_during_fit(per_step, mnist_batch):
  """4 steps per epoch, ramp over 2 epochs; the step's own epsilon metric agrees."""
  x, y = mnist_batch
  model = zoo.mixtrain_model("clean", network=zoo.linear_net(), epsilon=0.5)
  ramp = callbacks.EpsilonRamp(0.2, ramp_epochs=2, per_step=per_step)
  recorder = _EpsilonRecorder()
  history = model.fit(x, y, batch_size=2, epochs=3, shuffle=False, verbose=0,
                      callbacks=[ramp, recorder]).history
  expected = [ramp.value(e, s, 4) for e in range(3) for s in range(4)]
  np.testing.assert_allclose(recorder.seen, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(history["epsilon"],
                             np.mean(np.reshape(expected, (3, 4)), axis=1),
                             rtol=1e-5, atol=1e-7)
  assert float(model.epsilon.numpy()) == pytest.approx(expected[-1])
  if per_step:
    assert expected[:5] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
  else:
    assert expected[:5] == pytest.approx([0.0] * 4 + [0.1])


def test_smooth_ramp_follows_the_smooth_fraction_and_sets_progress():
  ramp = callbacks.EpsilonRamp(0.4, ramp_epochs=10, warmup_epochs=1, shape="smooth")
  for epoch, frac in [(0, 0.0), (1, 0.0), (2, 0.1), (4.5, 0.35), (11, 1.0)]:
    assert ramp.fraction(epoch) == pytest.approx(frac)
    assert ramp.value(epoch) == pytest.approx(0.4 * recipes.smooth_fraction(frac))
  model = types.SimpleNamespace(epsilon=tf.Variable(0.0), progress=tf.Variable(0.0))
  ramp.apply(model, 3, 5, 10)
  assert float(model.progress.numpy()) == pytest.approx(0.25)
  assert float(model.epsilon.numpy()) == pytest.approx(
      0.4 * recipes.smooth_fraction(0.25))
  with pytest.raises(ValueError, match="shape"):
    callbacks.EpsilonRamp(0.1, 2, shape="cosine")


# -- DynamicAlpha ------------------------------------------------------------------


def _alpha_callback(alpha=0.5, **kwargs):
  cb = callbacks.DynamicAlpha(**kwargs)
  cb.set_model(types.SimpleNamespace(alpha=tf.Variable(alpha)))
  return cb


def _epoch(cb, epoch, accuracy, verified):
  logs = {"val_accuracy": accuracy, "val_verified": verified}
  cb.on_epoch_end(epoch, logs)
  assert logs["alpha"] == pytest.approx(float(cb.model.alpha.numpy()))
  return float(cb.model.alpha.numpy())


def test_dynamic_alpha_rule():
  cb = _alpha_callback(0.5, delta=0.1)
  assert _epoch(cb, 0, 0.90, 0.50) == pytest.approx(0.5)  # nothing to compare yet
  assert _epoch(cb, 1, 0.80, 0.40) == pytest.approx(0.4)  # both fell: verified wins
  assert _epoch(cb, 2, 0.70, 0.45) == pytest.approx(0.5)  # only clean fell
  assert _epoch(cb, 3, 0.75, 0.45) == pytest.approx(0.5)  # nothing fell
  assert _epoch(cb, 4, 0.80, 0.44) == pytest.approx(0.4)  # only verified fell
  assert _epoch(cb, 5, 0.85, 0.50) == pytest.approx(0.4)  # both rose


def test_dynamic_alpha_clamps():
  low = _alpha_callback(0.25, delta=0.1, alpha_min=0.2)
  _epoch(low, 0, 0.9, 0.5)
  assert _epoch(low, 1, 0.9, 0.4) == pytest.approx(0.2)
  assert _epoch(low, 2, 0.9, 0.3) == pytest.approx(0.2)
  high = _alpha_callback(0.75, delta=0.1, alpha_max=0.8)
  _epoch(high, 0, 0.9, 0.5)
  assert _epoch(high, 1, 0.8, 0.5) == pytest.approx(0.8)
  assert _epoch(high, 2, 0.7, 0.5) == pytest.approx(0.8)


def test_dynamic_alpha_start_epoch_and_tolerance():
  cb = _alpha_callback(0.5, delta=0.1, start_epoch=2, tolerance=0.01)
  _epoch(cb, 0, 0.9, 0.5)
  assert _epoch(cb, 1, 0.5, 0.1) == pytest.approx(0.5)  # before start_epoch
  assert _epoch(cb, 2, 0.5, 0.095) == pytest.approx(0.5)  # fell within tolerance
  assert _epoch(cb, 3, 0.5, 0.08) == pytest.approx(0.4)  # fell by more


@pytest.mark.parametrize("logs", [{}, {"val_accuracy": 0.9}, {"val_verified": 0.5},
                                  {"accuracy": 0.9, "verified": 0.5}])
def test_dynamic_alpha_without_validation_metrics_raises(logs):
  cb = _alpha_callback()
  with pytest.raises(ValueError, match="validation_data"):
    cb.on_epoch_end(0, logs)


@pytest.mark.parametrize("kwargs", [dict(alpha_min=0.6, alpha_max=0.4),
                                    dict(alpha_min=-0.1), dict(alpha_max=1.5)])
def test_dynamic_alpha_rejects_bad_range(kwargs):
  with pytest.raises(ValueError, match="alpha_min"):
    callbacks.DynamicAlpha(**kwargs)


def test_dynamic_alpha_in_fit_without_validation_data_raises(mnist_batch):
  x, y = mnist_batch
  model = zoo.mixtrain_model("clean", network=zoo.linear_net())
  with pytest.raises(ValueError, match="validation_data"):
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
              callbacks=[callbacks.DynamicAlpha()])


def test_dynamic_alpha_in_fit_logs_alpha(mnist_batch):
  x, y = mnist_batch
  model = zoo.mixtrain_model("interval", network=zoo.linear_net(), epsilon=0.01)
  history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
                      validation_data=(x, y),
                      callbacks=[callbacks.DynamicAlpha(delta=0.1)]).history
  assert {"val_accuracy", "val_verified", "alpha"} <= set(history)
  assert history["alpha"][0] == pytest.approx(0.5)
  assert history["alpha"][-1] == pytest.approx(float(model.alpha.numpy()))


def test_dynamic_alpha_rule_state_survives_a_new_callback():
  """A resumed run builds a fresh callback: the rule reads the model's memory."""
  model = types.SimpleNamespace(alpha=tf.Variable(0.5),
                                alpha_rule_memory=tf.Variable([-1.0, -1.0]))
  first = callbacks.DynamicAlpha(delta=0.1)
  first.set_model(model)
  first.on_epoch_end(0, {"val_accuracy": 0.9, "val_verified": 0.8})
  np.testing.assert_allclose(model.alpha_rule_memory.numpy(), [0.9, 0.8])
  resumed = callbacks.DynamicAlpha(delta=0.1)
  resumed.set_model(model)
  resumed.on_epoch_end(1, {"val_accuracy": 0.9, "val_verified": 0.7})
  assert float(model.alpha.numpy()) == pytest.approx(0.4)


# -- TimeBudget -------------------------------------------------------------------


class _FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def _budget(monkeypatch, seconds=10.0, epochs=5, **ramp_kwargs):
  clock = _FakeClock()
  monkeypatch.setattr(callbacks.time, "perf_counter", clock)
  ramp = callbacks.EpsilonRamp(0.2, ramp_epochs=2, **ramp_kwargs)
  budget = callbacks.TimeBudget(seconds, epochs, ramp,
                                learning_rate=lambda e: 1e-3 * 0.1**(e >= 3))
  model = types.SimpleNamespace(epsilon=tf.Variable(0.0), stop_training=False,
                                optimizer=types.SimpleNamespace(learning_rate=None))
  budget.set_model(model)
  return budget, model, clock


def test_time_budget_lays_the_epoch_schedule_over_the_seconds(monkeypatch):
  budget, model, clock = _budget(monkeypatch)  # 10 s for 5 epochs: 2 s an epoch
  budget.on_train_begin()
  seen = []
  for t in [0.0, 1.0, 2.0, 4.0, 5.9, 6.0, 9.9]:
    clock.now = 100.0 + t
    budget.on_train_batch_begin(0)
    seen.append((float(model.epsilon.numpy()), model.optimizer.learning_rate))
    budget.on_train_batch_end(0)
    assert not model.stop_training
  assert [e for e, _ in seen] == pytest.approx([0.0, 0.05, 0.1, 0.2, 0.2, 0.2, 0.2])
  assert [lr for _, lr in seen] == pytest.approx([1e-3] * 5 + [1e-4] * 2)
  clock.now = 110.0
  budget.on_train_batch_end(0)
  assert model.stop_training
  logs = {}
  budget.on_epoch_end(0, logs)
  assert logs == {"train_seconds": pytest.approx(10.0), "schedule_epoch": 5.0}


def test_time_budget_does_not_count_paused_time(monkeypatch):
  budget, model, clock = _budget(monkeypatch)
  budget.on_train_begin()
  clock.now = 103.0
  with budget.paused():
    clock.now = 150.0  # e.g. measuring a learning curve
  clock.now = 152.0
  assert budget.train_seconds() == pytest.approx(5.0)
  budget.on_train_batch_end(0)
  assert not model.stop_training


def test_time_budget_per_epoch_ramp_steps_on_whole_schedule_epochs(monkeypatch):
  budget, model, clock = _budget(monkeypatch, per_step=False)
  budget.on_train_begin()
  clock.now = 103.9  # schedule epoch 1.95: the per-epoch ramp is still at epoch 1
  budget.on_train_batch_begin(0)
  assert float(model.epsilon.numpy()) == pytest.approx(0.1)


@pytest.mark.parametrize("seconds,epochs", [(0, 5), (-1, 5), (10, 0)])
def test_time_budget_rejects_empty_budget(seconds, epochs):
  with pytest.raises(ValueError, match="> 0"):
    callbacks.TimeBudget(seconds, epochs, callbacks.EpsilonRamp(0.1, 1))


def test_dynamic_alpha_starts_on_the_budget_schedule():
  cb = _alpha_callback(0.5, delta=0.1, start_epoch=2)
  cb.on_epoch_end(0, {"val_accuracy": 0.9, "val_verified": 0.5,
                      "schedule_epoch": 1.2})
  # Real epoch 5 but schedule epoch 2.9 < start_epoch + 1: not yet.
  cb.on_epoch_end(5, {"val_accuracy": 0.9, "val_verified": 0.4,
                      "schedule_epoch": 2.9})
  assert float(cb.model.alpha.numpy()) == pytest.approx(0.5)
  cb.on_epoch_end(6, {"val_accuracy": 0.9, "val_verified": 0.3,
                      "schedule_epoch": 3.0})
  assert float(cb.model.alpha.numpy()) == pytest.approx(0.4)
