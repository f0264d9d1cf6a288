"""The training loop of ``benchmarks.noisy_labels``, the table and notebook 02.

The loop keeps GAF's semantics visible:

* every step draws ``N`` class-balanced microbatches; both methods see exactly
  the same data (same indices) at every step;
* ``optax_gaf.microbatch_grads`` gives the ``N`` microgradients, and the
  optimizer is an ``nnx.Optimizer`` whose ``tx`` is
  ``aggregating.process(optax.identity(), aggregator, inner)``: the aggregator
  is GAF or the plain mean, and on a no-agreement step ``process`` skips
  ``inner`` entirely (no momentum, no weight decay: a true skip);
* the step is pure, so a chunk of steps runs as one jitted ``jax.lax.scan``
  over ``nnx.split`` state, and the benchmark ``vmap``\\ s that over seeds.
  XLA:CPU runs convolutions inside a loop body through a slow generic path
  (jax-ml/jax#12868: a ResNet-18 step took minutes instead of seconds), so
  conv nets on CPU use :func:`run_stepwise` instead: one jitted step per
  call, the same keys and results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from optax.experimental import aggregating

import optax_gaf

# name -> (tau, num_microbatches) -> Aggregator. Add a rule with one line.
METHODS: dict[str, Callable[[float, int], Any]] = {
  "average": lambda tau, n: aggregating.average_per_element_updates(),
  "gaf-sequential": lambda tau, n: optax_gaf.gaf(
    tau, rule="sequential", num_microbatches=n
  ),
  "gaf-pairwise": lambda tau, n: optax_gaf.gaf(
    tau, rule="pairwise", num_microbatches=n
  ),
  # Rules beyond the paper (README "Rules beyond the paper").
  "gaf-medoid": lambda tau, n: optax_gaf.gaf(
    tau, rule="medoid", num_microbatches=n
  ),
  "gaf-soft": lambda tau, n: optax_gaf.gaf(
    tau, rule="soft", temperature=0.05, num_microbatches=n
  ),
  "gaf-per-leaf": lambda tau, n: optax_gaf.gaf(
    tau, granularity="per_leaf", num_microbatches=n
  ),
  "gaf-adaptive": lambda tau, n: optax_gaf.gaf(
    optax_gaf.AdaptiveTau(k=1.0, history=256, cap=tau),
    num_microbatches=n,
  ),
  # Not GAF: tau is unused.
  "and-mask": lambda tau, n: optax_gaf.and_mask(1.0),
  "adacons": lambda tau, n: optax_gaf.adacons(0.9, num_microbatches=n),
}


def make_inner(
  name: str, lr: float | optax.Schedule, weight_decay: float = 5e-4
) -> optax.GradientTransformation:
  """``sgd`` (momentum 0.9) or ``adamw``: the optimizer after aggregation."""
  if name == "sgd":
    return optax.sgd(lr, momentum=0.9)
  if name == "adamw":
    return optax.adamw(lr, weight_decay=weight_decay)
  raise ValueError(f"Unknown optimizer {name!r}; choose 'sgd' or 'adamw'.")


def make_tx(
  method: str,
  *,
  tau: float,
  num_microbatches: int,
  inner: optax.GradientTransformation,
):
  """``process(identity, METHODS[method], inner)``: a true skip for GAF."""
  if method not in METHODS:
    raise ValueError(
      f"Unknown method {method!r}; choose one of {sorted(METHODS)}."
    )
  return aggregating.process(
    optax.identity(), METHODS[method](tau, num_microbatches), inner
  )


class StepMetrics(NamedTuple):
  """Per-step diagnostics; acceptance/ready are NaN/True for averaging."""

  loss: jax.Array
  acceptance_rate: jax.Array
  ready: jax.Array


def _cross_entropy(model, batch):
  logits = model(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(
    logits, batch["y"]
  ).mean()


def train_step(
  model: nnx.Module,
  optimizer: nnx.Optimizer,
  batch: dict[str, jax.Array],
  num_microbatches: int,
) -> StepMetrics:
  """One optimizer step on ``batch`` split into ``num_microbatches``."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, micro):
    # copy=True: fresh Variables inside this trace, so BatchNorm may update.
    m = nnx.merge(graphdef, params, rest, copy=True)
    loss = _cross_entropy(m, micro)
    return loss, nnx.state(m, nnx.Not(nnx.Param))  # e.g. BatchNorm stats

  (losses, rests), grads = optax_gaf.microbatch_grads(
    loss_fn, num_microbatches, has_aux=True
  )(params, batch)
  # Running statistics: the mean over microbatches (workers).
  nnx.update(model, jax.tree.map(lambda r: jnp.mean(r, 0), rests))
  optimizer.update(model, grads)
  try:
    s = optax_gaf.stats(nnx.as_pure(optimizer.opt_state))
    # and_mask/adacons have no acceptance rate.
    acc = s.get("acceptance_rate", jnp.float32(jnp.nan))
    ready = s["ready"]
  except ValueError:  # no GAFState: plain averaging
    acc, ready = jnp.float32(jnp.nan), jnp.bool_(True)
  return StepMetrics(jnp.mean(losses), acc, ready)


class Trainer(NamedTuple):
  """Pure functions over ``state = nnx.split((model, optimizer))[1]``."""

  graphdef: Any
  eval_graphdef: Any
  run_chunk: Callable[..., Any]
  accuracy: Callable[..., Any]
  step: Callable[..., Any]


def build(
  model: nnx.Module,
  tx,
  *,
  num_microbatches: int,
  train_x,
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[Trainer, Any]:
  """Wraps ``model`` and ``nnx.Optimizer(model, tx)`` into pure functions.

  Args:
    model: an NNX module in training mode.
    tx: the optimizer's transformation (see :func:`make_tx`).
    num_microbatches: N.
    train_x: the training images, on the device; batches are gathered by index.
    augment: optional ``augment(key, images) -> images``.

  Returns:
    ``(trainer, state)``. ``trainer.run_chunk(state, idx [S, N, m], labels,
    key) -> (state, StepMetrics [S])`` runs S steps in one ``lax.scan``;
    ``trainer.step(state, (idx [N, m], step_key), labels)`` is one step of
    it, without a loop (see :func:`run_stepwise`);
    ``trainer.accuracy(state, x, y, weights) -> float`` evaluates in eval mode.
  """
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  model.eval()
  eval_graphdef, _ = nnx.split((model, optimizer))
  model.train()

  def step(state, inputs, labels):
    step_idx, step_key = inputs
    flat = step_idx.reshape(-1)
    x = train_x[flat]
    if x.dtype == jnp.uint8:
      x = x.astype(jnp.float32) / 255.0
    if augment is not None:
      x = augment(step_key, x)
    model, optimizer = nnx.merge(graphdef, state)
    metrics = train_step(
      model, optimizer, {"x": x, "y": labels[flat]}, num_microbatches
    )
    return nnx.state((model, optimizer)), metrics

  def run_chunk(state, idx, labels, key):
    keys = jax.random.split(key, idx.shape[0])
    return jax.lax.scan(
      lambda s, inputs: step(s, inputs, labels), state, (idx, keys)
    )

  def accuracy(state, x, y, weights, batch_size: int = 1000):
    """Weighted accuracy of argmax predictions, in batches."""
    model, _ = nnx.merge(eval_graphdef, state)
    correct = []
    for start in range(0, x.shape[0], batch_size):
      xb = x[start : start + batch_size]
      if xb.dtype == jnp.uint8:
        xb = xb.astype(jnp.float32) / 255.0
      pred = jnp.argmax(model(xb), -1)
      correct.append(pred == y[start : start + batch_size])
    correct = jnp.concatenate(correct).astype(jnp.float32)
    return jnp.sum(correct * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  return Trainer(graphdef, eval_graphdef, run_chunk, accuracy, step), state


def run_stepwise(step: Callable[..., Any], state, idx, labels, key):
  """``run_chunk`` as a Python loop over a jitted ``trainer.step``.

  Same keys, same steps, same ``(state, StepMetrics [S])``; no XLA loop, so
  convolutions keep XLA:CPU's fast path (jax-ml/jax#12868).
  """
  keys = jax.random.split(key, idx.shape[0])
  metrics = []
  for i in range(idx.shape[0]):
    state, m = step(state, (idx[i], keys[i]), labels)
    metrics.append(m)
  return state, jax.tree.map(lambda *ms: jnp.stack(ms), *metrics)


def use_stepwise(model_name: str, backend: str | None = None) -> bool:
  """Whether to train ``model_name`` with :func:`run_stepwise` (CPU convs)."""
  backend = backend or jax.default_backend()
  return backend == "cpu" and model_name != "mlp"


def chunks(num_steps: int, eval_every: int) -> list[tuple[int, int]]:
  """``[(start, stop), ...]`` covering ``range(num_steps)``."""
  return [
    (s, min(s + eval_every, num_steps)) for s in range(0, num_steps, eval_every)
  ]


def flip_crop(key: jax.Array, x: jax.Array, pad: int = 4) -> jax.Array:
  """CIFAR augmentation: random horizontal flip and a padded random crop."""
  b, h, w, _ = x.shape
  k1, k2 = jax.random.split(key)
  flip = jax.random.bernoulli(k1, 0.5, (b,))
  x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  offsets = jax.random.randint(k2, (b, 2), 0, 2 * pad + 1)
  return jax.vmap(
    lambda im, o: jax.lax.dynamic_slice(
      im, (o[0], o[1], 0), (h, w, im.shape[-1])
    )
  )(padded, offsets)


def summarize_metrics(metrics: StepMetrics) -> dict[str, float]:
  """Means over a chunk of steps."""
  m = jax.tree.map(np.asarray, metrics)
  return {
    "loss": float(np.mean(m.loss)),
    "acceptance_rate": float(np.mean(m.acceptance_rate)),
    "skip_rate": float(1.0 - np.mean(m.ready)),
  }
