r"""Writes a VNN-COMP style benchmark of a trained model: ONNX network + VNNLIB files.

    python tools/export_onnx.py --model=runs/m --dataset=mnist --epsilon=0.1 \
        --num_examples=100 --output_dir=bench/mnist_small_eps0.1

--model is a training run's --model_dir (holding network.keras) or a `.keras` file.
The output directory gets

* `model.onnx`: the network (opset 13; input "input" NCHW float32 [1, C, H, W] with
  pixels in [0, 1], output "output" [1, num_classes] logits; see
  `mixtrain_tf.onnx_export`);
* `prop_<i>.vnnlib` for the first --num_examples test images, i = 0, 1, ...: the
  L-inf ball of radius --epsilon around test image i clipped to [0, 1] (X_k in the
  C, H, W order of the ONNX input) and the negated robustness property
  `or_{j != label} Y_j >= Y_label` (unsat = verified robust);
* `instances.csv`: one `model.onnx,prop_<i>.vnnlib,<timeout>` line per property,
  the instance list that VNN-COMP tools (e.g. alpha-beta-CROWN) read.

Properties are written for every test image, misclassified ones included (their
header comment says so: such a property is trivially sat). When onnxruntime is
installed the exported network is checked against the Keras logits on these images.
"""

from __future__ import annotations

import os

import keras
import numpy as np
from absl import app, flags, logging

from mixtrain_tf import data, onnx_export, vnnlib
from mixtrain_tf import layers as _layers  # noqa: F401  (registers custom layers)

FLAGS = flags.FLAGS
ONNX_NAME = "model.onnx"


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines the command-line flags (only when run as a script)."""
  fv = flag_values
  flags.DEFINE_string("model", None, "Training --model_dir (with network.keras) or "
                      "a .keras file.", flag_values=fv)
  flags.DEFINE_string("output_dir", None, "Directory to write the benchmark to.",
                      flag_values=fv)
  flags.DEFINE_enum("dataset", None, list(data.DATASETS), "Test set of the "
                    "properties.", flag_values=fv)
  flags.DEFINE_string("data_dir", None, "Dataset directory (default: "
                      "mixtrain_tf.data.default_data_dir).", flag_values=fv)
  flags.DEFINE_float("epsilon", None, "L-inf radius in pixel units, in [0, 1].",
                     flag_values=fv)
  flags.DEFINE_integer("num_examples", 100, "Properties for the first N test "
                       "images.", flag_values=fv)
  flags.DEFINE_integer("timeout", 300, "Per-instance timeout (s) in instances.csv.",
                       flag_values=fv)
  flags.mark_flags_as_required(["model", "output_dir", "dataset", "epsilon"],
                               flag_values=fv)
  flags.register_validator("epsilon", lambda v: v is None or 0 <= v <= 1,
                           "--epsilon must be in [0, 1] (pixel units).",
                           flag_values=fv)
  flags.register_validator("num_examples", lambda v: v >= 1,
                           "--num_examples must be >= 1.", flag_values=fv)
  flags.register_validator("timeout", lambda v: v >= 1, "--timeout must be >= 1.",
                           flag_values=fv)


def load_network(path: str) -> keras.Model:
  """The Keras network of a training --model_dir or a .keras file."""
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, "network.keras")):
    path = os.path.join(path, "network.keras")
  if not (path.endswith(".keras") and os.path.isfile(path)):
    raise app.UsageError(f"--model={path}: not a training --model_dir (with "
                         "network.keras) or a .keras file.")
  return keras.models.load_model(path, compile=False)


def _check_onnx(onnx_path: str, images: np.ndarray, logits: np.ndarray) -> None:
  try:
    import onnxruntime as ort  # noqa: PLC0415  (optional dependency)
  except ImportError:
    logging.warning("onnxruntime not installed: ONNX output not checked.")
    return
  session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
  got = np.concatenate([
      session.run(None, {onnx_export.INPUT_NAME: onnx_export.onnx_input(x[None])})[0]
      for x in images])
  err = float(np.max(np.abs(got - logits)))
  tol = 1e-3 * max(1.0, float(np.max(np.abs(logits))))
  if err > tol:
    raise RuntimeError(f"ONNX logits differ from Keras by {err:g} (> {tol:g}).")
  logging.info("ONNX matches Keras on %d images (max |diff| %.3g).", len(images), err)


def export_benchmark(model: str, output_dir: str, dataset: str, epsilon: float,
                     num_examples: int, data_dir: str | None = None,
                     timeout: int = 300) -> list[str]:
  """Writes model.onnx, prop_<i>.vnnlib, instances.csv; returns the property names."""
  network = load_network(model)
  in_shape = tuple(network.inputs[0].shape[1:])
  num_classes = int(network.outputs[0].shape[-1])
  if in_shape != tuple(data.input_shape(dataset)):
    raise app.UsageError(f"the network takes inputs of shape {in_shape}, dataset "
                         f"{dataset} has {tuple(data.input_shape(dataset))}.")
  if num_classes != data.num_classes(dataset):
    raise app.UsageError(f"the network has {num_classes} outputs, dataset {dataset} "
                         f"has {data.num_classes(dataset)} classes.")
  os.makedirs(output_dir, exist_ok=True)
  onnx_path = os.path.join(output_dir, ONNX_NAME)
  onnx_export.export_onnx(network, onnx_path, batch_size=1)

  images, labels = [], []
  for x, y in data.load(dataset, "test", data_dir=data_dir,
                        batch_size=min(num_examples, 100), max_examples=num_examples):
    images.append(x.numpy())
    labels.append(y.numpy())
  images, labels = np.concatenate(images), np.concatenate(labels)
  logits = np.concatenate([np.asarray(network(images[i:i + 100], training=False))
                           for i in range(0, len(images), 100)])
  _check_onnx(onnx_path, images, logits)

  props, rows = [], []
  for i, (x, y) in enumerate(zip(images, labels)):
    pred = int(np.argmax(logits[i]))
    name = f"prop_{i}.vnnlib"
    vnnlib.write_vnnlib(
        os.path.join(output_dir, name), x, int(y), epsilon, num_classes,
        comment=(f"{dataset} test image {i}; Keras prediction {pred} "
                 + ("(correct)" if pred == int(y) else
                    "(misclassified: the property is trivially sat)")
                 + f"; network {ONNX_NAME}."))
    props.append(name)
    rows.append(f"{ONNX_NAME},{name},{timeout}")
  with open(os.path.join(output_dir, "instances.csv"), "w") as fh:
    fh.write("\n".join(rows) + "\n")
  correct = int(np.sum(np.argmax(logits, -1) == labels))
  logging.info("Wrote %s and %d properties (%d correctly classified) to %s.",
               ONNX_NAME, len(props), correct, output_dir)
  return props


def main(argv: list[str], flag_values: flags.FlagValues | None = None) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flag_values or FLAGS
  props = export_benchmark(f.model, f.output_dir, f.dataset, f.epsilon,
                           f.num_examples, data_dir=f.data_dir, timeout=f.timeout)
  print(f"Wrote {ONNX_NAME}, {len(props)} VNNLIB properties and instances.csv to "
        f"{f.output_dir}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
