"""Records reference cases from the authors' ``step_GAF`` for a torch-free test.

``tests/integration/test_reference_parity.py`` checks
``optax_gaf.gaf(rule="pairwise")`` against
``gradient_agreement_filtering.step_GAF`` (0.1.3). Torch is not a dependency
of optax_gaf and CI does not have it, so this script runs ``step_GAF`` once,
in a side environment, and stores what it saw and did in
``tests/data/step_gaf_cases.npz``; the test replays those cases with no torch.

Each case is one ``step_GAF`` call on a tiny MLP (6 -> 6 -> 3, tanh; 63
parameters) with SGD at lr=1, so the parameter change is minus the filtered
gradient. The grid is N in 2..8, eight taus from 0.05 (nothing agrees) to 1.2
(nearly everything does) and six seeds; the seed picks the initial weights,
the data and how skewed the labels are, which spreads the cosine distances.
The script wraps the package's ``_compute_gradients`` and
``_filter_gradients_cosine_sim`` to record, in the order ``step_GAF`` visits
them, the microgradients it compares and the cosine distances it computes.

A case is left out when any of its distances lies within ``MARGIN`` of tau:
there float32 rounding, which differs between the two implementations, may
decide, and a parity test cannot tell a bug from a tie. The file records how
many were left out.

The file's arrays (C cases, M = sum of their N, P parameters):

* ``grads`` float32 ``[M, P]``: each case's N microgradients, flattened as
  ``step_GAF`` does (``torch.cat`` over ``model.parameters()``), case after
  case, in the order compared (row 0 of a case is the anchor).
* ``distance`` float32 ``[M]``: torch's cosine distance of each row to the
  running aggregate when it was compared; NaN for the anchor rows.
* ``n`` int32 ``[C]``, ``tau`` float64 ``[C]``, ``seed`` int32 ``[C]``.
* ``delta`` float32 ``[C, P]``: the parameter change torch applied,
  ``after - before``; zeros when it did not step.
* ``stepped`` bool ``[C]``: whether torch stepped (``agreed_count > 0``).
* ``agreed_count`` int32 ``[C]``: ``step_GAF``'s count of agreements.
* ``shapes`` str ``[L]``: the parameter shapes (``"6x6"``), in order.
* ``margin`` float64: ``MARGIN``; ``num_excluded`` int: cases left out.
* ``torch_version``, ``package_version`` str.

Side environment (torch 2.13.0 CPU; the package is installed without its
dependencies because it also asks for torchvision, which it never imports)::

  python -m venv /work/venv-torch
  /work/venv-torch/bin/pip install torch==2.13.0 numpy
  /work/venv-torch/bin/pip install --no-deps gradient-agreement-filtering==0.1.3

Run (from the repository root; deterministic: seeded, one torch thread, the
same bytes every run)::

  PYTHONPATH=. /work/venv-torch/bin/python benchmarks/reference_cases.py

The live test in ``tests/integration/test_reference_parity.py`` imports
``run_case`` from here; to run it in the side environment, add the main venv's
JAX stack and optax_gaf itself::

  /work/venv-torch/bin/pip install jax==0.10.2 optax==0.2.8 chex==0.1.92 \\
      pytest hypothesis nbmake
  /work/venv-torch/bin/pip install --no-deps -e .
  PYTHONPATH=. /work/venv-torch/bin/python -m pytest \\
      tests/integration/test_reference_parity.py

Torch is imported at the top, so the test suite does not import this module
(of ``benchmarks/`` only ``benchmarks/tests/`` is collected); only the live
test does, after it has checked that torch is there.
"""

import argparse
import contextlib
import importlib.metadata
import os

import gradient_agreement_filtering as reference
import numpy as np
import torch

NS = tuple(range(2, 9))
TAUS = (0.05, 0.15, 0.3, 0.5, 0.7, 0.9, 1.0, 1.2)
SEEDS = tuple(range(6))
# Fraction of labels forced to class 0, by seed: more skew, more agreement.
SKEW = (0.0, 0.3, 0.6, 0.9, 0.45, 0.75)
MICROBATCH = 6
MARGIN = 1e-5
OUT = os.path.join("tests", "data", "step_gaf_cases.npz")


def make_model(seed):
  """The tiny MLP, its weights drawn from ``seed``."""
  torch.manual_seed(seed)
  return torch.nn.Sequential(
    torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
  )


def make_microbatches(n, tau_index, seed):
  """N datasets of ``MICROBATCH`` examples, distinct for every grid point."""
  g = torch.Generator().manual_seed(1000 * seed + 100 * tau_index + n)
  x = torch.randn(n, MICROBATCH, 6, generator=g)
  y = torch.randint(0, 3, (n, MICROBATCH), generator=g)
  skewed = torch.rand(n, MICROBATCH, generator=g) < SKEW[seed % len(SKEW)]
  y = torch.where(skewed, torch.zeros_like(y), y)
  return [torch.utils.data.TensorDataset(x[i], y[i]) for i in range(n)]


@contextlib.contextmanager
def recording():
  """Records the microgradients and distances ``step_GAF`` computes."""
  grads, distances = [], []
  compute = reference._compute_gradients
  compare = reference._filter_gradients_cosine_sim

  def compute_and_record(*args, **kwargs):
    out = compute(*args, **kwargs)
    flat = torch.cat([g.reshape(-1) for g in out[0]])  # as step_GAF compares
    grads.append(flat.detach().numpy().copy())
    return out

  def compare_and_record(*args, **kwargs):
    out = compare(*args, **kwargs)
    distances.append(out[1])
    return out

  reference._compute_gradients = compute_and_record
  reference._filter_gradients_cosine_sim = compare_and_record
  try:
    yield grads, distances
  finally:
    reference._compute_gradients = compute
    reference._filter_gradients_cosine_sim = compare


def run_case(n, tau, seed, tau_index=None):
  """One ``step_GAF`` call; returns what it compared and what it applied.

  Returns:
    A dict with ``grads`` float32 ``[N, P]``, ``distance`` float32 ``[N]``
    (NaN for the anchor), ``delta`` float32 ``[P]`` (after - before),
    ``stepped``, ``agreed_count`` and ``shapes`` (the parameter shapes).
  """
  if tau_index is None:
    tau_index = TAUS.index(tau)
  torch.set_num_threads(1)  # one reduction order: the same file every run
  model = make_model(seed)
  microbatches = make_microbatches(n, tau_index, seed)
  before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
  optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
  with recording() as (grads, distances):
    result = reference.step_GAF(
      model,
      optimizer,
      torch.nn.functional.cross_entropy,
      microbatches,
      wandb=False,
      verbose=False,
      cos_distance_thresh=tau,
    )
  after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
  assert len(grads) == n and len(distances) == n - 1
  stepped = result["agreed_count"] > 0
  delta = (after - before).numpy()
  if not stepped:
    assert np.all(delta == 0), "no agreement, yet the parameters moved"
  return {
    "grads": np.stack(grads).astype(np.float32),
    "distance": np.array([np.nan, *distances], np.float32),
    "delta": delta.astype(np.float32),
    "stepped": stepped,
    "agreed_count": result["agreed_count"],
    "shapes": [tuple(p.shape) for p in model.parameters()],
  }


def is_ambiguous(case, tau, margin=MARGIN):
  """Whether a distance lies within ``margin`` of tau (a float32 tie)."""
  return bool(
    np.any(np.abs(case["distance"][1:].astype(np.float64) - tau) <= margin)
  )


def generate():
  """Runs the grid; returns the arrays of the file and the excluded count."""
  cases, meta, excluded = [], [], 0
  for seed in SEEDS:
    for tau_index, tau in enumerate(TAUS):
      for n in NS:
        case = run_case(n, tau, seed, tau_index)
        if is_ambiguous(case, tau):
          excluded += 1
          continue
        cases.append(case)
        meta.append((n, tau, seed))
  shapes = cases[0]["shapes"]
  return {
    "grads": np.concatenate([c["grads"] for c in cases]),
    "distance": np.concatenate([c["distance"] for c in cases]),
    "n": np.array([m[0] for m in meta], np.int32),
    "tau": np.array([m[1] for m in meta], np.float64),
    "seed": np.array([m[2] for m in meta], np.int32),
    "delta": np.stack([c["delta"] for c in cases]),
    "stepped": np.array([c["stepped"] for c in cases], bool),
    "agreed_count": np.array([c["agreed_count"] for c in cases], np.int32),
    "shapes": np.array(["x".join(map(str, s)) for s in shapes]),
    "margin": np.float64(MARGIN),
    "num_excluded": np.int64(excluded),
    "torch_version": np.array(torch.__version__),
    "package_version": np.array(
      importlib.metadata.version("gradient-agreement-filtering")
    ),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=OUT)
  args = parser.parse_args()
  arrays = generate()
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  np.savez_compressed(args.out, **arrays)
  stepped = arrays["stepped"]
  print(
    f"{args.out}: {len(stepped)} cases ({int(np.sum(~stepped))} no-agreement,"
    f" {int(arrays['num_excluded'])} left out as within {MARGIN} of tau),"
    f" {os.path.getsize(args.out)} bytes"
  )


if __name__ == "__main__":
  main()
