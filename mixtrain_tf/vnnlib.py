"""VNNLIB properties (VNN-COMP) of L-inf robustness for models exported to ONNX.

`write_vnnlib(path, x, y, epsilon, num_classes)` writes one VNN-COMP property:
`X_i` is the i-th input of the ONNX model flattened row-major, i.e. for images in
C, H, W order (i = c * H * W + h * W + w) -- the same order as the NCHW ONNX
input. Its box is [x - epsilon, x + epsilon] clipped to [clip_min, clip_max]
(computed in float64 from the float32 image and written in plain decimal notation,
no exponent, with the fewest digits that parse back to the same float64). The
output constraint is the negation of robustness: `(assert (or (and (>= Y_j Y_y))
...))` over all j != y, so a verifier answering "unsat" has proven that the label
cannot change within the box.
"""

from __future__ import annotations

import os

import numpy as np

from mixtrain_tf import api


def _example(x) -> np.ndarray:
  """One example without batch dimension (a leading batch of 1 is dropped)."""
  x = np.asarray(x, np.float32)
  return x[0] if x.ndim == 4 and x.shape[0] == 1 else x


def input_box(x: np.ndarray, epsilon: float, clip_min: float = 0.0,
              clip_max: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """The clipped eps box of one example, flattened in the VNNLIB X_i order.

  `x` is one example in the Keras layout without batch dimension ([H, W, C] for
  images; a leading batch of 1 is dropped). Images are flattened in C, H, W order,
  anything else row-major. Returns float64 (lower, upper).
  """
  x = _example(x)
  api.check_ball(x[None], epsilon, clip_min, clip_max)
  if x.ndim == 3:
    x = x.transpose(2, 0, 1)
  flat = x.astype(np.float64).ravel()
  return (np.clip(flat - epsilon, clip_min, clip_max),
          np.clip(flat + epsilon, clip_min, clip_max))


def _decimal(v) -> str:
  """Shortest plain decimal (no exponent) that parses back to float64 `v`."""
  return np.format_float_positional(float(v), unique=True, trim="0")


def vnnlib_text(x: np.ndarray, y: int, epsilon: float, num_classes: int,
                clip_min: float = 0.0, clip_max: float = 1.0,
                comment: str | None = None) -> str:
  """The VNNLIB property text of `write_vnnlib`."""
  y = int(y)
  if not 0 <= y < num_classes:
    raise ValueError(f"label {y} is not in [0, {num_classes}).")
  if num_classes < 2:
    raise ValueError("a robustness property needs at least 2 classes.")
  x = _example(x)
  lo, hi = input_box(x, epsilon, clip_min, clip_max)
  lines = [
      "; mixtrain_tf L-inf robustness property (VNN-COMP form: the assertions "
      "state a counterexample; unsat = robust).",
      f"; label y = {y}, epsilon = {float(epsilon)!r}, box clipped to "
      f"[{float(clip_min)!r}, {float(clip_max)!r}].",
      ("; X_i: ONNX input NCHW flattened in C, H, W order, i = c*H*W + h*W + w "
       f"(Keras image shape H, W, C = {tuple(int(d) for d in x.shape)})."
       if x.ndim == 3 else
       "; X_i: ONNX input flattened row-major."),
      "; Y_j: output logits.",
  ]
  if comment:
    lines += [f"; {line}" for line in comment.splitlines()]
  lines.append("")
  lines += [f"(declare-const X_{i} Real)" for i in range(lo.size)]
  lines.append("")
  lines += [f"(declare-const Y_{j} Real)" for j in range(num_classes)]
  lines += ["", "; input box"]
  for i, (l, h) in enumerate(zip(lo, hi)):
    lines.append(f"(assert (<= X_{i} {_decimal(h)}))")
    lines.append(f"(assert (>= X_{i} {_decimal(l)}))")
  lines += ["", f"; negated robustness: some logit j != {y} reaches Y_{y}",
            "(assert (or"]
  lines += [f"  (and (>= Y_{j} Y_{y}))" for j in range(num_classes) if j != y]
  lines.append("))")
  return "\n".join(lines) + "\n"


def write_vnnlib(path: str | os.PathLike[str], x: np.ndarray, y: int,
                 epsilon: float, num_classes: int, clip_min: float = 0.0,
                 clip_max: float = 1.0, comment: str | None = None) -> None:
  """Writes the VNN-COMP robustness property of one example to `path`.

  Args:
    path: Output .vnnlib file.
    x: One example in the Keras layout without batch ([H, W, C] image in
      [clip_min, clip_max]); a leading batch dimension of 1 is dropped.
    y: Its label.
    epsilon: L-inf radius (pixel units).
    num_classes: Number of logits.
    clip_min, clip_max: The valid input range; the box is clipped to it.
    comment: Extra comment lines for the file header.

  The input box is X_i in [x_i - epsilon, x_i + epsilon] clipped to
  [clip_min, clip_max], with X_i in the C, H, W order of the NCHW ONNX input; the
  output constraint is the disjunction over j != y of Y_j >= Y_y.
  """
  with open(path, "w") as fh:
    fh.write(vnnlib_text(x, y, epsilon, num_classes, clip_min, clip_max, comment))
