"""Side by side with the authors' PyTorch package (``step_GAF``).

The same model (an MLP and a small CNN on 32x32x3 inputs), the same initial
weights, the same microbatches, the same tau and SGD with momentum, trained
for a few steps by

* ``gradient_agreement_filtering.step_GAF`` (0.1.3; CPU torch), and
* ``optax_gaf``: ``microbatch_grads`` (vmap) + ``gaf(rule="pairwise")`` inside
  ``aggregating.process`` + ``optax.sgd``, one ``jax.jit`` step.

Per step it checks that the decisions agree (each microbatch's cosine distance
to the running pairwise aggregate, read from the package's
``_filter_gradients_cosine_sim``, against ``GAFState.accepted``), and it times
both, alternating, after a warm-up (JAX compile) step. The two frameworks get
the same 2 CPU cores; the ratio is torch time / optax_gaf time.

The authors' package is *not* a dependency of optax_gaf. It runs in a side
environment::

  python -m venv /work/venv-torch
  /work/venv-torch/bin/pip install torch --index-url \\
      https://download.pytorch.org/whl/cpu
  /work/venv-torch/bin/pip install gradient-agreement-filtering==0.1.3 \\
      jax optax chex numpy

Run from the repository root::

  /work/venv-torch/bin/python -m benchmarks.vs_reference

It writes ``benchmarks/results/vs_reference.md``.
"""

import argparse
import os
import time

import gradient_agreement_filtering as reference
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from optax.experimental import aggregating
from torch import nn
from torch.utils.data import Subset
from torch.utils.data import TensorDataset

import optax_gaf
from benchmarks import _common

TAU = 0.97
MICROBATCH = 16
LR, MOMENTUM = 0.01, 0.9


# --- the same two models in torch and in JAX (torch layouts: NCHW, OIHW) ---


def torch_model(kind):
  torch.manual_seed(0)
  if kind == "mlp":
    return nn.Sequential(
      nn.Flatten(), nn.Linear(3072, 128), nn.ReLU(), nn.Linear(128, 10)
    )
  return nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1),
    nn.ReLU(),
    nn.AvgPool2d(2),
    nn.Conv2d(16, 32, 3, padding=1),
    nn.ReLU(),
    nn.AvgPool2d(2),
    nn.Flatten(),
    nn.Linear(8 * 8 * 32, 10),
  )


def jax_params(model):
  return [jnp.asarray(p.detach().numpy()) for p in model.parameters()]


def jax_apply(kind, params, x):
  if kind == "mlp":
    w1, b1, w2, b2 = params
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ w1.T + b1)
    return h @ w2.T + b2
  c1, cb1, c2, cb2, w, b = params
  for k, kb in ((c1, cb1), (c2, cb2)):
    x = jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    x = jax.nn.relu(x + kb[None, :, None, None])
    n, c, h, wd = x.shape
    x = x.reshape(n, c, h // 2, 2, wd // 2, 2).mean(axis=(3, 5))
  return x.reshape(x.shape[0], -1) @ w.T + b


def jax_step_fn(kind, n):
  def loss(params, batch):
    logp = jax.nn.log_softmax(jax_apply(kind, params, batch["x"]))
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], 1))

  tx = aggregating.process(
    optax.identity(),
    optax_gaf.gaf(TAU, rule="pairwise", num_microbatches=n),
    optax.sgd(LR, momentum=MOMENTUM),
  )
  grad_fn = optax_gaf.microbatch_grads(loss, n)

  @jax.jit
  def step(params, state, batch):
    _, grads = grad_fn(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return tx, step


def run(kind, n, steps, rng):
  model = torch_model(kind)
  params = jax_params(model)
  opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
  tx, step = jax_step_fn(kind, n)
  state = tx.init(params)

  distances = []
  original = reference._filter_gradients_cosine_sim

  def recording(g1, g2, thresh):  # the package's comparison, recorded
    out = original(g1, g2, thresh)
    distances.append(out[1])
    return out

  reference._filter_gradients_cosine_sim = recording
  t_torch, t_jax, agree, compared, accepted = [], [], 0, 0, 0
  margins = []  # |distance - tau| where the two disagree
  try:
    for s in range(steps + 1):  # step 0 warms up (JAX compiles)
      x = rng.normal(size=(n * MICROBATCH, 3, 32, 32)).astype(np.float32)
      # Half the labels are class 0, so microgradients share a direction and
      # tau=0.97 accepts some and rejects some.
      y = np.where(
        rng.random(n * MICROBATCH) < 0.5,
        0,
        rng.integers(0, 10, size=n * MICROBATCH),
      )
      data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
      micro = [
        Subset(data, range(i * MICROBATCH, (i + 1) * MICROBATCH))
        for i in range(n)
      ]
      distances.clear()
      t0 = time.perf_counter()
      reference.step_GAF(
        model,
        opt,
        nn.CrossEntropyLoss(),
        micro,
        wandb=False,
        verbose=False,
        cos_distance_thresh=TAU,
      )
      t1 = time.perf_counter()
      params, state = jax.block_until_ready(
        step(params, state, {"x": jnp.asarray(x), "y": jnp.asarray(y)})
      )
      t2 = time.perf_counter()
      if s:
        t_torch.append(t1 - t0)
        t_jax.append(t2 - t1)
      ours = np.asarray(optax_gaf.stats(state)["accepted"])[1:]
      theirs = np.asarray(distances) <= TAU
      agree += int(np.sum(ours == theirs))
      margins += list(np.abs(np.asarray(distances) - TAU)[ours != theirs])
      compared += n - 1
      accepted += int(np.sum(theirs))
      # Keep the two runs on identical weights: float noise must not drift.
      params = jax_params(model)
  finally:
    reference._filter_gradients_cosine_sim = original
  return (
    np.median(t_torch),
    np.median(t_jax),
    agree,
    compared,
    accepted,
    max(margins, default=0.0),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
  parser.add_argument("--out", default="benchmarks/results")
  args = parser.parse_args()
  torch.set_num_threads(args.torch_threads)
  rows = []
  for kind in ("mlp", "cnn"):
    for n in (2, 4, 8):
      t_t, t_j, agree, compared, acc, margin = run(
        kind, n, args.steps, np.random.default_rng(n)
      )
      rows.append((kind, n, t_t, t_j, agree, compared, acc, margin))
      print(
        f"{kind} N={n}: step_GAF {t_t * 1e3:.2f} ms, optax_gaf"
        f" {t_j * 1e3:.2f} ms, ratio {t_t / t_j:.1f}x, decisions agree"
        f" {agree}/{compared} ({acc} accepted; largest |distance - tau|"
        f" where they differ {margin:.1e})",
        flush=True,
      )
  table = "\n".join(
    [
      "| model | N | step_GAF (ms/step) | optax_gaf (ms/step) |"
      " step_GAF / optax_gaf | decisions agree (accepted) |"
      " max abs(distance - tau) where not |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    + [
      f"| {k} | {n} | {tt * 1e3:.2f} | {tj * 1e3:.2f} | {tt / tj:.1f}x |"
      f" {a}/{c} ({acc}) | {m:.1e} |"
      for k, n, tt, tj, a, c, acc, m in rows
    ]
  )
  print(table)
  _common.write_result(
    args.out,
    "vs_reference.md",
    f"Median wall time per training step over {args.steps} steps (after"
    f" one warm-up step), microbatch size {MICROBATCH}, tau={TAU}, SGD"
    f" lr={LR} momentum={MOMENTUM}; torch {torch.__version__} (CPU),"
    f" gradient-agreement-filtering 0.1.3, jax {jax.__version__},"
    f" {os.cpu_count()} CPU cores, torch threads {args.torch_threads}.\n"
    f"`/work/venv-torch/bin/python -m benchmarks.vs_reference`"
    f"\n\n{table}\n",
  )


if __name__ == "__main__":
  main()
