"""Shared test helpers: data, jitted runners, meshes, comparisons.

The float64 oracles live in ``tests/oracle.py``; everything else that more than
one test module uses lives here.
"""

import functools
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gaf
from tests import oracle

D = 8  # simulated CPU devices (tests/conftest.py)


def examples(local: int, ci: int) -> int:
  """Hypothesis's ``max_examples``: ``ci`` under CI, else ``local``.

  For the property tests that compile per example. CI draws derandomized
  examples (tests/conftest.py), the same ones every run; locally hypothesis
  keeps searching with the larger count.
  """
  return ci if os.environ.get("CI") else local


SHAPES = ((3, 4), (5,), (2, 2, 2))  # one-device tests: three leaves
NAMES = ("w", "b", "k")
MESH_SHAPES = ((13,), (3, 5))  # 28 params: neither leaf a multiple of D
MESH_NAMES = ("w", "b")

ORACLES = {
  "sequential": oracle.sequential,
  "pairwise": oracle.pairwise,
  "medoid": oracle.medoid,
}


# --- data


def seed_of(*args):
  """A seed from test parameters, stable across runs (``hash`` of a str is
  salted per process)."""
  return zlib.crc32(repr(args).encode())


def make_microgradients(rng, n, shapes, agreement, flip_prob=0.3):
  """Microgradients around a shared signal; some point the other way.

  Args:
    rng: a NumPy Generator.
    n: the number of microgradients.
    shapes: parameter shapes (one leaf each).
    agreement: in [0, 1]; the weight of the shared signal against noise.
    flip_prob: chance that a microgradient's signal is negated (a conflicting
      one, like a microbatch with noisy labels).

  Returns:
    A list of float32 arrays ``[n, *shape]``.
  """
  leaves = []
  signs = np.where(rng.random(n) < flip_prob, -1.0, 1.0)
  for shape in shapes:
    signal = rng.normal(size=shape)
    noise = rng.normal(size=(n,) + tuple(shape))
    scale = rng.uniform(0.5, 2.0, size=(n,) + (1,) * len(shape))
    x = scale * (
      agreement * signs.reshape((n,) + (1,) * len(shape)) * signal
      + (1 - agreement) * noise
    )
    leaves.append(x.astype(np.float32))
  return leaves


def clear_draw(seed, n, shapes, agreement, is_clear, tries=20, **kw):
  """The first of a few deterministic draws for which ``is_clear(leaves)``.

  Fails the test (never skips it) when none is clear, so a seed that stops
  giving unambiguous data is noticed.
  """
  rng = np.random.default_rng(seed)
  for _ in range(tries):
    leaves = make_microgradients(rng, n, shapes, agreement, **kw)
    if is_clear(leaves):
      return leaves
  pytest.fail(f"no unambiguous draw in {tries} tries from seed {seed}")


def decisions_clear(rule, tau, margin=1e-4):
  """``is_clear`` for :func:`clear_draw`: the oracle's decisions are clear."""

  def is_clear(leaves):
    dist = ORACLES[rule](oracle.flatten(leaves), tau)[2]
    return not oracle.is_ambiguous(dist, tau, margin)

  return is_clear


def pairs_clear(tau, margin=1e-4):
  """``is_clear`` for :func:`clear_draw`: all pairwise distances are clear."""

  def is_clear(leaves):
    dist = oracle.pairwise_distances(oracle.flatten(leaves))
    return not oracle.is_ambiguous(dist, tau, margin)

  return is_clear


def tree(leaves, names=NAMES):
  return dict(zip(names, leaves))


def flat_update(updates, names=NAMES):
  """The update as one float64 vector, leaves in ``names`` order."""
  return np.concatenate(
    [np.ravel(np.asarray(updates[k], np.float64)) for k in names]
  )


def params_like(grads):
  """Zero parameters shaped like one microgradient."""
  return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), grads)


# --- runners


@functools.partial(
  jax.jit, static_argnames=("rule", "n", "granularity", "temperature")
)
def run_gaf(grads, tau, rule="sequential", n=None, granularity="global",
            temperature=None):  # fmt: skip
  """One jitted ``gaf`` step from a fresh state (tau traced: one compile per
  rule and shape)."""
  tx = optax_gaf.gaf(
    tau,
    rule=rule,
    num_microbatches=n,
    granularity=granularity,
    temperature=temperature,
  )
  params = jax.tree.map(lambda x: x[0], grads)
  return tx.update(grads, tx.init(params), params)


# --- devices


@functools.cache
def mesh(shape=(D,), names=("data",)):
  return jax.make_mesh(shape, names)


def shard(grads, spec=None, on=None):
  """``grads`` sharded by ``spec`` (default: the leading axis over "data")
  on the mesh ``on``."""
  spec = P("data") if spec is None else spec
  return jax.device_put(grads, NamedSharding(on or mesh(), spec))


def shard_map_update(agg, per_device=False, on=None, axis="data"):
  """Jitted ``agg.update`` inside ``jax.shard_map`` over ``axis``.

  Takes global microgradients (sharded on their leading axis) and a
  replicated state. With ``per_device`` every device's own copy of the output
  comes back, stacked ``[D, ...]``, for :func:`assert_same_on_every_device`.
  """

  def step(grads, state, *rest):
    out = agg.update(grads, state, *rest)
    if per_device:
      out = jax.tree.map(lambda x: x[None], out)
    return out

  spec = P(axis) if per_device else P()
  return jax.jit(
    jax.shard_map(
      step,
      mesh=on or mesh(),
      in_specs=(P(axis), P()),
      out_specs=(spec, spec),
    )
  )


def fixed_microgradients(n, seed=0):
  """Leaves of MESH_SHAPES: agreeing and conflicting microgradients, a NaN one
  (index 2) and a zero one (index n - 3)."""
  rng = np.random.default_rng(seed)
  leaves = make_microgradients(rng, n, MESH_SHAPES, agreement=0.7)
  leaves[1][2] = np.nan  # on device 1 (n_local 2) or 2 (n_local 1)
  for x in leaves:
    x[n - 3] = 0.0  # a zero microgradient on the last devices
  return leaves


def gathers_of_all_microgradients(hlo, n):
  """The all-gathers of compiled HLO text that gather all N microgradients."""
  return [
    line
    for line in hlo.splitlines()
    if " all-gather(" in line and f"[{n}," in line.split("all-gather(")[0]
  ]


# --- comparisons


def assert_bitwise_equal(got, want):
  """Every leaf of ``got`` has the bytes of ``want``'s (NaN equals NaN)."""
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(got_leaves, want_leaves):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype and g.shape == w.shape, (g, w)
    assert g.tobytes() == w.tobytes(), (g, w)


def assert_same_on_every_device(stacked, d=D):
  """Leaves ``[D, ...]`` (one copy per device) hold the same bits."""
  for x in jax.tree.leaves(stacked):
    x = np.asarray(x)
    assert x.shape[0] == d
    for i in range(1, d):
      assert x[i].tobytes() == x[0].tobytes(), (i, x[i], x[0])


def first_device(stacked):
  """Device 0's copy of per-device outputs ``[D, ...]`` (as NumPy arrays)."""
  return jax.tree.map(lambda x: np.asarray(x)[0], stacked)


def assert_close(got, want, rtol=2e-5, atol=2e-6):
  """Pytrees equal: exactly for bool/int leaves, to float32 rounding else."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    assert g.shape == w.shape, (g.shape, w.shape)
    if g.dtype == bool or np.issubdtype(g.dtype, np.integer):
      np.testing.assert_array_equal(g, w)
    else:
      np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def assert_matches_oracle(updates, state, leaves, rule, tau, names=NAMES,
                          dist_atol=2e-5, rtol=2e-5, atol=2e-6):  # fmt: skip
  """``gaf``'s update and GAFState against the rule's float64 oracle."""
  want, accepted, dist = ORACLES[rule](oracle.flatten(leaves), tau)
  np.testing.assert_array_equal(state.accepted, accepted)
  np.testing.assert_allclose(state.cosine_distance, dist, atol=dist_atol)
  assert bool(state.ready) == (want is not None)
  assert int(state.num_accepted) == accepted.sum()
  got = flat_update(updates, names)
  if want is None:
    np.testing.assert_array_equal(got, 0.0)
  else:
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# --- a custom rule


def near_mean(gram, usable, tau):
  """The example rule of ``optax_gaf/rules.py``'s docstring (float64 oracle:
  ``oracle.near_mean``)."""
  u = usable.astype(gram.dtype)
  dist = optax_gaf.rules.cosine_distance(
    gram @ u, jnp.diagonal(gram), u @ gram @ u
  )
  dist = jnp.where(usable, dist, jnp.nan)
  accepted = usable & (dist <= tau)
  ready = jnp.sum(accepted) >= 2
  weights = jnp.where(ready, accepted / jnp.maximum(accepted.sum(), 1), 0)
  return optax_gaf.RuleOutput(weights, ready, accepted, dist)
