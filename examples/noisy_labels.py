"""Quickstart: GAF against gradient averaging under label noise.

  pip install -e ".[examples]" && python examples/noisy_labels.py

A small Flax NNX MLP learns scikit-learn's handwritten digits (offline, 1300
training / 497 validation images) with 40% of the training labels moved to a
random other class. It trains twice, on exactly the same batches:

* averaging: the mean of the N=2 microbatch gradients, then SGD;
* GAF: ``optax_gaf.gaf(tau)`` takes that mean only when the microgradients
  agree (cosine distance below tau) and otherwise skips the step: SGD and its
  momentum do not move (``aggregating.process``).

It prints the final validation accuracy, the memorisation (accuracy on the
corrupted training examples measured against their wrong labels: how much of
the noise the network learnt) and GAF's acceptance rate and skipped steps,
and saves the learning curves to ``<--out>/curves.png``.

Settings: SGD with momentum 0.9, lr 0.01, 8000 steps of 2 class-balanced
microbatches with 5 examples of every class (about 600 epochs, long enough
for averaging to memorise all the noise), tau=0.8 (0.7 and 0.8 do best in
the benchmarks' tau sweep; at 0.9 and above enough noisy pairs agree that GAF
memorises too). Every method, CIFAR and several seeds: run
``python -m benchmarks.noisy_labels`` or
``python -m benchmarks.noisy_labels_table`` from the repository root.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from matplotlib.figure import Figure
from optax.experimental import aggregating
from sklearn import datasets
from sklearn import model_selection
from tqdm.auto import tqdm

import optax_gaf

NUM_CLASSES = 10
NUM_MICROBATCHES = 2  # N: GAF compares N microgradients at every step
PER_CLASS = 5  # examples of every class in each microbatch
LEARNING_RATE = 0.01


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument(
    "--label-noise",
    type=float,
    default=0.4,
    help="fraction of training labels moved to another class, in [0, 1)",
  )
  p.add_argument(
    "--tau", type=float, default=0.8, help="GAF cosine distance threshold"
  )
  p.add_argument("--steps", type=int, default=8000)
  p.add_argument("--eval-every", type=int, default=250)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/noisy_labels")
  args = p.parse_args(argv)
  if not 0.0 <= args.label_noise < 1.0:
    p.error(f"--label-noise must lie in [0, 1); got {args.label_noise}.")
  if not 0.0 <= args.tau <= 2.0:
    p.error(f"--tau is a cosine distance, in [0, 2]; got {args.tau}.")
  if args.steps < 1 or args.eval_every < 1:
    p.error("--steps and --eval-every must be >= 1.")
  return args


# ---------------------------------------------------------------- the data


def load_digits():
  """8x8 digits as 64 floats in [0, 1]: a fixed stratified 1300/497 split."""
  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  return model_selection.train_test_split(
    x, y, test_size=497, stratify=y, random_state=0
  )  # train_x, val_x, train_y, val_y


def symmetric_label_noise(labels, num_classes, rate, seed):
  """Moves exactly ``round(rate * n)`` labels to a random *other* class."""
  rng = np.random.default_rng(seed)
  chosen = rng.permutation(len(labels))[: int(round(rate * len(labels)))]
  noisy = labels.copy()
  # An offset in [1, C-1] never lands on the true class.
  offsets = rng.integers(1, num_classes, size=len(chosen))
  noisy[chosen] = (labels[chosen] + offsets) % num_classes
  return noisy.astype(np.int32)


def class_balanced_batches(labels, num_steps, seed):
  """``[steps, N, C * PER_CLASS]`` training indices.

  Every microbatch holds PER_CLASS examples of every class by the (noisy)
  labels, as in the GAF authors' code. Each class is drawn in epochs: no
  example repeats before its whole class has been used.
  """
  rng = np.random.default_rng(seed)
  need = num_steps * NUM_MICROBATCHES * PER_CLASS
  columns = []
  for c in range(NUM_CLASSES):
    pool = np.flatnonzero(labels == c)
    epochs = [rng.permutation(pool) for _ in range(-(-need // len(pool)))]
    stream = np.concatenate(epochs)[:need]
    columns.append(stream.reshape(num_steps, NUM_MICROBATCHES, PER_CLASS))
  # Mix the classes inside each microbatch.
  return rng.permuted(np.concatenate(columns, axis=-1), axis=-1)


# ---------------------------------------------------------------- the model


class MLP(nnx.Module):
  """64 -> 256 -> 256 -> 10 with ReLU."""

  def __init__(self, rngs: nnx.Rngs, hidden: int = 256):
    self.l1 = nnx.Linear(64, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.l1(x))
    x = jax.nn.relu(self.l2(x))
    return self.out(x)


# ---------------------------------------------------------------- training


def make_trainer(aggregator, graphdef, train_x, train_y):
  """Jitted ``run(params, opt_state, idx [S, N, m])``: S steps in one scan."""
  # process() runs SGD only on steps the aggregator accepts: a true skip.
  tx = aggregating.process(
    optax.identity(), aggregator, optax.sgd(LEARNING_RATE, momentum=0.9)
  )

  def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params)(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["y"]
    ).mean()

  # [N] losses and gradients with a leading microbatch axis of N.
  grad_fn = optax_gaf.microbatch_grads(loss_fn, NUM_MICROBATCHES)

  def step(carry, step_idx):
    params, opt_state = carry
    flat = step_idx.reshape(-1)  # N microbatches back to back
    _, grads = grad_fn(params, {"x": train_x[flat], "y": train_y[flat]})
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    try:
      acceptance = optax_gaf.stats(opt_state)["acceptance_rate"]
    except ValueError:  # plain averaging keeps no GAF state
      acceptance = jnp.float32(jnp.nan)
    return (params, opt_state), acceptance

  @jax.jit
  def run(params, opt_state, idx):
    (params, opt_state), acceptance = jax.lax.scan(
      step, (params, opt_state), idx
    )
    return params, opt_state, acceptance

  return tx, run


def train(aggregator, data, idx, args, progress):
  """Trains one model; returns its evaluations and final optimizer state."""
  train_x, val_x, train_y, val_y, clean_y = (jnp.asarray(a) for a in data)
  corrupted = train_y != clean_y
  # Same seed for both methods: the same initial weights.
  graphdef, params = nnx.split(MLP(nnx.Rngs(args.seed)))
  tx, run = make_trainer(aggregator, graphdef, train_x, train_y)
  opt_state = tx.init(params)

  @jax.jit
  def evaluate(params):
    model = nnx.merge(graphdef, params)
    val_acc = jnp.mean(jnp.argmax(model(val_x), -1) == val_y)
    fits_label = jnp.argmax(model(train_x), -1) == train_y
    memorised = jnp.sum(fits_label & corrupted) / jnp.maximum(
      jnp.sum(corrupted), 1
    )
    return val_acc, memorised

  history = {"step": [], "val_acc": [], "memorisation": [], "acceptance": []}
  for start in range(0, args.steps, args.eval_every):
    stop = min(start + args.eval_every, args.steps)
    params, opt_state, acceptance = run(params, opt_state, idx[start:stop])
    val_acc, memorised = evaluate(params)
    history["step"].append(stop)
    history["val_acc"].append(float(val_acc))
    history["memorisation"].append(float(memorised))
    history["acceptance"].append(float(jnp.mean(acceptance)))
    progress.update(stop - start)
    progress.set_postfix(val=f"{val_acc:.3f}", mem=f"{memorised:.3f}")
  return history, opt_state


# ---------------------------------------------------------------- results


def print_table(results, steps):
  print(
    f"{'method':<11}{'val acc':>9}{'memorisation':>14}"
    f"{'acceptance':>12}{'skipped steps':>16}"
  )
  for name, (history, opt_state) in results.items():
    acceptance, skipped = "-", "-"
    if name.startswith("GAF"):
      stats = optax_gaf.stats(opt_state)
      acceptance = f"{np.mean(history['acceptance']):.3f}"
      skipped = f"{int(stats['skipped_steps'])} / {steps}"
    print(
      f"{name:<11}{history['val_acc'][-1]:>9.3f}"
      f"{history['memorisation'][-1]:>14.3f}{acceptance:>12}{skipped:>16}"
    )


def plot(results, path, title):
  """Learning curves: validation accuracy, memorisation, GAF acceptance."""
  fig = Figure(figsize=(13, 3.6))  # no pyplot: no display needed
  axes = fig.subplots(1, 3)
  for i, (name, (h, _)) in enumerate(results.items()):
    style = {"label": name, "color": f"C{i}"}  # one colour per method
    axes[0].plot(h["step"], h["val_acc"], **style)
    axes[1].plot(h["step"], h["memorisation"], **style)
    if name.startswith("GAF"):
      axes[2].plot(h["step"], h["acceptance"], **style)
  # GAF always keeps the first microgradient: acceptance >= 1/N.
  axes[2].axhline(
    1 / NUM_MICROBATCHES, color="gray", ls=":", label="first one only"
  )
  axes[0].set(title="validation accuracy", xlabel="step")
  axes[1].set(title="memorisation (acc. on corrupted labels)", xlabel="step")
  axes[2].set(title="GAF acceptance rate", xlabel="step", ylim=(0, 1))
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  args = parse_args(argv)
  train_x, val_x, clean_y, val_y = load_digits()
  train_y = symmetric_label_noise(
    clean_y, NUM_CLASSES, args.label_noise, args.seed
  )
  data = (train_x, val_x, train_y, val_y, clean_y)
  # One index array for both methods: the same batches at every step.
  idx = class_balanced_batches(train_y, args.steps, args.seed)
  print(
    f"digits: {np.mean(train_y != clean_y):.1%} of {len(train_y)} training"
    f" labels corrupted; {args.steps} steps of {NUM_MICROBATCHES} x"
    f" {idx.shape[-1]} examples, SGD lr {LEARNING_RATE}, tau={args.tau}"
  )
  methods = {
    "averaging": aggregating.average_per_element_updates(),
    f"GAF tau={args.tau:g}": optax_gaf.gaf(
      args.tau, num_microbatches=NUM_MICROBATCHES
    ),
  }
  start = time.time()
  results = {}
  with tqdm(total=args.steps * len(methods), unit="step") as progress:
    for name, aggregator in methods.items():
      progress.set_description(name)
      results[name] = train(aggregator, data, idx, args, progress)
  print_table(results, args.steps)
  print(f"(trained in {time.time() - start:.0f} s)")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "curves.png")
  title = f"digits, {args.label_noise:.0%} symmetric label noise"
  plot(results, path, f"{title}, tau={args.tau:g}, N={NUM_MICROBATCHES}")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
