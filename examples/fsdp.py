"""FSDP with GAF: params and adamw's state sharded, updates sharded alike.

  python examples/fsdp.py                    # plain jax.jit, 8 CPU devices
  python examples/fsdp.py --mode shard_map   # the same inside jax.shard_map

An MLP learns scikit-learn's handwritten digits (offline) with
``--label-noise`` of the training labels moved to a random other class. Its
parameters are sharded over the ``"data"`` axis FSDP-style: each matrix along
its first axis that the device count divides, and a leaf with no such axis
(here the 10-class bias) replicated. Every step gathers the full params for
the forward pass, computes one gradient per microbatch, and lets GAF decide
over all ``N = devices x n_local`` of them. The updates come out sharded like
the params, so adamw's moments stay sharded too; GAF moves about the bytes
of the reduce-scatter that plain FSDP averaging would.

* ``--mode jit``: plain ``jax.jit`` on a ``jax.make_mesh`` mesh (Explicit
  axes): ``gaf()`` reads the params' shardings from their types.
* ``--mode shard_map``: each device holds its shards;
  ``gaf(axis_name="data", sharded_params=True)`` hands each device its own
  shard of the update.
"""

import argparse
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optax.experimental import aggregating
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import optax_gaf

NUM_CLASSES = 10


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mode", choices=("jit", "shard_map"), default="jit")
  p.add_argument(
    "--cpu-devices",
    type=int,
    default=8,
    help="simulated devices when the backend is the CPU",
  )
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument(
    "--n-local", type=int, default=2, help="microbatches per device"
  )
  p.add_argument("--microbatch-size", type=int, default=16)
  p.add_argument("--tau", type=float, default=0.95)
  p.add_argument("--label-noise", type=float, default=0.4)
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if not 0.0 <= args.label_noise < 1.0:
    p.error(f"--label-noise must lie in [0, 1); got {args.label_noise}.")
  if min(args.cpu_devices, args.hidden, args.n_local, args.steps) < 1:
    p.error("--cpu-devices, --hidden, --n-local and --steps must be >= 1.")
  return args


def load_data(args):
  """Digits, a fixed split, exactly ``label_noise`` of the labels moved."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
    x, digits.target, test_size=0.25, random_state=0, stratify=digits.target
  )
  rng = np.random.default_rng(args.seed)
  chosen = rng.permutation(len(y_train))[
    : int(round(args.label_noise * len(y_train)))
  ]
  y_noisy = y_train.copy()
  # An offset in [1, C-1] never lands on the true class.
  offsets = rng.integers(1, NUM_CLASSES, size=len(chosen))
  y_noisy[chosen] = (y_train[chosen] + offsets) % NUM_CLASSES
  return x_train, y_noisy.astype(np.int32), x_test, y_test


def init_params(hidden, seed):
  rng = np.random.default_rng(seed)
  glorot = lambda m, n: rng.normal(size=(m, n)) * np.sqrt(2.0 / (m + n))
  params = {
    "w1": glorot(64, hidden),
    "b1": np.zeros(hidden),
    "w2": glorot(hidden, NUM_CLASSES),
    "b2": np.zeros(NUM_CLASSES),
  }
  return {k: v.astype(np.float32) for k, v in params.items()}


def fsdp_spec(shape, num_devices):
  """Shards the first axis the device count divides; else replicates."""
  for k, size in enumerate(shape):
    if size % num_devices == 0:
      return P(*([None] * k), "data")
  return P()


def logits_fn(params, x):
  h = jax.nn.relu(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def loss_fn(params, batch):
  return optax.softmax_cross_entropy_with_integer_labels(
    logits_fn(params, batch["x"]), batch["y"]
  ).mean()


def make_jit_step(tx, n):
  """Plain jit: types carry the shardings; gaf() follows the params'."""

  @jax.jit
  def train_step(params, opt_state, batch):
    # FSDP's all-gather: the forward pass needs the whole params.
    full = jax.tree.map(lambda p: jax.sharding.reshard(p, P()), params)
    losses, grads = optax_gaf.microbatch_grads(loss_fn, n)(full, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, losses.mean()

  return train_step


def make_shard_map_step(tx, n_local, mesh, specs, state_specs):
  """shard_map: each device holds its shards of params and adamw's state."""

  def gather(p, spec):
    # Varying over "data" (as all_gather's result is): otherwise grad's
    # transpose would psum the microgradients of all devices.
    if "data" not in spec:
      return lax.pcast(p, "data", to="varying")
    return lax.all_gather(p, "data", axis=list(spec).index("data"), tiled=True)

  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(specs, state_specs, P("data")),
    out_specs=(specs, state_specs, P()),
  )
  def train_step(params, opt_state, batch):
    full = jax.tree.map(gather, params, specs)  # FSDP's all-gather
    losses, grads = optax_gaf.microbatch_grads(loss_fn, n_local)(full, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    loss = lax.pmean(losses.mean(), "data")
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def train(args, progress=True):
  """Trains; returns the logs, the final params and optimizer state."""
  # Sizes the CPU backend; once a backend has started this raises, and the
  # run keeps the devices it has.
  with contextlib.suppress(RuntimeError):
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  d = jax.device_count()
  mesh = jax.make_mesh((d,), ("data",))  # Explicit axes
  n = d * args.n_local
  x_train, y_noisy, x_test, y_test = load_data(args)
  host = init_params(args.hidden, args.seed)
  specs = {k: fsdp_spec(v.shape, d) for k, v in host.items()}
  axis = "data" if args.mode == "shard_map" else None
  tx = aggregating.process(  # skips adamw on a no-agreement step
    optax.identity(),
    optax_gaf.gaf(
      args.tau,
      num_microbatches=n,
      axis_name=axis,
      sharded_params=axis is not None,
    ),
    optax.adamw(args.lr),
  )
  with jax.set_mesh(mesh):
    params = {
      k: jax.device_put(v, NamedSharding(mesh, specs[k]))
      for k, v in host.items()
    }
    opt_state = jax.jit(tx.init)(params)  # moments sharded like params
    if args.mode == "jit":
      step_fn = make_jit_step(tx, n)
    else:
      state_specs = jax.tree.map(lambda x: x.sharding.spec, opt_state)
      step_fn = make_shard_map_step(tx, args.n_local, mesh, specs, state_specs)
    batch_sharding = NamedSharding(mesh, P("data"))
    logs = {"loss": [], "accepted": [], "ready": []}
    for step in tqdm.trange(args.steps, desc="train", disable=not progress):
      idx = np.random.default_rng((args.seed, step)).choice(
        len(x_train), n * args.microbatch_size, replace=False
      )
      batch = jax.device_put(
        {"x": x_train[idx], "y": y_noisy[idx]}, batch_sharding
      )
      params, opt_state, loss = step_fn(params, opt_state, batch)
      s = optax_gaf.stats(opt_state)
      logs["loss"].append(float(loss))
      logs["accepted"].append(np.asarray(s["accepted"]))
      logs["ready"].append(bool(s["ready"]))
  logits = logits_fn(jax.device_get(params), x_test)
  logs["test_accuracy"] = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
  logs["params"], logs["opt_state"] = params, opt_state
  logs["num_microbatches"] = n
  return logs


def main(argv=None):
  args = parse_args(argv)
  logs = train(args)
  steps = len(logs["loss"])
  rate = np.mean([a.mean() for a in logs["accepted"]])
  print(
    f"{args.mode}: {jax.device_count()} devices x {args.n_local} microbatches"
    f" (N = {logs['num_microbatches']}), tau = {args.tau}, label noise"
    f" {args.label_noise:.0%}; params and adamw moments sharded as"
    f" {jax.tree.map(lambda p: tuple(p.sharding.spec), logs['params'])}"
  )
  print(
    f"mean acceptance rate {rate:.2f}, skipped steps"
    f" {steps - sum(logs['ready'])} / {steps}, final train loss"
    f" {logs['loss'][-1]:.3f}, test accuracy {logs['test_accuracy']:.3f}"
  )


if __name__ == "__main__":
  main()
