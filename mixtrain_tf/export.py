"""SavedModel export that third parties can load and verify without mixtrain_tf.

The SavedModel has three signatures:
* `serving_default`: images [N, H, W, C] in [0, 1] -> {"logits": [N, classes]};
* `bounds`: (images, epsilon) -> {"lower", "upper"}: bounds of the logits over the
  L-inf ball clipped to [0, 1];
* `margins`: (images, labels, epsilon) -> {"margin_upper": [N, classes]}: upper
  bounds of z_j - z_y (0 at j = y); a point is verified iff every entry but the
  label's is < 0.

The bounds are those of `method` (default "symbolic"; any of `api.METHODS`), whose
name the SavedModel keeps in its variable `bound_method`. TensorFloat-32 is a
setting of the process that runs the signatures: turn it off there
(`tf.config.experimental.enable_tensor_float_32_execution(False)`), as importing
mixtrain_tf does.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from mixtrain_tf import api, bound_layer


class _BoundModule(tf.Module):

  def __init__(self, network: keras.Model, clip_min: float, clip_max: float,
               method: str = "symbolic"):
    super().__init__()
    self.network = network
    self.bound_method = tf.Variable(method, trainable=False, name="bound_method")
    shape = [None, *network.inputs[0].shape[1:]]
    x_spec = tf.TensorSpec(shape, tf.float32, name="images")
    eps_spec = tf.TensorSpec([], tf.float32, name="epsilon")

    @tf.function(input_signature=[x_spec])
    def serve(images):
      return {"logits": network(images, training=False)}

    self.bound_layer = bound_layer.BoundLayer(network, method, clip_min, clip_max)

    @tf.function(input_signature=[x_spec, eps_spec])
    def bounds(images, epsilon):
      return self.bound_layer(images, epsilon)

    @tf.function(input_signature=[
        x_spec, tf.TensorSpec([None], tf.int32, name="labels"), eps_spec])
    def margins(images, labels, epsilon):
      return self.bound_layer(images, epsilon, labels)

    self.serve, self.bounds, self.margins = serve, bounds, margins


def export_saved_model(network: keras.Model, path: str, clip_min: float = 0.0,
                       clip_max: float = 1.0, method: str = "symbolic") -> None:
  """Writes `network` with its `method` bound signatures as a SavedModel at `path`.

  A network the bound engines cannot read exactly is refused here, before anything
  is traced or written (UnsupportedLayerError / SelfCheckError).
  """
  api.bound_graph(network)
  method = api.BoundMethod(method).value
  module = _BoundModule(network, clip_min, clip_max, method)
  tf.saved_model.save(module, path, signatures={
      "serving_default": module.serve, "bounds": module.bounds,
      "margins": module.margins})
