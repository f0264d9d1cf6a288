"""Parity with the authors' package, ``gradient-agreement-filtering`` 0.1.3.

Their ``step_GAF`` runs end to end on a tiny torch model with SGD(lr=1), so the
parameter change is minus the gradient it applied. ``gaf(rule="pairwise")``
on the same microgradients must give the same update, or skip the same steps.

Skips unless torch and the package are importable. To run it::

  python -m venv /tmp/venv-torch
  /tmp/venv-torch/bin/pip install torch==2.13.0 jax optax chex numpy pytest hypothesis
  /tmp/venv-torch/bin/pip install --no-deps gradient-agreement-filtering==0.1.3
  PYTHONPATH=. /tmp/venv-torch/bin/python -m pytest tests/test_reference_parity.py
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
reference = pytest.importorskip("gradient_agreement_filtering")

import jax.numpy as jnp  # noqa: E402

import optax_gaf  # noqa: E402
from tests import oracle  # noqa: E402


def _model(seed):
  torch.manual_seed(seed)
  return torch.nn.Sequential(
    torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
  )


def _microbatches(seed, n, size=6):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(n, size, 5, generator=g)
  y = torch.randint(0, 3, (n, size), generator=g)
  return [torch.utils.data.TensorDataset(x[i], y[i]) for i in range(n)]


def _microgradients(model, microbatches):
  """Per-microbatch gradients, [N, *shape] per parameter, as step_GAF sees them."""
  per_param = [[] for _ in model.parameters()]
  for mb in microbatches:
    x, y = mb.tensors
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for store, p in zip(per_param, model.parameters()):
      store.append(p.grad.detach().numpy().copy())
  model.zero_grad()
  return [np.stack(s) for s in per_param]


CASES = [
  (n, tau, seed)
  for n in (2, 3, 5, 8)
  for tau in (0.05, 0.6, 0.95, 1.2)
  for seed in range(3)
]


@pytest.mark.parametrize("n,tau,seed", CASES)
def test_pairwise_matches_step_gaf(n, tau, seed):
  model = _model(seed)
  microbatches = _microbatches(100 + seed, n)
  leaves = _microgradients(model, microbatches)
  want, accepted, dist = oracle.pairwise(oracle.flatten(leaves), tau)
  if oracle.is_ambiguous(dist, tau):
    pytest.skip("a decision within 1e-4 of tau")

  before = [p.detach().clone() for p in model.parameters()]
  optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
  result = reference.step_GAF(
    model,
    optimizer,
    torch.nn.functional.cross_entropy,
    microbatches,
    wandb=False,
    verbose=False,
    cos_distance_thresh=tau,
  )
  applied = [
    (b - p.detach()).numpy() for b, p in zip(before, model.parameters())
  ]

  tx = optax_gaf.gaf(tau, rule="pairwise", num_microbatches=n)
  params = [jnp.asarray(b.numpy()) for b in before]
  updates, state = tx.update(
    [jnp.asarray(x) for x in leaves], tx.init(params), params
  )

  assert result["agreed_count"] == int(state.num_accepted) - 1 or (
    result["agreed_count"] == 0 and not bool(state.ready)
  )
  assert bool(state.ready) == (result["agreed_count"] > 0)
  np.testing.assert_array_equal(state.accepted, accepted)
  for got, ref in zip(updates, applied):
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-6)
  if not bool(state.ready):  # nothing agreed: they did not step at all
    assert all(np.all(a == 0) for a in applied)


def test_cases_cover_both_outcomes():
  """The grid above includes steps where nothing agrees and steps that apply."""
  outcomes = set()
  for n, tau, seed in CASES:
    leaves = _microgradients(_model(seed), _microbatches(100 + seed, n))
    outcomes.add(oracle.pairwise(oracle.flatten(leaves), tau)[0] is None)
  assert outcomes == {True, False}
