"""Tests of MixTrainModel (mixtrain_tf.training) and its callbacks (docs/method.md 3-4).

Train steps run on a tiny batch of real MNIST. The multi-device checks run in a
subprocess whose single CPU is split into 2 logical devices before TensorFlow
initializes them (the test process's own devices are already fixed).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from mixtrain_tf import callbacks, data, networks, training

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
METRICS = {"loss", "clean_loss", "robust_loss", "verified", "alpha", "epsilon",
           "accuracy"}
EPS = 0.1
BATCH = 8


@pytest.fixture(scope="module")
def mnist_batch() -> tuple[np.ndarray, np.ndarray]:
  """8 real MNIST test images [8, 28, 28, 1] in [0, 1] and their int32 labels."""
  x, y = next(iter(data.load("mnist", "test", batch_size=BATCH, max_examples=BATCH)))
  return x.numpy(), y.numpy()


def _network(seed: int = 0) -> keras.Model:
  keras.utils.set_random_seed(seed)
  return networks.build("mnist_small")


def _linear_network() -> keras.Model:
  """A tiny supported network (flatten + dense) for the callback tests."""
  keras.utils.set_random_seed(1)
  inputs = keras.Input((28, 28, 1))
  out = keras.layers.Dense(10)(keras.layers.Flatten()(inputs))
  return keras.Model(inputs, out)


def _model(method: str, network: keras.Model | None = None, lr: float = 0.1,
           **kwargs) -> training.MixTrainModel:
  kwargs.setdefault("epsilon", EPS)
  kwargs.setdefault("pgd_steps", 2)
  model = training.MixTrainModel(network or _network(), method=method, **kwargs)
  model.compile(optimizer=keras.optimizers.SGD(lr))
  return model


def _cross_entropy(y: np.ndarray, logits: np.ndarray) -> np.ndarray:
  """Per-example softmax cross-entropy, float64."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  return -log_p[np.arange(len(y)), y]


def _zero_width_robust_loss(network, x, y) -> float:
  """Cross-entropy of the margins z_j - z_y at x (the robust loss at eps = 0)."""
  z = np.asarray(network(x, training=False), np.float64)
  margins = z - z[np.arange(len(y)), y][:, None]
  return float(_cross_entropy(y, margins).mean())


# -- train_step -------------------------------------------------------------------


@pytest.mark.parametrize("method,k", [("clean", 5), ("mixtrain", 3), ("interval", 5),
                                      ("symbolic", 5), ("pgd", 5)])
def test_train_step_returns_metrics_and_updates_weights(method, k, mnist_batch):
  x, y = mnist_batch
  model = _model(method, k=k)
  before = [w.copy() for w in model.network.get_weights()]
  logits = np.asarray(model.network(x))
  logs = model.train_on_batch(x, y, return_dict=True)

  assert set(logs) == METRICS
  assert all(np.isfinite(v) for v in logs.values()), logs
  assert logs["alpha"] == pytest.approx(0.5)
  assert logs["epsilon"] == pytest.approx(EPS)
  clean = _cross_entropy(y, logits).mean()
  assert logs["clean_loss"] == pytest.approx(clean, rel=1e-5)
  assert logs["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y))
  if method == "clean":
    assert logs["loss"] == pytest.approx(logs["clean_loss"], rel=1e-6)
    assert logs["robust_loss"] == 0.0 and logs["verified"] == 0.0
  elif method == "pgd":
    assert logs["loss"] == pytest.approx(logs["robust_loss"], rel=1e-6)
    assert logs["verified"] == 0.0
  else:
    # alpha * clean + (1 - alpha) * robust; robust is a mean over k (or all) points.
    assert logs["loss"] == pytest.approx(
        0.5 * logs["clean_loss"] + 0.5 * logs["robust_loss"], rel=1e-5)
    assert 0.0 <= logs["verified"] <= 1.0
  if method in ("interval", "symbolic"):
    # The margin upper bounds dominate z_j - z_y, so CE(ub) >= CE(z) per example.
    assert logs["robust_loss"] >= logs["clean_loss"] - 1e-5
  after = model.network.get_weights()
  assert max(np.abs(a - b).max() for a, b in zip(after, before)) > 1e-6, (
      "one optimizer step left every weight unchanged")
  assert int(model.optimizer.iterations.numpy()) == 1


def test_mixtrain_with_k_equal_batch_matches_symbolic(mnist_batch):
  """k = batch samples every point: the same loss and update as "symbolic"."""
  x, y = mnist_batch
  mix = _model("mixtrain", k=BATCH)
  sym = _model("symbolic")
  logs_mix = mix.train_on_batch(x, y, return_dict=True)
  logs_sym = sym.train_on_batch(x, y, return_dict=True)
  for name in ("loss", "robust_loss", "verified"):
    assert logs_mix[name] == pytest.approx(logs_sym[name], rel=1e-5), name
  for a, b in zip(mix.network.get_weights(), sym.network.get_weights()):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_sample_draws_k_distinct_indices_and_changes_every_step():
  model = _model("mixtrain", k=3)
  first = model._sample(tf.constant(8)).numpy()
  assert first.shape == (3,) and len(set(first)) == 3
  assert first.min() >= 0 and first.max() < 8
  np.testing.assert_array_equal(model._sample(tf.constant(8)).numpy(), first)
  draws = set()
  for step in range(20):
    model.optimizer.iterations.assign(step)
    draws.add(tuple(model._sample(tf.constant(8)).numpy()))
  assert len(draws) > 10, "the sampled points hardly change from step to step"


# -- multiple devices -----------------------------------------------------------

_DISTRIBUTED_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from mixtrain_tf import networks, training

    BATCH, EPS, LR = 8, 0.1, 0.1
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (BATCH, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, BATCH).astype(np.int32)
    keras.utils.set_random_seed(0)
    initial = networks.build("mnist_small").get_weights()
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def one_step(strategy, method, k):
      with strategy.scope():
        network = networks.build("mnist_small")
        network.set_weights(initial)
        model = training.MixTrainModel(network, method=method, epsilon=EPS, k=k)
        model.compile(optimizer=keras.optimizers.SGD(LR))
      dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
      history = model.fit(dataset, epochs=1, verbose=0, shuffle=False)
      logs = {name: float(v[-1]) for name, v in history.history.items()}
      return [w.tolist() for w in network.get_weights()], logs

    out = {"replicas": mirrored.num_replicas_in_sync, "initial":
           [w.tolist() for w in initial], "runs": {}}
    default = tf.distribute.get_strategy()
    for method in ("clean", "interval", "symbolic"):
      out["runs"][method] = {"one": one_step(default, method, 5),
                             "two": one_step(mirrored, method, 5)}
    # k == per-replica batch: every point gets the robust loss on both sides.
    out["runs"]["mixtrain"] = {"one": one_step(default, "mixtrain", BATCH),
                               "two": one_step(mirrored, "mixtrain", BATCH // 2)}

    with mirrored.scope():
      model = training.MixTrainModel(networks.build("mnist_small"),
                                     method="mixtrain", k=3)
      model.compile(optimizer=keras.optimizers.SGD(LR))
    sample = tf.function(lambda: mirrored.run(model._sample, args=(16,)),
                         autograph=False)
    out["samples"] = [t.numpy().tolist()
                      for t in mirrored.experimental_local_results(sample())]
    json.dump(out, sys.stdout)
    """)


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
  """Runs _DISTRIBUTED_SCRIPT once; returns its JSON output."""
  script = tmp_path_factory.mktemp("distributed") / "distributed.py"
  script.write_text(_DISTRIBUTED_SCRIPT)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
      "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
  proc = subprocess.run([sys.executable, str(script)], capture_output=True,
                        text=True, env=env, cwd=REPO_ROOT, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout)


@pytest.mark.parametrize("method", ["clean", "interval", "symbolic", "mixtrain"])
def test_update_on_two_replicas_equals_one_device(distributed, method):
  """One SGD step: the same weights on 1 device and on 2 mirrored replicas.

  Each replica's loss is divided by the replica count before the gradients are
  summed, so a missing (or doubled) scaling changes the step by 2x. "mixtrain" runs
  with k = per-replica batch, so both sides bound every point.
  """
  assert distributed["replicas"] == 2
  (one, logs_one), (two, logs_two) = (distributed["runs"][method]["one"],
                                      distributed["runs"][method]["two"])
  moved = max(np.abs(np.subtract(a, b)).max()
              for a, b in zip(one, distributed["initial"]))
  assert moved > 1e-3, "the step did not move the weights: nothing compared"
  for i, (a, b) in enumerate(zip(one, two)):
    np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-5, rtol=1e-5,
                               err_msg=f"weight {i} ({method})")
  for name in ("loss", "clean_loss", "robust_loss", "verified", "accuracy"):
    assert logs_two[name] == pytest.approx(logs_one[name], rel=1e-5, abs=1e-6), name


def test_replicas_sample_different_points(distributed):
  samples = distributed["samples"]
  assert len(samples) == 2
  for s in samples:
    assert len(s) == 3 and len(set(s)) == 3 and all(0 <= i < 16 for i in s)
  assert samples[0] != samples[1], "both replicas drew the same points"


# -- callbacks reach the compiled step ----------------------------------------


class _AtEpoch(keras.callbacks.Callback):
  """Runs actions[epoch](model) at the start of that epoch."""

  def __init__(self, actions):
    super().__init__()
    self.actions = actions

  def on_epoch_begin(self, epoch, logs=None):
    if epoch in self.actions:
      self.actions[epoch](self.model)


def test_assigned_alpha_and_epsilon_reach_the_compiled_step(mnist_batch):
  """Epoch 0 trains as built; epoch 1 after alpha := 1; epoch 2 after eps := 0.

  One batch per epoch, so each epoch's logs are that one step's values.
  """
  x, y = mnist_batch
  model = _model("mixtrain", k=BATCH, lr=1e-3)
  expected = {}

  def alpha_one(m):
    m.alpha.assign(1.0)

  def eps_zero(m):
    m.epsilon.assign(0.0)
    z = np.asarray(m.network(x))
    expected["robust_loss"] = _zero_width_robust_loss(m.network, x, y)
    expected["accuracy"] = float(np.mean(z.argmax(1) == y))

  dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
  history = model.fit(dataset, epochs=3, verbose=0, shuffle=False,
                      callbacks=[_AtEpoch({1: alpha_one, 2: eps_zero})]).history
  # Epoch 0: alpha = 0.5 and a positive radius, so loss != clean loss.
  assert history["alpha"][0] == pytest.approx(0.5)
  assert history["robust_loss"][0] > history["clean_loss"][0] + 1e-3
  assert history["loss"][0] > history["clean_loss"][0] + 1e-4
  # Epoch 1: alpha = 1 -> the loss is the clean loss.
  assert history["alpha"][1] == pytest.approx(1.0)
  assert history["loss"][1] == pytest.approx(history["clean_loss"][1], rel=1e-6)
  # Epoch 2: eps = 0 -> robust loss = CE of the margins z_j - z_y at x, and a point
  # is verified exactly when it is classified correctly.
  assert history["epsilon"][2] == 0.0
  assert history["robust_loss"][2] == pytest.approx(expected["robust_loss"],
                                                    rel=1e-5)
  assert history["robust_loss"][2] == pytest.approx(history["clean_loss"][2],
                                                    rel=1e-5)
  assert history["verified"][2] == pytest.approx(expected["accuracy"])
  assert history["accuracy"][2] == pytest.approx(expected["accuracy"])


def test_assigned_alpha_reaches_an_existing_train_function(mnist_batch):
  x, y = mnist_batch
  model = _model("interval", lr=1e-3)
  model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
  train_function = model.train_function
  model.alpha.assign(1.0)
  logs = model.train_on_batch(x, y, return_dict=True)
  assert model.train_function is train_function
  assert logs["alpha"] == pytest.approx(1.0)
  assert logs["loss"] == pytest.approx(logs["clean_loss"], rel=1e-6)
  assert logs["robust_loss"] > logs["clean_loss"] + 1e-4


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
  model = _model("clean", network=_linear_network(), epsilon=0.5)
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
  model = _model("clean", network=_linear_network())
  with pytest.raises(ValueError, match="validation_data"):
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0,
              callbacks=[callbacks.DynamicAlpha()])


def test_dynamic_alpha_in_fit_logs_alpha(mnist_batch):
  x, y = mnist_batch
  model = _model("interval", network=_linear_network(), epsilon=0.01)
  history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
                      validation_data=(x, y),
                      callbacks=[callbacks.DynamicAlpha(delta=0.1)]).history
  assert {"val_accuracy", "val_verified", "alpha"} <= set(history)
  assert history["alpha"][0] == pytest.approx(0.5)
  assert history["alpha"][-1] == pytest.approx(float(model.alpha.numpy()))


# -- constructor checks -------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="fgsm"), "method"),
    (dict(k=0), "k"),
    (dict(alpha=1.5), "alpha"),
    (dict(alpha=-0.1), "alpha"),
    (dict(epsilon=-0.1), "epsilon"),
    (dict(eval_bound="crown"), "eval_bound"),
])
def test_bad_constructor_args(kwargs, match):
  with pytest.raises(ValueError, match=match):
    training.MixTrainModel(_linear_network(), **kwargs)


def test_unsupported_layer_is_rejected_at_construction():
  inputs = keras.Input((28, 28, 1))
  x = keras.layers.MaxPooling2D(2, name="max_pooling2d")(inputs)
  out = keras.layers.Dense(10)(keras.layers.Flatten()(x))
  with pytest.raises(ValueError, match="max_pooling2d"):
    training.MixTrainModel(keras.Model(inputs, out))


def test_mixed_precision_is_refused_with_the_fix():
  """Under mixed_float16 Keras would wrap the optimizer in a loss-scale optimizer and
  build float16 layers; a float16 bound is not a proof, so both are refused."""
  network = _linear_network()  # float32
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    with pytest.raises(ValueError, match="set_global_policy\\('float32'\\)"):
      training.MixTrainModel(network)
    half = _linear_network()
    with pytest.raises(ValueError, match="dtype_policy='mixed_float16'"):
      keras.mixed_precision.set_global_policy("float32")
      training.MixTrainModel(half)
  finally:
    keras.mixed_precision.set_global_policy("float32")


def test_train_step_scales_the_loss_like_a_loss_scale_optimizer(mnist_batch):
  """With a loss-scale optimizer the update equals the plain optimizer's."""
  x, y = mnist_batch
  updates = []
  for wrap in (False, True):
    network = _linear_network()
    before = [w.copy() for w in network.get_weights()]
    model = training.MixTrainModel(network, method="mixtrain", k=2, epsilon=EPS)
    opt = keras.optimizers.SGD(0.1)
    if wrap:
      opt = keras.optimizers.LossScaleOptimizer(opt, initial_scale=2.0**10)
    model.compile(optimizer=opt)
    model.train_on_batch(x, y)
    updates.append([a - b for a, b in zip(network.get_weights(), before)])
  for plain, scaled in zip(*updates):
    np.testing.assert_allclose(scaled, plain, rtol=1e-4, atol=1e-7)


def test_keras_still_calls_the_symbolic_build_hook(mnist_batch, monkeypatch):
  """MixTrainModel overrides Keras' private _maybe_symbolic_build (its default
  reduces a data batch, which fails under MultiWorkerMirroredStrategy). Keras 3.15
  has no public hook for this; if Keras stops calling it, this test fails and the
  override must be revisited."""
  calls = []
  original = training.MixTrainModel._maybe_symbolic_build

  def counting(self, *args, **kwargs):
    calls.append(1)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(training.MixTrainModel, "_maybe_symbolic_build", counting)
  x, y = mnist_batch
  model = _model("clean", _linear_network())
  model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
  assert calls, "Keras no longer calls MixTrainModel._maybe_symbolic_build"


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
