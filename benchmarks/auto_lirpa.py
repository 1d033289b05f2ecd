r"""Our bounds and training steps against auto_LiRPA (PyTorch), side by side.

    python benchmarks/auto_lirpa.py [--networks=mnist_small,cifar_small] [--runs=10]
    python benchmarks/auto_lirpa.py --networks=mnist_small --runs=3 --steps=3 \
        --bound_methods=interval,crown_ibp,crown   # quick look, no alpha_crown

auto_LiRPA and torch are an optional extra that CI never installs; without them the
script exits with a one-line install hint. Install them in a separate venv that
also has this package (its own TensorFlow comes with it):

    python3 -m venv /tmp/lirpa-venv && . /tmp/lirpa-venv/bin/activate
    pip install torch --index-url https://download.pytorch.org/whl/cpu  # CPU build
    git clone https://github.com/Verified-Intelligence/auto_LiRPA /tmp/auto_LiRPA
    pip install --no-deps -e /tmp/auto_LiRPA  # its setup.py pins torch<2.9 and more
    pip install numpy packaging appdirs pyyaml tqdm graphviz  # what it imports
    pip install -e ".[benchmark]"   # from this repository's root
    taskset -c 0 python benchmarks/auto_lirpa.py

With --authors_npz (and e.g. --epsilon=0.3) the bounds of mnist_small use the
MixTrain authors' released weights instead (training steps keep random weights).

Each network of `mixtrain_tf.networks` (random weights, seed 0) is rebuilt in
PyTorch from its Keras weights (NHWC -> NCHW; Flatten's (h, w, c) order is permuted
into the first Dense layer; InputNormalization becomes the first torch op), and its
logits must agree with Keras' on real test images to --logit_tol. Then, on real test
images at eps 0.1 (MNIST) or 2/255 (CIFAR-10), the L-inf ball clipped to [0, 1]:

* bounds: `mixtrain_tf.api.compute_bounds(model, x, eps, method)` (eager, the public
  API) against auto_LiRPA's `BoundedModule.compute_bounds(method=...)` under
  `torch.no_grad()` (alpha-CROWN: with gradients, as it needs them), both on the
  logits (no specification). interval = IBP, crown_ibp = CROWN-IBP, crown = CROWN,
  alpha_crown = alpha-CROWN, --alpha_steps iterations on both sides (other
  optimiser settings are each library's own; on --alpha_batch images, as
  auto_LiRPA's alpha-CROWN re-optimises every layer's bounds, ours only the
  output's). "ours tf.function" times `api.input_box` + `api.bound_box` in one
  tf.function, unchunked (not for crown and alpha_crown, whose ~150-260 MB per
  example compute_bounds splits into chunks of 4-6 examples). max diff is the largest
  |ours - theirs| over lower and upper bounds; "rel" divides it by the largest
  |bound|; width is the mean width of ours over the mean width of theirs (> 1: ours
  looser). Where auto_LiRPA fails with the normalisation inside the model (its
  CROWN on CIFAR nets, in its default "patches" conv mode), it bounds the
  normalised ball with the rest of the network, as its own examples do (marked *).
* train step: one Adam step (forward, backward, apply) of the cross-entropy of the
  margin bounds. Ours: `training.MixTrainModel(network, method=M, kappa=(0, 0),
  beta=(1, 1))`'s compiled Keras train function, as benchmarks/train_step.py times
  it, with M = "ibp" / "crown_ibp" (where training.TRAINING_METHODS lacks them: a
  tf.function doing the same with `api.ball_margins`, and the output says so).
  auto_LiRPA's: the loss of its examples/vision/simple_training.py (margin spec C,
  clean forward, IBP lower bounds; for CROWN-IBP the IBP call and then the backward
  call with bound_upper=False, mixed with factor 1), loss.backward(), Adam step.
  max diff is |our loss - their loss| on the first (warm-up) step, same weights.

Both libraries get one thread (torch.set_num_threads(1); TF's intra- and inter-op
pools 1): run the script under `taskset -c 0` so that they share one core equally.
Times are the median of --runs calls (--steps steps) after --warmup calls; ratios
(ours / theirs: compute_bounds or the train function against auto_LiRPA) are
measured within one run. Training steps alternate in blocks of 5 (ours, theirs,
ours, ...), so a change in the machine's load hits both sides alike.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from mixtrain_tf import api, data, networks, ops, pretrained, training
from mixtrain_tf.layers import InputNormalization

try:  # the optional extra (see the docstring); CI never installs it
  import torch
  from auto_LiRPA import BoundedModule, BoundedTensor
  from auto_LiRPA.perturbations import PerturbationLpNorm
except ImportError as _missing:
  torch = None
  _MISSING = _missing

INSTALL_HINT = (
    "benchmarks/auto_lirpa.py needs torch and auto_LiRPA ({err}): pip install torch "
    "--index-url https://download.pytorch.org/whl/cpu && pip install --no-deps -e "
    "<clone of github.com/Verified-Intelligence/auto_LiRPA> && pip install numpy "
    "packaging appdirs pyyaml tqdm graphviz (see the docstring)")

FLAGS = flags.FLAGS
flags.DEFINE_list("networks", ["mnist_small", "cifar_small"], "Networks to compare.")
flags.DEFINE_list("bound_methods", ["interval", "crown_ibp", "crown", "alpha_crown"],
                  "Our bound methods to compare (each against its auto_LiRPA twin).")
flags.DEFINE_list("train_methods", ["ibp", "crown_ibp"], "Training losses to time.")
flags.DEFINE_integer("bound_batch", 100, "Batch of the bound comparison.")
flags.DEFINE_integer("train_batch", 256, "Batch of the training step.")
flags.DEFINE_integer("runs", 10, "Timed bound calls (median reported); crown and "
                     "alpha_crown get max(2, runs // 5) after one warm-up call.")
flags.DEFINE_integer("alpha_batch", 10, "Batch of the alpha_crown comparison "
                     "(auto_LiRPA's alpha-CROWN re-optimises every layer's bounds).")
flags.DEFINE_integer("steps", 20, "Timed training steps (median reported).")
flags.DEFINE_integer("warmup", 2, "Untimed calls before timing (trace, caches); "
                     "at least 1.", lower_bound=1)
flags.DEFINE_integer("alpha_steps", 20, "alpha-CROWN iterations, both libraries.")
flags.DEFINE_float("logit_tol", 1e-4, "Largest allowed |Keras - torch| logit.")
flags.DEFINE_string("authors_npz", None, "Bound the MixTrain authors' released "
                    "MNIST_Small (this .npz, see mixtrain_tf.pretrained) instead of "
                    "random weights (mnist_small only; training steps keep random "
                    "weights).")
flags.DEFINE_integer("verify_examples", 0, "Also verify the first N test images "
                     "with crown and alpha_crown on both sides (margin rows, "
                     "auto_LiRPA in batches of 50), timed in the same run after "
                     "one warm-up call each: auto_LiRPA's on 2 images, ours on "
                     "the same N (its compiled CROWN traces once per batch "
                     "shape; that call's seconds are printed).")
flags.DEFINE_float("epsilon", None, "Radius of the bound comparison (default: 0.1 "
                   "on MNIST, 2/255 on CIFAR-10).")

DATASET = {"mnist_small": "mnist", "mnist_large": "mnist", "cifar_small": "cifar10",
           "cifar_large": "cifar10"}
EPSILON = {"mnist": 0.1, "cifar10": 2 / 255}
LIRPA_METHOD = {"interval": "IBP", "crown_ibp": "CROWN-IBP", "crown": "CROWN",
                "alpha_crown": "alpha-CROWN"}
LIRPA_TRAIN = {"ibp": "IBP", "crown_ibp": "CROWN-IBP"}
BALL_BOUND = {"ibp": "interval", "crown_ibp": "crown_ibp"}
# Timed max(2, runs // 5) times after one warm-up call.
HEAVY = ("crown", "alpha_crown")


# -- the same network in PyTorch ------------------------------------------------

def _same_padding(size: int, kernel: int, stride: int) -> int:
  """Keras' "same" padding as torch's symmetric padding (refused if asymmetric)."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  if total % 2:
    raise ValueError(f"asymmetric 'same' padding (size {size}, kernel {kernel}, "
                     f"stride {stride}) has no torch Conv2d twin here.")
  return total // 2


if torch is not None:
  class Normalize(torch.nn.Module):
    """InputNormalization: (x - mean) / std per channel, NCHW."""

    def __init__(self, mean, std):
      super().__init__()
      self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
      self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
      return (x - self.mean) / self.std


def _torch_network(net: keras.Model):
  """torch.nn.Sequential with the Keras network's weights, taking NCHW images."""
  nn = torch.nn

  def param(a):
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(a, np.float32)))

  mods, shape, flat_from = [], tuple(net.input_shape[1:]), None  # shape: (h, w, c)
  for layer in net.layers:
    act = getattr(layer, "activation", None)
    if isinstance(layer, keras.layers.InputLayer):
      continue
    if isinstance(layer, InputNormalization):
      mods.append(Normalize(layer.mean, layer.std))
    elif isinstance(layer, keras.layers.Conv2D):
      kernel, bias = layer.get_weights()
      (kh, kw), (sh, sw) = layer.kernel_size, layer.strides
      if layer.padding == "same":
        pad = (_same_padding(shape[0], kh, sh), _same_padding(shape[1], kw, sw))
      else:
        pad = (0, 0)
      conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], (kh, kw), (sh, sw), pad)
      conv.weight = param(kernel.transpose(3, 2, 0, 1))
      conv.bias = param(bias)
      mods.append(conv)
      shape = tuple(layer.output.shape[1:])
    elif isinstance(layer, keras.layers.Flatten):
      mods.append(nn.Flatten())
      flat_from = shape
    elif isinstance(layer, keras.layers.Dense):
      kernel, bias = layer.get_weights()
      if flat_from is not None:  # Keras flattens (h, w, c), torch (c, h, w)
        h, w, c = flat_from
        kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(
            h * w * c, -1)
        flat_from = None
      dense = nn.Linear(kernel.shape[0], kernel.shape[1])
      dense.weight = param(kernel.T)
      dense.bias = param(bias)
      mods.append(dense)
    elif isinstance(layer, keras.layers.ReLU):
      mods.append(nn.ReLU())
    else:
      raise ValueError(f"no torch twin for layer {layer.name} "
                       f"({type(layer).__name__}).")
    if act is not None and act is keras.activations.relu:
      mods.append(nn.ReLU())
    elif act is not None and act is not keras.activations.linear:
      raise ValueError(f"activation {act} of {layer.name} has no torch twin here.")
  return nn.Sequential(*mods)


def _nchw(x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _bounded(tnet, x: np.ndarray, eps: float, bound_opts=None,
             outside: bool = False):
  """auto_LiRPA BoundedModule and the clipped ball around x as a BoundedTensor.

  `outside`: the network's first op, the normalisation, is applied to the ball
  instead (x and its box mapped by (x - mean) / std, std > 0: the same set, as
  auto_LiRPA's own examples normalise outside the model).
  """
  xt = _nchw(x)
  lo, hi = (xt - eps).clamp(0.0, 1.0), (xt + eps).clamp(0.0, 1.0)
  if outside:
    norm, tnet = tnet[0], tnet[1:]
    xt, lo, hi = norm(xt), norm(lo), norm(hi)
  model = BoundedModule(tnet, torch.zeros_like(xt[:1]), bound_opts=bound_opts,
                        device="cpu")
  ptb = PerturbationLpNorm(norm=np.inf, eps=eps, x_L=lo, x_U=hi)
  return model, BoundedTensor(xt, ptb)


def _margin_spec(y: np.ndarray, n: int):
  """simple_training.py's C: rows e_y - e_j for j != y, [batch, n - 1, n]."""
  yt = torch.from_numpy(y.astype(np.int64))
  eye = torch.eye(n)
  c = eye[yt].unsqueeze(1) - eye.unsqueeze(0)
  keep = yt.unsqueeze(1) != torch.arange(n).unsqueeze(0)
  return c[keep].view(len(y), n - 1, n)


# -- timing ---------------------------------------------------------------------

def _median_ms(fn, runs: int, warmup: int) -> tuple[float, object]:
  """Median wall-clock ms of fn over `runs` calls after `warmup` untimed calls,
  and the result of the first timed call."""
  for _ in range(warmup):
    fn()
  times, first = [], None
  for i in range(runs):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
    if i == 0:
      first = out
  return 1000 * statistics.median(times), first


def _interleaved_ms(fns, runs: int, warmup: int, block: int = 5) -> list[float]:
  """Median wall-clock ms of each of fns over `runs` calls, made in blocks of
  `block` calls per function in turn (each block after one untimed call), after
  `warmup` untimed calls each: a change of the machine's load hits both sides
  alike, and each block runs with its own library's caches warm (calls that
  alternate one by one slowed both sides, auto_LiRPA's twice as much)."""
  for fn in fns:
    for _ in range(warmup):
      fn()
  times = [[] for _ in fns]
  while len(times[0]) < runs:
    for fn, t in zip(fns, times):
      fn()
      for _ in range(min(block, runs - len(t))):
        start = time.perf_counter()
        fn()
        t.append(time.perf_counter() - start)
  return [1000 * statistics.median(t) for t in times]


def _compare_bounds(net, tnet, x, eps, method):
  """(ours ms, ours in a tf.function ms or None, theirs ms, max diff, width)."""
  heavy = method in HEAVY
  runs = max(2, FLAGS.runs // 5) if heavy else FLAGS.runs
  warmup = 1 if heavy else FLAGS.warmup
  kwargs = {"alpha_steps": FLAGS.alpha_steps} if method == "alpha_crown" else {}

  def ours():
    lo, hi = api.compute_bounds(net, x, eps, method, **kwargs)
    return lo.numpy(), hi.numpy()

  @tf.function
  def graph(xb):
    lo, hi = api.input_box(xb, eps)
    b = api.bound_box(net, lo, hi, method).concretize()
    return ops.flat(b.lower), ops.flat(b.upper)

  opts = None
  if method == "alpha_crown":
    opts = {"optimize_bound_args": {"iteration": FLAGS.alpha_steps}}
  lirpa = {"outside": False}

  def theirs():
    if "model" not in lirpa:
      lirpa["model"], lirpa["x"] = _bounded(tnet, x, eps, opts, lirpa["outside"])
    if method == "alpha_crown":
      lo, hi = lirpa["model"].compute_bounds(x=(lirpa["x"],),
                                             method=LIRPA_METHOD[method])
    else:
      with torch.no_grad():
        lo, hi = lirpa["model"].compute_bounds(x=(lirpa["x"],),
                                               method=LIRPA_METHOD[method])
    return lo.detach().numpy(), hi.detach().numpy()

  their_warmup = warmup - 1  # the probe below is the first warm-up call
  try:
    theirs()
  except RuntimeError as err:
    if not isinstance(tnet[0], Normalize):
      raise
    # auto_LiRPA 0.7.1's CROWN fails on a per-channel (x - mean) / std in front of
    # a conv in its default "patches" mode (a shape mismatch in concretisation).
    print(f"auto_LiRPA {LIRPA_METHOD[method]} failed with the normalisation in the "
          f"model ({str(err)[:80]}...): normalising the ball outside instead")
    lirpa.clear()
    lirpa["outside"] = True
    their_warmup = warmup
  ours_ms, (ol, ou) = _median_ms(ours, runs, warmup)
  graph_ms = None
  if not heavy:  # unchunked: CROWN's batch would not fit in memory
    xt = tf.constant(x)
    graph_ms, _ = _median_ms(lambda: [t.numpy() for t in graph(xt)], runs, warmup)
  their_ms, (tl, tu) = _median_ms(theirs, runs, their_warmup)
  diff = max(np.abs(ol - tl).max(), np.abs(ou - tu).max())
  scale = max(np.abs(tl).max(), np.abs(tu).max())
  width = float(np.mean(ou - ol) / np.mean(tu - tl))
  return (ours_ms, graph_ms, their_ms, f"{diff:.2e} ({diff / scale:.0e} rel)",
          width, lirpa["outside"])


def _our_step(net, method, x, y, eps):
  """(one step, first-step loss, how it was timed)."""
  keras.utils.set_random_seed(0)
  if method in training.TRAINING_METHODS:
    model = training.MixTrainModel(net, method=method, epsilon=eps,
                                   kappa=(0.0, 0.0), beta=(1.0, 1.0))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    model.make_train_function()
    it = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    how = f"MixTrainModel(method={method!r})"

    def step():
      return float(model.train_function(it)["loss"])
  else:
    opt = keras.optimizers.Adam(1e-3)
    opt.build(net.trainable_variables)
    bound = BALL_BOUND[method]
    xt, yt = tf.constant(x), tf.constant(y, tf.int32)

    @tf.function
    def train(xb, yb):
      with tf.GradientTape() as tape:
        ub = api.ball_margins(net, xb, yb, eps, bound)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            yb, ub, from_logits=True))
      grads = tape.gradient(loss, net.trainable_variables)
      opt.apply(grads, net.trainable_variables)
      return loss

    how = f"tf.function(ball_margins({bound!r}) + Adam): no {method!r} method yet"

    def step():
      return float(train(xt, yt))
  loss = step()  # the first step: same weights on both sides
  return step, loss, how


def _their_step(tnet, method, x, y, eps):
  model, bx = _bounded(tnet, x, eps)
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  c = _margin_spec(y, 10)
  labels = torch.from_numpy(y.astype(np.int64))
  ce = torch.nn.CrossEntropyLoss()

  def step():
    opt.zero_grad()
    output = model(bx)
    ce(output, labels)  # the example's clean loss (logged there, not trained on)
    lb, _ = model.compute_bounds(IBP=True, C=c, method=None)
    if LIRPA_TRAIN[method] == "CROWN-IBP":  # factor 1: the CROWN-IBP bound
      lb, _ = model.compute_bounds(IBP=False, C=c, method="backward",
                                   bound_upper=False)
    padded = torch.cat([torch.zeros(len(lb), 1), lb], dim=1)
    loss = ce(-padded, torch.zeros(len(lb), dtype=torch.int64))
    loss.backward()
    opt.step()
    return loss.item()

  loss = step()  # the first step: same weights on both sides
  return step, loss


def _verify(net, tnet, x, y, eps) -> list[str]:
  """Verified accuracy and seconds of crown / alpha_crown on both sides."""
  out = []
  correct = np.argmax(net(x, training=False).numpy(), 1) == y
  def theirs_fn(method, xs, ys):
    found = []
    for i in range(0, len(xs), 50):
      opts = {"optimize_bound_args": {"iteration": FLAGS.alpha_steps}}
      model, ball = _bounded(tnet, xs[i:i + 50], eps, bound_opts=opts)
      lb, _ = model.compute_bounds(
          x=(ball,), C=_margin_spec(ys[i:i + 50], net.output_shape[-1]),
          method="CROWN-Optimized" if method == "alpha_crown" else "CROWN",
          bound_upper=False)
      found += list((lb > 0).all(1).numpy())
    return np.array(found)

  def ours_fn(method, xs, ys):
    return api.verified(net, xs, ys, eps, method,
                        alpha_steps=FLAGS.alpha_steps).numpy()

  for method in ("crown", "alpha_crown"):
    # One warm-up call each. Ours on the same images: a compiled bound traces
    # once per batch shape (seconds), which a long run pays once; it is printed.
    start = time.perf_counter()
    ours_fn(method, x, y)
    print(f"{method}: our warm-up call on the same {len(x)} images (tracing "
          f"included) {time.perf_counter() - start:.1f} s", flush=True)
    theirs_fn(method, x[:2], y[:2])
    start = time.perf_counter()
    ours = ours_fn(method, x, y)
    our_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = theirs_fn(method, x, y) & correct
    their_s = time.perf_counter() - start
    out.append(f"| verify {method} / {LIRPA_METHOD[method]} (first {len(x)}) | "
               f"{ours.mean():.1%} | {our_s:.1f} | {theirs.mean():.1%} | "
               f"{their_s:.1f} | {our_s / their_s:.2f} |")
    print(out[-1], flush=True)
  return out


def _batch(dataset: str, size: int):
  x, y = next(iter(data.load(dataset, "test", batch_size=size, max_examples=size)))
  return x.numpy().astype(np.float32), y.numpy().astype(np.int32)


def main(argv):
  del argv
  if torch is None:
    sys.exit(INSTALL_HINT.format(err=_MISSING))
  torch.set_num_threads(1)
  torch.set_num_interop_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  print(f"load average at start: {os.getloadavg()}")
  print(f"tensorflow {tf.__version__}, torch {torch.__version__}, auto_LiRPA "
        f"{__import__('auto_LiRPA').__version__}; threads: torch "
        f"{torch.get_num_threads()}, tf 1/1; CPUs allowed: "
        f"{sorted(os.sched_getaffinity(0))}")
  rows, notes, verify_rows = [], [], []
  for name in FLAGS.networks:
    dataset = DATASET[name]
    eps = EPSILON[dataset] if FLAGS.epsilon is None else FLAGS.epsilon
    keras.utils.set_random_seed(0)
    net = networks.build(name, data.num_classes(dataset))
    if FLAGS.authors_npz and name == "mnist_small":
      net = pretrained.load_authors_mnist_small(FLAGS.authors_npz)
      print(f"{name}: the authors' weights from {FLAGS.authors_npz}")
    tnet = _torch_network(net)
    x, y = _batch(dataset, max(FLAGS.bound_batch, FLAGS.train_batch,
                               FLAGS.verify_examples))
    with torch.no_grad():
      gap = np.abs(net(x, training=False).numpy() - tnet(_nchw(x)).numpy()).max()
    print(f"{name}: max |keras - torch| logit on {len(x)} test images: {gap:.2e}")
    if not gap <= FLAGS.logit_tol:
      sys.exit(f"{name}: the torch twin's logits differ by {gap:.2e} > "
               f"{FLAGS.logit_tol:g}: the conversion is wrong.")
    for method in FLAGS.bound_methods:
      xb = x[:FLAGS.alpha_batch if method == "alpha_crown" else FLAGS.bound_batch]
      ours, graph, theirs, diff, width, outside = _compare_bounds(
          net, tnet, xb, eps, method)
      star = "*" if outside else ""
      rows.append((name, f"bounds {method} / {LIRPA_METHOD[method]}{star} "
                   f"(batch {len(xb)})", ours, graph, theirs, diff, f"{width:.4f}"))
      print(rows[-1], flush=True)
    if FLAGS.verify_examples:
      n = FLAGS.verify_examples
      found = _verify(net, tnet, x[:n], y[:n], eps)
      verify_rows += [f"| {name} {r[2:]}" for r in found]
    xt, yt = x[:FLAGS.train_batch], y[:FLAGS.train_batch]
    for method in FLAGS.train_methods:
      # Each side trains its own copy from the same initial weights.
      keras.utils.set_random_seed(0)
      net_t = networks.build(name, data.num_classes(dataset))
      tnet_t = _torch_network(net_t)
      eps_t = EPSILON[dataset]
      our_fn, our_loss, how = _our_step(net_t, method, xt, yt, eps_t)
      their_fn, their_loss = _their_step(tnet_t, method, xt, yt, eps_t)
      ours, theirs = _interleaved_ms([our_fn, their_fn], FLAGS.steps,
                                     FLAGS.warmup - 1)
      notes.append(f"{name} train {method}: ours = {how}; first loss ours "
                   f"{our_loss:.6f}, auto_LiRPA {their_loss:.6f}")
      rows.append((name, f"train step {method} / {LIRPA_TRAIN[method]} "
                   f"(batch {len(xt)})", ours, None, theirs,
                   f"{abs(our_loss - their_loss):.2e} (loss)", ""))
      print(rows[-1], flush=True)
  print(f"\nload average at end: {os.getloadavg()}")
  bound_eps = ("" if FLAGS.epsilon is None
               else f" (bounds: eps {FLAGS.epsilon:g})")
  print(f"\neps: mnist {EPSILON['mnist']}, cifar10 {EPSILON['cifar10']:.5f}"
        f"{bound_eps}; "
        f"median of {FLAGS.runs} bound calls ({max(2, FLAGS.runs // 5)} for "
        f"alpha_crown), {FLAGS.steps} train steps, after {FLAGS.warmup} warm-up "
        f"calls\n")
  print("| network | what | ours ms | ours tf.function ms | auto_LiRPA ms | "
        "ours / theirs | max diff | width ours / theirs |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for name, what, ours, graph, theirs, diff, width in rows:
    graph = "" if graph is None else f"{graph:.1f}"
    print(f"| {name} | {what} | {ours:.1f} | {graph} | {theirs:.1f} | "
          f"{ours / theirs:.2f} | {diff} | {width} |")
  if verify_rows:
    print("\n| network | what | ours verified | ours s | auto_LiRPA verified | "
          "auto_LiRPA s | ours / theirs |\n|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(verify_rows))
  print("\n* auto_LiRPA normalised the ball outside the model (its CROWN failed "
        "with the normalisation inside).")
  for note in notes:
    print(note)


if __name__ == "__main__":
  app.run(main)
