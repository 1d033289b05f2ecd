"""Independent float64 reference of docs/method.md 2.2 with explicit dense matrices.

Per example, every node carries the full symbolic equation: center c [n], input
coefficients A [d, n] and one relaxation block E_l [n_l, n] per ReLU node, pushed
forward exactly as the method describes (no colouring, no backward pass). Each
affine node's dense matrix is read off the operator applied to an identity basis.
"""

import numpy as np
import tensorflow as tf

from mixtrain_tf import ops
from mixtrain_tf.graph import bound_graph


def affine_matrix(op):
  n_in = int(np.prod(op.in_shape))
  eye = tf.reshape(tf.eye(n_in), (n_in,) + tuple(op.in_shape))
  zero = tf.zeros((1,) + tuple(op.in_shape))
  b = tf.reshape(op.affine(zero), [-1]).numpy().astype(np.float64)
  m = tf.reshape(op.affine(eye), [n_in, -1]).numpy().astype(np.float64) - b
  return m, b


def symbolic_reference(model, lower, upper, spec=None):
  """Returns (lower, upper) of the output (or spec @ output) per example, float64."""
  graph = bound_graph(model)
  mats = {i: affine_matrix(n.op) for i, n in enumerate(graph.nodes)
          if isinstance(n.op, ops.AffineOp)}
  lows, ups = [], []
  for ex in range(len(lower)):
    lo = np.asarray(lower[ex], np.float64).ravel()
    hi = np.asarray(upper[ex], np.float64).ravel()
    eq = {0: ((lo + hi) / 2, np.diag((hi - lo) / 2), {})}
    for i, node in enumerate(graph.nodes[1:], 1):
      op = node.op
      if isinstance(op, ops.AffineOp):
        c, a, e = eq[node.inputs[0]]
        m, b = mats[i]
        eq[i] = (c @ m + b, a @ m, {k: v @ m for k, v in e.items()})
      elif isinstance(op, ops.AddOp):
        parts = [eq[j] for j in node.inputs]
        e = {}
        for _, _, pe in parts:
          for k, v in pe.items():
            e[k] = e[k] + v if k in e else v
        eq[i] = (sum(p[0] for p in parts), sum(p[1] for p in parts), e)
      else:  # ReLU
        c, a, e = eq[node.inputs[0]]
        rad = np.abs(a).sum(0) + sum(np.abs(v).sum(0) for v in e.values())
        l, u = c - rad, c + rad
        lam = np.where(l >= 0, 1.0, 0.0)
        unstable = (l < 0) & (u > 0)
        lam[unstable] = u[unstable] / (u[unstable] - l[unstable])
        mu = np.where(unstable, -lam * l / 2, 0.0)
        e = {k: v * lam for k, v in e.items()}
        e[i] = np.diag(mu)
        eq[i] = (c * lam + mu, a * lam, e)
    c, a, e = eq[len(graph.nodes) - 1]
    if spec is not None:
      s = np.asarray(spec[ex], np.float64)
      c, a, e = c @ s.T, a @ s.T, {k: v @ s.T for k, v in e.items()}
    rad = np.abs(a).sum(0) + sum(np.abs(v).sum(0) for v in e.values())
    lows.append(c - rad)
    ups.append(c + rad)
  return np.array(lows), np.array(ups)
