"""`BoundLayer`: the bounds of a network as a Keras layer, for the functional API.

    images = keras.Input((28, 28, 1)); eps = keras.Input(()); labels = keras.Input(
        (), dtype="int32")
    bounds = mixtrain_tf.BoundLayer(network, method="symbolic")
    model = keras.Model([images, eps, labels], bounds(images, eps, labels))

The layer meets the design of "layers that carry bounds" at the model boundary: the
wrapped network stays an ordinary Keras model, and its whole bound graph is planned
at once (the symbolic planner needs the whole graph), while the bounds, and for the
symbolic method the output's symbolic equation, come out as tensors of a layer that
saves, loads and exports like any other.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from mixtrain_tf import api, ops


@keras.saving.register_keras_serializable(package="mixtrain_tf")
class BoundLayer(keras.layers.Layer):
  """Bounds of `network` over the L-inf ball around its input, clipped to a domain.

  Called as `layer(images, epsilon)` it returns {"lower", "upper"}: bounds of the
  (flattened) outputs, [batch, n]. Called as `layer(images, epsilon, labels)` it
  returns {"margin_upper"}: upper bounds of z_j - z_y, [batch, n] (0 at j = y); a
  point is verified iff every other entry is < 0. `method` is any of
  `api.BoundMethod`; `alpha_steps` sets alpha_crown's optimisation steps.
  `epsilon` is a scalar or one radius per example. With `return_equation=True`
  (symbolic method, no labels) the output's symbolic equation is added (see
  `bounds.SymbolicBounds`): "center" [batch, n], "input_coeffs"
  [batch, n, *input_shape] and "relax_coeffs_<i>" [batch, n, *relu_shape] per
  ReLU layer. Bounds are always float32 (no autocast):
  a float16 bound is not a proof. Inputs are checked like `api.input_box` does.

  Saving: the layer's config holds its network, and `.keras` files store each
  network's weights once, so in a model to be saved give every BoundLayer its own
  network (e.g. `keras.models.clone_model` + `set_weights`) rather than sharing one.
  """

  def __init__(self, network: keras.Model, method: str = "symbolic",
               clip_min: float = 0.0, clip_max: float = 1.0,
               return_equation: bool = False, alpha_steps: int | None = None,
               **kwargs):
    kwargs["dtype"] = "float32"
    kwargs["autocast"] = False
    super().__init__(**kwargs)
    method = api.BoundMethod(method).value
    if return_equation and method != "symbolic":
      raise ValueError("return_equation needs method='symbolic' (the interval "
                       "method has no symbolic equation).")
    self.clip_min, self.clip_max = api._domain(clip_min, clip_max)
    api.bound_graph(network)  # refuse what the engines cannot read, now
    self.network = network
    self.method = method
    self.return_equation = bool(return_equation)
    self.alpha_steps = None if alpha_steps is None else int(alpha_steps)

  def __call__(self, images, epsilon, labels=None, **kwargs):
    # Keras takes only tensors positionally: a Python or numpy radius becomes one.
    if isinstance(epsilon, (int, float, np.number)) and not isinstance(epsilon, bool):
      with np.errstate(over="ignore"):  # an overflowing radius is refused as inf
        epsilon = tf.constant(np.float32(epsilon))
    if labels is not None:
      kwargs["labels"] = labels
    return super().__call__(images, epsilon, **kwargs)

  def call(self, images, epsilon, labels=None):
    if labels is not None:
      return {"margin_upper": api.ball_margins(
          self.network, images, labels, epsilon, self.method, self.clip_min,
          self.clip_max, self.alpha_steps)}
    lower, upper = api.input_box(images, epsilon, self.clip_min, self.clip_max)
    b = api.bound_box(self.network, lower, upper, self.method,
                      alpha_steps=self.alpha_steps)
    c = b.concretize()
    out = {"lower": ops.flat(c.lower), "upper": ops.flat(c.upper)}
    if self.return_equation:
      out["center"] = b.center
      out["input_coeffs"] = b.input_coeffs
      out.update({f"relax_coeffs_{i}": e for i, e in enumerate(b.relax_coeffs)})
    return out

  def compute_output_spec(self, images, epsilon, labels=None):
    graph = api.bound_graph(self.network)
    batch = images.shape[0]
    n = graph.num_outputs
    spec = lambda *shape: keras.KerasTensor((batch, *shape), "float32")  # noqa: E731
    if labels is not None:
      return {"margin_upper": spec(n)}
    out = {"lower": spec(n), "upper": spec(n)}
    if self.return_equation:
      out["center"] = spec(n)
      out["input_coeffs"] = spec(n, *graph.input_shape)
      relus = [node for node in graph.nodes if isinstance(node.op, ops.ReluOp)]
      out.update({f"relax_coeffs_{i}": spec(n, *node.op.out_shape)
                  for i, node in enumerate(relus)})
    return out

  def get_config(self):
    return {**super().get_config(),
            "network": keras.saving.serialize_keras_object(self.network),
            "method": self.method, "clip_min": self.clip_min,
            "clip_max": self.clip_max, "return_equation": self.return_equation,
            "alpha_steps": self.alpha_steps}

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    config["network"] = keras.saving.deserialize_keras_object(config["network"])
    for key in ("dtype", "autocast"):  # fixed by the layer
      config.pop(key, None)
    return cls(**config)
