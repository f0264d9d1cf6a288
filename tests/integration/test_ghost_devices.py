"""Ghost microgradients inside ``jax.shard_map`` and ``jax.pmap`` (8
simulated devices): per device with ``gaf()``, and across devices with
``gaf(axis_name=...)``, each as ``microbatch_grads`` gives it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_gaf
from tests import helpers

D = 8
N_LOCAL = 2


def loss(p, b):
  h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
  return optax.softmax_cross_entropy_with_integer_labels(
    h @ p["w2"], b["y"]
  ).mean()


def setup():
  k = jax.random.split(jax.random.key(0), 4)
  params = {
    "w1": jax.random.normal(k[0], (5, 7)),
    "b1": jnp.full((7,), 0.1),
    "w2": jax.random.normal(k[1], (7, 3)),
  }
  batch = {
    "x": jax.random.normal(k[2], (D * N_LOCAL * 2, 5)),
    "y": jax.random.randint(k[3], (D * N_LOCAL * 2,), 0, 3),
  }
  return params, batch


def step_fn(producer, axis_name, vary=None):
  """``vary``: the device axis to pcast the params to varying over, as the
  devices guide has it for microbatch_grads (ghost varies them itself)."""
  n = N_LOCAL if axis_name is None else D * N_LOCAL
  tx = optax_gaf.gaf(0.9, axis_name=axis_name, num_microbatches=n)

  def step(p, b):
    local = p if vary is None else jax.lax.pcast(p, vary, to="varying")
    _, grads = producer(loss, N_LOCAL)(local, b)
    updates, state = tx.update(grads, tx.init(p), p)
    per_device = lambda x: x[None]
    return jax.tree.map(per_device, updates), per_device(state.accepted)

  return step


def shard_mapped(producer, axis_name, vary=None):
  return jax.jit(
    jax.shard_map(
      step_fn(producer, axis_name, vary),
      mesh=helpers.mesh(),
      in_specs=(P(), P("data")),
      out_specs=(P("data"), P("data")),
    )
  )


def assert_same(got, want):
  np.testing.assert_array_equal(got[1], want[1])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    got[0],
    want[0],
  )


@pytest.mark.parametrize("axis_name", [None, "data"])
def test_shard_map(axis_name):
  """None: each device filters its own N_LOCAL microbatches; "data": GAF
  over all D * N_LOCAL, as the stacked route's all-to-all does."""
  params, batch = setup()
  batch = helpers.shard(batch)
  ghost = optax_gaf.ghost_microgradients
  got = shard_mapped(ghost, axis_name)(params, batch)
  want = shard_mapped(optax_gaf.microbatch_grads, axis_name, "data")
  assert_same(got, want(params, batch))
  # Params varied by the caller, as for microbatch_grads: the same.
  assert_same(shard_mapped(ghost, axis_name, "data")(params, batch), got)
  accepted = np.asarray(got[1])
  if axis_name is not None:  # every device has the one global decision
    assert (accepted == accepted[:1]).all()
    assert accepted.shape == (D, D * N_LOCAL)
  assert 0 < accepted.sum() < accepted.size


@pytest.mark.parametrize("axis_name", [None, "i"])
def test_pmap(axis_name):
  params, batch = setup()
  batch = jax.tree.map(lambda x: x.reshape(D, -1, *x.shape[1:]), batch)

  def run(producer, vary=None):
    step = step_fn(producer, axis_name, vary)
    fn = jax.pmap(step, axis_name="i", in_axes=(None, 0))
    return jax.tree.map(lambda x: x[:, 0], fn(params, batch))

  got = run(optax_gaf.ghost_microgradients)
  assert_same(got, run(optax_gaf.microbatch_grads, "i"))


def test_fsdp_sharded_params():
  """Each device holds 1/D of the params and gets its shard of the update
  (gaf(sharded_params=True)), as from microbatch_grads."""
  params, batch = setup()
  k = jax.random.split(jax.random.key(1), 2)
  params = {
    "w1": jax.random.normal(k[0], (5, 16)),
    "b1": jnp.zeros(16),
    "w2": jax.random.normal(k[1], (16, 3)),
  }
  specs = {"w1": P(None, "data"), "b1": P("data"), "w2": P("data", None)}
  tx = optax_gaf.gaf(
    0.9, axis_name="data", sharded_params=True, num_microbatches=D * N_LOCAL
  )

  def run(producer):
    def step(p, b):
      full = {
        k: jax.lax.all_gather(
          v, "data", axis=list(specs[k]).index("data"), tiled=True
        )
        for k, v in p.items()
      }
      _, grads = producer(loss, N_LOCAL)(full, b)
      updates, state = tx.update(grads, tx.init(p), p)
      return updates, state.accepted

    fn = jax.shard_map(
      step,
      mesh=helpers.mesh(),
      in_specs=(specs, P("data")),
      out_specs=(specs, P()),
    )
    placed = jax.tree.map(lambda x, s: helpers.shard(x, s), params, specs)
    return jax.jit(fn)(placed, helpers.shard(batch))

  got = run(optax_gaf.ghost_microgradients)
  assert_same(got, run(optax_gaf.microbatch_grads))
  assert 0 < np.asarray(got[1]).sum() < D * N_LOCAL
