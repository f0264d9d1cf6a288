"""gaf in the training stack: one test per pattern users reach for.

Each test checks values: the filtered update against the float64 oracle (or
against the same optimizer run by hand), the inner optimizer's state on a
no-agreement step, restored checkpoints bitwise. docs/guides/compat.md is the
table these tests back.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.experimental import aggregating

import optax_gaf
from tests import oracle

N = 4
TAU = 0.5
# Microgradient patterns (signs of a shared direction): AGREE has one
# conflicting microgradient (rejected), DISAGREE only conflicts with the
# anchor (a no-agreement step for the sequential rule).
AGREE = (1, 1, -1, 1)
DISAGREE = (1, -1, -1, -1)


def _params():
  return {
    "w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2),
    "b": jnp.array([0.5, -0.25]),
  }


def _micro(signs, seed=0, dtype=jnp.float32, params=None):
  """Microgradients ``[len(signs), *shape]``: signed direction + 10% noise."""
  params = _params() if params is None else params
  rng = np.random.default_rng(seed)
  s = np.asarray(signs, np.float64)

  def leaf(p):
    d = rng.normal(size=p.shape)
    noise = rng.normal(size=(len(s),) + p.shape)
    x = s.reshape((-1,) + (1,) * p.ndim) * d + 0.1 * noise
    return jnp.asarray(x, dtype)

  return jax.tree.map(leaf, params)


def _oracle_update(grads, tau=TAU):
  """The float64 oracle's sequential update as a tree (None: no agreement)."""
  leaves, treedef = jax.tree.flatten(grads)
  update, _, _ = oracle.sequential(oracle.flatten(leaves), tau)
  if update is None:
    return None
  out, start = [], 0
  for x in leaves:
    size = int(np.prod(x.shape[1:]))
    out.append(update[start : start + size].reshape(x.shape[1:]))
    start += size
  return treedef.unflatten(out)


def _assert_tree_close(actual, expected, rtol=1e-6, atol=1e-7):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(
      np.asarray(a, np.float64), np.asarray(e, np.float64), rtol, atol
    )


def _assert_tree_equal(actual, expected):
  """Same structure, dtypes and bits (NaN equal to NaN)."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert np.asarray(a).dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _scaled(tree, factor):
  return jax.tree.map(lambda x: factor * np.asarray(x, np.float64), tree)


# --- Flax NNX -------------------------------------------------------------


# One transformation for both NNX tests and their functional reference, so
# the reference step compiles once.
NNX_TX = optax_gaf.process(
  optax.identity(),
  optax_gaf.gaf(TAU, num_microbatches=N),
  optax.sgd(0.1, momentum=0.9),
)


def _nnx_setup():
  from flax import nnx

  class Linear(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
      return self.dense(x)

  def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  return nnx, Linear(nnx.Rngs(0)), loss_fn, NNX_TX


def _regression_data(signs, seed):
  """x ``[N, 8, 3]`` shared by the microbatches, targets ``+-10``: the
  microgradients point along ``signs`` (the residual is the target's)."""
  rng = np.random.default_rng(seed)
  x = np.broadcast_to(rng.normal(size=(8, 3)), (len(signs), 8, 3))
  x = x + 0.05 * rng.normal(size=x.shape)
  y = 10.0 * np.asarray(signs, np.float64)[:, None, None] * np.ones((8, 2))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _linear_loss(p, x, y):
  return jnp.mean((x @ p["kernel"] + p["bias"] - y) ** 2)


@jax.jit
def _reference_step(p, state, x, y):
  grads = jax.vmap(jax.grad(_linear_loss), in_axes=(None, 0, 0))(p, x, y)
  updates, state = NNX_TX.update(grads, state, p)
  return optax.apply_updates(p, updates), state


def _reference_linear_run(kernel, bias, batches):
  """The same training, functional: jax.vmap(jax.grad) on a params dict."""
  p = {"kernel": kernel, "bias": bias}
  state = NNX_TX.init(p)
  for x, y in batches:
    p, state = _reference_step(p, state, x, y)
  return p


def test_nnx_optimizer_under_nnx_jit():
  nnx, model, loss_fn, tx = _nnx_setup()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  kernel0, bias0 = model.dense.kernel[...], model.dense.bias[...]

  @nnx.jit
  def train_step(model, optimizer, x, y):
    grads = nnx.vmap(nnx.grad(loss_fn), in_axes=(None, 0, 0))(model, x, y)
    optimizer.update(model, grads)

  batches = [_regression_data(AGREE, 1), _regression_data(DISAGREE, 2)]
  train_step(model, optimizer, *batches[0])
  s = optax_gaf.stats(optimizer.opt_state)
  assert all(isinstance(v, jax.Array) for v in s.values()), s
  assert not any(isinstance(v, nnx.Variable) for v in s.values()), s
  assert bool(s["ready"])
  np.testing.assert_array_equal(s["accepted"], [True, True, False, True])
  kernel1, bias1 = model.dense.kernel[...], model.dense.bias[...]
  momentum1 = jax.tree.map(jnp.copy, nnx.as_pure(optimizer.opt_state))

  train_step(model, optimizer, *batches[1])  # nothing agrees
  s = optax_gaf.stats(optimizer.opt_state)
  assert not bool(s["ready"])
  assert int(s["count"]) == 2 and int(s["skipped_steps"]) == 1
  # The true skip: parameters and momentum bitwise as after step 1.
  np.testing.assert_array_equal(model.dense.kernel[...], kernel1)
  np.testing.assert_array_equal(model.dense.bias[...], bias1)
  after = nnx.as_pure(optimizer.opt_state)
  _assert_tree_equal(after[2], momentum1[2])

  ref = _reference_linear_run(kernel0, bias0, batches)
  np.testing.assert_allclose(model.dense.kernel[...], ref["kernel"], 1e-5)
  np.testing.assert_allclose(model.dense.bias[...], ref["bias"], 1e-5)


def test_nnx_optimizer_inside_nnx_scan_over_steps():
  nnx, model, loss_fn, tx = _nnx_setup()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  kernel0, bias0 = model.dense.kernel[...], model.dense.bias[...]
  batches = [
    _regression_data(AGREE, 1),
    _regression_data(DISAGREE, 2),
    _regression_data(AGREE, 3),
  ]
  xs = jnp.stack([x for x, _ in batches])
  ys = jnp.stack([y for _, y in batches])

  @nnx.jit
  def train(model, optimizer, xs, ys):
    @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
    def body(carry, x, y):
      model, optimizer = carry
      grad_fn = nnx.vmap(nnx.value_and_grad(loss_fn), in_axes=(None, 0, 0))
      losses, grads = grad_fn(model, x, y)
      optimizer.update(model, grads)
      ready = optax.tree.get(nnx.as_pure(optimizer.opt_state), "ready")
      return (model, optimizer), ready

    _, ready = body((model, optimizer), xs, ys)
    return ready

  ready = train(model, optimizer, xs, ys)
  np.testing.assert_array_equal(ready, [True, False, True])
  s = optax_gaf.stats(optimizer.opt_state)
  assert int(s["count"]) == 3 and int(s["skipped_steps"]) == 1
  assert bool(s["ready"])
  ref = _reference_linear_run(kernel0, bias0, batches)
  np.testing.assert_allclose(model.dense.kernel[...], ref["kernel"], 1e-5)
  np.testing.assert_allclose(model.dense.bias[...], ref["bias"], 1e-5)


# --- Flax Linen TrainState ------------------------------------------------


def test_linen_train_state_apply_gradients():
  import flax.linen as nn
  from flax.training import train_state

  model = nn.Dense(2)
  x0 = jnp.ones((1, 3))
  params = model.init(jax.random.key(0), x0)["params"]
  tx = optax_gaf.process(
    optax.identity(), optax_gaf.gaf(TAU, num_microbatches=N), optax.sgd(0.1)
  )
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=tx
  )

  def loss(p, x, y):
    return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

  @jax.jit
  def step(state, x, y):
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(state.params, x, y)
    return state.apply_gradients(grads=grads), grads

  state1, grads = step(state, *_regression_data(AGREE, 1))
  filtered = _oracle_update(grads)
  expected = jax.tree.map(lambda p, f: p - 0.1 * f, params, filtered)
  _assert_tree_close(state1.params, expected, rtol=1e-5)
  state2, _ = step(state1, *_regression_data(DISAGREE, 2))
  _assert_tree_equal(state2.params, state1.params)  # skipped
  # TrainState.step counts every call; gaf's state counts the skips.
  assert int(state2.step) == 2
  assert int(optax_gaf.stats(state2.opt_state)["skipped_steps"]) == 1


# --- orbax checkpoints ----------------------------------------------------


def _full_featured_tx():
  return optax_gaf.process(
    optax.identity(),
    optax_gaf.gaf(
      optax_gaf.AdaptiveTau(
        k=1.0, history=8, min_count=2, cap=optax.linear_schedule(0.3, 1.2, 4)
      ),
      num_microbatches=N,
      granularity="per_leaf",
    ),
    optax.adamw(1e-2, weight_decay=1e-2),
  )


CHECKPOINT_TXS = {
  "default": lambda: optax_gaf.process(
    optax.identity(), optax_gaf.gaf(), optax.sgd(0.1, momentum=0.9)
  ),
  "every_feature": _full_featured_tx,
  "auto_tau": lambda: optax_gaf.process(
    optax.identity(),
    optax_gaf.gaf(
      optax_gaf.AutoTau(min_count=2),
      num_microbatches=N,
      granularity="per_leaf",
    ),
    optax.adamw(1e-2, weight_decay=1e-2),
  ),
}
CHECKPOINT_STEPS = (AGREE, DISAGREE, AGREE, AGREE, DISAGREE, (1, 1, 1, -1))


@pytest.mark.parametrize("name", sorted(CHECKPOINT_TXS))
def test_orbax_checkpoint_resumes_bitwise(name, tmp_path):
  import orbax.checkpoint as ocp

  tx = CHECKPOINT_TXS[name]()
  # Committed to one device like the arrays orbax restores, so that the
  # restored state runs the same compiled step.
  commit = lambda tree: jax.device_put(tree, jax.devices()[0])
  params = commit(_params())

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  grads = [commit(_micro(s, seed=i)) for i, s in enumerate(CHECKPOINT_STEPS)]
  p, state = params, commit(tx.init(params))
  for g in grads:
    p, state = step(p, state, g)
  expected_params, expected_state = p, state

  p, state = params, commit(tx.init(params))
  for g in grads[:3]:
    p, state = step(p, state, g)
  path = tmp_path / "opt_state"
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(path, jax.eval_shape(tx.init, params))
  finally:
    checkpointer.close()
  _assert_tree_equal(restored, state)
  state = restored
  for g in grads[3:]:
    p, state = step(p, state, g)
  _assert_tree_equal(p, expected_params)
  _assert_tree_equal(state, expected_state)
  s = optax_gaf.stats(state)
  assert int(s["count"]) == 6
  if name == "auto_tau":  # stricter than tau: at least the two conflicts
    assert int(s["skipped_steps"]) >= 2 and np.all(s["chance_stats"][:, 2] > 0)
  else:
    assert int(s["skipped_steps"]) == 2


# --- optax wrappers -------------------------------------------------------


def test_multisteps_inside_process_accumulates_filtered_updates():
  k, lr = 2, 0.5
  tx = optax_gaf.process(
    optax.identity(),
    optax_gaf.gaf(TAU, num_microbatches=N),
    optax.MultiSteps(optax.sgd(lr), every_k_schedule=k),
  )
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  g1, g2, g3 = _micro(AGREE, 1), _micro(DISAGREE, 2), _micro(AGREE, 3)

  u1, state = update(g1, state, params)
  _assert_tree_equal(u1, jax.tree.map(jnp.zeros_like, params))
  multi = state[2]
  u2, state = update(g2, state, params)  # no agreement: MultiSteps untouched
  _assert_tree_equal(u2, jax.tree.map(jnp.zeros_like, params))
  _assert_tree_equal(state[2], multi)
  assert int(state[2].mini_step) == 1
  u3, state = update(g3, state, params)  # the k-th filtered update: emit
  f1, f3 = _oracle_update(g1), _oracle_update(g3)
  expected = jax.tree.map(lambda a, b: -lr * (a + b) / k, f1, f3)
  _assert_tree_close(u3, expected, rtol=1e-5)
  assert int(state[2].mini_step) == 0 and int(state[2].gradient_step) == 1


def test_multisteps_outside_gaf_raises_the_params_shaped_error():
  tx = optax.MultiSteps(optax.chain(optax_gaf.gaf(TAU), optax.sgd(0.1)), 2)
  params = _params()
  with pytest.raises(ValueError, match="shaped exactly like the params"):
    jax.jit(tx.update)(_micro(AGREE), tx.init(params), params)


def test_inject_hyperparams_tau_schedule_and_tau_from_outside():
  inject = optax.inject_hyperparams(
    optax_gaf.gaf, static_args=("num_microbatches",)
  )
  params = _params()
  grads = _micro(AGREE, 5)
  # Two decisions: at tau 0.5 the conflicting one is out, at 2.0 all are in.
  schedule = optax.piecewise_constant_schedule(TAU, {2: 4.0})
  tx = inject(tau=schedule, num_microbatches=N)
  state = tx.init(params)
  update = jax.jit(tx.update)
  accepted = []
  for _ in range(4):
    _, state = update(grads, state, params)
    accepted.append(np.asarray(optax_gaf.stats(state)["accepted"]))
    assert float(state.hyperparams["tau"]) == float(schedule(len(accepted) - 1))
  np.testing.assert_array_equal(
    accepted, [[True, True, False, True]] * 2 + [[True] * 4] * 2
  )

  tx = inject(tau=TAU, num_microbatches=N)
  state = tx.init(params)
  update = jax.jit(tx.update)
  u, state = update(grads, state, params)
  _assert_tree_close(u, _oracle_update(grads, TAU), rtol=1e-5)
  state.hyperparams["tau"] = jnp.float32(2.0)  # accept everything
  u, state = update(grads, state, params)
  _assert_tree_close(u, _oracle_update(grads, 2.0), rtol=1e-5)
  assert float(optax_gaf.stats(state)["tau"]) == 2.0
  state.hyperparams["tau"] = jnp.float32(0.0)  # only exact alignment
  u, state = update(grads, state, params)
  assert not bool(optax_gaf.stats(state)["ready"])
  _assert_tree_equal(u, jax.tree.map(jnp.zeros_like, params))


def _plateau_expectations(grads, values):
  """Updates of sgd(0.1) + reduce_on_plateau(patience=1, factor=0.5)."""
  scale, best, out = 1.0, np.inf, []
  for g, v in zip(grads, values):
    if v < (1 - 1e-4) * best:
      best = v
    else:
      scale *= 0.5
    out.append(_scaled(_oracle_update(g), -0.1 * scale))
  return out


def _plateau():
  return optax.contrib.reduce_on_plateau(factor=0.5, patience=1)


def test_chain_with_reduce_on_plateau_and_value():
  tx = optax.chain(optax_gaf.gaf(TAU), optax.sgd(0.1), _plateau())
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = [_micro(AGREE, i) for i in range(3)]
  values = [1.0, 2.0, 2.0]
  expected = _plateau_expectations(grads, values)
  for g, v, e in zip(grads, values, expected):
    u, state = update(g, state, params, value=jnp.float32(v))
    _assert_tree_close(u, e, rtol=1e-5)
  assert float(state[2].scale) == 0.25


def test_process_with_reduce_on_plateau_and_value():
  tx = optax_gaf.process(
    optax.identity(),
    optax_gaf.gaf(TAU),
    optax.chain(optax.sgd(0.1), _plateau()),
  )
  params = _params()
  grads = _micro(AGREE)
  u, _ = jax.jit(tx.update)(
    grads, tx.init(params), params, value=jnp.float32(1.0)
  )
  _assert_tree_close(u, _scaled(_oracle_update(grads), -0.1), rtol=1e-5)


def test_process_with_reduce_on_plateau_extra_args_identity():
  """An explicitly wrapped preprocessor works the same (no double wrapping)."""
  tx = optax_gaf.process(
    optax.with_extra_args_support(optax.identity()),
    optax_gaf.gaf(TAU),
    optax.chain(optax.sgd(0.1), _plateau()),
  )
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = [_micro(AGREE, 0), _micro(DISAGREE, 1), _micro(AGREE, 1)]
  u, state = update(grads[0], state, params, value=jnp.float32(1.0))
  _assert_tree_close(u, _scaled(_oracle_update(grads[0]), -0.1), rtol=1e-5)
  plateau = state[2][1]
  # A skipped step never shows its loss to reduce_on_plateau.
  u, state = update(grads[1], state, params, value=jnp.float32(5.0))
  _assert_tree_equal(state[2][1], plateau)
  _assert_tree_equal(u, jax.tree.map(jnp.zeros_like, params))
  u, state = update(grads[2], state, params, value=jnp.float32(2.0))
  _assert_tree_close(u, _scaled(_oracle_update(grads[2]), -0.05), rtol=1e-5)


# --- contrib optimizers as the inner optimizer ----------------------------


def _quadratic_problem():
  """Least squares on a 4x3 matrix and a bias: microbatches of 8 rows."""
  rng = np.random.default_rng(0)
  w_true = rng.normal(size=(4, 3))
  x = rng.normal(size=(N, 8, 4))
  y = x @ w_true + 0.01 * rng.normal(size=(N, 8, 3))
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}

  def loss(p, x, y):
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

  return params, loss, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


@pytest.mark.parametrize(
  "inner",
  [
    pytest.param(lambda: optax.contrib.schedule_free_adamw(0.1), id="sf"),
    pytest.param(lambda: optax.contrib.muon(0.2), id="muon"),
  ],
)
def test_contrib_optimizer_as_inner(inner):
  params, loss, x, y = _quadratic_problem()
  tx = optax_gaf.process(
    optax.identity(), optax_gaf.gaf(0.9, num_microbatches=N), inner()
  )

  @jax.jit
  def step(p, state, grads):
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  grad_fn = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))
  total = jax.jit(lambda p: loss(p, x.reshape(-1, 4), y.reshape(-1, 3)))
  state = tx.init(params)
  p = params
  losses = [float(total(p))]
  for _ in range(10):
    p, state = step(p, state, grad_fn(p, x, y))
    losses.append(float(total(p)))
  assert int(optax_gaf.stats(state)["skipped_steps"]) == 0
  assert losses[-1] < 0.5 * losses[0], losses
  inner_state = state[2]
  p_skip, state = step(p, state, _micro(DISAGREE, params=p))
  assert not bool(optax_gaf.stats(state)["ready"])
  _assert_tree_equal(state[2], inner_state)
  _assert_tree_equal(p_skip, p)


# --- apply_if_finite ------------------------------------------------------


def _finite_tx(aggregator):
  return optax_gaf.process(
    optax.identity(), aggregator, optax.apply_if_finite(optax.sgd(0.5), 2)
  )


def test_apply_if_finite_inside_process():
  params = {"w": jnp.zeros(3)}
  gaf_tx = _finite_tx(optax_gaf.gaf(TAU))
  gaf_update = jax.jit(gaf_tx.update)
  # Eight finite, agreeing microgradients whose sum overflows float32: gaf's
  # update is their weighted mean (finite); the plain mean sums first.
  rows = 5e37 * np.array([[1.0, 0.5 + 0.01 * i, 0.1] for i in range(8)])
  big = {"w": jnp.asarray(rows, jnp.float32)}
  with np.errstate(over="ignore"):
    assert not np.isfinite(np.sum(np.asarray(big["w"]), axis=0)).all()
  u, state = gaf_update(big, gaf_tx.init(params), params)
  np.testing.assert_allclose(u["w"], -0.5 * rows.mean(axis=0), rtol=1e-6)
  assert int(state[2].total_notfinite) == 0
  mean_tx = _finite_tx(aggregating.average_per_element_updates())
  u, state = jax.jit(mean_tx.update)(big, mean_tx.init(params), params)
  assert int(state[2].total_notfinite) == 1  # rejected by apply_if_finite
  _assert_tree_equal(u, {"w": jnp.zeros(3)})

  # A microgradient with an inf: gaf drops it, apply_if_finite never sees it.
  g = _micro((1,) * 8, params=params)
  g = {"w": g["w"].at[1, 0].set(jnp.inf)}
  u, state = gaf_update(g, gaf_tx.init(params), params)
  expected = np.delete(np.asarray(g["w"], np.float64), 1, axis=0).mean(0)
  np.testing.assert_allclose(u["w"], -0.5 * expected, rtol=1e-6)
  assert int(state[2].total_notfinite) == 0
  # Nothing usable: a no-agreement step; process skips apply_if_finite, whose
  # counters stay as they were.
  bad = {"w": jnp.full((8, 3), jnp.nan)}
  state0 = gaf_tx.init(params)
  u, state = gaf_update(bad, state0, params)
  assert not bool(state[1].ready)
  _assert_tree_equal(state[2], state0[2])
  _assert_tree_equal(u, {"w": jnp.zeros(3)})


def test_apply_if_finite_outside_gaf_fails():
  """Outside gaf it fails in optax: its reject branch returns zeros shaped
  like its input, the [N, ...] microgradients, while gaf returns params-shaped
  updates, and ``lax.cond`` refuses the mismatch. gaf itself only ever sees
  the [N, ...] microgradients here, so it cannot name the cause."""
  tx = optax.apply_if_finite(optax.chain(optax_gaf.gaf(TAU), optax.sgd(1)), 2)
  params = _params()
  with pytest.raises(TypeError, match="cond branches must have equal"):
    jax.jit(tx.update)(_micro(AGREE), tx.init(params), params)


# --- mixed precision ------------------------------------------------------


def test_bf16_microgradients_with_f32_params_in_process():
  params = _params()
  agg = optax_gaf.gaf(TAU, num_microbatches=N)
  tx = optax_gaf.process(optax.identity(), agg, optax.adamw(1e-2))
  update = jax.jit(tx.update)
  grads = _micro(AGREE, 1, dtype=jnp.bfloat16)
  state = tx.init(params)
  u, state = update(grads, state, params)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(u))
  # The same as gaf alone, then adamw alone, on the bf16 filtered update.
  adamw = optax.adamw(1e-2)

  @jax.jit
  def by_hand(grads, params):
    filtered, _ = agg.update(grads, agg.init(params), params)
    return filtered, *adamw.update(filtered, adamw.init(params), params)

  filtered, expected, adam_state = by_hand(grads, params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(filtered))
  _assert_tree_close(u, expected, rtol=1e-6)
  _assert_tree_close(state[2], adam_state, rtol=1e-6)
  _assert_tree_close(
    filtered, _oracle_update(grads), rtol=1e-2, atol=1e-3
  )  # bf16 rounding of the result

  adam_before = state[2]
  u, state = update(_micro(DISAGREE, 2, dtype=jnp.bfloat16), state, params)
  assert not bool(state[1].ready)
  _assert_tree_equal(state[2], adam_before)
  _assert_tree_equal(u, jax.tree.map(jnp.zeros_like, params))


def test_optax_aggregating_process_still_fails_on_bf16_with_f32_params():
  """optax's own process returns bf16 zeros on the skip branch and float32
  updates on the other, so ``lax.cond`` refuses. If this starts passing,
  optax fixed it and optax_gaf.process can defer to it."""
  params = _params()
  tx = aggregating.process(
    optax.identity(), optax_gaf.gaf(TAU), optax.adamw(1e-2)
  )
  grads = _micro(AGREE, dtype=jnp.bfloat16)
  with pytest.raises(TypeError, match="cond branches must have equal"):
    jax.jit(tx.update)(grads, tx.init(params), params)


# --- donation -------------------------------------------------------------


def test_jit_with_donated_params_and_state():
  tx = optax_gaf.process(
    optax.identity(),
    optax_gaf.gaf(TAU, num_microbatches=N, granularity="per_leaf"),
    optax.adamw(1e-2),
  )

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  plain, donating = jax.jit(step), jax.jit(step, donate_argnums=(0, 1))
  grads = [_micro(s, seed=i) for i, s in enumerate(CHECKPOINT_STEPS)]
  p, state = _params(), tx.init(_params())
  for g in grads:
    p, state = plain(p, state, g)
  q, dstate = _params(), tx.init(_params())
  for g in grads:
    old = q["w"]
    q, dstate = donating(q, dstate, g)
    assert old.is_deleted()  # the buffer was donated
  _assert_tree_equal(q, p)
  _assert_tree_equal(dstate, state)


# --- masks and partitions -------------------------------------------------


def test_masked_gaf_raises_the_masked_node_error():
  tx = optax.masked(optax_gaf.gaf(TAU), {"w": True, "b": False})
  params = _params()
  with pytest.raises(ValueError, match="MaskedNode"):
    jax.jit(tx.update)(_micro(AGREE), tx.init(params), params)


LABELS = {"w": "matrix", "b": "vector"}


def _partition_inner():
  return {"matrix": optax.sgd(0.1), "vector": optax.sgd(1.0)}


def test_multi_transform_with_gaf_per_partition_is_refused():
  """optax.partition is built on optax.masked: gaf sees MaskedNode leaves,
  cannot tell the two apart, and points to the pattern that works."""
  tx = optax.multi_transform(
    {
      name: optax_gaf.process(optax.identity(), optax_gaf.gaf(TAU), inner)
      for name, inner in _partition_inner().items()
    },
    LABELS,
  )
  params = _params()
  with pytest.raises(ValueError, match="Put gaf first"):
    tx.update(_micro(AGREE), tx.init(params), params)


def test_gaf_before_multi_transform():
  """One decision over the whole pytree, then an optimizer per partition."""
  tx = optax_gaf.process(
    optax.identity(),
    optax_gaf.gaf(TAU, num_microbatches=N),
    optax.multi_transform(_partition_inner(), LABELS),
  )
  params = _params()
  state = tx.init(params)
  grads = _micro(AGREE)
  u, state = jax.jit(tx.update)(grads, state, params)
  filtered = _oracle_update(grads)
  np.testing.assert_allclose(u["w"], -0.1 * filtered["w"], rtol=1e-5)
  np.testing.assert_allclose(u["b"], -1.0 * filtered["b"], rtol=1e-5)
  inner = state[2]
  u, state = jax.jit(tx.update)(_micro(DISAGREE, 1), state, params)
  _assert_tree_equal(state[2], inner)


def test_per_leaf_decisions_before_multi_transform():
  """Decisions per tensor: granularity='per_leaf' inside the same pattern."""
  tx = optax_gaf.process(
    optax.identity(),
    optax_gaf.gaf(TAU, num_microbatches=N, granularity="per_leaf"),
    optax.multi_transform(_partition_inner(), LABELS),
  )
  params = _params()
  grads = _micro(AGREE)
  u, state = jax.jit(tx.update)(grads, tx.init(params), params)
  for name, lr in (("w", 0.1), ("b", 1.0)):
    expected = _oracle_update({name: grads[name]})[name]
    np.testing.assert_allclose(u[name], -lr * expected, rtol=1e-5)
