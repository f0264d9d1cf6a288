"""FSDP: params sharded over the data axis, updates sharded like them.

Under plain ``jax.jit`` the updates take the params' shardings; inside
``jax.shard_map`` with ``sharded_params=True`` each device gets its own shard.
Either way the decisions equal the float64 oracle's, the state is replicated
bitwise, every leaf crosses the network once, and the bytes stay within 1.05x
of a reduce-scatter of the mean (ring model from the compiled HLO, as
``benchmarks/collectives.py`` measures) plus the N x N statistics. The FSDP
example and the pod guide's snippets: tests/docs/test_pod_guide.py.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gaf
from benchmarks.collectives import collective_ops
from benchmarks.collectives import statistics_bytes
from tests import helpers
from tests import oracle

D = 8
TAU = 0.5
# One leaf per case: sharded along its first axis, along its second, and a
# replicated one whose axes do not divide D (JAX cannot shard it).
SHAPES = {"w": (16, 6), "v": (5, 24), "b": (13,)}
SPECS = {"w": P("data", None), "v": P(None, "data"), "b": P()}


def _mesh(axis_type="Explicit"):
  return jax.make_mesh((D,), ("data",), (getattr(AxisType, axis_type),))


def _microgradients(n, shapes=SHAPES, seed=0, scale=1.0):
  """Agreeing ones (signal + noise) and a few flipped: clear decisions."""
  rng = np.random.default_rng(seed)
  for _ in range(50):
    signal = {k: rng.normal(size=s) for k, s in shapes.items()}
    flip = np.where(rng.random(n) < 0.3, -1.0, 1.0)
    grads = {
      k: (scale * (flip.reshape((n,) + (1,) * len(s)) * signal[k]
                   + 0.8 * rng.normal(size=(n,) + s))).astype(np.float32)
      for k, s in shapes.items()
    }  # fmt: skip
    dist = oracle.sequential(_flat(grads), TAU)[2]
    if not oracle.is_ambiguous(dist, TAU):
      return grads
  raise AssertionError("no clear draw")


def _flat(tree):
  return oracle.flatten([tree[k] for k in sorted(tree)])


def _assert_oracle(updates, state, grads):
  want, accepted, _ = oracle.sequential(_flat(grads), TAU)
  np.testing.assert_array_equal(state.accepted, accepted)
  assert bool(state.ready) == (want is not None)
  got = _flat({k: np.asarray(v)[None] for k, v in updates.items()})[0]
  want = np.zeros_like(got) if want is None else want
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def _spec(x):
  """A jit output's spec, one entry per axis (``P('data')`` -> 'data', )."""
  spec = tuple(x.sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def _params(mesh, shapes=SHAPES, specs=SPECS):
  return {
    k: jax.device_put(jnp.zeros(s), NamedSharding(mesh, specs[k]))
    for k, s in shapes.items()
  }


def _moved(hlo, n, num_leaves):
  """(gradient bytes, N x N statistics bytes, all-to-all count)."""
  ops = collective_ops(hlo, D)
  stats = statistics_bytes(hlo, n, num_leaves, D)
  grad = sum(moved for _, _, moved in ops) - stats
  return grad, stats, sum(kind == "all-to-all" for kind, _, _ in ops)


@functools.cache
def _reduce_scatter_bytes(shapes, specs):
  """The baseline: each leaf's mean reduce-scattered like its param."""
  mesh = _mesh()
  specs = dict(specs)

  def mean(g):
    out = {}
    for k, x in g.items():
      m = jnp.mean(x, 0)
      axis = [i for i, e in enumerate(specs[k]) if e == "data"]
      out[k] = (
        lax.psum_scatter(m, "data", scatter_dimension=axis[0], tiled=True) / D
        if axis
        else lax.pmean(m, "data")
      )
    return out

  fn = jax.shard_map(mean, mesh=mesh, in_specs=P("data"), out_specs=specs)
  args = {
    k: jax.ShapeDtypeStruct(
      (D,) + s, jnp.float32, sharding=NamedSharding(mesh, P("data"))
    )
    for k, s in shapes
  }
  hlo = jax.jit(fn).lower(args).compile().as_text()
  return sum(m for _, _, m in collective_ops(hlo, D))


# --- FSDP under plain jit


@pytest.mark.parametrize(
  "axis_type, axis_name, set_mesh",
  [
    ("Explicit", None, False),  # sharding read from the types
    ("Explicit", "data", True),
    ("Auto", "data", True),  # Auto params carry no sharding: replicated
  ],
)
def test_jit_updates_take_the_params_shardings(axis_type, axis_name, set_mesh):
  n = 2 * D
  mesh = _mesh(axis_type)
  grads = _microgradients(n, seed=1)
  agg = optax_gaf.gaf(TAU, num_microbatches=n, axis_name=axis_name)
  with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
    g = jax.device_put(grads, NamedSharding(mesh, P("data")))
    params = _params(mesh)
    fn = jax.jit(agg.update)
    hlo = fn.lower(g, agg.init(None), params).compile().as_text()
    updates, state = fn(g, agg.init(None), params)
  _assert_oracle(updates, state, grads)
  for k, u in updates.items():
    want = tuple(SPECS[k]) if axis_type == "Explicit" else ()
    assert _spec(u) == want + (None,) * (u.ndim - len(want)), k
  assert _moved(hlo, n, len(SHAPES))[2] == len(SHAPES)  # each leaf moved once


def test_jit_auto_tau_matches_one_device_and_keeps_shardings():
  n = 2 * D
  mesh = _mesh()
  agg = optax_gaf.gaf(optax_gaf.AutoTau(min_count=2), num_microbatches=n)
  params = _params(mesh)
  local = jax.tree.map(np.asarray, params)
  sharded, single = agg.init(None), agg.init(None)
  for seed in (1, 2, 3):
    grads = _microgradients(n, seed=seed)
    g = jax.device_put(grads, NamedSharding(mesh, P("data")))
    updates, sharded = jax.jit(agg.update)(g, sharded, params)
    want, single = jax.jit(agg.update)(grads, single, local)
    helpers.assert_close((updates, sharded), (want, single))
    for k, u in updates.items():
      assert _spec(u) == tuple(SPECS[k]) + (None,) * (u.ndim - len(SPECS[k]))
  assert float(sharded.tau) < 1.0  # adapted after the warm-up


def test_jit_two_axis_mesh():
  """Params also sharded over a model axis: updates keep every sharding."""
  n = 8
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  shapes = {"w": (16, 8), "u": (6, 4), "b": (5,)}
  specs = {"w": P("data", "model"), "u": P("model", None), "b": P()}
  grads = _microgradients(n, shapes, seed=5)
  agg = optax_gaf.gaf(TAU, num_microbatches=n)
  updates, state = jax.jit(agg.update)(
    jax.device_put(grads, NamedSharding(mesh, P("data"))),
    agg.init(None),
    _params(mesh, shapes, specs),
  )
  _assert_oracle(updates, state, grads)
  for k, u in updates.items():
    assert _spec(u) == tuple(specs[k]) + (None,) * (u.ndim - len(specs[k]))


@pytest.mark.parametrize("n_local", [1, 2])
def test_jit_bytes_at_most_a_reduce_scatter(n_local):
  """Per device, gaf's gradient bytes <= 1.05 x n_local x reduce-scatter."""
  n = D * n_local
  shapes = {"w": (64, 48), "v": (48, 64), "b": (100, 7)}
  specs = {"w": P("data", None), "v": P(None, "data"), "b": P()}
  mesh = _mesh()
  agg = optax_gaf.gaf(TAU, num_microbatches=n)
  g = {
    k: jax.ShapeDtypeStruct(
      (n,) + s, jnp.float32, sharding=NamedSharding(mesh, P("data"))
    )
    for k, s in shapes.items()
  }
  hlo = (
    jax.jit(agg.update)
    .lower(g, agg.init(None), _params(mesh, shapes, specs))
    .compile()
    .as_text()
  )
  grad, stats, all_to_all = _moved(hlo, n, len(shapes))
  base = _reduce_scatter_bytes(tuple(shapes.items()), tuple(specs.items()))
  # An all-to-all of n_local gradients: n_local reduce-scatters' worth.
  assert grad <= 1.05 * n_local * base, (grad, base)
  assert grad >= 0.95 * n_local * base
  # One [N, N] psum, and one more in the rare rescaled step with its maxima.
  assert stats <= 2 * (2 * 7 / 8 * n * n * 4) + 7 / 8 * len(shapes) * n * 4
  assert all_to_all == len(shapes)


def test_jit_rescaled_step_moves_nothing_more():
  """Tiny norms take the rescaled Gram branch: exact, no second move."""
  n = D
  mesh = _mesh()
  grads = _microgradients(n, seed=2, scale=1e-22)
  agg = optax_gaf.gaf(TAU, num_microbatches=n)
  g = jax.device_put(grads, NamedSharding(mesh, P("data")))
  params = _params(mesh)
  fn = jax.jit(agg.update)
  hlo = fn.lower(g, agg.init(None), params).compile().as_text()
  updates, state = fn(g, agg.init(None), params)
  want, accepted, _ = oracle.sequential(_flat(grads), TAU)
  np.testing.assert_array_equal(state.accepted, accepted)
  got = _flat({k: np.asarray(v)[None] for k, v in updates.items()})[0]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-28)
  assert _moved(hlo, n, len(SHAPES))[2] == len(SHAPES)


@pytest.mark.parametrize("shape", [(300, 7), (13,), (3, 5, 7)])
@pytest.mark.parametrize("where", ["jit", "shard_map", "all_gather"])
def test_each_leaf_is_moved_once(shape, where):
  """The move that stages 1 and 3 (and the rescaled branch) share."""
  n = 2 * D
  mesh = _mesh()
  g = {
    "x": jax.ShapeDtypeStruct(
      (n,) + shape, jnp.float32, sharding=NamedSharding(mesh, P("data"))
    ),
    "y": jax.ShapeDtypeStruct(
      (n, 4), jnp.float32, sharding=NamedSharding(mesh, P("data"))
    ),
  }
  if where == "jit":
    agg = optax_gaf.gaf(TAU, num_microbatches=n)
    fn = jax.jit(agg.update)
  else:
    collective = "all_gather" if where == "all_gather" else "all_to_all"
    agg = optax_gaf.gaf(
      TAU, num_microbatches=n, axis_name="data", collective=collective
    )
    fn = jax.jit(
      jax.shard_map(
        agg.update, mesh=mesh, in_specs=(P("data"), P()), out_specs=P()
      )
    )
  hlo = fn.lower(g, agg.init(None)).compile().as_text()
  ops = collective_ops(hlo, D)
  if where == "all_gather":  # gathers of all N microgradients
    moves = [s for k, s, _ in ops if k == "all-gather" and s[0][0] == n]
  else:
    moves = [s for k, s, _ in ops if k == "all-to-all"]
  assert len(moves) == 2, moves


# --- FSDP inside shard_map


@functools.cache
def _shard_map_step(n, granularity="global"):
  agg = optax_gaf.gaf(
    TAU,
    num_microbatches=n,
    axis_name="data",
    sharded_params=True,
    granularity=granularity,
  )

  def step(grads, state, params):
    updates, state = agg.update(grads, state, params)
    return updates, jax.tree.map(lambda x: x[None], state)

  fn = jax.shard_map(
    step,
    mesh=_mesh(),
    in_specs=(P("data"), P(), SPECS),
    out_specs=(SPECS, P("data")),
  )
  return agg, jax.jit(fn)


@pytest.mark.parametrize("n_local", [1, 2])
def test_shard_map_each_device_gets_its_shard(n_local):
  n = D * n_local
  mesh = _mesh()
  grads = _microgradients(n, seed=3)
  agg, fn = _shard_map_step(n)
  params = _params(mesh)
  g = jax.device_put(grads, NamedSharding(mesh, P("data")))
  updates, states = fn(g, agg.init(None), params)
  for k, u in updates.items():  # laid out as the sharded params
    assert u.sharding.is_equivalent_to(params[k].sharding, u.ndim), k
    assert u.shape == SHAPES[k]
  for x in jax.tree.leaves(states):  # every device: the same bits
    x = np.asarray(x)
    assert all(x[d].tobytes() == x[0].tobytes() for d in range(D))
  _assert_oracle(
    updates, jax.tree.map(lambda x: np.asarray(x)[0], states), grads
  )
  hlo = fn.lower(g, agg.init(None), params).compile().as_text()
  grad, stats, all_to_all = _moved(hlo, n, len(SHAPES))
  base = _reduce_scatter_bytes(tuple(SHAPES.items()), tuple(SPECS.items()))
  assert all_to_all == len(SHAPES)
  # b (13 floats) is padded to 16 for its all-to-all and all-gather.
  assert grad <= 16 / 13 * n_local * base


def test_shard_map_per_leaf_granularity():
  n = 2 * D
  mesh = _mesh()
  grads = _microgradients(n, seed=4)
  agg, fn = _shard_map_step(n, "per_leaf")
  updates, states = fn(
    jax.device_put(grads, NamedSharding(mesh, P("data"))),
    agg.init(_params(mesh)),
    _params(mesh),
  )
  for i, k in enumerate(sorted(SHAPES)):
    want, accepted, _ = oracle.sequential(oracle.flatten([grads[k]]), TAU)
    np.testing.assert_array_equal(np.asarray(states.accepted)[0, i], accepted)
    np.testing.assert_allclose(
      np.asarray(updates[k]).reshape(-1), want, rtol=2e-5, atol=2e-6
    )


def test_sharded_params_checks():
  with pytest.raises(ValueError, match="needs axis_name"):
    optax_gaf.gaf(TAU, sharded_params=True)
  with pytest.raises(ValueError, match="all_to_all"):
    optax_gaf.gaf(
      TAU, axis_name="data", collective="all_gather", sharded_params=True
    )
  with pytest.raises(TypeError, match="bool"):
    optax_gaf.gaf(TAU, axis_name="data", sharded_params="yes")
  agg = optax_gaf.gaf(TAU, axis_name="data", sharded_params=True)
  mesh = _mesh()
  g = jax.device_put(jnp.ones((D, 16)), NamedSharding(mesh, P("data")))

  def run(params, spec):
    params = jax.device_put(params, NamedSharding(mesh, spec))
    fn = jax.shard_map(
      lambda g, p: agg.update(g, agg.init(None), p)[0],
      mesh=mesh,
      in_specs=(P("data"), spec),
      out_specs=spec,
    )
    return fn(g, params)

  with pytest.raises(ValueError, match="pass them"):
    jax.shard_map(
      lambda g: agg.update(g, agg.init(None))[0],
      mesh=mesh,
      in_specs=P("data"),
      out_specs=P(),
    )(g)
  with pytest.raises(ValueError, match="times smaller along one axis"):
    run(jnp.zeros(D * 4), P("data"))  # local [4], leaf [1, 16]
  with pytest.raises(ValueError, match="tree structures"):
    run({"a": jnp.zeros(16)}, P())
