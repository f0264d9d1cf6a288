"""Streaming GAF (one microgradient at a time) and ``streamed()``: the same
decisions, update and GAFState as ``gaf`` on stacked microgradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from optax.experimental import aggregating

import optax_gaf
from tests import helpers
from tests import oracle

N = 6


def loss_fn(params, batch):
  pred = jnp.tanh(batch["x"] @ params["w"]) @ params["v"]
  return jnp.mean((pred - batch["y"]) ** 2)


def problem(seed, size=N * 2):
  keys = jax.random.split(jax.random.key(seed), 4)
  params = {
    "w": jax.random.normal(keys[0], (3, 4)),
    "v": jax.random.normal(keys[1], (4,)),
  }
  x = jax.random.normal(keys[2], (size, 3))
  # Noisy labels: some microbatches pull against the rest.
  y = x[:, 0] + 2.0 * jax.random.normal(keys[3], (size,))
  return params, {"x": x, "y": y}


def make_run(streaming, rule, tau, steps=3):
  """Three steps of aggregating.process(gaf or streamed, sgd with momentum)."""
  if streaming:
    agg = optax_gaf.record_filtered(num_microbatches=N)
    grad_fn = optax_gaf.streaming_filtered_grads(loss_fn, N, tau, rule=rule)
  else:
    agg = optax_gaf.gaf(tau, rule=rule, num_microbatches=N)
    grad_fn = optax_gaf.microbatch_grads(loss_fn, N)
  tx = aggregating.process(optax.identity(), agg, optax.sgd(0.1, momentum=0.9))

  @jax.jit
  def run(params, batch):
    state = tx.init(params)
    history = []
    for _ in range(steps):
      losses, grads = grad_fn(params, batch)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      history.append((losses, optax_gaf.stats(state)))
    return params, state, history

  return run


@pytest.mark.parametrize("rule", ["sequential", "pairwise"])
def test_streaming_equals_vmap(rule):
  """streaming_grads + streamed() record the same GAFState as
  microbatch_grads + gaf(), step after step, and move the params alike."""
  tau = 0.9
  vmap_run, stream_run = make_run(False, rule, tau), make_run(True, rule, tau)
  seen_reject = seen_accept = False
  for seed in range(3):
    params, batch = problem(seed)
    p_v, s_v, h_v = vmap_run(params, batch)
    p_s, s_s, h_s = stream_run(params, batch)
    for (loss_v, st_v), (loss_s, st_s) in zip(h_v, h_s):
      dist = np.asarray(st_v["cosine_distance"])
      assert np.min(np.abs(dist - tau)) > 1e-4  # no near-ties in these cases
      np.testing.assert_allclose(loss_s, loss_v, rtol=1e-5)
      assert set(st_s) == set(st_v)
      for key in ("accepted", "ready", "num_accepted", "skipped_steps"):
        np.testing.assert_array_equal(st_s[key], st_v[key], err_msg=key)
      np.testing.assert_array_equal(st_s["count"], st_v["count"])
      for key in (
        "cosine_distance",
        "acceptance_rate",
        "gradient_diversity",
        "tau",
        "skip_rate",
      ):
        np.testing.assert_allclose(
          st_s[key], st_v[key], rtol=1e-5, atol=1e-6, err_msg=key
        )
      seen_reject |= not np.all(st_v["accepted"])
      seen_accept |= int(st_v["num_accepted"]) > 1
    helpers.assert_close(p_s, p_v, rtol=1e-5, atol=1e-6)
    # The whole optimizer state: GAFState and the momentum.
    helpers.assert_close(s_s, s_v, rtol=1e-5, atol=1e-6)
  assert seen_reject and seen_accept  # the cases exercise both branches


def test_accumulator_in_optax_microbatch_equals_gaf():
  """With optax.microbatching.microbatch (strided microbatches)."""
  params, batch = problem(7)
  tau = 0.9
  acc = optax_gaf.gaf_accumulator(tau, rule="pairwise", num_microbatches=N)
  out = jax.jit(
    optax.microbatching.microbatch(
      jax.grad(loss_fn), argnums=1, microbatch_size=2, accumulator=acc
    )
  )(params, batch)
  # optax's microbatch i holds rows i, i + N, ...: stack the same ones.
  strided = jax.tree.map(
    lambda x: x.reshape((2, N) + x.shape[1:]).swapaxes(0, 1), batch
  )
  grads = jax.vmap(jax.grad(loss_fn), (None, 0))(params, strided)
  tx = optax_gaf.gaf(tau, rule="pairwise", num_microbatches=N)
  updates, state = jax.jit(tx.update)(grads, tx.init(params))
  np.testing.assert_array_equal(out.accepted, state.accepted)
  assert 1 < int(state.num_accepted) < N
  helpers.assert_close(out.updates, updates, rtol=1e-5, atol=1e-6)
  # micro_vmap's `aggregate` route filters stacked microgradients alike.
  np.testing.assert_array_equal(
    jax.jit(acc.aggregate)(grads).accepted, state.accepted
  )


def test_non_finite_microgradient_excluded_like_vmap():
  params, batch = problem(1)
  batch["x"] = batch["x"].at[4, 0].set(jnp.nan)  # poisons microbatch 2
  losses, filtered = jax.jit(
    optax_gaf.streaming_filtered_grads(loss_fn, N, 1.5)
  )(params, batch)
  assert np.isnan(losses[2])
  assert np.isnan(filtered.cosine_distance[2]) and not filtered.accepted[2]
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(filtered.updates))
  tx = optax_gaf.gaf(1.5, num_microbatches=N)
  _, grads = optax_gaf.microbatch_grads(loss_fn, N)(params, batch)
  updates, state = jax.jit(tx.update)(grads, tx.init(params))
  np.testing.assert_array_equal(filtered.accepted, state.accepted)
  helpers.assert_close(filtered.updates, updates, rtol=1e-5, atol=0)


def test_no_agreement_skips_the_optimizer():
  """Through aggregating.process, a no-agreement step leaves all untouched."""

  def lin(w, b):
    return jnp.mean(b["x"] @ w)  # gradient: the microbatch's mean x

  batch = {"x": jnp.concatenate([jnp.eye(3), -jnp.eye(3)])}  # all disagree
  tx = aggregating.process(
    optax.identity(),
    optax_gaf.record_filtered(num_microbatches=N),
    optax.sgd(0.1, momentum=0.9),
  )
  params = jnp.ones(3)
  state = tx.init(params)
  momentum = optax.tree.get(state, "trace")
  state = state[:2] + (jax.tree.map(lambda t: t + 1.0, state[2]),)
  _, filtered = jax.jit(optax_gaf.streaming_filtered_grads(lin, N, 0.5))(
    params, batch
  )
  updates, new_state = jax.jit(tx.update)(filtered, state, params)
  assert not bool(filtered.ready)
  np.testing.assert_array_equal(updates, jnp.zeros(3))
  np.testing.assert_array_equal(
    optax.tree.get(new_state, "trace"), momentum + 1.0
  )
  assert int(optax_gaf.stats(new_state)["skipped_steps"]) == 1
  # An agreeing step moves the momentum.
  _, agreeing = optax_gaf.streaming_filtered_grads(lin, N, 0.5)(
    params, {"x": jnp.ones((N, 3))}
  )
  _, newer = tx.update(agreeing, new_state, params)
  assert bool(optax_gaf.stats(newer)["ready"])
  assert not np.allclose(optax.tree.get(newer, "trace"), momentum + 1.0)


def test_streaming_memory_does_not_grow_with_n():
  """XLA's scratch memory is the same at N = 4 and N = 32 (batch aside)."""
  params = {"w": jnp.zeros((64, 64)), "v": jnp.zeros(64)}

  def temp(n):
    batch = {"x": jnp.zeros((n * 2, 64)), "y": jnp.zeros(n * 2)}
    fn = optax_gaf.streaming_filtered_grads(loss_fn, n, 0.9)
    return (
      jax.jit(fn)
      .lower(params, batch)
      .compile()
      .memory_analysis()
      .temp_size_in_bytes
    )

  small, large = temp(4), temp(32)
  assert large <= small + 32 * 64  # at most a few [N] vectors more


# --- arguments


def test_rules_that_need_the_gram_matrix_cannot_stream():
  for rule in ("medoid", "soft", helpers.near_mean):
    with pytest.raises(ValueError, match="running-aggregate rules"):
      optax_gaf.gaf_accumulator(0.5, rule=rule, num_microbatches=4)
    with pytest.raises(ValueError, match="running-aggregate rules"):
      optax_gaf.streaming_filtered_grads(loss_fn, 4, 0.5, rule=rule)
  with pytest.raises(ValueError, match="num_microbatches must be"):
    optax_gaf.streaming_filtered_grads(loss_fn, 1, 0.5)


def _filtered_shape():
  params, batch = problem(0)
  return params, jax.eval_shape(
    optax_gaf.streaming_filtered_grads(loss_fn, N, 0.9), params, batch
  )[1]


def test_streamed_refuses_another_n():
  params, filtered = _filtered_shape()
  tx = optax_gaf.record_filtered(num_microbatches=N + 1)
  with pytest.raises(ValueError, match="num_microbatches=7.*6 microgradients"):
    tx.update(filtered, tx.init(params))


def test_streamed_refuses_stacked_microgradients():
  tx = optax_gaf.record_filtered()
  with pytest.raises(TypeError, match=r"FilteredGradients.*use gaf\(\)"):
    tx.update(jnp.ones((N, 3)), tx.init(None))


def test_gaf_refuses_filtered_gradients_and_points_to_streamed():
  params, filtered = _filtered_shape()
  for tx in (
    optax_gaf.gaf(0.9),
    optax_gaf.gaf(0.9, num_microbatches=N),
    optax_gaf.gaf(0.9, rule="medoid"),
    optax_gaf.gaf(optax_gaf.AdaptiveTau(cap=0.9)),
  ):
    with pytest.raises(TypeError, match=r"optax_gaf\.record_filtered\(\)"):
      tx.update(filtered, tx.init(params))


# --- issue 19: the accumulator fed another count, micro_vmap, NumPy batches


def _linear(w, x):
  return jnp.sum(w * x)  # gradient: x


_FED = {}


def _fed_fn(k, n, rule, real=None):
  """gaf_accumulator(num_microbatches=n) fed k microbatches (real of them)."""
  key = (k, n, rule, real)
  if key not in _FED:
    acc = optax_gaf.gaf_accumulator(0.5, rule=rule, num_microbatches=n)
    _FED[key] = jax.jit(
      optax.microbatching.microbatch(
        jax.grad(_linear),
        argnums=1,
        microbatch_size=1,
        accumulator=acc,
        num_real_microbatches=real,
      )
    )
  return _FED[key]


def _record(filtered, n):
  tx = optax_gaf.record_filtered(num_microbatches=n)
  _, state = tx.update(filtered, tx.init(None))
  return state


def test_more_microbatches_than_declared_is_an_error():
  """6 into num_microbatches=4 returned 6/4 of the mean."""
  xs = jnp.tile(jnp.array([[1.0, 0.0]]), (6, 1))
  with pytest.raises(Exception, match="more microbatches than declared"):
    jax.block_until_ready(_fed_fn(6, 4, "sequential")(jnp.zeros(2), xs))


@settings(max_examples=helpers.examples(10, 4), deadline=None)
@given(
  k=st.integers(2, 6),
  rule=st.sampled_from(["sequential", "pairwise"]),
  seed=st.integers(0, 2**31 - 1),
)
def test_property_any_count_fed_is_right_or_refused(k, rule, seed):
  """N=4 declared, k fed: k <= 4 gives the oracle's update on those k and
  acceptance_rate = num_accepted / k; k > 4 is an error. Would have found
  the clamped slots (issue 19, item 3)."""
  n = 4
  rng = np.random.default_rng(seed)
  (x,) = helpers.make_microgradients(rng, k, [(3,)], 0.6)
  fn = _fed_fn(k, n, rule)
  if k > n:
    with pytest.raises(Exception, match="more microbatches than declared"):
      jax.block_until_ready(fn(jnp.zeros(3), jnp.asarray(x)))
  else:
    out = fn(jnp.zeros(3), jnp.asarray(x))
    want, accepted, dist = helpers.ORACLES[rule](oracle.flatten([x]), 0.5)
    assume(not oracle.is_ambiguous(dist, 0.5))
    np.testing.assert_array_equal(out.accepted[:k], accepted)
    assert not np.any(out.accepted[k:]) and np.all(
      np.isnan(out.cosine_distance[k:])
    )
    assert int(out.num_microgradients) == k
    want = np.zeros(3) if want is None else want
    np.testing.assert_allclose(out.updates, want, rtol=1e-5, atol=1e-6)
    state = _record(out, n)
    assert float(state.acceptance_rate) == pytest.approx(accepted.sum() / k)


def test_num_real_microbatches_stops_early():
  """Fewer than N fed (optax's early stop): the update of those fed, and
  acceptance_rate over them, not over N."""
  x = jnp.array([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [9.0, 9.0]])
  out = _fed_fn(4, 4, "sequential", real=3)(jnp.zeros(2), x)
  np.testing.assert_array_equal(out.accepted, [True, True, False, False])
  np.testing.assert_allclose(out.updates, [1.0, 0.05], rtol=1e-6)
  assert int(out.num_microgradients) == 3
  assert float(_record(out, 4).acceptance_rate) == pytest.approx(2 / 3)


def test_gaf_accumulator_in_micro_vmap_is_refused_with_what_to_use():
  """micro_vmap fed the chunks' FilteredGradients back into update and
  filtered the bookkeeping as gradient coordinates (issue 19, item 2)."""
  acc = optax_gaf.gaf_accumulator(0.5, num_microbatches=2)
  fn = optax.microbatching.micro_vmap(
    jax.grad(_linear), in_axes=(None, 0), microbatch_size=2, accumulator=acc
  )
  with pytest.raises(TypeError, match="micro_vmap.*microbatch_size=1"):
    fn(jnp.zeros(2), jnp.ones((4, 2)))


def test_streaming_grads_takes_numpy_batches():
  """Called outside jit, the loop's traced index met the NumPy arrays."""
  params, batch = problem(3)
  fn = optax_gaf.streaming_filtered_grads(loss_fn, N, 0.9)
  losses, filtered = fn(params, jax.tree.map(np.asarray, batch))
  want_losses, want = fn(params, batch)
  np.testing.assert_array_equal(losses, want_losses)
  helpers.assert_close(filtered, want, rtol=0, atol=0)
