"""gaf(axis_name=...) across 8 simulated CPU devices: shard_map and pmap."""

import contextlib
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
from tests import oracle

D = 8
SHAPES = ((13,), (3, 5))  # 28 params: neither leaf is a multiple of D
ORACLES = {"sequential": oracle.sequential, "pairwise": oracle.pairwise}


def _tree(leaves):
  return {"w": leaves[0], "b": leaves[1]}


def _leaves(tree):
  return [tree["w"], tree["b"]]


@functools.cache
def _mesh():
  return jax.make_mesh((D,), ("data",))


@functools.cache
def _shard_map_step(n, rule, collective, per_device=False):
  """Jitted shard_map step: global microgradients in, (updates, state) out.

  With ``per_device`` every device's own copy comes back, stacked ``[D, ...]``.
  """
  mesh = _mesh()
  agg = optax_gaf.gaf(
    0.5, rule=rule, num_microbatches=n, axis_name="data", collective=collective
  )

  def step(grads, state):
    out = agg.update(grads, state)
    if per_device:
      out = jax.tree.map(lambda x: x[None], out)
    return out

  spec = P("data") if per_device else P()
  fn = jax.shard_map(
    step, mesh=mesh, in_specs=(P("data"), P()), out_specs=(spec, spec)
  )
  return agg, jax.jit(fn)


def _run_shard_map(leaves, rule, collective, per_device=False):
  n = leaves[0].shape[0]
  agg, fn = _shard_map_step(n, rule, collective, per_device)
  grads = jax.device_put(_tree(leaves), NamedSharding(_mesh(), P("data")))
  return fn(grads, agg.init(None))


def _single_device(leaves, rule):
  agg = optax_gaf.gaf(0.5, rule=rule, num_microbatches=leaves[0].shape[0])
  return agg.update(_tree(leaves), agg.init(None))


def _assert_matches_oracle(updates, state, leaves, rule, tau=0.5):
  flat = oracle.flatten(leaves)
  want, accepted, dist = ORACLES[rule](flat, tau)
  np.testing.assert_array_equal(state.accepted, accepted)
  np.testing.assert_allclose(state.cosine_distance, dist, atol=1e-5)
  got = oracle.flatten([x[None] for x in _leaves(updates)])[0]
  if want is None:
    assert not state.ready
    np.testing.assert_array_equal(got, 0.0)
  else:
    assert state.ready
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _fixed_microgradients(n, seed=0):
  """Agreeing and conflicting ones, plus a NaN one and a zero one."""
  rng = np.random.default_rng(seed)
  leaves = oracle.make_microgradients(rng, n, SHAPES, agreement=0.7)
  leaves[1][2] = np.nan  # on device 1 (n_local 2) or 2 (n_local 1)
  for x in leaves:
    x[n - 3] = 0.0  # a zero microgradient on the last devices
  return leaves


@pytest.mark.parametrize("n_local", [1, 2])
@pytest.mark.parametrize("collective", ["all_to_all", "all_gather"])
@pytest.mark.parametrize("rule", ["sequential", "pairwise"])
def test_shard_map_matches_single_device_and_oracle(n_local, collective, rule):
  leaves = _fixed_microgradients(D * n_local)
  flat = oracle.flatten(leaves)
  assert not oracle.is_ambiguous(ORACLES[rule](flat, 0.5)[2], 0.5)
  updates, state = _run_shard_map(leaves, rule, collective)
  _assert_matches_oracle(updates, state, leaves, rule)
  one_updates, one_state = _single_device(leaves, rule)
  for field in ("accepted", "ready", "num_accepted", "skipped_steps"):
    np.testing.assert_array_equal(
      getattr(state, field), getattr(one_state, field)
    )
  np.testing.assert_allclose(
    state.gradient_diversity, one_state.gradient_diversity, rtol=1e-5
  )
  chex_close = functools.partial(
    np.testing.assert_allclose, rtol=1e-5, atol=1e-7
  )
  jax.tree.map(chex_close, updates, one_updates)
  assert not state.accepted[2] and np.isnan(state.cosine_distance[2])  # NaN
  assert np.isnan(state.cosine_distance[D * n_local - 3])  # so is zero


@pytest.mark.parametrize("collective", ["all_to_all", "all_gather"])
def test_every_device_holds_bitwise_the_same_result(collective):
  leaves = _fixed_microgradients(2 * D, seed=1)
  updates, state = _run_shard_map(
    leaves, "sequential", collective, per_device=True
  )
  _assert_same_bits_on_every_device((updates, state))


def _assert_same_bits_on_every_device(tree):
  for x in jax.tree.leaves(tree):
    x = np.asarray(x)
    assert x.shape[0] == D
    for d in range(1, D):
      assert x[d].tobytes() == x[0].tobytes(), (d, x[d], x[0])


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
  seed=st.integers(0, 2**31 - 1),
  agreement=st.floats(0.2, 0.9),
  rule=st.sampled_from(["sequential", "pairwise"]),
)
def test_property_all_to_all_equals_float64_oracle(seed, agreement, rule):
  rng = np.random.default_rng(seed)
  leaves = oracle.make_microgradients(rng, 2 * D, SHAPES, agreement)
  hypothesis.assume(
    not oracle.is_ambiguous(ORACLES[rule](oracle.flatten(leaves), 0.5)[2], 0.5)
  )
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
  leaves = _fixed_microgradients(D * n_local, seed=2)
  agg = optax_gaf.gaf(
    0.5, num_microbatches=D * n_local, axis_name="i", collective=collective
  )
  state = agg.init(None)
  local = jax.tree.map(
    lambda x: x.reshape((D, n_local) + x.shape[1:]), _tree(leaves)
  )
  updates, new_state = jax.pmap(agg.update, axis_name="i", in_axes=(0, None))(
    local, state
  )
  _assert_same_bits_on_every_device((updates, new_state))
  first = jax.tree.map(lambda x: x[0], (updates, new_state))
  _assert_matches_oracle(*first, leaves, "sequential")


def test_tuple_axis_name_is_device_major():
  mesh = jax.make_mesh((4, 2), ("x", "y"))
  leaves = _fixed_microgradients(D, seed=3)
  agg = optax_gaf.gaf(0.5, num_microbatches=D, axis_name=("x", "y"))
  fn = jax.jit(
    jax.shard_map(
      agg.update, mesh=mesh, in_specs=(P(("x", "y")), P()), out_specs=(P(), P())
    )
  )
  grads = jax.device_put(_tree(leaves), NamedSharding(mesh, P(("x", "y"))))
  _assert_matches_oracle(*fn(grads, agg.init(None)), leaves, "sequential")


def test_inside_an_optimizer_with_inner_adam():
  """aggregating.process around gaf, state replicated with out_specs=P()."""
  mesh = _mesh()
  params = {"w": jnp.ones(13), "b": jnp.ones((3, 5))}

  def make_step(axis_name):
    tx = aggregating.process(
      optax.identity(),
      optax_gaf.gaf(0.5, num_microbatches=2 * D, axis_name=axis_name),
      optax.adam(0.1),
    )

    def step(grads, opt_state, params):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    return tx.init(params), step

  opt_state, step = make_step("data")
  fn = jax.jit(
    jax.shard_map(
      step, mesh=mesh, in_specs=(P("data"), P(), P()), out_specs=(P(), P())
    )
  )
  leaves = _fixed_microgradients(2 * D, seed=4)
  grads = jax.device_put(_tree(leaves), NamedSharding(mesh, P("data")))
  new_params, new_state = fn(grads, opt_state, params)
  ref_state, ref_step = make_step(None)
  ref_params, _ = ref_step(_tree(leaves), ref_state, params)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5),
    new_params,
    ref_params,
  )
  assert optax_gaf.stats(new_state)["count"] == 1


def test_per_leaf_gram_and_weights_across_devices():
  """What per-leaf aggregators use: [L, N, N] Gram, [L, N] weights."""
  leaves = _fixed_microgradients(2 * D, seed=5)
  leaves = [np.nan_to_num(x) for x in leaves]
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(2, 2 * D)).astype(np.float32)
  usable = np.ones((2, 2 * D), bool)
  usable[1, 3] = False
  place = optax_gaf.make_placement("data")

  def fn(*local):
    gram = place.gram(list(local), per_leaf=True)
    return gram, place.combine(list(local), weights, usable)

  fn = jax.jit(
    jax.shard_map(fn, mesh=_mesh(), in_specs=P("data"), out_specs=P())
  )
  gram, combined = fn(
    *[jax.device_put(x, NamedSharding(_mesh(), P("data"))) for x in leaves]
  )
  for l, x in enumerate(leaves):
    flat = x.reshape(2 * D, -1).astype(np.float64)
    np.testing.assert_allclose(gram[l], flat @ flat.T, rtol=1e-5, atol=1e-5)
    want = (weights[l] * usable[l]) @ flat
    np.testing.assert_allclose(
      combined[l].reshape(-1), want, rtol=1e-5, atol=1e-5
    )
    assert combined[l].shape == x.shape[1:]


def _compiled_hlo(collective):
  agg, fn = _shard_map_step(2 * D, "sequential", collective)
  spec = NamedSharding(_mesh(), P("data"))
  args = (
    _tree(
      [
        jax.ShapeDtypeStruct((2 * D,) + s, jnp.float32, sharding=spec)
        for s in SHAPES
      ]
    ),
    agg.init(None),
  )
  return fn.lower(*args).compile().as_text()


def test_all_to_all_plan_moves_each_leaf_once():
  """gram and combine share one all_to_all per leaf (XLA CSE), no gather of N."""
  hlo = _compiled_hlo("all_to_all")
  ops = [line for line in hlo.splitlines() if " all-to-all(" in line]
  assert 1 <= len(ops) <= len(SHAPES), ops
  assert not _gathers_of_all_microgradients(hlo, 2 * D)


def test_unbound_axis_name_says_what_to_do():
  agg = optax_gaf.gaf(0.5, axis_name="data")
  with pytest.raises(ValueError, match="not bound.*shard_map.*pmap"):
    agg.update(jnp.ones((4, 3)), agg.init(None))


def test_bad_arguments():
  with pytest.raises(ValueError, match="collective"):
    optax_gaf.gaf(0.5, axis_name="data", collective="ring")
  with pytest.raises(TypeError, match="axis_name"):
    optax_gaf.gaf(0.5, axis_name=["data"])
  with pytest.raises(ValueError, match="num_microbatches"):
    agg, fn = _shard_map_step(2 * D, "sequential", "all_to_all")
    leaves = _fixed_microgradients(D)  # n_local 1: N = 8, not 16
    fn(
      jax.device_put(_tree(leaves), NamedSharding(_mesh(), P("data"))),
      agg.init(None),
    )


def test_lax_all_to_all_layout_is_device_major():
  """The layout the placement relies on: row d * n_local + i of device c's
  chunk is chunk c of device d's i-th microgradient."""
  x = np.arange(2 * D * D * 3, dtype=np.float32).reshape(2 * D, D * 3)

  def fn(x):
    y = lax.all_to_all(x.reshape(2, D, 3), "data", 1, 0, tiled=True)
    return y.reshape(1, 2 * D, 3)

  out = jax.jit(
    jax.shard_map(fn, mesh=_mesh(), in_specs=P("data"), out_specs=P("data"))
  )(jax.device_put(x, NamedSharding(_mesh(), P("data"))))
  out = np.asarray(out)
  for c in range(D):
    np.testing.assert_array_equal(out[c], x[:, 3 * c : 3 * c + 3])


def _gathers_of_all_microgradients(hlo, n):
  return [
    line
    for line in hlo.splitlines()
    if " all-gather(" in line and f"[{n}," in line.split("all-gather(")[0]
  ]


@pytest.mark.parametrize(
  "axis_type, axis_name, set_mesh",
  [
    ("Auto", "data", True),  # plain jit, axis named, jax.set_mesh
    ("Explicit", None, False),  # sharding read from the leaves' types
    ("Explicit", "data", True),
  ],
)
def test_plain_jit_takes_the_all_to_all_plan(axis_type, axis_name, set_mesh):
  n = 2 * D
  mesh = jax.make_mesh(
    (D,), ("data",), axis_types=(getattr(jax.sharding.AxisType, axis_type),)
  )
  leaves = _fixed_microgradients(n, seed=6)
  agg = optax_gaf.gaf(0.5, num_microbatches=n, axis_name=axis_name)
  ctx = jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext()
  with ctx:
    grads = jax.device_put(_tree(leaves), NamedSharding(mesh, P("data")))
    fn = jax.jit(agg.update)
    hlo = fn.lower(grads, agg.init(None)).compile().as_text()
    updates, state = fn(grads, agg.init(None))
  _assert_matches_oracle(updates, state, leaves, "sequential")
  assert " all-to-all(" in hlo
  assert not _gathers_of_all_microgradients(hlo, n)


def test_plain_jit_explicit_with_an_unsharded_leaf():
  """One leaf's microbatch axis sharded, the other replicated: still exact."""
  n = 2 * D
  mesh = jax.make_mesh((D,), ("data",))  # Explicit axes by default
  leaves = _fixed_microgradients(n, seed=7)
  agg = optax_gaf.gaf(0.5, num_microbatches=n)
  grads = _tree(
    [
      jax.device_put(leaves[0], NamedSharding(mesh, P("data"))),
      jax.device_put(leaves[1], NamedSharding(mesh, P())),
    ]
  )
  fn = jax.jit(agg.update)
  hlo = fn.lower(grads, agg.init(None)).compile().as_text()
  _assert_matches_oracle(*fn(grads, agg.init(None)), leaves, "sequential")
  assert not _gathers_of_all_microgradients(hlo, n)


def test_plain_jit_explicit_leaves_sharded_over_different_axes():
  mesh = jax.make_mesh((4, 2), ("x", "y"))
  leaves = _fixed_microgradients(D, seed=8)
  grads = _tree(
    [
      jax.device_put(leaves[0], NamedSharding(mesh, P("x"))),
      jax.device_put(leaves[1], NamedSharding(mesh, P("y"))),
    ]
  )
  agg = optax_gaf.gaf(0.5)
  with pytest.raises(ValueError, match="different mesh axes"):
    jax.jit(agg.update)(grads, agg.init(None))
