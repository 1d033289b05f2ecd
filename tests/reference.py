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


# -- CROWN (docs/method.md 2.4) --------------------------------------------------


def _interval64(graph, mats, lo, hi):
  """Interval bounds (lower, upper) of every node, float64, one example."""
  out = {0: (lo, hi)}
  for i, node in enumerate(graph.nodes[1:], 1):
    op = node.op
    ins = [out[j] for j in node.inputs]
    if isinstance(op, ops.AffineOp):
      m, b = mats[i]
      c, r = (ins[0][0] + ins[0][1]) / 2, (ins[0][1] - ins[0][0]) / 2
      out[i] = (c @ m + b - r @ np.abs(m), c @ m + b + r @ np.abs(m))
    elif isinstance(op, ops.AddOp):
      out[i] = (sum(p[0] for p in ins), sum(p[1] for p in ins))
    else:
      out[i] = (np.maximum(ins[0][0], 0), np.maximum(ins[0][1], 0))
  return out


def _crown_upper64(graph, mats, pre, z, rows, lo, hi):
  """max over the box of rows [m, n_z] . node_z, CROWN's lines, float64."""
  adj = {z: rows}
  const = np.zeros(len(rows))
  for i in sorted(graph.ancestors(z) - {0}, reverse=True):
    if i not in adj:
      continue
    a = adj.pop(i)
    node = graph.nodes[i]
    if isinstance(node.op, ops.AffineOp):
      m, b = mats[i]
      const = const + a @ b
      pulled = [a @ m.T]
    elif isinstance(node.op, ops.AddOp):
      pulled = [a] * len(node.inputs)
    else:
      l, u = pre[node.inputs[0]]
      unstable = (l < 0) & (u > 0)
      s = np.where(l >= 0, 1.0, 0.0)
      s[unstable] = u[unstable] / (u[unstable] - l[unstable])
      intercept = np.where(unstable, -s * l, 0.0)
      slope = np.where((l >= 0) | (unstable & (u > -l)), 1.0, 0.0)
      pos, neg = np.maximum(a, 0), np.minimum(a, 0)
      const = const + pos @ intercept
      pulled = [pos * s + neg * slope]
    for j, p in zip(node.inputs, pulled):
      adj[j] = adj[j] + p if j in adj else p
  a0 = adj[0]
  return const + a0 @ ((lo + hi) / 2) + np.abs(a0) @ ((hi - lo) / 2)


def crown_reference(model, lower, upper, spec=None, method="crown"):
  """(lower, upper) per example of the output (or spec @ output) by CROWN with
  CROWN (method="crown") or interval ("crown_ibp") pre-activation bounds, each
  CROWN pre-activation bound intersected with the interval one. float64."""
  graph = bound_graph(model)
  mats = {i: affine_matrix(n.op) for i, n in enumerate(graph.nodes)
          if isinstance(n.op, ops.AffineOp)}
  out_l, out_u = [], []
  for ex in range(len(lower)):
    lo = np.asarray(lower[ex], np.float64).ravel()
    hi = np.asarray(upper[ex], np.float64).ravel()
    itv = _interval64(graph, mats, lo, hi)
    pre = {}
    for node in graph.nodes:
      if not isinstance(node.op, ops.ReluOp) or node.inputs[0] in pre:
        continue
      z = node.inputs[0]
      relu_before = any(isinstance(graph.nodes[i].op, ops.ReluOp)
                        for i in graph.ancestors(z))
      if method == "crown_ibp" or not relu_before:
        pre[z] = itv[z]
        continue
      n = len(itv[z][0])
      ub = _crown_upper64(graph, mats, pre, z, np.vstack([np.eye(n), -np.eye(n)]),
                          lo, hi)
      pre[z] = (np.maximum(-ub[n:], itv[z][0]), np.minimum(ub[:n], itv[z][1]))
    n_out = len(itv[len(graph.nodes) - 1][0])
    s = np.eye(n_out) if spec is None else np.asarray(spec[ex], np.float64)
    ub = _crown_upper64(graph, mats, pre, len(graph.nodes) - 1,
                        np.vstack([s, -s]), lo, hi)
    out_u.append(ub[:len(s)])
    out_l.append(-ub[len(s):])
  return np.array(out_l), np.array(out_u)
