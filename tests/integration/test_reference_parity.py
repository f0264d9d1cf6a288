"""Parity with the authors' package, ``gradient-agreement-filtering`` 0.1.3.

Their ``step_GAF`` filters microgradients pairwise: each one is compared with
the running aggregate ``G`` and, when its cosine distance is at most tau,
``G <- (G + g_i) / 2``; with no agreement it does not step.
``gaf(rule="pairwise")`` must make the same decisions and the same update.

Torch is not a dependency, so the main test replays cases that
``benchmarks/reference_cases.py`` recorded from ``step_GAF`` (a tiny MLP, SGD
at lr=1: the parameter change is minus the filtered gradient) in
``tests/data/step_gaf_cases.npz``; it needs only NumPy and JAX and runs in CI.
The live test runs ``step_GAF`` itself and skips unless torch and the package
are importable; the generator's docstring says how to build that side venv.
Run it there with::

  PYTHONPATH=. /work/venv-torch/bin/python -m pytest \\
      tests/integration/test_reference_parity.py
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gaf

TESTS = pathlib.Path(__file__).resolve().parents[1]
DATA = TESTS / "data" / "step_gaf_cases.npz"
# A distance this close to tau is a float32 tie: the two implementations round
# it differently, so either decision is right. The generator leaves such
# cases out and the file must hold none.
MARGIN = 1e-5
# float32 tolerances (eps = 2**-24 ~ 6e-8; every gradient entry and parameter
# here is below 1 in magnitude):
# - the update: torch halves G once per agreement, optax_gaf forms a weighted
#   sum (a few roundings, each <= eps of a value < 1), and torch's parameter
#   change after - before adds the rounding of after = before - G. That is a
#   few eps absolute; relative error is meaningless where entries cancel.
#   1e-6 (~16 eps) absolute; the largest difference measured is 6e-8, while a
#   wrong weight (the plain mean instead of the halving) is off by ~1e-2.
UPDATE_RTOL, UPDATE_ATOL = 1e-6, 1e-6
# - distances: torch takes the cosine of the float32 vectors, optax_gaf reads
#   it from a float32 Gram matrix; the largest difference measured is 2.4e-7.
#   Any difference under MARGIN cannot flip a decision, as no stored distance
#   is within MARGIN of tau.
DISTANCE_ATOL = MARGIN


def _load():
  with np.load(DATA) as f:
    return {k: f[k] for k in f.files}


CASES = _load()
SHAPES = [tuple(map(int, s.split("x"))) for s in CASES["shapes"]]
STARTS = np.concatenate([[0], np.cumsum(CASES["n"])])


def _case(i):
  """Case ``i`` of the file as the dict that ``run_case`` returns."""
  rows = slice(STARTS[i], STARTS[i + 1])
  return {
    "grads": CASES["grads"][rows],
    "distance": CASES["distance"][rows],
    "delta": CASES["delta"][i],
    "stepped": bool(CASES["stepped"][i]),
    "agreed_count": int(CASES["agreed_count"][i]),
  }


def _split(flat, shapes):
  """``[N, P]`` -> one ``[N, *shape]`` leaf per parameter, in order."""
  sizes = [int(np.prod(s)) for s in shapes]
  assert sum(sizes) == flat.shape[1]
  parts = np.split(flat, np.cumsum(sizes)[:-1], axis=1)
  return [jnp.asarray(p.reshape(-1, *s)) for p, s in zip(parts, shapes)]


@jax.jit
def _gaf_sgd(leaves, tau):
  """``gaf(pairwise)`` + SGD(1) on ``[N, *shape]`` leaves: updates, stats.

  Jitted with tau traced (float32, as torch compares it): one compile per N,
  not per case; eager, each fresh ``gaf`` costs about a second, minutes in all.
  """
  n = leaves[0].shape[0]
  tx = optax.chain(
    optax_gaf.gaf(tau, rule="pairwise", num_microbatches=n), optax.sgd(1.0)
  )
  params = [jnp.zeros(x.shape[1:], x.dtype) for x in leaves]
  updates, state = tx.update(leaves, tx.init(params), params)
  return updates, optax_gaf.stats(state)


def _gaf_step(grads, tau, shapes):
  """Runs ``_gaf_sgd`` on ``[N, P]`` microgradients split by ``shapes``."""
  updates, stats = _gaf_sgd(_split(grads, shapes), jnp.float32(tau))
  flat = np.concatenate([np.asarray(u).reshape(-1) for u in updates])
  return flat, stats


def _check(case, tau, shapes, label):
  """Asserts that gaf(pairwise) does what step_GAF did in ``case``."""
  update, stats = _gaf_step(case["grads"], tau, shapes)
  torch_distance = case["distance"][1:]
  assert bool(stats["ready"]) == case["stepped"], f"{label}: ready"
  # Anchor first, then each microgradient torch accepted.
  np.testing.assert_array_equal(
    np.asarray(stats["accepted"]),
    [True, *(torch_distance <= tau)],
    err_msg=f"{label}: accepted",
  )
  assert int(stats["num_accepted"]) == case["agreed_count"] + 1, label
  np.testing.assert_allclose(
    np.asarray(stats["cosine_distance"])[1:],
    torch_distance,
    rtol=0,
    atol=DISTANCE_ATOL,
    err_msg=f"{label}: cosine distances",
  )
  if case["stepped"]:
    np.testing.assert_allclose(
      update,
      case["delta"],
      rtol=UPDATE_RTOL,
      atol=UPDATE_ATOL,
      err_msg=f"{label}: update vs torch's parameter change",
    )
  else:  # a no-agreement step: no update at all, as torch did not step
    np.testing.assert_array_equal(
      update, np.zeros_like(update), err_msg=f"{label}: nonzero update"
    )


def test_file_holds_the_cases_it_should():
  """A broken or truncated data file must fail here, not pass vacuously."""
  n, tau, stepped = CASES["n"], CASES["tau"], CASES["stepped"]
  grads, distance = CASES["grads"], CASES["distance"]
  num = len(n)
  assert num >= 200
  assert set(n.tolist()) == set(range(2, 9))
  assert tau.min() <= 0.05 and tau.max() >= 1.2
  assert len(np.unique(tau)) >= 5 and len(np.unique(CASES["seed"])) >= 3
  assert np.sum(stepped) >= 50 and np.sum(~stepped) >= 50
  assert grads.dtype == np.float32 and CASES["delta"].dtype == np.float32
  assert grads.shape == (n.sum(), sum(int(np.prod(s)) for s in SHAPES))
  assert CASES["delta"].shape == (num, grads.shape[1])
  assert distance.shape == (n.sum(),)
  # Every microgradient is usable (finite, nonzero): step_GAF has no notion of
  # an unusable one, so the two agree only on such inputs.
  assert np.all(np.isfinite(grads)) and np.all(np.any(grads != 0, axis=1))
  # torch's own record is consistent: it stepped iff something agreed.
  np.testing.assert_array_equal(stepped, CASES["agreed_count"] > 0)
  assert np.all(CASES["delta"][~stepped] == 0)
  assert np.any(CASES["delta"][stepped] != 0, axis=1).all()
  anchor = np.zeros(n.sum(), bool)
  anchor[STARTS[:-1]] = True
  assert np.all(np.isnan(distance[anchor]))
  taus = np.repeat(tau, n)[~anchor]
  compared = distance[~anchor].astype(np.float64)
  assert np.all(np.isfinite(compared))
  owner = np.repeat(np.arange(num), n - 1)  # the case of each compared row
  agreed = np.bincount(owner, weights=compared <= taus, minlength=num)
  np.testing.assert_array_equal(agreed, CASES["agreed_count"])
  # No float32 ties: every decision is clear by more than MARGIN.
  assert float(CASES["margin"]) >= MARGIN
  ties = np.unique(owner[np.abs(compared - taus) <= MARGIN])
  assert not ties.size, f"cases {ties} have a distance within {MARGIN} of tau"


@pytest.mark.parametrize("index", range(len(CASES["n"])))
def test_pairwise_matches_recorded_step_gaf(index):
  """Case ``index`` of the file: same decisions, same update as step_GAF."""
  n, tau = int(CASES["n"][index]), float(CASES["tau"][index])
  label = f"case {index} (N={n}, tau={tau}, seed={CASES['seed'][index]})"
  _check(_case(index), tau, SHAPES, label)


def test_concrete_tau_and_one_leaf_give_the_same_update():
  """A Python-float tau, eager, and one [N, P] leaf: the same decisions.

  The parametrized test traces tau under jit and splits P into the model's
  parameter shapes; the distance is over the whole pytree either way.
  """
  picks = [
    np.flatnonzero((CASES["n"] == 8) & np.isclose(CASES["tau"], t))[0]
    for t in (0.05, 0.5, 0.9, 1.2)
  ]
  assert len(set(CASES["stepped"][picks].tolist())) == 2  # both outcomes
  for i in picks:
    case = _case(i)
    tau = float(CASES["tau"][i])
    n, p = case["grads"].shape
    tx = optax.chain(
      optax_gaf.gaf(tau, rule="pairwise", num_microbatches=n), optax.sgd(1.0)
    )
    params = jnp.zeros(p, jnp.float32)
    update, state = tx.update(
      jnp.asarray(case["grads"]), tx.init(params), params
    )
    assert bool(optax_gaf.stats(state)["ready"]) == case["stepped"]
    split, _ = _gaf_step(case["grads"], tau, SHAPES)
    np.testing.assert_allclose(update, split, rtol=0, atol=UPDATE_ATOL)


# Live: seed 0 lies in the file's grid (the file must match a fresh run),
# seed 7 does not.
LIVE = [
  (n, tau, seed)
  for n in (2, 5, 8)
  for tau in (0.05, 0.3, 0.7, 1.2)
  for seed in (0, 7)
]


@pytest.mark.parametrize("n,tau,seed", LIVE)
def test_pairwise_matches_live_step_gaf(n, tau, seed):
  """step_GAF run now, not recorded; and the file matches a fresh run."""
  pytest.importorskip("torch")
  pytest.importorskip("gradient_agreement_filtering")
  from benchmarks import reference_cases

  case = reference_cases.run_case(n, tau, seed)
  if reference_cases.is_ambiguous(case, tau, MARGIN):
    pytest.skip(f"a distance within {MARGIN} of tau: a float32 tie")
  _check(case, tau, case["shapes"], f"live N={n}, tau={tau}, seed={seed}")
  stored = np.flatnonzero(
    (CASES["n"] == n) & (CASES["tau"] == tau) & (CASES["seed"] == seed)
  )
  if seed in CASES["seed"]:
    assert len(stored) == 1, "a grid case is missing from the file"
    want = _case(stored[0])
    for key in ("grads", "distance", "delta"):
      np.testing.assert_allclose(case[key], want[key], rtol=1e-6, atol=1e-7)
    assert case["stepped"] == want["stepped"]
