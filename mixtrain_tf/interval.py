"""Interval bound propagation (docs/method.md 2.1)."""

from __future__ import annotations

import tensorflow as tf

from mixtrain_tf import ops
from mixtrain_tf.bounds import IntervalBounds
from mixtrain_tf.graph import BoundGraph


def _relu(i, node, ins):
  return IntervalBounds(tf.nn.relu(ins[0].lower), tf.nn.relu(ins[0].upper))


def _add(i, node, ins):
  return IntervalBounds(tf.add_n([b.lower for b in ins]),
                        tf.add_n([b.upper for b in ins]))


def _affine(i, node, ins):
  return IntervalBounds.from_center_radius(node.op.affine(ins[0].center),
                                           node.op.abs_linear(ins[0].radius))


RULES = {ops.ReluOp: _relu, ops.AddOp: _add, ops.AffineOp: _affine}


def node_bounds(graph: BoundGraph, lower: tf.Tensor, upper: tf.Tensor,
                stop: int | None = None) -> list[IntervalBounds]:
  """Interval bounds of every node up to `stop` (default: all)."""
  stop = len(graph.nodes) if stop is None else stop
  values = graph.propagate(RULES, {0: IntervalBounds(lower, upper)},
                           order=range(1, stop))
  return [values[i] for i in range(stop)]


def bounds(graph: BoundGraph, lower: tf.Tensor, upper: tf.Tensor,
           spec: tf.Tensor | None = None) -> IntervalBounds:
  """Interval bounds of the output, or of `spec @ output` when spec [B, m, n] is given.

  With a spec, it is folded into the last layer when that layer is affine: the
  margins then get the interval bound of one affine map of the layer's input
  (tighter than subtracting logit bounds).
  """
  return bounds_and_nodes(graph, lower, upper, spec)[0]


def bounds_and_nodes(graph: BoundGraph, lower: tf.Tensor, upper: tf.Tensor,
                     spec: tf.Tensor | None = None
                     ) -> tuple[IntervalBounds, list[IntervalBounds]]:
  """`bounds` and the interval bounds of the nodes it computed on the way (every
  node, or every node but an affine last one when a spec is folded into it): one
  pass for training losses that also read intermediate bounds."""
  last = graph.nodes[-1]
  if spec is None:
    nodes = node_bounds(graph, lower, upper)
    return nodes[-1], nodes
  if isinstance(last.op, ops.AffineOp):
    nodes = node_bounds(graph, lower, upper, stop=len(graph.nodes) - 1)
    pre = nodes[last.inputs[0]]
    op = last.op
    rows = op.transpose(tf.reshape(spec, tf.concat(
        [tf.shape(spec)[:2], op.out_shape], 0)))  # [B, m, *in_shape]
    center = ops.rowdot(rows, pre.center)
    b = op.bias()
    if b is not None:
      # A bias may carry broadcast dims (Normalization's mean is (1, n)).
      center += tf.linalg.matvec(spec, tf.reshape(
          tf.broadcast_to(b, (1,) + tuple(op.out_shape)), [-1]))
    rad = ops.rowdot(tf.abs(rows), pre.radius)
    return IntervalBounds.from_center_radius(center, rad), nodes
  nodes = node_bounds(graph, lower, upper)
  out = nodes[-1]
  c = tf.linalg.matvec(spec, ops.flat(out.center))
  r = tf.linalg.matvec(tf.abs(spec), ops.flat(out.radius))
  return IntervalBounds.from_center_radius(c, r), nodes
