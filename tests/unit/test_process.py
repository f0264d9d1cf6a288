"""process(schedule_steps=...): the steps a schedule in the optimizer counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gaf

SKIPPED = np.array([0, 1, 1, 0, 1, 1, 1, 0, 1, 0], bool)  # 6 of 10, as in #21
B1, B2, EPS, WD = 0.9, 0.999, 1e-8, 1e-2


def schedule(count):
  return 0.01 * (count + 1.0)


def _grads(step, g):
  """Two agreeing copies of g, or two orthogonal ones (a skip at tau=0.5)."""
  if SKIPPED[step]:
    return jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], jnp.float32)
  return jnp.asarray(np.stack([g, g]), jnp.float32)


def _run(inner, schedule_steps):
  tx = optax_gaf.process(
    optax.identity(),
    optax_gaf.gaf(0.5),
    inner,
    schedule_steps=schedule_steps,
  )
  params = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
  state = tx.init(params)
  update = jax.jit(tx.update)
  gs = np.random.default_rng(0).normal(size=(len(SKIPPED), 3))
  for t, g in enumerate(gs):
    updates, state = update(_grads(t, g), state, params)
    params = optax.apply_updates(params, updates)
  return params, state, gs


def _adamw_oracle(gs, schedule_steps):
  """float64 adamw: lr at the schedule's count, bias by applied steps."""
  p = np.asarray([0.5, -1.0, 2.0])
  mu = np.zeros(3)
  nu = np.zeros(3)
  applied = 0
  for t, g in enumerate(gs):
    if SKIPPED[t]:
      continue
    count = t if schedule_steps == "all" else applied
    applied += 1
    mu = B1 * mu + (1 - B1) * g
    nu = B2 * nu + (1 - B2) * g**2
    mu_hat = mu / (1 - B1**applied)
    nu_hat = nu / (1 - B2**applied)
    p = p - schedule(count) * (mu_hat / (np.sqrt(nu_hat) + EPS) + WD * p)
  return p


@pytest.mark.parametrize("schedule_steps", ["all", "applied"])
def test_adamw_schedule_and_bias_correction_against_oracle(schedule_steps):
  inner = optax.adamw(schedule, B1, B2, EPS, weight_decay=WD)
  params, state, gs = _run(inner, schedule_steps)
  np.testing.assert_allclose(
    params, _adamw_oracle(gs, schedule_steps), rtol=2e-5
  )
  want = len(SKIPPED) if schedule_steps == "all" else (~SKIPPED).sum()
  assert int(_find(state, optax.ScaleByScheduleState).count) == want
  adam = _find(state, optax.ScaleByAdamState)
  assert int(adam.count) == (~SKIPPED).sum()  # the moments' own count


def _find(state, kind):
  (found,) = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
    if isinstance(s, kind)
  ]
  return found


def test_the_oracle_tells_the_two_modes_apart():
  gs = np.random.default_rng(0).normal(size=(len(SKIPPED), 3))
  assert not np.allclose(_adamw_oracle(gs, "all"), _adamw_oracle(gs, "app"))


@pytest.mark.parametrize("schedule_steps", ["all", "applied"])
def test_an_injected_learning_rate_schedule_counts_the_chosen_steps(
  schedule_steps,
):
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
  params, state, gs = _run(inner, schedule_steps)
  p = np.asarray([0.5, -1.0, 2.0])  # float64 sgd oracle
  for t in np.flatnonzero(~SKIPPED):
    count = t if schedule_steps == "all" else (~SKIPPED[:t]).sum()
    p = p - schedule(count) * gs[t]
  np.testing.assert_allclose(params, p, rtol=1e-5)
  want = len(SKIPPED) if schedule_steps == "all" else (~SKIPPED).sum()
  assert int(state[2].count) == want
  assert int(state[2].hyperparams_states["learning_rate"].count) == want


def test_applied_leaves_the_state_bitwise_untouched_on_a_skip():
  tx = optax_gaf.process(
    optax.identity(),
    optax_gaf.gaf(0.5),
    optax.adamw(schedule),
    schedule_steps="applied",
  )
  params = jnp.ones(3)
  state = tx.init(params)
  _, after = tx.update(_grads(1, None), state, params)
  for a, b in zip(jax.tree.leaves(state[2]), jax.tree.leaves(after[2])):
    np.testing.assert_array_equal(a, b)


def test_unknown_schedule_steps_is_refused():
  with pytest.raises(ValueError, match="'all'.*'applied'"):
    optax_gaf.process(
      optax.identity(), optax_gaf.gaf(), optax.sgd(0.1), schedule_steps="x"
    )
