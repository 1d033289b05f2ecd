"""Symbolic intervals with symbolic linear relaxation (docs/method.md 2.2).

Every neuron value is the equation z = c + sum_i A[i] e_i + sum_r E[r] h_r with all
symbols in [-1, 1]: one input symbol per input value (A starts as the diagonal of
the input box radius) and one new symbol per unstable ReLU neuron (coefficient
mu = -lam * l / 2 at that neuron, after scaling the equation by lam = u / (u - l)).

The bounds are exactly those of pushing A and E forward layer by layer; this module
evaluates the same sums in a cheaper order, chosen per layer at plan time:

* the center c is pushed forward (one clean-sized pass);
* the radius at a neuron, sum_i |A[i]| + sum_r |E[r]|, splits by *source* (the input
  box, or the new symbols of one ReLU layer). For each source it is computed
  - directly as |W| r when the source is one linear layer away (as in intervals),
  - forward by pushing basis images through the layers between source and neuron.
    Basis vectors whose receptive fields never overlap at a neuron are summed into
    one image ("colours" of a periodic grid), since the absolute value of the sum
    equals the sum of absolute values when at most one term is nonzero: conv
    stacks need (receptive field)^2 * channels images instead of H * W * channels;
  - or backward, by pulling one row per neuron back to the input (the transposed
    layers), which handles every source at once and is cheap for narrow layers.

The final layer is always bounded backward from the specification rows (margins
z_j - z_y folded into the last layer), which also yields the output's full
symbolic equation (`SymbolicBounds`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from mixtrain_tf import ops
from mixtrain_tf.bounds import SymbolicBounds
from mixtrain_tf.graph import BoundGraph

# float32, with room for the intermediate tensors: 4 values of room fell short on
# ImageNet-200 (1.33 GB measured per example against 1.07 GB estimated,
# docs/benchmarks.md); 6 cover every network measured.
_BYTES_PER_VALUE = 4 * 6


@dataclasses.dataclass
class _Source:
  """How the contribution of one source's symbols to a target is computed."""
  index: int
  kind: str  # "direct" or "forward"
  chain: tuple[int, ...] = ()  # node indices from source (excl.) to target (incl.)
  shape: tuple[int, ...] = ()  # the source's shape
  period: tuple[int, int] | None = None  # colour grid (forward, spatial sources)

  @property
  def colours(self) -> int:
    """K, the number of basis images pushed forward."""
    if self.period is None:
      return int(np.prod(self.shape))
    return self.period[0] * self.period[1] * self.shape[-1]

  def basis(self) -> tf.Tensor:
    """[K, *shape]: image k is 1 at every position and channel of colour k."""
    n = self.colours
    if self.period is None:
      return tf.reshape(tf.eye(n), (n,) + self.shape)
    h, w, c = self.shape
    py, px = self.period
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    colour = ((yy % py) * px + (xx % px))[..., None] * c + np.arange(c)  # [h, w, c]
    return tf.transpose(tf.one_hot(colour, n), [3, 0, 1, 2])


@dataclasses.dataclass
class _Target:
  index: int
  mode: str  # "forward" or "backward"
  sources: list[_Source]
  cost: float
  values_per_sample: int


class Plan:
  """Per-node strategy of the symbolic engine for one graph (built once, eagerly)."""

  #: Planner modes a test can force instead of choosing by cost.
  FORCE = ("forward", "backward", "forward_no_direct", "forward_no_colour")

  def __init__(self, graph: BoundGraph, force: str | None = None):
    if force is not None and force not in self.FORCE:
      raise ValueError(f"force must be one of {self.FORCE}, got {force!r}.")
    self.force = force
    self.graph = graph
    nodes = graph.nodes
    self.sources = [0] + [i for i, n in enumerate(nodes)
                          if isinstance(n.op, ops.ReluOp)]
    self.ancestors = [graph.ancestors(i) for i in range(len(nodes))]
    consumers = graph.consumers()
    self.descendants = [set() for _ in nodes]
    for i in reversed(range(len(nodes))):
      self.descendants[i] = {i}.union(*[self.descendants[j] for j in consumers[i]])
    self.targets: dict[int, _Target] = {}
    with tf.init_scope():
      for node in nodes:
        if isinstance(node.op, ops.ReluOp) and node.inputs[0] not in self.targets:
          self.targets[node.inputs[0]] = self._plan_target(node.inputs[0])
    out = len(nodes) - 1
    n_out = int(np.prod(nodes[out].op.out_shape))
    self.output_values = n_out * self._max_values(self.ancestors[out])
    self.values_per_sample = max(
        [t.values_per_sample for t in self.targets.values()] + [self.output_values])

  def _size(self, i: int) -> int:
    return int(np.prod(self.graph.nodes[i].op.out_shape))

  def _max_values(self, indices) -> int:
    return max(self._size(i) for i in indices)

  def _flops(self, indices) -> int:
    total = 0
    for i in indices:
      op = self.graph.nodes[i].op
      total += op.flops() if isinstance(op, ops.AffineOp) else self._size(i)
    return total

  def _between(self, s: int, z: int) -> list[int]:
    return sorted((self.descendants[s] & self.ancestors[z]) - {s})

  def _plan_target(self, z: int) -> _Target:
    nodes = self.graph.nodes
    sources, fwd_cost, fwd_values = [], 0.0, 0
    for s in self.sources:
      if s not in self.ancestors[z]:
        continue
      chain = self._between(s, z)
      affine = [nodes[i].op for i in chain]
      if (all(isinstance(op, ops.AffineOp) and len(nodes[i].inputs) == 1
              for i, op in zip(chain, affine))
          and sum(op.mixing for op in affine) <= 1
          and self.force != "forward_no_direct"):
        sources.append(_Source(s, "direct", tuple(chain)))
        continue
      s_shape = nodes[s].op.out_shape
      period = (self._period(s, z, chain)
                if len(s_shape) == 3 and self.force != "forward_no_colour" else None)
      src = _Source(s, "forward", tuple(chain), s_shape, period)
      sources.append(src)
      fwd_cost += src.colours * self._flops(chain)
      fwd_values = max(fwd_values, src.colours * self._max_values(chain))
    rows = self._size(z)
    bwd_cost = rows * self._flops(self.ancestors[z])
    bwd_values = rows * self._max_values(self.ancestors[z])
    forward = (self.force != "backward" if self.force else fwd_cost <= bwd_cost)
    if forward:
      return _Target(z, "forward", sources, fwd_cost, fwd_values)
    return _Target(z, "backward", [], bwd_cost, bwd_values)

  def _period(self, s: int, z: int, chain: list[int]) -> tuple[int, int] | None:
    """Smallest grid period (py, px) so that no target neuron sees two source
    positions of one colour; None when the layers between are not spatial."""
    nodes = self.graph.nodes
    h, w, _ = nodes[s].op.out_shape
    if len(nodes[z].op.out_shape) != 3:
      return None
    probe = np.eye(h * w, dtype=np.float32).reshape(h * w, h, w, 1)

    def structural(i, node, ins):
      out = node.op.structural(ins[0])
      if out is None:
        raise _NotSpatial
      return out

    try:
      values = self.graph.propagate(
          {ops.ReluOp: lambda i, node, ins: ins[0],
           ops.AddOp: lambda i, node, ins: sum(ins), ops.AffineOp: structural},
          {s: probe}, order=chain)
    except _NotSpatial:
      return None
    dep = values[z][..., 0].reshape(h * w, -1) > 0  # [source pos, target pos]
    ys, xs = np.divmod(np.arange(h * w), w)
    py = px = 1
    for q in range(dep.shape[1]):
      hit = dep[:, q]
      if hit.any():
        py = max(py, ys[hit].max() - ys[hit].min() + 1)
        px = max(px, xs[hit].max() - xs[hit].min() + 1)
    return int(min(py, h)), int(min(px, w))


def _relax(lower, upper):
  """lam, mu of docs/method.md 2.2 (lam = 1, mu = 0 active; 0, 0 dead)."""
  active = lower >= 0.0
  unstable = tf.logical_and(lower < 0.0, upper > 0.0)
  denom = tf.where(unstable, upper - lower, tf.ones_like(upper))
  lam = tf.where(active, tf.ones_like(upper),
                 tf.where(unstable, upper / denom, tf.zeros_like(upper)))
  mu = tf.where(unstable, -lam * lower / 2.0, tf.zeros_like(upper))
  return lam, mu


class _NotSpatial(Exception):
  """A layer between source and target has no structural (spatial) map."""


class _State:
  """Center, lam and source radii of one forward pass."""

  def __init__(self, graph: BoundGraph, plan: Plan):
    self.graph, self.plan = graph, plan
    self.center: dict[int, tf.Tensor] = {}
    self.lam: dict[int, tf.Tensor] = {}
    self.rad: dict[int, tf.Tensor] = {}

  def backward(self, z: int, rows: tf.Tensor, keep: bool = False):
    """Pulls rows [B, m, *z_shape] back to every source.

    Returns the radius [B, m] and, if keep, the coefficients at each source.
    """
    nodes = self.graph.nodes
    adj = {z: rows}
    radius = 0.0
    coeffs = {}
    for i in sorted(self.plan.ancestors[z], reverse=True):
      a = adj.pop(i, None)
      if a is None:
        continue
      if i in self.rad:
        r = self.rad[i]
        radius += ops.rowdot(tf.abs(a), r)
        if keep:
          coeffs[i] = a * r[:, None]
      op = nodes[i].op
      if isinstance(op, ops.InputOp):
        continue
      if isinstance(op, ops.ReluOp):
        pulled = [a * self.lam[i][:, None]]
      elif isinstance(op, ops.AddOp):
        pulled = [a] * len(nodes[i].inputs)
      else:
        pulled = [op.transpose(a)]
      for j, p in zip(nodes[i].inputs, pulled):
        adj[j] = adj[j] + p if j in adj else p
    return radius, coeffs

  def forward_radius(self, z: int, src: _Source) -> tf.Tensor:
    nodes = self.graph.nodes
    r = self.rad[src.index]
    if src.kind == "direct":
      for i in src.chain:
        r = nodes[i].op.abs_linear(r)
      return r
    x = self.graph.propagate(
        {ops.ReluOp: lambda i, node, ins: ins[0] * self.lam[i][:, None],
         ops.AddOp: lambda i, node, ins: tf.add_n(ins),
         ops.AffineOp: lambda i, node, ins: node.op.linear(ins[0])},
        {src.index: r[:, None] * src.basis()[None]}, order=src.chain)
    return tf.reduce_sum(tf.abs(x[z]), axis=1)

  def radius(self, z: int) -> tf.Tensor:
    target = self.plan.targets[z]
    if target.mode == "forward":
      return tf.add_n([self.forward_radius(z, s) for s in target.sources])
    shape = self.graph.nodes[z].op.out_shape
    n = int(np.prod(shape))
    batch = tf.shape(self.center[z])[0]
    eye = tf.reshape(tf.eye(n), (1, n) + shape)
    rows = tf.tile(eye, tf.concat([[batch], tf.ones([len(shape) + 1], tf.int32)], 0))
    rad, _ = self.backward(z, rows)
    return tf.reshape(rad, tf.concat([[batch], shape], 0))


def bounds(graph: BoundGraph, plan: Plan, lower: tf.Tensor, upper: tf.Tensor,
           spec: tf.Tensor | None = None) -> SymbolicBounds:
  """Symbolic bounds of the output (or of spec [B, m, n_out] @ output)."""
  st = _State(graph, plan)
  st.center[0] = (lower + upper) / 2.0
  st.rad[0] = (upper - lower) / 2.0

  def relu(i, node, ins):
    rad = st.radius(node.inputs[0])
    st.lam[i], st.rad[i] = _relax(ins[0] - rad, ins[0] + rad)
    return st.lam[i] * ins[0] + st.rad[i]

  graph.propagate({ops.ReluOp: relu, ops.AddOp: lambda i, node, ins: tf.add_n(ins),
                   ops.AffineOp: lambda i, node, ins: node.op.affine(ins[0])},
                  st.center)
  out = len(graph.nodes) - 1
  c_out = st.center[out]
  batch = tf.shape(c_out)[0]
  if spec is None:
    n = int(np.prod(graph.output_shape))
    spec = tf.tile(tf.eye(n)[None], [batch, 1, 1])
  c_flat = ops.flat(c_out)
  rows = tf.reshape(spec, tf.concat([tf.shape(spec)[:2], graph.output_shape], 0))
  rad, coeffs = st.backward(out, rows, keep=True)
  center = tf.linalg.matvec(spec, c_flat)
  relu_sources = [i for i in plan.sources if i != 0]
  zeros = lambda i: tf.zeros(tf.concat(  # noqa: E731
      [tf.shape(spec)[:2], graph.nodes[i].op.out_shape], 0))
  return SymbolicBounds(
      center=center,
      input_coeffs=coeffs.get(0, zeros(0)),
      relax_coeffs=tuple(coeffs.get(i, zeros(i)) for i in relu_sources),
      lower=center - rad,
      upper=center + rad)
