"""Data-parallel GAF across devices: ``shard_map`` + ``gaf(axis_name=...)``.

  python examples/data_parallel.py                # 8 simulated CPU devices
  python examples/data_parallel.py --tau 2        # tau=2 accepts all: the mean

A Flax NNX MLP learns scikit-learn's handwritten digits (offline) with
symmetric label noise: exactly ``--label-noise`` of the training labels are
moved to a random other class. The global batch is sharded over the
``"data"`` axis of a ``jax.make_mesh`` mesh; each device splits its shard
into ``--n-local`` microbatches and computes their gradients;
``gaf(axis_name="data")`` decides over all ``N = devices x n_local``
microgradients at the communication cost of one all-reduce, and every device
applies the same update (parameters and optimizer state stay replicated:
``out_specs=P()``).

Runs as is on 8 simulated CPU devices. On a multi-GPU host or a TPU VM it
uses the accelerators unchanged (``--cpu-devices`` only affects the CPU
backend). On a multi-host pod slice or GPU cluster, run the same command on
every host with ``--multihost``, which calls ``jax.distributed.initialize()``
first (see https://docs.jax.dev/en/latest/multi_process.html); each process
feeds the rows for its own devices. The coordinator's address, the number of
processes and this process's id come from ``--coordinator-address``,
``--num-processes`` and ``--process-id``, or else from the environment as
``jax.distributed.initialize`` reads it (Cloud TPU, SLURM, Open MPI,
Kubernetes, ``JAX_COORDINATOR_ADDRESS``). Two processes of 4 CPU devices on
one machine, for a try::

  for i in 0 1; do
    python examples/data_parallel.py --multihost --cpu-devices 4 \
      --coordinator-address 127.0.0.1:12355 --num-processes 2 \
      --process-id $i --steps 200 &
  done; wait
"""

import argparse
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
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
    "--coordinator-address",
    help="with --multihost: host:port of process 0 (default: the"
    " environment's, as jax.distributed.initialize finds it)",
  )
  p.add_argument(
    "--num-processes", type=int, help="with --multihost: how many processes"
  )
  p.add_argument(
    "--process-id", type=int, help="with --multihost: this process's id"
  )
  p.add_argument(
    "--n-local", type=int, default=2, help="microbatches per device"
  )
  p.add_argument("--microbatch-size", type=int, default=16)
  p.add_argument("--tau", type=float, default=0.95)
  p.add_argument(
    "--label-noise",
    type=float,
    default=0.4,
    help="fraction of training labels moved to another class, in [0, 1)",
  )
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if not 0.0 <= args.label_noise < 1.0:
    p.error(f"--label-noise must lie in [0, 1); got {args.label_noise}.")
  if min(args.cpu_devices, args.n_local, args.microbatch_size) < 1:
    p.error("--cpu-devices, --n-local and --microbatch-size must be >= 1.")
  if args.steps < 1:
    p.error("--steps must be >= 1.")
  given = [args.coordinator_address, args.num_processes, args.process_id]
  if not args.multihost and any(x is not None for x in given):
    p.error(
      "--coordinator-address, --num-processes and --process-id need"
      " --multihost."
    )
  return args


def symmetric_label_noise(labels, num_classes, rate, seed):
  """Moves exactly ``round(rate * n)`` labels to a random *other* class."""
  rng = np.random.default_rng(seed)
  chosen = rng.permutation(len(labels))[: int(round(rate * len(labels)))]
  noisy = labels.copy()
  # An offset in [1, C-1] never lands on the true class.
  offsets = rng.integers(1, num_classes, size=len(chosen))
  noisy[chosen] = (labels[chosen] + offsets) % num_classes
  return noisy.astype(np.int32)


def load_data(args):
  """The same arrays on every process: a fixed split, noise from the seed."""
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
    x, digits.target, test_size=0.25, random_state=0, stratify=digits.target
  )
  y_noisy = symmetric_label_noise(
    y_train, NUM_CLASSES, args.label_noise, args.seed
  )
  return x_train, y_noisy, x_test, y_test


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(64, 128, rngs=rngs)
    self.out = nnx.Linear(128, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


def make_train_step(mesh, graphdef, tx, n_local):
  """``step(params, opt_state, batch)``; ``batch`` sharded over ``"data"``."""

  def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params)(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["y"]
    ).mean()

  grad_fn = optax_gaf.microbatch_grads(loss_fn, n_local)

  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(P(), P(), P("data")),
    out_specs=(P(), P(), P()),
  )
  def train_step(params, opt_state, batch):
    # Here batch is this device's shard: n_local microbatches of it. The
    # params are the same on every device; as they stand, grad's transpose
    # would psum each microgradient over the devices. Varying, each device
    # keeps its own.
    local = lax.pcast(params, "data", to="varying")
    losses, grads = grad_fn(local, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (
      optax.apply_updates(params, updates),
      opt_state,
      lax.pmean(losses.mean(), "data"),
    )

  return train_step


def make_global_batch(mesh, x_train, y_noisy, batch_size, seed):
  """``global_batch(step)``: this process's rows of the step's batch."""
  sharding = NamedSharding(mesh, P("data"))
  rows = batch_size // jax.process_count()
  first = jax.process_index() * rows

  def global_batch(step):
    idx = np.random.default_rng((seed, step)).choice(
      len(x_train), batch_size, replace=False
    )[first : first + rows]
    local = {"x": x_train[idx], "y": y_noisy[idx]}
    return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, a), local
    )

  return global_batch


def train(args, progress=True):
  """Trains; returns a dict of per-step logs and the final test accuracy."""
  # Sizes the CPU backend; once a backend has started (e.g. in a notebook)
  # this raises, and the run keeps the devices it has.
  with contextlib.suppress(RuntimeError):
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  if args.multihost:
    # gloo carries the CPU backend's collectives between processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      args.coordinator_address, args.num_processes, args.process_id
    )

  num_devices = jax.device_count()
  mesh = jax.make_mesh((num_devices,), ("data",))
  n_global = num_devices * args.n_local
  x_train, y_noisy, x_test, y_test = load_data(args)
  graphdef, params = nnx.split(MLP(nnx.Rngs(args.seed)))
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
  train_step = make_train_step(mesh, graphdef, tx, args.n_local)
  global_batch = make_global_batch(
    mesh, x_train, y_noisy, n_global * args.microbatch_size, args.seed
  )

  logs = {"loss": [], "acceptance_rate": [], "ready": []}
  for step in tqdm.trange(args.steps, desc="train", disable=not progress):
    params, opt_state, loss = train_step(params, opt_state, global_batch(step))
    s = optax_gaf.stats(opt_state)
    logs["loss"].append(float(loss))
    logs["acceptance_rate"].append(float(s["acceptance_rate"]))
    logs["ready"].append(bool(s["ready"]))
  logits = nnx.merge(graphdef, params)(x_test)
  logs["test_accuracy"] = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
  logs["num_devices"] = num_devices
  logs["num_microbatches"] = n_global
  return logs


def main(argv=None):
  args = parse_args(argv)
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
