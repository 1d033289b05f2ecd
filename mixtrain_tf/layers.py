"""Keras layers of our own. Each describes its bound operator via `bound_op()`."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from mixtrain_tf import ops


@keras.saving.register_keras_serializable(package="mixtrain_tf")
class InputNormalization(keras.layers.Layer):
  """(x - mean) / std per channel, with constants fixed in the config.

  Unlike `keras.layers.Normalization` it needs no `adapt()`: the constants of
  docs/method.md 7 are given, and it round-trips through `get_config`.
  """

  def __init__(self, mean: Sequence[float], std: Sequence[float], **kwargs):
    super().__init__(**kwargs)
    self.mean = [float(m) for m in mean]
    self.std = [float(s) for s in std]
    if len(self.mean) != len(self.std) or min(self.std) <= 0:
      raise ValueError(f"mean {self.mean} and std {self.std} must have the same "
                       "length and std must be positive.")

  def call(self, inputs):
    return ops.per_channel(lambda x, m, s: (x - m) / s, inputs,
                           tf.constant(self.mean, inputs.dtype),
                           tf.constant(self.std, inputs.dtype))

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), "mean": self.mean, "std": self.std}

  def bound_op(self) -> ops.ScaleShiftOp:
    """x * (1 / std) + (-mean / std), per channel."""
    scale = [1.0 / s for s in self.std]
    shift = [-m / s for m, s in zip(self.mean, self.std)]

    def scale_fn():
      return tf.constant(scale)

    def shift_fn():
      return tf.constant(shift)

    return ops.ScaleShiftOp(scale_fn, shift_fn)
