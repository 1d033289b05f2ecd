"""Tests of mixtrain_tf.onnx_export and tools/export_onnx.py.

The exported ONNX graphs run in onnxruntime against the Keras logits; the VNNLIB
files are read back with a small s-expression parser written here.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from mixtrain_tf import networks, onnx_export, vnnlib  # noqa: E402
from mixtrain_tf.layers import InputNormalization  # noqa: E402

L = keras.layers
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPORT_TOOL = REPO_ROOT / "tools" / "export_onnx.py"
TFDS_DIR = pathlib.Path(os.environ.get("TFDS_DATA_DIR",
                                       REPO_ROOT.parent / "shared" / "tfds"))
ATOL = 1e-4


def _run_onnx(proto, x_nhwc: np.ndarray) -> np.ndarray:
  session = ort.InferenceSession(proto.SerializeToString(),
                                 providers=["CPUExecutionProvider"])
  return session.run(None, {"input": onnx_export.onnx_input(x_nhwc)})[0]


def _check_logits(model: keras.Model, n: int = 3, seed: int = 0,
                  batch_size: int | None = None):
  proto = onnx_export.to_onnx(model, batch_size=batch_size)
  x = np.random.RandomState(seed).uniform(
      0, 1, (n, *model.inputs[0].shape[1:])).astype(np.float32)
  want = np.asarray(model(x, training=False))
  assert np.max(np.abs(want)) > 1e-2  # the comparison is not vacuous
  np.testing.assert_allclose(_run_onnx(proto, x), want, atol=ATOL, rtol=ATOL)
  return proto


@pytest.mark.parametrize("name", ["mnist_small", "cifar_small", "cifar_resnet",
                                  "imagenet200_resnet"])
def test_networks_match_keras(name):
  keras.utils.set_random_seed(1)
  proto = _check_logits(networks.build(name))
  in_dims = [d.dim_value or d.dim_param
             for d in proto.graph.input[0].type.tensor_type.shape.dim]
  h, w, c = networks.INPUT_SHAPES[name]
  assert in_dims == ["batch", c, h, w]  # NCHW
  used = {n.op_type for n in proto.graph.node}
  assert "Transpose" not in used  # Flatten is folded into the Dense kernel
  if name == "imagenet200_resnet":
    assert "Pad" in used


def _every_layer_model() -> keras.Model:
  """Every supported layer kind, odd sizes (asymmetric SAME pads), mixed layouts."""
  keras.utils.set_random_seed(2)
  inputs = keras.Input((9, 9, 2), name="image")
  x = L.Rescaling(scale=[0.5, 2.0], offset=0.1)(inputs)
  x = L.Normalization(mean=[0.1, 0.2], variance=[0.5, 2.0])(x)
  x = InputNormalization([0.3, 0.4], [0.5, 0.7])(x)
  x = L.ZeroPadding2D(((1, 2), (0, 1)))(x)                        # 12 x 11
  a = L.Conv2D(4, 4, strides=2, padding="same", activation="relu")(x)  # 6 x 6
  b = L.Conv2D(4, 3, strides=2, padding="same", use_bias=False)(x)
  x = L.Add()([a, b])
  bn = L.BatchNormalization()
  x = bn(x)
  x = L.Dropout(0.5)(L.Activation("linear")(L.ReLU()(x)))
  x = L.AveragePooling2D(3, strides=2, padding="same")(x)         # 3 x 3, pad 0/1
  c = L.Activation("relu")(L.Dense(5)(x))                        # Dense on an image
  d = L.Reshape((3, 3, 5))(L.Dense(45)(L.Flatten()(x)))          # NHWC reshape
  e = L.Conv2D(5, 1)(x)
  x = L.Add()([c, d, e])                                          # mixed layouts
  x = L.AveragePooling2D(2, strides=1, padding="valid")(x)        # 2 x 2
  x = L.Conv2D(6, 2, padding="same", activation="relu")(x)        # pads 0/1
  f = L.Flatten()(x)
  bn_flat = L.BatchNormalization()
  f = L.ReLU()(bn_flat(f))                                        # per-element scale
  f = L.Dense(8, use_bias=False)(f)
  g = L.Dense(8)(L.Flatten()(L.Dense(3)(L.Reshape((4, 6))(x))))  # Dense on rank 3
  x = L.Add()([f, g])
  head = keras.Sequential([L.Dense(10), L.Activation("linear")], name="head")
  model = keras.Model(inputs, head(x))
  rng = np.random.RandomState(3)
  for layer in (bn, bn_flat):
    n = layer.gamma.shape[0]
    layer.set_weights([rng.uniform(0.5, 2, n), rng.normal(0, 0.5, n),
                       rng.normal(0, 0.5, n), rng.uniform(0.2, 2, n)])
  return model


def test_every_layer_kind_matches_keras():
  proto = _check_logits(_every_layer_model(), n=4, batch_size=4)
  used = {n.op_type for n in proto.graph.node}
  assert {"Conv", "Gemm", "MatMul", "Relu", "Add", "Mul", "Pad", "AveragePool",
          "Flatten", "Reshape", "Transpose"} <= used
  assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [
      4, 2, 9, 9]


def _edge_models():
  keras.utils.set_random_seed(4)
  img = keras.Input((5, 4, 3))
  conv = L.Conv2D(2, 3, strides=2, padding="same")(img)
  yield keras.Model(img, conv)                                    # NCHW -> NHWC out
  yield keras.Model(img, L.Flatten()(conv))                       # CHW -> HWC flat
  vec = keras.Input((7,))
  hidden = L.Dense(6, activation="relu", bias_initializer="ones")(vec)
  yield keras.Model(vec, L.Dense(3)(hidden))
  yield keras.Model(vec, L.Dropout(0.1)(vec))                     # output = input


def test_edge_models_match_keras():
  for model in _edge_models():
    _check_logits(model, n=2, batch_size=2)


def test_weights_are_read_at_export_time(tmp_path):
  keras.utils.set_random_seed(5)
  model = networks.build("mnist_small")
  model.get_layer("logits").bias.assign(np.arange(10, dtype=np.float32))
  path = tmp_path / "m.onnx"
  onnx_export.export_onnx(model, path)
  proto = onnx.load(os.fspath(path))
  x = np.random.RandomState(0).uniform(0, 1, (1, 28, 28, 1)).astype(np.float32)
  np.testing.assert_allclose(_run_onnx(proto, x), model(x), atol=ATOL)
  assert all(t.data_type == onnx.TensorProto.FLOAT for t in proto.graph.initializer
             if t.data_type != onnx.TensorProto.INT64)


# -- VNNLIB --------------------------------------------------------------------


def _sexprs(text: str) -> list:
  """The top-level s-expressions of `text` (comments dropped) as nested lists."""
  tokens = " ".join(line.split(";", 1)[0] for line in text.splitlines())
  tokens = tokens.replace("(", " ( ").replace(")", " ) ").split()
  stack = [[]]
  for tok in tokens:
    if tok == "(":
      stack.append([])
    elif tok == ")":
      done = stack.pop()
      stack[-1].append(done)
    else:
      stack[-1].append(tok)
  assert len(stack) == 1, "unbalanced parentheses"
  return stack[0]


def parse_vnnlib(text: str):
  """(declared X count, declared Y count, {i: [lo, hi]}, [(j, y) disjuncts])."""
  n_x = n_y = 0
  box: dict[int, list] = {}
  disjuncts = None
  for expr in _sexprs(text):
    if expr[0] == "declare-const":
      assert expr[2] == "Real"
      if expr[1].startswith("X_"):
        assert int(expr[1][2:]) == n_x
        n_x += 1
      else:
        assert expr[1] == f"Y_{n_y}"
        n_y += 1
      continue
    assert expr[0] == "assert" and len(expr) == 2
    body = expr[1]
    if body[0] in ("<=", ">="):
      var, value = body[1], float(body[2])
      assert var.startswith("X_")
      assert re.fullmatch(r"-?\d+\.\d+", body[2]), body[2]  # plain decimal
      bounds = box.setdefault(int(var[2:]), [None, None])
      k = 1 if body[0] == "<=" else 0
      assert bounds[k] is None
      bounds[k] = value
    else:
      assert body[0] == "or" and disjuncts is None
      disjuncts = []
      for conj in body[1:]:
        assert conj[0] == "and" and len(conj) == 2
        op, yj, yy = conj[1]
        assert op == ">=" and yj.startswith("Y_") and yy.startswith("Y_")
        disjuncts.append((int(yj[2:]), int(yy[2:])))
  return n_x, n_y, box, disjuncts


@pytest.mark.parametrize("shape,eps", [((4, 3, 2), 0.05), ((28, 28, 1), 0.3)])
def test_vnnlib_is_the_clipped_eps_box(tmp_path, shape, eps):
  rng = np.random.RandomState(6)
  x = rng.uniform(0, 1, shape).astype(np.float32)
  x.flat[:3] = [0.0, 1.0, 0.02]  # clipped below / above
  y = 3
  path = tmp_path / "p.vnnlib"
  vnnlib.write_vnnlib(path, x, y, eps, num_classes=10)
  n_x, n_y, box, disjuncts = parse_vnnlib(path.read_text())
  h, w, c = shape
  assert n_x == x.size and n_y == 10 and sorted(box) == list(range(x.size))
  for i in range(x.size):  # X_i = pixel (c, h, w) with i = c*H*W + h*W + w
    ci, hi, wi = np.unravel_index(i, (c, h, w))
    v = float(x[hi, wi, ci])
    assert box[i] == [max(v - eps, 0.0), min(v + eps, 1.0)], i
  assert sorted(disjuncts) == [(j, y) for j in range(10) if j != y]
  # The X_i order is the ONNX input's (NCHW, flattened).
  lo = np.array([box[i][0] for i in range(x.size)])
  hi = np.array([box[i][1] for i in range(x.size)])
  flat = onnx_export.onnx_input(x[None]).ravel()
  assert np.all(lo <= flat) and np.all(flat <= hi)
  assert np.all(hi - lo <= 2 * eps + 1e-12)
  inner = (flat - eps > 0) & (flat + eps < 1)
  np.testing.assert_allclose((lo + hi)[inner] / 2, flat[inner], atol=1e-12)


def test_vnnlib_rejects_bad_label(tmp_path):
  with pytest.raises(ValueError, match="label"):
    vnnlib.write_vnnlib(tmp_path / "p.vnnlib", np.zeros((2, 2, 1)), 10, 0.1, 10)


@pytest.mark.parametrize("x, eps, match", [
    (np.full((2, 2, 1), 200.0), 0.1, "divide them by 255"),
    (np.full((2, 2, 1), 0.5), -0.1, "epsilon"),
    (np.full((2, 2, 1), 0.5), float("nan"), "epsilon"),
    (np.full((2, 2, 1), np.nan), 0.1, "NaN"),
])
def test_vnnlib_refuses_balls_that_cannot_carry_a_proof(tmp_path, x, eps, match):
  with pytest.raises(ValueError, match=match):
    vnnlib.write_vnnlib(tmp_path / "p.vnnlib", x, 1, eps, 10)


# -- CLI -------------------------------------------------------------------------


@pytest.mark.skipif(not (TFDS_DIR / "mnist").is_dir(),
                    reason=f"shared TFDS mnist not found in {TFDS_DIR}")
def test_cli_writes_benchmark(tmp_path):
  keras.utils.set_random_seed(7)
  model = networks.build("mnist_small")
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  model.save(model_dir / "network.keras")
  out = tmp_path / "bench"
  n, eps = 3, 0.1
  result = subprocess.run(
      [sys.executable, os.fspath(EXPORT_TOOL), f"--model={model_dir / 'network.keras'}",
       f"--output_dir={out}", "--dataset=mnist", f"--data_dir={TFDS_DIR}",
       f"--epsilon={eps}", f"--num_examples={n}", "--timeout=60"],
      capture_output=True, text=True, timeout=120,
      env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(out)) == sorted(
      ["model.onnx", "instances.csv"] + [f"prop_{i}.vnnlib" for i in range(n)])
  assert (out / "instances.csv").read_text().splitlines() == [
      f"model.onnx,prop_{i}.vnnlib,60" for i in range(n)]

  from mixtrain_tf import data  # noqa: PLC0415
  x, y = next(iter(data.load("mnist", "test", data_dir=TFDS_DIR, batch_size=n,
                             max_examples=n)))
  x, y = x.numpy(), y.numpy()
  proto = onnx.load(os.fspath(out / "model.onnx"))
  session = ort.InferenceSession(proto.SerializeToString(),
                                 providers=["CPUExecutionProvider"])
  want = np.asarray(model(x, training=False))
  for i in range(n):
    got = session.run(None, {"input": onnx_export.onnx_input(x[i:i + 1])})[0]
    np.testing.assert_allclose(got, want[i:i + 1], atol=ATOL)
    n_x, n_y, box, disjuncts = parse_vnnlib((out / f"prop_{i}.vnnlib").read_text())
    assert (n_x, n_y) == (784, 10)
    lo, hi = vnnlib.input_box(x[i], eps)
    assert [box[k] for k in range(784)] == [[a, b] for a, b in zip(lo, hi)]
    assert sorted(disjuncts) == [(j, int(y[i])) for j in range(10) if j != y[i]]
