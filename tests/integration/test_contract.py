"""The contract every aggregator and every producer of microgradients keeps.

In the manner of optax's ``contrib/_common_test.py``: one parametrized suite,
so a new aggregator or producer is one more entry in ``AGGREGATORS`` or
``PRODUCERS``. Only the public API (``optax_gaf.__all__``,
``optax_gaf.rules``) is used, so that a refactor of the library's modules
cannot break it.

Aggregators: ``init``/``update`` under ``jax.jit``; a NamedTuple state with
no zero-size arrays whose shapes and dtypes an update keeps (so
``jax.lax.scan`` runs over steps); updates shaped like the params; in
``optax.chain`` and ``optax_gaf.process``; a NaN microgradient is as if
absent; identical microgradients give their mean; float64 in, float64 out;
``optax_gaf.stats`` reads the state.

Producers (vmap, the block route, streaming, ghost, ghost_grads): on one
small MLP and batch, the decisions and the update of the float64 NumPy oracle
of the sequential rule.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gaf
from tests import helpers
from tests import oracle
from tests import oracle_models

TAU = 0.9
N = 5
LR = 0.1
SHAPES = {"w": (3, 2), "b": (2,)}

# --- aggregators

AGGREGATORS = {
  "gaf_sequential": lambda n: optax_gaf.gaf(TAU, num_microbatches=n),
  "gaf_pairwise": lambda n: optax_gaf.gaf(
    TAU, rule="pairwise", num_microbatches=n
  ),
  "gaf_medoid": lambda n: optax_gaf.gaf(TAU, rule="medoid", num_microbatches=n),
  "gaf_soft": lambda n: optax_gaf.gaf(TAU, rule="soft", num_microbatches=n),
  "adacons": lambda n: optax_gaf.adacons(0.5, num_microbatches=n),
  "and_mask": lambda n: optax_gaf.and_mask(0.5),
}
NAMES = sorted(AGGREGATORS)


def _params(dtype=jnp.float32):
  return {k: jnp.zeros(s, dtype) for k, s in SHAPES.items()}


@functools.cache
def _leaves(n=N):
  """Float32 microgradients ``[n, *shape]`` per leaf, some conflicting, whose
  decisions (every rule of the oracle at TAU) sit well away from TAU."""

  def is_clear(leaves):
    return helpers.pairs_clear(TAU, 1e-3)(leaves) and all(
      helpers.decisions_clear(rule, TAU, 1e-3)(leaves)
      for rule in ("sequential", "pairwise", "medoid")
    )

  return tuple(
    helpers.clear_draw(helpers.seed_of("contract", n), n,
                       list(SHAPES.values()), 0.6, is_clear, flip_prob=0.2)
  )  # fmt: skip


def _grads(leaves=None, dtype=jnp.float32):
  leaves = _leaves() if leaves is None else leaves
  return {k: jnp.asarray(x, dtype) for k, x in zip(SHAPES, leaves)}


@functools.cache
def _update(name, n=N):
  """The aggregator for N=n and its jitted update (compiled once)."""
  agg = AGGREGATORS[name](n)
  return agg, jax.jit(agg.update)


def _step(name, grads, n=N):
  agg, update = _update(name, n)
  params = _params()
  return update(grads, jax.jit(agg.init)(params), params)


def _assert_tree_close(got, want, rtol=1e-5):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    w = np.asarray(w, np.float64)
    atol = 1e-6 * max(float(np.max(np.abs(w), initial=0.0)), 1e-30)
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol, atol)


@pytest.mark.parametrize("name", NAMES)
def test_init_and_update_under_jit_keep_the_params_tree(name):
  updates, state = _step(name, _grads())
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, _params())
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert bool(state.ready)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_a_named_tuple_of_fixed_shapes_without_empty_arrays(name):
  agg, _ = _update(name)
  state0 = jax.jit(agg.init)(_params())
  assert isinstance(state0, tuple) and hasattr(state0, "_fields"), state0
  assert all(x.size for x in jax.tree.leaves(state0)), state0
  _, state1 = _step(name, _grads())
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state1)


@pytest.mark.parametrize("name", NAMES)
def test_scan_over_steps_in_a_chain(name):
  tx = optax.chain(AGGREGATORS[name](N), optax.sgd(LR))
  params = _params()
  rng = np.random.default_rng(helpers.seed_of("scan", name))
  scale = rng.uniform(0.5, 2.0, size=(3, N)).astype(np.float32)
  steps = jax.tree.map(
    lambda g: g[None] * scale.reshape((3, N) + (1,) * (g.ndim - 1)), _grads()
  )

  def step(carry, grads):
    p, s = carry
    u, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, u), s), None

  state0 = tx.init(params)
  (_, state), _ = jax.jit(lambda c, xs: jax.lax.scan(step, c, xs))(
    (params, state0), steps
  )
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state)
  assert int(optax_gaf.stats(state)["count"]) == 3


@pytest.mark.parametrize("wrap", ["chain", "process"])
@pytest.mark.parametrize("name", NAMES)
def test_in_chain_and_process_the_optimizer_gets_the_aggregate(name, wrap):
  agg = AGGREGATORS[name](N)
  if wrap == "chain":
    tx = optax.chain(agg, optax.sgd(LR))
  else:
    tx = optax_gaf.process(optax.identity(), agg, optax.sgd(LR))
  params = _params()
  updates, state = jax.jit(tx.update)(_grads(), tx.init(params), params)
  aggregate, _ = _step(name, _grads())
  _assert_tree_close(updates, jax.tree.map(lambda a: -LR * a, aggregate))
  assert bool(optax_gaf.stats(state)["ready"])


@pytest.mark.parametrize("name", NAMES)
def test_a_nan_microgradient_is_as_if_absent(name):
  leaves = [x.copy() for x in _leaves()]
  leaves[0][2, 0] = np.nan  # one entry of microgradient 2: all of it goes
  updates, state = _step(name, _grads(leaves))
  kept = [np.delete(x, 2, axis=0) for x in _leaves()]
  want, _ = _step(name, _grads(kept), n=N - 1)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  _assert_tree_close(updates, want)
  assert bool(optax_gaf.stats(state)["ready"])


@pytest.mark.parametrize("name", NAMES)
def test_identical_microgradients_give_their_mean(name):
  """All agree: the aggregate is the mean (which is each of them). Positive
  multiples would not do for every rule: pairwise halves towards the last."""
  leaves = [np.repeat(x[:1], N, axis=0) for x in _leaves()]
  updates, state = _step(name, _grads(leaves))
  _assert_tree_close(updates, {k: x.mean(0) for k, x in zip(SHAPES, leaves)})
  assert bool(optax_gaf.stats(state)["ready"])


@pytest.mark.parametrize("name", NAMES)
def test_float64_in_float64_out(name):
  with jax.enable_x64(True):
    agg = AGGREGATORS[name](N)
    params = _params(jnp.float64)
    grads = _grads(dtype=jnp.float64)
    updates, _ = jax.jit(agg.update)(grads, agg.init(params), params)
    assert all(u.dtype == jnp.float64 for u in jax.tree.leaves(updates))
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  want, _ = _step(name, _grads())
  _assert_tree_close(updates, want, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_stats_reads_the_state_alone_and_inside_optimizers(name):
  agg, _ = _update(name)
  _, state = _step(name, _grads())
  s = optax_gaf.stats(state)
  assert isinstance(s, dict) and "ready" in s and "count" in s
  assert s["ready"].dtype == jnp.bool_ and bool(s["ready"])
  params = _params()
  chained = optax.chain(agg, optax.sgd(LR)).init(params)
  processed = optax_gaf.process(optax.identity(), agg, optax.sgd(LR))
  for nested in (chained, processed.init(params)):
    assert "ready" in optax_gaf.stats(nested)


# --- producers of microgradients

D_IN, HIDDEN, CLASSES, BATCH = 4, 5, 3, 40


def _loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return jnp.mean(
    optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
  )


def _vmap(n, params, batch):
  _, grads = optax_gaf.microbatch_grads(_loss, n)(params, batch)
  agg = optax_gaf.gaf(TAU, num_microbatches=n)
  return agg.update(grads, agg.init(params), params)


def _streaming(n, params, batch):
  _, filtered = optax_gaf.streaming_filtered_grads(_loss, n, TAU)(params, batch)
  agg = optax_gaf.record_filtered(num_microbatches=n)
  return agg.update(filtered, agg.init(params), params)


def _ghost(n, params, batch):
  _, ghost = optax_gaf.ghost_microgradients(_loss, n)(params, batch)
  agg = optax_gaf.gaf(TAU, num_microbatches=n)
  return agg.update(ghost, agg.init(params), params)


def _ghost_grads(n, params, batch):
  _, filtered = optax_gaf.ghost_filtered_grads(_loss, n, TAU)(params, batch)
  agg = optax_gaf.record_filtered(num_microbatches=n)
  return agg.update(filtered, agg.init(params), params)


# (producer, N): gaf on one device takes the block route for the sequential
# rule when N > 16, the Gram route below.
PRODUCERS = {
  "vmap": (_vmap, 8),
  "block": (_vmap, 20),
  "streaming": (_streaming, 8),
  "streaming_n20": (_streaming, 20),
  "ghost": (_ghost, 8),
  "ghost_n20": (_ghost, 20),
  "ghost_grads": (_ghost_grads, 8),
}


def _oracle(params, batch, n):
  """The float64 oracle: per-microbatch gradients by hand, then the rule."""
  x, y = (np.asarray(batch[k]) for k in ("x", "y"))
  rows = np.split(np.arange(BATCH), n)
  flat = np.stack([oracle_models.mlp_grads(params, x[r], y[r]) for r in rows])
  return oracle.sequential(flat, TAU)


@functools.cache
def _problem():
  """Params, a batch with random labels, and the oracle at N = 8 and 20:
  the first draw whose decisions are clear and mixed at both."""
  for seed in range(20):
    rng = np.random.default_rng(helpers.seed_of("contract_mlp", seed))
    params = {
      "w1": rng.normal(size=(D_IN, HIDDEN)),
      "b1": 0.1 * rng.normal(size=HIDDEN),
      "w2": rng.normal(size=(HIDDEN, CLASSES)),
      "b2": 0.1 * rng.normal(size=CLASSES),
    }
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    batch = {
      "x": jnp.asarray(rng.normal(size=(BATCH, D_IN)), jnp.float32),
      "y": jnp.asarray(rng.integers(0, CLASSES, BATCH), jnp.int32),
    }
    want = {n: _oracle(params, batch, n) for n in (8, 20)}
    if all(
      not oracle.is_ambiguous(dist, TAU, 1e-3) and 2 < accepted.sum() < n
      for n, (_, accepted, dist) in want.items()
    ):
      return params, batch, want
  pytest.fail("no draw with clear and mixed decisions")


@pytest.mark.parametrize("producer", sorted(PRODUCERS))
def test_producer_matches_the_float64_oracle(producer):
  fn, n = PRODUCERS[producer]
  params, batch, want = _problem()
  update, accepted, _ = want[n]
  updates, state = jax.jit(functools.partial(fn, n))(params, batch)
  s = optax_gaf.stats(state)
  np.testing.assert_array_equal(s["accepted"], accepted)
  assert bool(s["ready"])
  chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
  got = np.concatenate([np.ravel(updates[k]) for k in sorted(updates)])
  np.testing.assert_allclose(
    got, update, rtol=1e-5, atol=1e-6 * np.max(np.abs(update))
  )
