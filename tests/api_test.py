"""Bad inputs never become proofs: the ball is checked eagerly, in graph mode and in
the SavedModel signatures; unsupported layers are named and unknown methods refused;
empty batches, every last layer and memory budgets (chunks give the same bounds) work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
import zoo  # tests/zoo.py: the shared networks and helpers

import mixtrain_tf
from mixtrain_tf import api, export, networks
from mixtrain_tf.layers import InputNormalization

L = keras.layers
METHODS = ("interval", "symbolic")


def _net(seed=0) -> keras.Model:
  keras.utils.set_random_seed(seed)
  x = inputs = keras.Input((4, 4, 1))
  x = L.Conv2D(3, 3, activation="relu")(x)
  x = L.Flatten()(x)
  return keras.Model(inputs, L.Dense(5)(x))


NET = _net()


def _x(n=3, seed=0, shape=(4, 4, 1)):
  return np.random.default_rng(seed).uniform(0, 1, (n,) + shape).astype(np.float32)


def _all_calls(model, x, y, eps, method, **kw):
  return {
      "compute_bounds": lambda: mixtrain_tf.compute_bounds(model, x, eps, method, **kw),
      "margin_upper_bounds": lambda: mixtrain_tf.margin_upper_bounds(
          model, x, y, eps, method, **kw),
      "verified": lambda: mixtrain_tf.verified(model, x, y, eps, method, **kw),
  }


# -- eager checks ------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_images_in_0_255_are_refused_with_the_fix(method):
  x = _x() * 255
  for call in _all_calls(NET, x, np.zeros(3, int), 0.1, method).values():
    with pytest.raises(ValueError, match=r"outside the input domain.*divide them by "
                                         r"255, or pass clip_max=255"):
      call()
  # ... and accepted once the domain says so.
  mixtrain_tf.verified(NET, x, np.zeros(3, int), 10.0, method, clip_max=255.0)


@pytest.mark.parametrize("method", METHODS)
def test_x_outside_a_custom_domain_is_refused(method):
  x = _x()
  with pytest.raises(ValueError, match=r"\[0.2, 0.8\].*3 examples"):
    mixtrain_tf.verified(NET, x, np.zeros(3, int), 0.1, method, clip_min=0.2,
                         clip_max=0.8)
  with pytest.raises(ValueError, match="look normalized"):
    mixtrain_tf.compute_bounds(NET, x - 0.5, 0.1, method)


def test_x_off_the_domain_by_float_round_off_is_accepted():
  x = _x()
  x[0, 0, 0, 0] = np.float32(1.0) + np.float32(1e-7)
  x[1, 0, 0, 0] = -np.float32(1e-7)
  lower, upper = mixtrain_tf.compute_bounds(NET, x, 0.1, "interval")
  assert lower.shape == (3, 5)


@pytest.mark.parametrize("clip_min, clip_max, match", [
    (1.0, 0.0, "greater than clip_max"),
    (float("nan"), 1.0, "finite"),
    (0.0, float("inf"), "finite"),
    ("0", 1.0, None),  # a string that parses is fine
    ("zero", 1.0, "must be numbers"),
])
def test_bad_domains_are_refused(clip_min, clip_max, match):
  x = _x()
  call = lambda: mixtrain_tf.compute_bounds(  # noqa: E731
      NET, x, 0.1, "interval", clip_min=clip_min, clip_max=clip_max)
  if match is None:
    call()
    return
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf"), 1e39, "0.1",
                                 [0.1, 0.1], [[0.1]], [0.1, -0.1, 0.1]])
@pytest.mark.parametrize("method", METHODS)
def test_bad_epsilons_are_refused(eps, method):
  for call in _all_calls(NET, _x(), np.zeros(3, int), eps, method).values():
    with pytest.raises(ValueError, match="epsilon"):
      call()


@pytest.mark.parametrize("method", METHODS)
def test_one_radius_per_example_equals_separate_calls(method, monkeypatch):
  x, eps = _x(), np.array([0.0, 0.05, 0.2], np.float32)
  lower, upper = mixtrain_tf.compute_bounds(NET, x, eps, method)
  ub = mixtrain_tf.margin_upper_bounds(NET, x, np.arange(3), eps, method)
  monkeypatch.setattr(api, "per_sample_bytes", lambda *a: 2**40)  # chunks of one
  chunked = mixtrain_tf.compute_bounds(NET, x, eps, method, memory_budget_mb=1)
  for i in range(3):
    lo, hi = mixtrain_tf.compute_bounds(NET, x[i:i + 1], float(eps[i]), method)
    u = mixtrain_tf.margin_upper_bounds(NET, x[i:i + 1], [i], float(eps[i]), method)
    np.testing.assert_allclose(lower[i], lo[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(upper[i], hi[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(chunked[1][i], hi[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ub[i], u[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("labels, match", [
    (np.array([0.0, 1.0, 2.0]), "integer class indices"),
    (np.array([True, False, True]), "integer class indices"),
    (np.array([0, 1, 5]), r"labels must be in \[0, 5\)"),
    (np.array([0, 1]), "y must have shape"),
])
def test_bad_labels_are_refused(labels, match):
  with pytest.raises(ValueError, match=match):
    mixtrain_tf.verified(NET, _x(), labels, 0.1, "symbolic")


# -- graph mode and SavedModel ---------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_graph_mode_checks_fail_the_call(method):
  margins = tf.function(lambda x, y, e: mixtrain_tf.margin_upper_bounds(
      NET, x, y, e, method))
  x, y = _x(), np.zeros(3, np.int32)
  assert margins(x, y, tf.constant(0.1)).shape == (3, 5)
  for args, match in [((x * 255, y, 0.1), "above the input domain"),
                      ((x - 0.5, y, 0.1), "below the input domain"),
                      ((x, y, -0.1), "epsilon must be >= 0"),
                      ((x, y, np.nan), "epsilon must be >= 0"),
                      ((x, y, np.inf), "epsilon must be finite"),
                      ((x, y + 7, 0.1), "labels must be < 5"),
                      ((x, y - 1, 0.1), "labels must be >= 0")]:
    xa, ya, e = args
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
      margins(tf.constant(xa), tf.constant(ya), tf.constant(e, tf.float32))


def test_graph_mode_checks_static_shapes_and_dtypes():
  with pytest.raises(ValueError, match="takes inputs of shape"):
    tf.function(
        lambda x: mixtrain_tf.compute_bounds(NET, x, 0.1)).get_concrete_function(
        tf.TensorSpec([None, 5, 5, 1], tf.float32))
  with pytest.raises(ValueError, match="integer class indices"):
    tf.function(
        lambda x, y: mixtrain_tf.verified(NET, x, y, 0.1)).get_concrete_function(
        tf.TensorSpec([None, 4, 4, 1], tf.float32), tf.TensorSpec([None], tf.float32))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sm") / "sm")
  export.export_saved_model(NET, path)
  return tf.saved_model.load(path).signatures


def test_saved_model_margins_refuse_bad_inputs(saved):
  margins = saved["margins"]
  x, y = tf.constant(_x()), tf.zeros(3, tf.int32)
  ok = margins(images=x, labels=y, epsilon=tf.constant(0.1))["margin_upper"]
  np.testing.assert_allclose(
      ok, mixtrain_tf.margin_upper_bounds(NET, _x(), np.zeros(3, int), 0.1), rtol=1e-5,
      atol=1e-5)
  for kw, match in [(dict(epsilon=tf.constant(-0.1)), "epsilon must be >= 0"),
                    (dict(epsilon=tf.constant(np.nan, tf.float32)), "epsilon"),
                    (dict(images=x * 255.0), "above the input domain"),
                    (dict(labels=y + 5), "labels must be < 5")]:
    args = {"images": x, "labels": y, "epsilon": tf.constant(0.1), **kw}
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
      margins(**args)
  with pytest.raises(tf.errors.InvalidArgumentError, match="epsilon"):
    saved["bounds"](images=x, epsilon=tf.constant(-1.0))


def test_saved_model_signatures_take_empty_batches(saved):
  empty = tf.zeros((0, 4, 4, 1))
  assert saved["margins"](images=empty, labels=tf.zeros(0, tf.int32),
                          epsilon=tf.constant(0.1))["margin_upper"].shape == (0, 5)
  out = saved["bounds"](images=empty, epsilon=tf.constant(0.1))
  assert out["lower"].shape == out["upper"].shape == (0, 5)


# -- empty batches and last layers ------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_empty_batches_give_empty_results(method):
  x, y = np.zeros((0, 4, 4, 1), np.float32), np.zeros(0, np.int64)
  lower, upper = mixtrain_tf.compute_bounds(NET, x, 0.1, method)
  assert lower.shape == upper.shape == (0, 5)
  assert mixtrain_tf.margin_upper_bounds(NET, x, y, 0.1, method).shape == (0, 5)
  assert mixtrain_tf.verified(NET, x, y, 0.1, method).shape == (0,)


def _ending_in(last) -> keras.Model:
  keras.utils.set_random_seed(3)
  x = inputs = keras.Input((4, 4, 2))
  x = L.Conv2D(3, 2, activation="relu")(x)                          # 3x3x3
  if last == "conv":
    return keras.Model(inputs, L.Conv2D(2, 2)(x))
  if last == "pool":
    return keras.Model(inputs, L.AveragePooling2D(2, padding="same")(x))
  if last == "pad":
    return keras.Model(inputs, L.ZeroPadding2D(1)(x))
  x = L.Dense(4)(L.Flatten()(x))
  ends = {
      "dense": lambda t: L.Dense(5)(t),
      "dense_relu": lambda t: L.Dense(5, activation="relu")(t),
      "relu": L.ReLU(),
      "activation": L.Activation("linear"),
      "flatten": L.Flatten(),
      "reshape": lambda t: L.Reshape((4,))(L.Reshape((2, 2))(t)),
      "dropout": L.Dropout(0.3),
      "rescaling": L.Rescaling([2.0, -1.0, 0.5, 3.0], offset=[0.1, 0.2, 0.3, 0.4]),
      "normalization": L.Normalization(mean=[0.1, 0.2, 0.3, 0.4],
                                       variance=[1.0, 2.0, 0.5, 4.0]),
      "scalar_normalization": L.Normalization(axis=None, mean=0.3, variance=2.0),
      "batchnorm": L.BatchNormalization(),
      "input_normalization": InputNormalization([0.1, 0.2, 0.3, 0.4],
                                                [1.0, 2.0, 0.5, 4.0]),
      "add": lambda t: L.Add()([t, L.Dense(4)(t)]),
  }
  return keras.Model(inputs, ends[last](x))


LAST = ["conv", "pool", "pad", "dense", "dense_relu", "relu", "activation", "flatten",
        "reshape", "dropout", "rescaling", "normalization", "scalar_normalization",
        "batchnorm", "input_normalization", "add"]


@pytest.mark.parametrize("last", LAST)
def test_margins_work_and_are_sound_for_every_last_layer(last):
  model = _ending_in(last)
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (2, 4, 4, 2)).astype(np.float32)
  logits = np.reshape(model(x), (2, -1))
  y = np.argmax(logits, 1)
  eps = 0.05
  pts = np.clip(x[:, None] + rng.uniform(-eps, eps, (2, 300, 4, 4, 2)), 0, 1)
  pts[:, :100] = np.clip(x[:, None] + eps * np.sign(pts[:, :100] - x[:, None]), 0, 1)
  out = np.reshape(model(pts.reshape(600, 4, 4, 2).astype(np.float32)), (2, 300, -1))
  found = out - np.take_along_axis(out, y[:, None, None], 2)
  for method in METHODS:
    ub = mixtrain_tf.margin_upper_bounds(model, x, y, eps, method).numpy()
    assert ub.shape == logits.shape
    np.testing.assert_array_equal(ub[np.arange(2), y], 0.0)
    tol = 1e-5 * np.maximum(1.0, np.abs(ub).max())
    assert np.all(found <= ub[:, None] + tol), (last, method,
                                               float((found - ub[:, None]).max()))


# -- memory budgets ---------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    import mixtrain_tf as mt
    from mixtrain_tf import networks
    method, budget, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    model = networks.build("mnist_small")
    x = np.random.default_rng(0).uniform(0, 1, (n, 28, 28, 1)).astype("float32")
    y = np.zeros(n, "int64")
    mt.verified(model, x[:2], y[:2], 0.1, method=method)  # warm up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mt.verified(model, x, y, 0.1, method=method, memory_budget_mb=budget)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(json.dumps({"grew_mb": grew / 1024}))
""")


@pytest.mark.parametrize("method", METHODS)
def test_every_engine_honours_the_memory_budget(method):
  """Peak RSS growth of a 4,000-image (interval) or 1,000-image (symbolic, ~10x the
  budget) call with a 48 MB budget stays within the budget plus the input's own
  copies (2 x 4 bytes x 784 per image) and 25% slack. Before the interval estimate
  counted every node, interval overshot ~4x."""
  budget, n = 48, (4000 if method == "interval" else 1000)
  out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, method, str(budget),
                        str(n)], capture_output=True, text=True, timeout=300,
                       check=True)
  grew = json.loads(out.stdout.strip().splitlines()[-1])["grew_mb"]
  inputs_mb = 2 * n * 784 * 4 / 2**20
  assert grew <= 1.25 * budget + inputs_mb, f"{method}: grew {grew:.0f} MB"


# -- unsupported layers, bad inputs, unknown methods ----------------------------


def _with(layer, input_shape=(6, 6, 2)):
  x = inputs = keras.Input(input_shape)
  x = L.Conv2D(2, 3, padding="same", activation="relu", name="first")(x)
  x = layer(x)
  x = L.Flatten()(x)
  return keras.Model(inputs, L.Dense(3)(x))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer, cls", [
    (lambda: L.MaxPooling2D(2, name="pool_me"), "MaxPooling2D"),
    (lambda: L.Dense(4, activation="tanh", name="tanh_dense"), "Dense"),
    (lambda: L.Conv2D(2, 3, dilation_rate=2, padding="same", name="dilated"),
     "Conv2D"),
    (lambda: L.Activation("sigmoid", name="sigmoid_act"), "Activation"),
    (lambda: L.ReLU(max_value=6.0, name="relu6"), "ReLU"),
])
def test_unsupported_layer_is_named(layer, cls, method):
  lay = layer()
  model = _with(lay)
  x = np.full((1, 6, 6, 2), 0.5, np.float32)
  with pytest.raises(ValueError) as err:
    mixtrain_tf.compute_bounds(model, x, 0.1, method=method)
  msg = str(err.value)
  assert f"'{lay.name}'" in msg and f"({cls})" in msg, msg
  assert "supported:" in msg and "Dense" in msg and "Conv2D" in msg and "ReLU" in msg


@pytest.mark.parametrize("method", METHODS)
def test_input_errors(method):
  model = zoo.conv_net()
  x = zoo.inputs(model, 2, seed=0)
  y = np.array([0, 1])
  with pytest.raises(ValueError, match=r"shape"):
    mixtrain_tf.compute_bounds(model, x[:, :6], 0.1, method=method)
  with pytest.raises(ValueError, match=r"shape"):
    mixtrain_tf.compute_bounds(model, x.reshape(2, -1), 0.1, method=method)
  with pytest.raises(ValueError, match=r"epsilon"):
    mixtrain_tf.compute_bounds(model, x, -0.1, method=method)
  with pytest.raises(ValueError, match=r"epsilon"):
    mixtrain_tf.compute_bounds(model, x, float("nan"), method=method)
  bad = x.copy()
  bad[1, 2, 3, 0] = np.nan
  with pytest.raises(ValueError, match=r"NaN"):
    mixtrain_tf.compute_bounds(model, bad, 0.1, method=method)
  with pytest.raises(ValueError, match=r"NaN"):
    mixtrain_tf.margin_upper_bounds(model, bad, y, 0.1, method=method)
  with pytest.raises(ValueError, match=r"labels"):
    mixtrain_tf.margin_upper_bounds(model, x, np.array([0, 5]), 0.1, method=method)
  with pytest.raises(ValueError, match=r"labels"):
    mixtrain_tf.verified(model, x, np.array([-1, 0]), 0.1, method=method)
  with pytest.raises(ValueError, match=r"y must have shape"):
    mixtrain_tf.verified(model, x, np.array([0, 1, 2]), 0.1, method=method)


@pytest.mark.parametrize("call", ["compute_bounds", "margin_upper_bounds", "verified",
                                  "bound_box"])
def test_unknown_method(call):
  model = zoo.dense_net()
  x = zoo.inputs(model, 2, seed=0)
  y = np.array([0, 1])
  fns = {
      "compute_bounds": lambda: mixtrain_tf.compute_bounds(model, x, 0.1, "deeppoly"),
      "margin_upper_bounds": lambda: mixtrain_tf.margin_upper_bounds(
          model, x, y, 0.1, "deeppoly"),
      "verified": lambda: mixtrain_tf.verified(model, x, y, 0.1, "deeppoly"),
      "bound_box": lambda: api.bound_box(model, x, x, "deeppoly"),
  }
  # (Not "crown": that is a bound method since issue 12.)
  with pytest.raises(ValueError, match=r"unknown bound method 'deeppoly'.*interval.*"
                                       r"symbolic"):
    fns[call]()


# -- memory chunking --------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_tiny_memory_budget_gives_same_bounds(method, monkeypatch):
  model = zoo.authors_model()
  x, y = zoo.mnist_test(100)
  x, y = x[:5], y[:5]
  whole = mixtrain_tf.compute_bounds(model, x, 0.2, method=method)
  whole_ub = mixtrain_tf.margin_upper_bounds(model, x, y, 0.2, method=method)
  calls = []
  bound_box = api.bound_box
  monkeypatch.setattr(api, "bound_box",
                      lambda *a, **k: calls.append(a[1].shape[0]) or bound_box(*a, **k))
  tiny = 1e-6  # MB: far less than one example needs, so chunks of one example
  parts = mixtrain_tf.compute_bounds(model, x, 0.2, method=method,
                                     memory_budget_mb=tiny)
  parts_ub = mixtrain_tf.margin_upper_bounds(model, x, y, 0.2, method=method,
                                             memory_budget_mb=tiny)
  parts_ok = mixtrain_tf.verified(model, x, y, 0.2, method=method,
                                  memory_budget_mb=tiny)
  assert calls == [1] * 15
  for a, b in zip(whole + (whole_ub,), parts + (parts_ub,)):
    tol = zoo.RTOL * zoo.scale(a.numpy())
    zoo.assert_close(a, b, tol)
  np.testing.assert_array_equal(parts_ok, np.max(np.where(
      np.eye(10)[y] > 0, -np.inf, whole_ub), 1) < 0)


def test_non_positive_memory_budget_is_an_error():
  model = networks.build("mnist_small")
  x = np.zeros((2, 28, 28, 1), np.float32)
  with pytest.raises(ValueError, match="memory_budget_mb must be > 0"):
    mixtrain_tf.compute_bounds(model, x, 0.1, memory_budget_mb=0)


# -- true float32 -------------------------------------------------------------------


def test_tensor_float_32_is_off_for_every_bound(tmp_path):
  """TF32 (10-bit mantissa matmuls on Ampere+ GPUs) is off after import, and a bound
  computation turns it off again if a user re-enabled it, also when the bound is
  traced inside a compiled function."""
  assert not tf.config.experimental.tensor_float_32_execution_enabled()
  tf.config.experimental.enable_tensor_float_32_execution(True)
  try:
    fn = tf.function(lambda x: api.ball_margins(NET, x, tf.zeros(3, tf.int32), 0.1))
    fn(tf.constant(_x()))
    assert not tf.config.experimental.tensor_float_32_execution_enabled()
  finally:
    tf.config.experimental.enable_tensor_float_32_execution(False)


def test_xla_margins_of_a_refused_ball_or_label_are_nan_and_never_verified():
  """XLA drops assert ops; the checks then poison the box (or the spec) with NaN."""
  model = zoo.mnist_small()
  x, y = zoo.mnist_test(3)
  fn = tf.function(lambda x, y, e: api.ball_margins(model, x, y, e, "interval"),
                   jit_compile=True)
  zero = tf.constant(0.0)
  good = fn(x, y, zero).numpy()
  assert np.all(np.isfinite(good))
  bad_x = x.copy()
  bad_x[1] *= 255.0
  # Tensors, not Python floats: a Python constant would fail the asserts when
  # traced, before XLA ever runs.
  for args, row in [((bad_x, y, zero), 1), ((x, np.array([0, 10, 1]), zero), 1),
                    ((x, y, tf.constant(-0.1)), None)]:
    ub = fn(*args).numpy()
    rows = range(3) if row is None else [row]
    for r in rows:
      assert np.all(np.isnan(ub[r])), args
    verified = api.is_verified(tf.constant(ub), tf.constant(np.clip(args[1], 0, 9)))
    assert not any(verified.numpy()[r] for r in rows)


def test_is_verified_never_counts_a_nan_bound():
  ub = tf.constant([[0.0, -1.0, np.nan], [0.0, -1.0, -2.0]])
  assert api.is_verified(ub, tf.constant([0, 0])).numpy().tolist() == [False, True]


@pytest.mark.parametrize("name,measured_mb", [("imagenet200_resnet", 1330),
                                              ("cifar_large", 1630),
                                              ("cifar_resnet", 1090),
                                              ("mnist_large", 965)])
def test_symbolic_memory_estimate_covers_the_measured_peak(name, measured_mb):
  """The peaks per example that benchmarks/bounds.py measured (docs/benchmarks.md):
  the estimate behind chunking and --k=auto must not fall below them."""
  assert api.per_sample_bytes(networks.build(name), "symbolic") >= measured_mb * 1e6


@pytest.mark.parametrize("total_mib,budget", [(1024, 256), (8192, 2048),
                                              (65536, 4096)])
def test_default_memory_budget_is_a_quarter_of_the_machine_capped(
    total_mib, budget, monkeypatch):
  pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": total_mib * 2**20 // 4096}
  monkeypatch.setattr(api.os, "sysconf", pages.__getitem__)
  assert api._default_memory_budget_mb() == budget
