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
* "symbolic": the same with symbolic bounds on every point (k = batch);

and the IBP-family recipes (docs/method.md 9), whose clean-loss weight kappa and
CROWN-IBP weight beta follow the eps ramp (`progress`, 0 to 1, set by `EpsilonRamp`)
from their start to their end value, with optional warm-up regularisers
(`reg_weight`, Shi et al. 2021) that fade out over the ramp:

* "ibp": kappa * clean + (1 - kappa) * robust, interval bounds on every point
  (Gowal et al. 2018; with `recipes.ibp_init` and the regularisers, Shi et al. 2021);
* "crown_ibp": the same, the margins beta * CROWN-IBP + (1 - beta) * IBP
  (Zhang et al. 2020);
* "mtl_ibp": robust = (1 - ibp_weight) * cross-entropy at a PGD point +
  ibp_weight * IBP loss (De Palma et al. 2024);
* "mixtrain_ibp": MixTrain on top of IBP: alpha * clean + (1 - alpha) * robust, the
  robust loss on every point, its margins IBP except on k sampled points, which get
  the tighter `tight_bound` (and dynamic alpha, as MixTrain).

`alpha` and `epsilon` are non-trainable variables, so callbacks that assign them
change what the compiled step computes.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from mixtrain_tf import api, attacks, recipes

TRAINING_METHODS = ("mixtrain", "clean", "pgd", "interval", "symbolic", "ibp",
                    "crown_ibp", "mtl_ibp", "mixtrain_ibp")
# Methods whose robust loss is built on interval bounds of the whole batch (and can
# take the warm-up regularisers); the first three schedule kappa over the ramp.
IBP_FAMILY = ("ibp", "crown_ibp", "mtl_ibp", "mixtrain_ibp")
KAPPA_SCHEDULED = ("ibp", "crown_ibp", "mtl_ibp")
# Methods that bound k points sampled from each replica batch (they take `k`).
SAMPLING_METHODS = ("mixtrain", "mixtrain_ibp")


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
    pgd_steps, pgd_step_size: the attack of the "pgd" method ("mtl_ibp" takes
      pgd_steps, with steps of 2.5 epsilon / pgd_steps).
    clip_min, clip_max: valid input domain.
    seed: seed of the per-step sampling (replicas fold in their id).
    kappa: (start, end) weight of the clean loss over the eps ramp ("ibp",
      "crown_ibp", "mtl_ibp").
    beta: (start, end) weight of CROWN-IBP in the margins over the ramp
      ("crown_ibp").
    ibp_weight: weight of the IBP loss against the PGD loss ("mtl_ibp").
    reg_weight: weight of the warm-up regularisers, times (1 - progress) (IBP
      family; 0 turns them off).
    reg_tol: their tolerance.
    tight_bound: the bound of the k sampled points ("mixtrain_ibp").
  """

  def __init__(self, network: keras.Model, method: str = "mixtrain",
               epsilon: float = 0.1, k: int = 5, alpha: float = 0.5,
               eval_bound: str = "symbolic", pgd_steps: int = 40,
               pgd_step_size: float = 0.01, clip_min: float = 0.0,
               clip_max: float = 1.0, seed: int = 0,
               kappa: tuple[float, float] = (1.0, 0.0),
               beta: tuple[float, float] = (1.0, 0.0), ibp_weight: float = 0.5,
               reg_weight: float = 0.0, reg_tol: float = 0.5,
               tight_bound: str = "symbolic", **kwargs):
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
    for name, pair in (("kappa", kappa), ("beta", beta)):
      if len(pair) != 2 or not all(0.0 <= v <= 1.0 for v in pair):
        raise ValueError(f"{name} must be (start, end), each in [0, 1], got {pair}.")
    if not 0.0 <= ibp_weight <= 1.0:
      raise ValueError(f"ibp_weight must be in [0, 1], got {ibp_weight}.")
    if reg_weight < 0 or reg_tol <= 0:
      raise ValueError(f"need reg_weight >= 0 and reg_tol > 0, got {reg_weight}, "
                       f"{reg_tol}.")
    if tight_bound not in api.METHODS:
      raise ValueError(f"unknown tight_bound {tight_bound!r}; choose one of "
                       f"{api.METHODS}.")
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
    self.kappa = tuple(float(v) for v in kappa)
    self.beta = tuple(float(v) for v in beta)
    self.ibp_weight = float(ibp_weight)
    self.reg_weight, self.reg_tol = float(reg_weight), float(reg_tol)
    self.tight_bound = tight_bound
    self.epsilon = self.add_weight(
        name="epsilon", shape=(), initializer=keras.initializers.Constant(epsilon),
        trainable=False)
    self.alpha = self.add_weight(
        name="alpha", shape=(), initializer=keras.initializers.Constant(alpha),
        trainable=False)
    # Fraction of the eps ramp done (EpsilonRamp assigns it): the IBP family's
    # kappa, beta and regulariser schedules read it.
    self.progress = self.add_weight(
        name="progress", shape=(), initializer=keras.initializers.Constant(0.0),
        trainable=False)
    # DynamicAlpha's last (clean, verified) validation accuracy, -1 before the
    # first epoch: a model variable so that a resumed run keeps the rule's state.
    self.alpha_rule_memory = self.add_weight(
        name="alpha_rule_memory", shape=(2,),
        initializer=keras.initializers.Constant(-1.0), trainable=False)
    self._trackers = {
        name: keras.metrics.Mean(name=name)
        for name in ("loss", "clean_loss", "robust_loss", "verified", "alpha",
                     "epsilon", "regularizer")}
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

  def _pgd_point(self, x, y, step_size=None):
    return attacks.pgd(
        lambda z: self.network(z, training=False), x, y, self.epsilon,
        self.pgd_steps, self.pgd_step_size if step_size is None else step_size,
        clip_min=self.clip_min,
        clip_max=self.clip_max,
        seed=tf.stack([self.seed, tf.cast(self.optimizer.iterations, tf.int32)]))

  def _ramped(self, pair: tuple[float, float]) -> tf.Tensor:
    return pair[0] + (pair[1] - pair[0]) * self.progress

  def _clean_weight(self) -> tf.Tensor:
    """The IBP family's clean-loss weight this step (alpha or the ramped kappa)."""
    return (self.alpha if self.method == "mixtrain_ibp"
            else self._ramped(self.kappa))

  def _clean_logits(self, x) -> tf.Tensor:
    """The network's logits on the clean batch. In the IBP family, once the clean
    loss has weight 0 (kappa's end value 0, after the ramp) no gradient flows
    from them, so the step skips the clean backward pass: a fifth of an IBP
    step on MNIST_Small (docs/benchmarks.md)."""
    if self.method not in IBP_FAMILY:
      return self.network(x, training=True)
    return tf.cond(self._clean_weight() > 0,
                   lambda: self.network(x, training=True),
                   lambda: tf.stop_gradient(self.network(x, training=True)))

  def _ibp_family_loss(self, x, y, clean):
    """(loss, per-example robust loss, verified, clean weight, regulariser)."""
    ub, box, pre = recipes.ibp_margins(self.network, x, y, self.epsilon,
                                       self.clip_min, self.clip_max)
    if self.method == "crown_ibp":
      beta = self._ramped(self.beta)
      ub = tf.cond(beta > 0, lambda: beta * api.ball_margins(
          self.network, x, y, self.epsilon, "crown_ibp", self.clip_min,
          self.clip_max) + (1.0 - beta) * ub, lambda: ub)
    elif self.method == "mixtrain_ibp":
      idx = self._sample(tf.shape(x)[0])
      tight = api.ball_margins(self.network, tf.gather(x, idx), tf.gather(y, idx),
                               self.epsilon, self.tight_bound, self.clip_min,
                               self.clip_max)
      # Both bounds are sound: the sampled points keep the smaller one.
      ub = tf.tensor_scatter_nd_update(
          ub, idx[:, None], tf.minimum(tf.gather(ub, idx), tight))
    robust = keras.losses.sparse_categorical_crossentropy(y, ub, from_logits=True)
    verified = api.is_verified(ub, y)
    if self.method == "mtl_ibp":
      # Step size 2.5 eps / steps (Madry et al.), following the ramped epsilon.
      step = 2.5 * self.epsilon / self.pgd_steps
      adv = keras.losses.sparse_categorical_crossentropy(
          y, self.network(self._pgd_point(x, y, step), training=True),
          from_logits=True)
      robust = (1.0 - self.ibp_weight) * adv + self.ibp_weight * robust
    weight = self._clean_weight()
    reg = tf.zeros(())
    if self.reg_weight > 0:
      reg = (self.reg_weight * (1.0 - self.progress)
             * recipes.warmup_regularizer(box, pre, self.reg_tol))
    loss = (weight * tf.reduce_mean(clean) + (1.0 - weight) * tf.reduce_mean(robust)
            + reg)
    return loss, robust, verified, weight, reg

  def train_step(self, data):
    x, y = data[0], tf.cast(data[1], tf.int32)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    weight, reg = self.alpha, None
    with tf.GradientTape() as tape:
      logits = self._clean_logits(x)
      clean = keras.losses.sparse_categorical_crossentropy(
          y, logits, from_logits=True)
      if self.method == "clean":
        robust, verified = tf.zeros([0]), tf.zeros([0], tf.bool)
        loss = tf.reduce_mean(clean)
      elif self.method == "pgd":
        robust = keras.losses.sparse_categorical_crossentropy(
            y, self.network(self._pgd_point(x, y), training=True), from_logits=True)
        verified = tf.zeros([0], tf.bool)
        loss = tf.reduce_mean(robust)
      elif self.method in IBP_FAMILY:
        loss, robust, verified, weight, reg = self._ibp_family_loss(x, y, clean)
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
    if reg is not None:
      t["regularizer"].update_state(reg)
    t["alpha"].update_state(weight)
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
