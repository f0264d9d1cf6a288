"""Placement: where the microgradients are, read from the context.

``resolve_placement`` picks LocalPlacement, AllToAllPlacement,
AllGatherPlacement or MeshPlacement from the axis name, the collective and the
leaves' shardings, and refuses what it cannot place. The placements
themselves: tests/unit/test_collectives.py (shard_map, pmap) and
tests/unit/test_mesh.py (plain jit over a mesh).
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import optax_gaf
from tests import helpers
from tests.helpers import MESH_NAMES
from tests.helpers import D

TAU = 0.5


def _tree(leaves):
  return helpers.tree(leaves, MESH_NAMES)


# --- resolve_placement


def _placement_type(leaves, axis_name=None, collective="all_to_all"):
  return type(
    optax_gaf.placement.resolve_placement(leaves, axis_name, collective)
  )


def test_resolve_placement_without_axis_is_local():
  assert (
    _placement_type([jnp.ones((4, 2))]) is optax_gaf.placement.LocalPlacement
  )


@pytest.mark.parametrize(
  "collective, want",
  [
    ("all_to_all", optax_gaf.placement.AllToAllPlacement),
    ("all_gather", optax_gaf.placement.AllGatherPlacement),
  ],
)
def test_resolve_placement_in_shard_map_and_pmap(collective, want):
  found = []

  def fn(x):
    found.append(_placement_type([x], "data", collective))
    return x

  jax.shard_map(
    fn, mesh=helpers.mesh(), in_specs=P("data"), out_specs=P("data")
  )(helpers.shard(jnp.ones((D, 2))))
  jax.pmap(fn, axis_name="data")(jnp.ones((D, 1, 2)))
  assert found == [want, want]


def test_resolve_placement_under_plain_jit():
  explicit = helpers.mesh()  # Explicit axes by default
  found = {}

  @jax.jit
  def fn(x):
    found["explicit"] = _placement_type([x])
    return x

  fn(helpers.shard(jnp.ones((D, 2)), on=explicit))
  auto = jax.make_mesh(
    (D,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )

  @jax.jit
  def named(x):
    found["named"] = _placement_type([x], "data")
    found["named_gather"] = _placement_type([x], "data", "all_gather")
    return x

  with jax.set_mesh(auto):
    named(helpers.shard(jnp.ones((D, 2)), on=auto))
  assert found == {
    "explicit": optax_gaf.placement.MeshPlacement,
    "named": optax_gaf.placement.MeshPlacement,
    "named_gather": optax_gaf.placement.LocalPlacement,
  }


def test_resolve_placement_with_an_unbound_axis_says_what_to_do():
  with pytest.raises(ValueError, match="not bound.*shard_map.*pmap.*set_mesh"):
    optax_gaf.placement.resolve_placement([jnp.ones((4, 2))], "data")
  agg = optax_gaf.gaf(TAU, axis_name="data")
  with pytest.raises(ValueError, match="not bound.*shard_map.*pmap"):
    agg.update(jnp.ones((4, 3)), agg.init(None))


def test_resolve_placement_checks_its_arguments():
  with pytest.raises(ValueError, match="collective"):
    optax_gaf.placement.resolve_placement([jnp.ones((4, 2))], None, "ring")
  with pytest.warns(DeprecationWarning, match="optax_gaf.placement"):
    old = optax_gaf.resolve_placement
  assert old is optax_gaf.placement.resolve_placement


# --- arguments and a vmap axis


def test_bad_arguments():
  with pytest.raises(ValueError, match="collective"):
    optax_gaf.gaf(TAU, axis_name="data", collective="ring")
  with pytest.raises(TypeError, match="axis_name"):
    optax_gaf.gaf(TAU, axis_name=["data"])
  agg = optax_gaf.gaf(TAU, num_microbatches=2 * D, axis_name="data")
  leaves = helpers.fixed_microgradients(D)  # n_local 1: N = 8, not 16
  with pytest.raises(ValueError, match="num_microbatches=16.*got 8"):
    helpers.shard_map_update(agg)(helpers.shard(_tree(leaves)), agg.init(None))


@pytest.mark.parametrize(
  "agg",
  [
    optax_gaf.gaf(TAU, axis_name="i"),
    optax_gaf.and_mask(axis_name="i"),
    optax_gaf.adacons(axis_name="i"),
  ],
  ids=["gaf", "and_mask", "adacons"],
)
def test_a_vmap_axis_is_refused_with_what_to_do(agg):
  def step(g):
    return agg.update(g, agg.init(None))[0]

  with pytest.raises(ValueError, match="jax.vmap axis.*axis_name=None"):
    jax.vmap(step, axis_name="i")(jnp.ones((4, 1, 2)))
