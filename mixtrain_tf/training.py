"""MixTrain as a Keras model: clean loss on the batch, robust loss on k sampled points.

    model = MixTrainModel(networks.build("mnist_small"), method="mixtrain",
                          epsilon=0.1, k=5)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(train_ds, validation_data=val_ds, epochs=20,
              callbacks=[EpsilonRamp(0.1, ramp_epochs=10), DynamicAlpha()])

The same model runs the baselines MixTrain's cost claims are measured against,
selected by `method`:

* "mixtrain": alpha * clean + (1 - alpha) * robust, the robust loss (docs/method.md 2.3,
  symbolic bounds) on k points drawn uniformly from each replica's batch;
* "clean": cross-entropy only;
* "pgd": Madry adversarial training (cross-entropy at PGD points);
* "interval": alpha * clean + (1 - alpha) * robust with interval bounds on every point;
* "symbolic": the same with symbolic bounds on every point (k = batch).

`alpha` and `epsilon` are non-trainable variables, so callbacks that assign them
change what the compiled step computes.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from mixtrain_tf import api, attacks

TRAINING_METHODS = ("mixtrain", "clean", "pgd", "interval", "symbolic")


def robust_loss(network: keras.Model, x: tf.Tensor, y: tf.Tensor, epsilon,
                bound: str, clip_min: float = 0.0, clip_max: float = 1.0
                ) -> tuple[tf.Tensor, tf.Tensor]:
  """Per-example robust loss (docs/method.md 2.3: cross-entropy of the margin upper
  bounds) and whether each example is verified."""
  ub = api.ball_margins(network, x, y, epsilon, bound, clip_min, clip_max)
  per_example = keras.losses.sparse_categorical_crossentropy(y, ub, from_logits=True)
  return per_example, api.is_verified(ub, y)


def _for_reduction(logs: dict) -> dict:
  """Keras reduces step outputs over workers with MEAN along axis 0 under
  MultiWorkerMirroredStrategy, which rejects scalars: give them one axis there."""
  if isinstance(tf.distribute.get_strategy(),
                tf.distribute.MultiWorkerMirroredStrategy):
    return {k: tf.reshape(v, [1]) for k, v in logs.items()}
  return logs


class MixTrainModel(keras.Model):
  """Wraps a supported network; `fit` trains it by `method` (see module doc).

  Args:
    network: a built Keras model of supported layers, images -> logits.
    method: one of TRAINING_METHODS.
    epsilon: initial L-inf radius (an `EpsilonRamp` callback may change it).
    k: points per replica batch that get the robust loss ("mixtrain").
    alpha: initial weight of the clean loss (a `DynamicAlpha` callback adapts it).
    eval_bound: bound used for verified accuracy in `test_step`.
    pgd_steps, pgd_step_size: the attack of the "pgd" method.
    clip_min, clip_max: valid input domain.
    seed: seed of the per-step sampling (replicas fold in their id).
  """

  def __init__(self, network: keras.Model, method: str = "mixtrain",
               epsilon: float = 0.1, k: int = 5, alpha: float = 0.5,
               eval_bound: str = "symbolic", pgd_steps: int = 40,
               pgd_step_size: float = 0.01, clip_min: float = 0.0,
               clip_max: float = 1.0, seed: int = 0, **kwargs):
    super().__init__(**kwargs)
    if method not in TRAINING_METHODS:
      raise ValueError(f"unknown method {method!r}; choose one of "
                       f"{TRAINING_METHODS}.")
    if k < 1:
      raise ValueError(f"k must be >= 1, got {k}.")
    if eval_bound not in api.METHODS:
      raise ValueError(f"unknown eval_bound {eval_bound!r}; choose one of "
                       f"{api.METHODS}.")
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    if epsilon < 0:
      raise ValueError(f"epsilon must be >= 0, got {epsilon}.")
    policy = self.dtype_policy.name
    if policy != "float32":
      raise ValueError(
          f"MixTrainModel runs under the {policy!r} dtype policy, but bounds are "
          "float32 proofs (a float16 bound proves nothing): set "
          "keras.mixed_precision.set_global_policy('float32') before building the "
          "network and the model.")
    api.bound_graph(network)  # unsupported layers fail here, before training
    self.network = network
    self.method = method
    self.k = int(k)
    self.eval_bound = eval_bound
    self.pgd_steps = int(pgd_steps)
    self.pgd_step_size = float(pgd_step_size)
    self.clip_min, self.clip_max = float(clip_min), float(clip_max)
    self.seed = int(seed)
    self.epsilon = self.add_weight(
        name="epsilon", shape=(), initializer=keras.initializers.Constant(epsilon),
        trainable=False)
    self.alpha = self.add_weight(
        name="alpha", shape=(), initializer=keras.initializers.Constant(alpha),
        trainable=False)
    # DynamicAlpha's last (clean, verified) validation accuracy, -1 before the
    # first epoch: a model variable so that a resumed run keeps the rule's state.
    self.alpha_rule_memory = self.add_weight(
        name="alpha_rule_memory", shape=(2,),
        initializer=keras.initializers.Constant(-1.0), trainable=False)
    self._trackers = {
        name: keras.metrics.Mean(name=name)
        for name in ("loss", "clean_loss", "robust_loss", "verified", "alpha",
                     "epsilon")}
    self._accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    self.built = True  # the wrapped network is built; nothing else to create

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    # Keras first reduces a distributed data batch with MEAN to build the model
    # symbolically, which fails under MultiWorkerMirroredStrategy. This model is
    # built and compiles no loss or metrics: only the optimizer needs building.
    with self.distribute_strategy.scope():
      self._symbolic_build(data_batch=None)

  @property
  def metrics(self):
    return [*self._trackers.values(), self._accuracy]

  def call(self, x, training=False):
    return self.network(x, training=training)

  # -- training -----------------------------------------------------------------

  def _sample(self, batch: tf.Tensor) -> tf.Tensor:
    """Indices of k points drawn without replacement; replicas draw differently."""
    ctx = tf.distribute.get_replica_context()
    replica = tf.cast(ctx.replica_id_in_sync_group if ctx else 0, tf.int32)
    step = tf.cast(self.optimizer.iterations, tf.int32)
    seed = tf.stack([self.seed + 7919 * replica, step])
    noise = tf.random.stateless_uniform([batch], seed)
    return tf.argsort(noise)[: self.k]

  def train_step(self, data):
    x, y = data[0], tf.cast(data[1], tf.int32)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    with tf.GradientTape() as tape:
      logits = self.network(x, training=True)
      clean = keras.losses.sparse_categorical_crossentropy(
          y, logits, from_logits=True)
      if self.method == "clean":
        robust, verified = tf.zeros([0]), tf.zeros([0], tf.bool)
        loss = tf.reduce_mean(clean)
      elif self.method == "pgd":
        x_adv = attacks.pgd(
            lambda z: self.network(z, training=False), x, y, self.epsilon,
            self.pgd_steps, self.pgd_step_size, clip_min=self.clip_min,
            clip_max=self.clip_max,
            seed=tf.stack([self.seed, tf.cast(self.optimizer.iterations, tf.int32)]))
        robust = keras.losses.sparse_categorical_crossentropy(
            y, self.network(x_adv, training=True), from_logits=True)
        verified = tf.zeros([0], tf.bool)
        loss = tf.reduce_mean(robust)
      else:
        if self.method == "mixtrain":
          idx = self._sample(tf.shape(x)[0])
          xs, ys = tf.gather(x, idx), tf.gather(y, idx)
        else:
          xs, ys = x, y
        bound = "interval" if self.method == "interval" else "symbolic"
        robust, verified = robust_loss(self.network, xs, ys, self.epsilon, bound,
                                       self.clip_min, self.clip_max)
        loss = (self.alpha * tf.reduce_mean(clean)
                + (1.0 - self.alpha) * tf.reduce_mean(robust))
      # Per-replica mean / replicas: the summed gradients of all replicas are the
      # gradient of the global mean, as on one device. scale_loss is the
      # identity unless a loss-scale optimizer asks for it.
      scaled = self.optimizer.scale_loss(loss / tf.cast(replicas, tf.float32))
    grads = tape.gradient(scaled, self.network.trainable_variables)
    self.optimizer.apply(grads, self.network.trainable_variables)
    t = self._trackers
    t["loss"].update_state(loss)
    t["clean_loss"].update_state(clean)
    if self.method != "clean":
      t["robust_loss"].update_state(robust)
    if self.method not in ("clean", "pgd"):
      t["verified"].update_state(tf.cast(verified, tf.float32))
    t["alpha"].update_state(self.alpha)
    t["epsilon"].update_state(self.epsilon)
    self._accuracy.update_state(y, logits)
    return _for_reduction({m.name: m.result() for m in self.metrics})

  def test_step(self, data):
    """Clean accuracy, clean loss and verified accuracy at the current epsilon."""
    x, y = data[0], tf.cast(data[1], tf.int32)
    logits = self.network(x, training=False)
    clean = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    ub = api.ball_margins(self.network, x, y, self.epsilon, self.eval_bound,
                        self.clip_min, self.clip_max)
    verified = tf.logical_and(api.is_verified(ub, y),
                              tf.equal(tf.argmax(logits, 1, tf.int32), y))
    self._trackers["loss"].update_state(clean)
    self._trackers["verified"].update_state(tf.cast(verified, tf.float32))
    self._accuracy.update_state(y, logits)
    return _for_reduction({"loss": self._trackers["loss"].result(),
                           "accuracy": self._accuracy.result(),
                           "verified": self._trackers["verified"].result()})
