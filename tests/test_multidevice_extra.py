"""Every rule and aggregator of issue 6 across 8 simulated CPU devices.

shard_map over the 8 devices must give what one device gives on the
device-major concatenation of all microgradients: the same decisions (exactly)
and the same updates and statistics (to float32 rounding, since the Gram
matrix is summed chunk by chunk).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gaf
from tests import oracle

D = 8
SHAPES = ((13,), (3, 5))  # neither leaf is a multiple of D

CASES = {
  "medoid": lambda n, **kw: optax_gaf.gaf(
    0.8, rule="medoid", num_microbatches=n, **kw
  ),
  "soft": lambda n, **kw: optax_gaf.gaf(
    0.8, rule="soft", temperature=0.1, num_microbatches=n, **kw
  ),
  "sequential_per_leaf": lambda n, **kw: optax_gaf.gaf(
    0.8, granularity="per_leaf", num_microbatches=n, **kw
  ),
  "pairwise_per_leaf": lambda n, **kw: optax_gaf.gaf(
    0.8, rule="pairwise", granularity="per_leaf", num_microbatches=n, **kw
  ),
  "medoid_per_leaf": lambda n, **kw: optax_gaf.gaf(
    0.8, rule="medoid", granularity="per_leaf", num_microbatches=n, **kw
  ),
  "soft_per_leaf": lambda n, **kw: optax_gaf.gaf(
    0.8, rule="soft", granularity="per_leaf", num_microbatches=n, **kw
  ),
  "adaptive_tau": lambda n, **kw: optax_gaf.gaf(
    1.0,
    num_microbatches=n,
    adaptive_tau=optax_gaf.AdaptiveTau(k=0.5, history=3 * n),
    **kw,
  ),
  "and_mask": lambda n, **kw: optax_gaf.and_mask(
    0.5, scale_grad_inverse_sparsity=True, **kw
  ),
  "adacons": lambda n, **kw: optax_gaf.adacons(0.9, num_microbatches=n, **kw),
}
# Cases whose state carries over (momentum, tau history) run two steps.
TWO_STEPS = ("adaptive_tau", "adacons")


@functools.cache
def _aggregators(case, n, collective):
  """(single-device aggregator, its jitted update, the same on 'data')."""
  single = CASES[case](n)
  multi = CASES[case](n, axis_name="data", collective=collective)
  return single, jax.jit(single.update), multi


@functools.cache
def _mesh():
  return jax.make_mesh((D,), ("data",))


def _params():
  return {"w": jnp.zeros(SHAPES[0]), "b": jnp.zeros(SHAPES[1])}


def _shard_map_update(agg):
  step = jax.shard_map(
    lambda g, s: agg.update(g, s),
    mesh=_mesh(),
    in_specs=(P("data"), P()),
    out_specs=(P(), P()),
  )
  return jax.jit(step)


def _assert_same(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    if g.dtype == bool or np.issubdtype(g.dtype, np.integer):
      np.testing.assert_array_equal(g, w)
    else:
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
  "case, n_local", [(c, 2) for c in sorted(CASES)] + [("medoid", 1)]
)
def test_shard_map_equals_single_device(case, n_local):
  n = D * n_local
  single, single_update, multi = _aggregators(case, n, "all_to_all")
  update = _shard_map_update(multi)
  s_single = single.init(_params())
  s_multi = multi.init(_params())
  rng = np.random.default_rng(oracle.seed_of(case, n_local))
  for _ in range(2 if case in TWO_STEPS else 1):
    leaves = oracle.make_microgradients(rng, n, SHAPES, 0.5, flip_prob=0.3)
    grads = {"w": leaves[0], "b": leaves[1]}
    want = single_update(grads, s_single)
    sharded = jax.device_put(grads, NamedSharding(_mesh(), P("data")))
    got = update(sharded, s_multi)
    _assert_same(got, want)
    (_, s_single), (_, s_multi) = want, got


def _draw(n, seed):
  """Microgradients on one device, and the same sharded over the mesh."""
  leaves = oracle.make_microgradients(
    np.random.default_rng(seed), n, SHAPES, 0.5
  )
  grads = {"w": leaves[0], "b": leaves[1]}
  return grads, jax.device_put(grads, NamedSharding(_mesh(), P("data")))


@pytest.mark.parametrize("case", ["soft_per_leaf", "and_mask"])
def test_all_gather_collective_equals_single_device(case):
  n = D
  single, single_update, multi = _aggregators(case, n, "all_gather")
  grads, sharded = _draw(n, seed=5)
  want = single_update(grads, single.init(_params()))
  got = _shard_map_update(multi)(sharded, multi.init(_params()))
  _assert_same(got, want)


@pytest.mark.parametrize("case", ["medoid_per_leaf", "and_mask"])
def test_plain_jit_with_sharded_microbatch_axis(case):
  single, single_update, _ = _aggregators(case, D, "all_to_all")
  grads, sharded = _draw(D, seed=9)
  want = single_update(grads, single.init(_params()))
  # Same jitted function, now with the microbatch axis sharded: the mesh path.
  got = single_update(sharded, single.init(_params()))
  _assert_same(got, want)
