"""Bound containers: plain typed tuples of float32 tensors."""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from mixtrain_tf import ops


@dataclasses.dataclass(frozen=True)
class IntervalBounds:
  """Elementwise bounds lower <= z <= upper, each [batch, *shape].

  Bounds made by `from_center_radius` keep their centre and radius, so that an
  affine layer that reads them does not recompute them from lower and upper
  (four elementwise passes over the layer, and their gradients, in every IBP
  training step)."""

  lower: tf.Tensor
  upper: tf.Tensor
  kept_center: tf.Tensor | None = dataclasses.field(default=None, repr=False)
  kept_radius: tf.Tensor | None = dataclasses.field(default=None, repr=False)

  @classmethod
  def from_center_radius(cls, center: tf.Tensor, radius: tf.Tensor
                         ) -> "IntervalBounds":
    return cls(center - radius, center + radius, center, radius)

  @property
  def center(self) -> tf.Tensor:
    if self.kept_center is not None:
      return self.kept_center
    return (self.lower + self.upper) / 2.0

  @property
  def radius(self) -> tf.Tensor:
    if self.kept_radius is not None:
      return self.kept_radius
    return (self.upper - self.lower) / 2.0

  def concretize(self) -> "IntervalBounds":
    return self


@dataclasses.dataclass(frozen=True)
class SymbolicBounds:
  """A symbolic interval (docs/method.md 2.2) of m output quantities per example.

  Quantity j of example b is
      z[b, j] = center[b, j] + sum_i input_coeffs[b, j, i] * e_i
                + sum_l sum_r relax_coeffs[l][b, j, r] * h_{l, r},
  with every input symbol e_i and relaxation symbol h_{l, r} in [-1, 1]. The input
  coefficients are indexed like the input ([batch, m, *input_shape]); relaxation
  coefficients come one tensor per ReLU layer ([batch, m, *relu_shape]), zero at
  stable neurons. `lower`/`upper` are the concretized bounds, [batch, m].
  """

  center: tf.Tensor
  input_coeffs: tf.Tensor
  relax_coeffs: tuple[tf.Tensor, ...]
  lower: tf.Tensor
  upper: tf.Tensor

  def concretize(self) -> IntervalBounds:
    """Bounds from the equation: center -/+ (sum |input| + sum |relax| coeffs)."""
    def abs_sum(t):
      return tf.reduce_sum(ops.flat(tf.abs(t), 2), axis=-1)
    rad = abs_sum(self.input_coeffs)
    for e in self.relax_coeffs:
      rad += abs_sum(e)
    return IntervalBounds(self.center - rad, self.center + rad)
