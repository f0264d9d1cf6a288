"""Data-parallel training with GAF across devices: ``shard_map`` + ``gaf(axis_name=...)``.

A Flax NNX MLP learns scikit-learn's handwritten digits (offline) with symmetric
label noise. The global batch is sharded over the ``"data"`` axis of a
``jax.make_mesh`` mesh; each device splits its shard into ``n_local``
microbatches and computes their gradients; ``gaf(axis_name="data")`` decides
over all ``N = devices x n_local`` microgradients at the communication cost of
one all-reduce, and every device applies the same update (the parameters and
optimizer state stay replicated: ``out_specs=P()``).

Runs as is on 8 simulated CPU devices. On a multi-GPU host or a TPU VM it uses
the accelerators unchanged (``--cpu-devices`` only affects the CPU backend).
On a multi-host pod slice or GPU cluster, run the same command on every host
with ``--multihost``, which calls ``jax.distributed.initialize()`` first (see
https://docs.jax.dev/en/latest/multi_process.html); each process feeds the rows
for its own devices.

  python examples/data_parallel.py                # 8 simulated CPU devices
  python examples/data_parallel.py --tau 2        # tau=2 accepts all: the mean
"""

import argparse
import functools
import pathlib
import sys


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--cpu-devices",
    type=int,
    default=8,
    help="simulated devices when the backend is the CPU",
  )
  p.add_argument(
    "--multihost",
    action="store_true",
    help="call jax.distributed.initialize() (multi-host)",
  )
  p.add_argument(
    "--n-local", type=int, default=2, help="microbatches per device"
  )
  p.add_argument("--microbatch-size", type=int, default=16)
  p.add_argument("--tau", type=float, default=0.95)
  p.add_argument("--label-noise", type=float, default=0.4)
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def train(args, progress=True):
  """Trains; returns a dict of per-step logs and the final test accuracy."""
  import jax  # pylint: disable=g-import-not-at-top

  # Only sizes the CPU backend, and only before any backend has started.
  try:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  except RuntimeError:
    pass  # already started (e.g. in a notebook): keep its devices
  if args.multihost:
    jax.distributed.initialize()

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from optax.experimental import aggregating  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import optax_gaf  # pylint: disable=g-import-not-at-top

  num_devices = jax.device_count()
  mesh = jax.make_mesh((num_devices,), ("data",))
  n_global = num_devices * args.n_local
  batch_size = n_global * args.microbatch_size

  # The same arrays on every process: a fixed split, noise from the seed.
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
    x, digits.target, test_size=0.25, random_state=0, stratify=digits.target
  )
  rng = np.random.default_rng(args.seed)
  noisy = rng.random(len(y_train)) < args.label_noise
  y_noisy = np.where(noisy, rng.integers(0, 10, len(y_train)), y_train)

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(64, 128, rngs=rngs)
      self.out = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
      return self.out(jax.nn.relu(self.hidden(x)))

  graphdef, params = nnx.split(MLP(nnx.Rngs(args.seed)))

  def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params)(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["y"]
    ).mean()

  # process() skips adam entirely on a no-agreement step.
  tx = aggregating.process(
    optax.identity(),
    optax_gaf.gaf(args.tau, axis_name="data", num_microbatches=n_global),
    optax.adam(args.lr),
  )
  # Replicated from the start, as train_step returns them: one compilation.
  params, opt_state = jax.device_put(
    (params, tx.init(params)), NamedSharding(mesh, P())
  )
  grad_fn = optax_gaf.microbatch_grads(loss_fn, args.n_local)

  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(P(), P(), P("data")),
    out_specs=(P(), P(), P()),
  )
  def train_step(params, opt_state, batch):
    # Here batch is this device's shard: n_local microbatches of it.
    losses, grads = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (
      optax.apply_updates(params, updates),
      opt_state,
      lax.pmean(losses.mean(), "data"),
    )

  @jax.jit
  def accuracy(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return jnp.mean(jnp.argmax(logits, -1) == y)

  sharding = NamedSharding(mesh, P("data"))
  rows = batch_size // jax.process_count()
  first = jax.process_index() * rows

  def global_batch(step):
    idx = np.random.default_rng((args.seed, step)).choice(
      len(x_train), batch_size, replace=False
    )[first : first + rows]
    local = {"x": x_train[idx], "y": y_noisy[idx].astype(np.int32)}
    return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, a), local
    )

  logs = {"loss": [], "acceptance_rate": [], "ready": []}
  for step in tqdm.trange(args.steps, desc="train", disable=not progress):
    params, opt_state, loss = train_step(params, opt_state, global_batch(step))
    s = optax_gaf.stats(opt_state)
    logs["loss"].append(float(loss))
    logs["acceptance_rate"].append(float(s["acceptance_rate"]))
    logs["ready"].append(bool(s["ready"]))
  logs["test_accuracy"] = float(accuracy(params, x_test, y_test))
  logs["num_devices"] = num_devices
  logs["num_microbatches"] = n_global
  return logs


def main():
  args = parse_args()
  logs = train(args)
  steps = len(logs["loss"])
  print(
    f"{logs['num_devices']} devices x {args.n_local} microbatches of"
    f" {args.microbatch_size} (N = {logs['num_microbatches']}),"
    f" tau = {args.tau}, label noise {args.label_noise:.0%}"
  )
  print(
    f"mean acceptance rate {sum(logs['acceptance_rate']) / steps:.2f},"
    f" skipped steps {steps - sum(logs['ready'])} / {steps},"
    f" final train loss {logs['loss'][-1]:.3f},"
    f" test accuracy {logs['test_accuracy']:.3f}"
  )


if __name__ == "__main__":
  main()
