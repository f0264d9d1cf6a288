"""The collective placements across 8 simulated CPU devices: shard_map and
pmap with ``all_to_all`` or ``all_gather``.

Every aggregator spread over devices must give what one device gives on the
device-major concatenation of all microgradients: the same decisions (exactly)
and the same updates and statistics (to float32 rounding, since the Gram
matrix is summed chunk by chunk), bitwise identical on every device. Plain
jit over a mesh: tests/unit/test_mesh.py; resolve_placement:
tests/unit/test_placement.py.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optax.experimental import aggregating

import optax_gaf
from tests import helpers
from tests import oracle
from tests.helpers import MESH_NAMES
from tests.helpers import MESH_SHAPES
from tests.helpers import D

TAU = 0.5


def _tree(leaves):
  return helpers.tree(leaves, MESH_NAMES)


def _assert_matches_oracle(updates, state, leaves, rule):
  helpers.assert_matches_oracle(
    updates, state, leaves, rule, TAU, MESH_NAMES, 1e-5, 1e-5, 1e-6
  )


@functools.cache
def _gaf_step(n, rule, collective, per_device=False):
  agg = optax_gaf.gaf(
    TAU, rule=rule, num_microbatches=n, axis_name="data", collective=collective
  )
  return agg, helpers.shard_map_update(agg, per_device)


def _run_shard_map(leaves, rule, collective, per_device=False):
  agg, fn = _gaf_step(leaves[0].shape[0], rule, collective, per_device)
  return fn(helpers.shard(_tree(leaves)), agg.init(None))


# --- gaf across devices


@pytest.mark.parametrize("n_local", [1, 2])
@pytest.mark.parametrize("collective", ["all_to_all", "all_gather"])
@pytest.mark.parametrize("rule", ["sequential", "pairwise"])
def test_shard_map_matches_single_device_and_oracle(n_local, collective, rule):
  n = D * n_local
  leaves = helpers.fixed_microgradients(n)
  flat = oracle.flatten(leaves)
  assert not oracle.is_ambiguous(helpers.ORACLES[rule](flat, TAU)[2], TAU)
  updates, state = _run_shard_map(leaves, rule, collective)
  _assert_matches_oracle(updates, state, leaves, rule)
  one_updates, one_state = helpers.run_gaf(_tree(leaves), TAU, rule, n)
  for field in ("accepted", "ready", "num_accepted", "skipped_steps"):
    np.testing.assert_array_equal(
      getattr(state, field), getattr(one_state, field)
    )
  np.testing.assert_allclose(
    state.gradient_diversity, one_state.gradient_diversity, rtol=1e-5
  )
  helpers.assert_close(updates, one_updates, rtol=1e-5, atol=1e-7)
  assert not state.accepted[2] and np.isnan(state.cosine_distance[2])  # NaN
  assert np.isnan(state.cosine_distance[n - 3])  # so is zero


@pytest.mark.parametrize("collective", ["all_to_all", "all_gather"])
def test_every_device_holds_bitwise_the_same_result(collective):
  leaves = helpers.fixed_microgradients(2 * D, seed=1)
  out = _run_shard_map(leaves, "sequential", collective, per_device=True)
  helpers.assert_same_on_every_device(out)
  assert bool(helpers.first_device(out)[1].ready)


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
  seed=st.integers(0, 2**31 - 1),
  agreement=st.floats(0.2, 0.9),
  rule=st.sampled_from(["sequential", "pairwise"]),
)
def test_property_all_to_all_equals_float64_oracle(seed, agreement, rule):
  rng = np.random.default_rng(seed)
  leaves = helpers.make_microgradients(rng, 2 * D, MESH_SHAPES, agreement)
  dist = helpers.ORACLES[rule](oracle.flatten(leaves), TAU)[2]
  hypothesis.assume(not oracle.is_ambiguous(dist, TAU))
  updates, state = _run_shard_map(leaves, rule, "all_to_all")
  _assert_matches_oracle(updates, state, leaves, rule)


def test_no_agreement_step_is_skipped_on_every_device():
  # Pairwise orthogonal microgradients: nothing agrees at tau=0.5.
  leaves = [np.eye(D, 13, dtype=np.float32), np.zeros((D, 3, 5), np.float32)]
  updates, state = _run_shard_map(
    leaves, "sequential", "all_to_all", per_device=True
  )
  assert not np.asarray(state.ready).any()
  np.testing.assert_array_equal(state.skipped_steps, 1)
  for x in jax.tree.leaves(updates):
    np.testing.assert_array_equal(x, 0.0)


@pytest.mark.parametrize("collective", ["all_to_all", "all_gather"])
def test_pmap(collective):
  n_local = 2
  leaves = helpers.fixed_microgradients(D * n_local, seed=2)
  agg = optax_gaf.gaf(
    TAU, num_microbatches=D * n_local, axis_name="i", collective=collective
  )
  local = jax.tree.map(
    lambda x: x.reshape((D, n_local) + x.shape[1:]), _tree(leaves)
  )
  out = jax.pmap(agg.update, axis_name="i", in_axes=(0, None))(
    local, agg.init(None)
  )
  helpers.assert_same_on_every_device(out)
  first = helpers.first_device(out)
  _assert_matches_oracle(*first, leaves, "sequential")


def test_tuple_axis_name_is_device_major():
  mesh = helpers.mesh((4, 2), ("x", "y"))
  leaves = helpers.fixed_microgradients(D, seed=3)
  agg = optax_gaf.gaf(TAU, num_microbatches=D, axis_name=("x", "y"))
  fn = helpers.shard_map_update(agg, on=mesh, axis=("x", "y"))
  grads = helpers.shard(_tree(leaves), P(("x", "y")), on=mesh)
  _assert_matches_oracle(*fn(grads, agg.init(None)), leaves, "sequential")


def test_inside_an_optimizer_with_inner_adam():
  """aggregating.process around gaf, state replicated with out_specs=P()."""
  params = {"w": jnp.ones(13), "b": jnp.ones((3, 5))}

  def make_step(axis_name):
    tx = aggregating.process(
      optax.identity(),
      optax_gaf.gaf(TAU, num_microbatches=2 * D, axis_name=axis_name),
      optax.adam(0.1),
    )

    def step(grads, opt_state, params):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return tx.init(params), step

  opt_state, step = make_step("data")
  fn = jax.jit(
    jax.shard_map(
      step,
      mesh=helpers.mesh(),
      in_specs=(P("data"), P(), P()),
      out_specs=(P(), P()),
    )
  )
  leaves = helpers.fixed_microgradients(2 * D, seed=4)
  new_params, new_state = fn(helpers.shard(_tree(leaves)), opt_state, params)
  ref_state, ref_step = make_step(None)
  ref_params, _ = ref_step(_tree(leaves), ref_state, params)
  helpers.assert_close(new_params, ref_params, rtol=1e-5, atol=0)
  assert optax_gaf.stats(new_state)["count"] == 1
  assert bool(optax_gaf.stats(new_state)["ready"])


def test_per_leaf_gram_and_weights_across_devices():
  """What per-leaf aggregators use: [L, N, N] Gram, [L, N] weights."""
  leaves = helpers.fixed_microgradients(2 * D, seed=5)
  leaves = [np.nan_to_num(x) for x in leaves]
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(2, 2 * D)).astype(np.float32)
  usable = np.ones((2, 2 * D), bool)
  usable[1, 3] = False

  def fn(*local):
    place = optax_gaf.placement.resolve_placement(list(local), "data")
    assert isinstance(place, optax_gaf.placement.AllToAllPlacement)
    gram = place.gram(per_leaf=True)
    return gram, place.combine(weights, usable)

  fn = jax.jit(
    jax.shard_map(fn, mesh=helpers.mesh(), in_specs=P("data"), out_specs=P())
  )
  gram, combined = fn(*[helpers.shard(x) for x in leaves])
  for i, x in enumerate(leaves):
    flat = x.reshape(2 * D, -1).astype(np.float64)
    np.testing.assert_allclose(gram[i], flat @ flat.T, rtol=1e-5, atol=1e-5)
    want = (weights[i] * usable[i]) @ flat
    np.testing.assert_allclose(
      combined[i].reshape(-1), want, rtol=1e-5, atol=1e-5
    )
    assert combined[i].shape == x.shape[1:]


def test_all_to_all_plan_moves_each_leaf_once():
  """gram and combine share one all_to_all per leaf (XLA CSE); no gather of
  all N."""
  agg, fn = _gaf_step(2 * D, "sequential", "all_to_all")
  spec = NamedSharding(helpers.mesh(), P("data"))
  grads = _tree(
    [
      jax.ShapeDtypeStruct((2 * D,) + s, jnp.float32, sharding=spec)
      for s in MESH_SHAPES
    ]
  )
  hlo = fn.lower(grads, agg.init(None)).compile().as_text()
  ops = [line for line in hlo.splitlines() if " all-to-all(" in line]
  assert 1 <= len(ops) <= len(MESH_SHAPES), ops
  assert not helpers.gathers_of_all_microgradients(hlo, 2 * D)


def test_lax_all_to_all_layout_is_device_major():
  """The layout the placement relies on: row d * n_local + i of device c's
  chunk is chunk c of device d's i-th microgradient."""
  x = np.arange(2 * D * D * 3, dtype=np.float32).reshape(2 * D, D * 3)

  def fn(x):
    y = lax.all_to_all(x.reshape(2, D, 3), "data", 1, 0, tiled=True)
    return y.reshape(1, 2 * D, 3)

  out = jax.jit(
    jax.shard_map(
      fn, mesh=helpers.mesh(), in_specs=P("data"), out_specs=P("data")
    )
  )(helpers.shard(x))
  out = np.asarray(out)
  for c in range(D):
    np.testing.assert_array_equal(out[c], x[:, 3 * c : 3 * c + 3])


# --- every rule and aggregator across devices

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
    optax_gaf.AdaptiveTau(k=0.5, history=3 * n, cap=1.0),
    num_microbatches=n,
    **kw,
  ),
  "auto_tau": lambda n, **kw: optax_gaf.gaf(
    optax_gaf.AutoTau(min_count=2), num_microbatches=n, **kw
  ),
  "auto_tau_per_leaf": lambda n, **kw: optax_gaf.gaf(
    optax_gaf.AutoTau(min_count=2),
    granularity="per_leaf",
    num_microbatches=n,
    **kw,
  ),
  "and_mask": lambda n, **kw: optax_gaf.and_mask(
    0.5, scale_grad_inverse_sparsity=True, **kw
  ),
  "adacons": lambda n, **kw: optax_gaf.adacons(0.9, num_microbatches=n, **kw),
}
# Cases whose state carries over (momentum, tau statistics) run two steps.
TWO_STEPS = ("adaptive_tau", "auto_tau", "auto_tau_per_leaf", "adacons")


@functools.cache
def _aggregators(case, n, collective):
  """(single-device aggregator, its jitted update, the same on 'data')."""
  single = CASES[case](n)
  multi = CASES[case](n, axis_name="data", collective=collective)
  return single, jax.jit(single.update), multi


def _params():
  return {"w": jnp.zeros(MESH_SHAPES[0]), "b": jnp.zeros(MESH_SHAPES[1])}


@pytest.mark.parametrize(
  "case, n_local", [(c, 2) for c in sorted(CASES)] + [("medoid", 1)]
)
def test_shard_map_equals_single_device(case, n_local):
  n = D * n_local
  single, single_update, multi = _aggregators(case, n, "all_to_all")
  update = helpers.shard_map_update(multi, per_device=True)
  s_single = single.init(_params())
  s_multi = multi.init(_params())
  rng = np.random.default_rng(helpers.seed_of(case, n_local))
  for _ in range(2 if case in TWO_STEPS else 1):
    leaves = helpers.make_microgradients(rng, n, MESH_SHAPES, 0.5)
    grads = _tree(leaves)
    want = single_update(grads, s_single)
    got = update(helpers.shard(grads), s_multi)
    helpers.assert_same_on_every_device(got)
    got = helpers.first_device(got)
    helpers.assert_close(got, want)
    (_, s_single), (_, s_multi) = want, got


def _draw(n, seed):
  """Microgradients on one device, and the same sharded over the mesh."""
  leaves = helpers.make_microgradients(
    np.random.default_rng(seed), n, MESH_SHAPES, 0.5
  )
  grads = _tree(leaves)
  return grads, helpers.shard(grads)


@pytest.mark.parametrize("case", ["soft_per_leaf", "and_mask"])
def test_all_gather_collective_equals_single_device(case):
  single, single_update, multi = _aggregators(case, D, "all_gather")
  grads, sharded = _draw(D, seed=5)
  want = single_update(grads, single.init(_params()))
  got = helpers.shard_map_update(multi)(sharded, multi.init(_params()))
  helpers.assert_close(got, want)


# --- issue 19: zero-size leaves across devices


@pytest.mark.parametrize("collective", ["all_to_all", "all_gather"])
@pytest.mark.parametrize("scale", [1.0, 1e20], ids=["common", "rescaled"])
def test_zero_size_leaf_in_shard_map(collective, scale):
  n = 2 * D
  leaves = helpers.make_microgradients(
    np.random.default_rng(helpers.seed_of("empty", scale)), n, MESH_SHAPES, 0.9
  )
  leaves = [x * np.float32(scale) for x in leaves]
  grads = {"w": leaves[0], "b": leaves[1], "e": np.zeros((n, 0), np.float32)}
  agg = optax_gaf.gaf(
    TAU, num_microbatches=n, axis_name="data", collective=collective
  )
  updates, state = helpers.shard_map_update(agg)(
    helpers.shard(grads), agg.init(None)
  )
  assert updates["e"].shape == (0,)
  want, accepted, _ = oracle.sequential(oracle.flatten(leaves), TAU)
  np.testing.assert_array_equal(state.accepted, accepted)
  got = helpers.flat_update(updates, MESH_NAMES)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)
