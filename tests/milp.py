"""Exact answers for small dense ReLU networks by mixed-integer linear programming
(HiGHS through highspy), independent of the package's bound code.

A network is a list of (W [n_in, n_out], b [n_out]) float64 layers with a ReLU
after every layer but the last. Each unstable ReLU h = max(z, 0), l < 0 < u, is
encoded exactly with a binary a: h >= z, h >= 0, h <= u a, h <= z - l (1 - a),
where l, u are interval bounds (valid on the box, so the encoding is exact there).
"""

from __future__ import annotations

import highspy
import numpy as np


def dense_layers(model) -> list[tuple[np.ndarray, np.ndarray]]:
  """(W, b) per Dense layer of a Keras Sequential of Dense layers."""
  return [(np.asarray(w, np.float64), np.asarray(b, np.float64))
          for w, b in (layer.get_weights() for layer in model.layers)]


def max_margins(layers, lo, hi, y: int, splits: dict | None = None):
  """Exact max over the box [lo, hi] of logit_j - logit_y, for every j (the y
  entry is 0), under split constraints {layer index: {neuron: +1 (z >= 0) or -1
  (z <= 0)}}, with a maximiser per j. None when the constraints are infeasible."""
  splits = splits or {}
  h = highspy.Highs()
  h.setOptionValue("output_flag", False)
  h.setOptionValue("mip_rel_gap", 0.0)
  h.setOptionValue("mip_abs_gap", 1e-9)
  xs = [h.addVariable(lb=float(a), ub=float(b)) for a, b in zip(lo, hi)]
  act, l_act, u_act = xs, np.asarray(lo, np.float64), np.asarray(hi, np.float64)
  for index, (w, b) in enumerate(layers):
    wp, wn = np.maximum(w, 0), np.minimum(w, 0)
    l = l_act @ wp + u_act @ wn + b
    u = u_act @ wp + l_act @ wn + b
    for k, sign in splits.get(index, {}).items():
      if sign > 0:
        l[k] = max(l[k], 0.0)
      else:
        u[k] = min(u[k], 0.0)
    if np.any(l > u):
      return None  # the split constraints leave no point
    zs = []
    for k in range(w.shape[1]):
      z = h.addVariable(lb=float(l[k]), ub=float(u[k]))
      h.addConstr(z == sum(float(w[i, k]) * act[i] for i in range(len(act))
                           if w[i, k] != 0) + float(b[k]))
      zs.append(z)
    if index == len(layers) - 1:
      outputs = zs
      break
    hs = []
    for k, z in enumerate(zs):
      if l[k] >= 0:
        hs.append(z)
        continue
      out = h.addVariable(lb=0.0, ub=float(max(u[k], 0.0)))
      if u[k] > 0:
        a = h.addVariable(lb=0, ub=1, type=highspy.HighsVarType.kInteger)
        h.addConstr(out >= z)
        h.addConstr(out <= float(u[k]) * a)
        h.addConstr(out <= z - float(l[k]) * (1 - a))
      hs.append(out)  # u <= 0: out is fixed at 0 by its bounds
    act, l_act, u_act = hs, np.maximum(l, 0), np.maximum(u, 0)
  values, points = np.zeros(len(outputs)), [None] * len(outputs)
  for j in range(len(outputs)):
    if j == y:
      continue
    h.maximize(outputs[j] - outputs[y])
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
      return None
    assert status == highspy.HighsModelStatus.kOptimal, status
    values[j] = h.getInfo().objective_function_value
    points[j] = np.array(h.getSolution().col_value[:len(xs)])
  return values, points


def forward(layers, x: np.ndarray) -> np.ndarray:
  """Logits of the network at x [n_in], float64."""
  for index, (w, b) in enumerate(layers):
    x = x @ w + b
    if index < len(layers) - 1:
      x = np.maximum(x, 0)
  return x
