"""L-inf attacks: PGD (Madry et al.) with random start and restarts."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from mixtrain_tf import api

#: Defaults per dataset: (steps, step size). MNIST is Madry's setting; for the
#: small CIFAR / ImageNet radii the step is a quarter of the usual eps.
PGD_DEFAULTS = {"mnist": (40, 0.01), "fashion_mnist": (40, 0.01),
                "cifar10": (40, 2.0 / 255 / 4), "imagenet200": (40, 1.785 / 255 / 4)}


def pgd_settings(dataset: str, steps: int | None = None,
                 step_size: float | None = None) -> dict:
  """{"pgd_steps", "pgd_step_size"}: the given values, else the dataset's defaults."""
  default_steps, default_size = PGD_DEFAULTS[dataset]
  return {"pgd_steps": default_steps if steps is None else steps,
          "pgd_step_size": default_size if step_size is None else step_size}


def margin_loss(logits, y):
  """max_{j != y} z_j - z_y: > 0 exactly when the point is misclassified."""
  onehot = tf.one_hot(y, tf.shape(logits)[1])
  other = tf.reduce_max(logits - 1e9 * onehot, axis=1)
  return other - tf.reduce_sum(logits * onehot, axis=1)


def pgd(model: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor, y: tf.Tensor,
        epsilon, steps: int = 40, step_size: float = 0.01, restarts: int = 1,
        random_start: bool = True, clip_min: float = 0.0, clip_max: float = 1.0,
        loss: str = "ce", seed: tf.Tensor | None = None,
        start: tf.Tensor | None = None) -> tf.Tensor:
  """Projected gradient ascent inside B(x, eps) intersected with [clip_min, clip_max].

  Keeps, per example, the worst point over restarts (largest margin loss). Works
  eagerly and inside `tf.function`; `model` maps images to logits. `loss` is the
  ascended objective: "ce" (cross-entropy) or "margin" (max_j z_j - z_y). `seed`
  is a stateless-random seed of shape [2]. `start` (points of the clipped ball,
  like x), when given, is where the first restart starts instead.

  Returns:
    Adversarial images, same shape as x, always inside the clipped ball.
  """
  x = tf.cast(x, tf.float32)
  y = tf.cast(y, tf.int32)
  eps = tf.cast(epsilon, tf.float32)
  lo, hi = api.input_box(x, epsilon, clip_min, clip_max)
  best = x
  best_score = margin_loss(model(x), y)
  seed = tf.zeros([2], tf.int32) if seed is None else tf.cast(seed, tf.int32)
  for r in range(restarts):
    if start is not None and r == 0:
      xa = tf.clip_by_value(tf.cast(start, tf.float32), lo, hi)
    elif random_start:
      noise = tf.random.stateless_uniform(tf.shape(x), seed + [0, r], -1.0, 1.0)
      xa = tf.clip_by_value(x + eps * noise, lo, hi)
    else:
      xa = x
    xa = _pgd_from(model, xa, y, steps, step_size, lo, hi, loss)
    score = margin_loss(model(xa), y)
    better = score > best_score
    mask = tf.reshape(better, [-1] + [1] * (len(x.shape) - 1))
    best = tf.where(mask, xa, best)
    best_score = tf.where(better, score, best_score)
  return tf.stop_gradient(best)


def interval_step(network, x_adv: tf.Tensor, x: tf.Tensor, y: tf.Tensor, epsilon,
                  estep: float = 0.01, clip_min: float = 0.0,
                  clip_max: float = 1.0) -> tf.Tensor:
  """One interval iteration of docs/method.md 5 for every point of the batch.

  Around x_adv, boxes of radius estep * ed (ed = 1, then x3, radius capped at
  eps / 2) are bounded symbolically. Where the box is not proven robust, the
  interval gradient (input coefficients of the symbolic equation of z_d - z_y,
  d = argmax_j of the margin upper bounds) gives the step x_adv + ed * sign(g),
  projected onto B(x, eps) and [clip_min, clip_max]. Points proven robust even at
  the cap keep x_adv. `epsilon` is a Python float (it fixes the number of
  growth attempts).
  """
  eps = tf.cast(epsilon, tf.float32)
  n_out = network.outputs[0].shape[-1]
  spec = api.margin_spec(y, n_out)
  ball_lo, ball_hi = api.input_box(x, epsilon, clip_min, clip_max)
  cap = eps / 2.0
  radius = tf.minimum(tf.fill(tf.shape(y), estep), cap)
  ed = tf.ones(tf.shape(y))
  pending = tf.ones(tf.shape(y), tf.bool)
  out = x_adv
  bshape = [-1] + [1] * (len(x.shape) - 1)
  # radius grows 3x per attempt until the cap: a fixed number of attempts
  attempts = 1
  r = estep
  while r < float(epsilon) / 2.0 and attempts < 8:
    r *= 3.0
    attempts += 1
  for _ in range(attempts):
    lo, hi = api.input_box(out, radius, clip_min, clip_max)
    sb = api.bound_box(network, lo, hi, "symbolic", spec)
    d = tf.argmax(sb.upper, axis=1, output_type=tf.int32)
    proven = tf.equal(d, y)
    g = tf.gather(sb.input_coeffs, d, axis=1, batch_dims=1)  # [B, *input_shape]
    stepped = tf.clip_by_value(out + tf.reshape(ed, bshape) * tf.sign(g),
                               ball_lo, ball_hi)
    move = tf.logical_and(pending, tf.logical_not(proven))
    out = tf.where(tf.reshape(move, bshape), stepped, out)
    pending = tf.logical_and(pending, proven)
    at_cap = radius >= cap
    pending = tf.logical_and(pending, tf.logical_not(at_cap))
    ed = tf.where(pending, ed * 3.0, ed)
    radius = tf.where(pending, tf.minimum(radius * 3.0, cap), radius)
  return tf.stop_gradient(out)


def interval_attack(network, x: tf.Tensor, y: tf.Tensor, epsilon,
                    pgd_steps: int = 40, step_size: float = 0.01, restarts: int = 1,
                    estep: float = 0.01, clip_min: float = 0.0,
                    clip_max: float = 1.0, seed: tf.Tensor | None = None
                    ) -> tf.Tensor:
  """The interval attack of docs/method.md 5: PGD combined with interval steps.

  Each restart: PGD from the current point, up to 3 interval iterations (1 after
  the first two restarts), PGD again. Restart 0 starts at x, later ones at uniform
  noise in the ball; points already broken keep their adversarial example.
  """
  x = tf.cast(x, tf.float32)
  y = tf.cast(y, tf.int32)
  eps = tf.cast(epsilon, tf.float32)
  seed = tf.zeros([2], tf.int32) if seed is None else tf.cast(seed, tf.int32)
  lo, hi = api.input_box(x, epsilon, clip_min, clip_max)
  predict = lambda z: network(z, training=False)  # noqa: E731
  bshape = [-1] + [1] * (len(x.shape) - 1)
  best = x
  broken = tf.not_equal(tf.argmax(predict(x), 1, tf.int32), y)
  for r in range(restarts):
    if r == 0:
      start = x
    else:
      noise = tf.random.stateless_uniform(tf.shape(x), seed + [1, r], -1.0, 1.0)
      start = tf.clip_by_value(x + eps * noise, lo, hi)
    xa = _pgd_from(predict, start, y, pgd_steps, step_size, lo, hi)
    for _ in range(3 if r < 2 else 1):
      xa = interval_step(network, xa, x, y, epsilon, estep, clip_min, clip_max)
    xa = _pgd_from(predict, xa, y, pgd_steps, step_size, lo, hi)
    now = tf.not_equal(tf.argmax(predict(xa), 1, tf.int32), y)
    new = tf.logical_and(now, tf.logical_not(broken))
    best = tf.where(tf.reshape(new, bshape), xa, best)
    broken = tf.logical_or(broken, now)
  return tf.stop_gradient(best)


def _pgd_from(model, start, y, steps, step_size, lo, hi, loss="ce"):
  """`steps` signed-gradient ascent steps from `start`, projected onto [lo, hi]."""
  xa = start
  for _ in range(steps):
    with tf.GradientTape() as tape:
      tape.watch(xa)
      logits = model(xa)
      if loss == "ce":
        obj = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            y, logits))
      else:
        obj = tf.reduce_sum(margin_loss(logits, y))
    xa = tf.clip_by_value(xa + step_size * tf.sign(tape.gradient(obj, xa)), lo, hi)
  return xa
