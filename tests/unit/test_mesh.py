"""MeshPlacement: plain ``jax.jit`` over a mesh (Explicit axes, or Auto axes
with ``jax.set_mesh`` and an axis name) gives one device's result on the
device-major microgradients, and XLA takes the all-to-all plan (no gather of
all N)."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import optax_gaf
from tests import helpers
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


# The aggregators whose mesh route is checked against one device.
CASES = {
  "medoid_per_leaf": lambda n: optax_gaf.gaf(
    0.8, rule="medoid", granularity="per_leaf", num_microbatches=n
  ),
  "and_mask": lambda n: optax_gaf.and_mask(
    0.5, scale_grad_inverse_sparsity=True
  ),
}


def _params():
  return {"w": jnp.zeros(MESH_SHAPES[0]), "b": jnp.zeros(MESH_SHAPES[1])}


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
  leaves = helpers.fixed_microgradients(n, seed=6)
  agg = optax_gaf.gaf(TAU, num_microbatches=n, axis_name=axis_name)
  ctx = jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext()
  with ctx:
    grads = helpers.shard(_tree(leaves), on=mesh)
    fn = jax.jit(agg.update)
    hlo = fn.lower(grads, agg.init(None)).compile().as_text()
    updates, state = fn(grads, agg.init(None))
  _assert_matches_oracle(updates, state, leaves, "sequential")
  assert " all-to-all(" in hlo
  assert not helpers.gathers_of_all_microgradients(hlo, n)


def test_plain_jit_explicit_with_an_unsharded_leaf():
  """One leaf's microbatch axis sharded, the other replicated: still exact."""
  n = 2 * D
  mesh = helpers.mesh()  # Explicit axes by default
  leaves = helpers.fixed_microgradients(n, seed=7)
  agg = optax_gaf.gaf(TAU, num_microbatches=n)
  grads = _tree(
    [helpers.shard(leaves[0], on=mesh), helpers.shard(leaves[1], P(), mesh)]
  )
  fn = jax.jit(agg.update)
  hlo = fn.lower(grads, agg.init(None)).compile().as_text()
  _assert_matches_oracle(*fn(grads, agg.init(None)), leaves, "sequential")
  assert not helpers.gathers_of_all_microgradients(hlo, n)


def test_plain_jit_explicit_leaves_sharded_over_different_axes():
  mesh = helpers.mesh((4, 2), ("x", "y"))
  leaves = helpers.fixed_microgradients(D, seed=8)
  grads = _tree(
    [
      helpers.shard(leaves[0], P("x"), mesh),
      helpers.shard(leaves[1], P("y"), mesh),
    ]
  )
  agg = optax_gaf.gaf(TAU)
  with pytest.raises(ValueError, match="different mesh axes"):
    jax.jit(agg.update)(grads, agg.init(None))


@pytest.mark.parametrize("case", ["medoid_per_leaf", "and_mask"])
def test_plain_jit_with_sharded_microbatch_axis(case):
  single = CASES[case](D)
  single_update = jax.jit(single.update)
  leaves = helpers.make_microgradients(
    np.random.default_rng(9), D, MESH_SHAPES, 0.5
  )
  grads = _tree(leaves)
  sharded = helpers.shard(grads)
  want = single_update(grads, single.init(_params()))
  # Same jitted function, now with the microbatch axis sharded: the mesh path.
  got = single_update(sharded, single.init(_params()))
  helpers.assert_close(got, want)
