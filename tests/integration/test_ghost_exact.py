"""No silent wrong result on the ghost route (issue 26): every gather mode
and dtype cast the capture accepts has autodiff's Gram matrix, anything else
takes an exact route, and each misuse gets a message that names the fix.

Each case compares ``ghost_microgradients`` with ``microbatch_grads`` (the
stacked route) in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gaf
from optax_gaf import _gram
from optax_gaf import rules
from optax_gaf._ghost import embedding
from optax_gaf._ghost import layers
from optax_gaf._ghost import trace

EMB = embedding.Embedding


def stacked_gram(loss, n, params, batch, *args):
  g = optax_gaf.microbatch_grads(loss, n)(params, batch, *args)[1]
  return _gram.gram(jax.tree.leaves(g))


def ghost_gram(loss, n, params, batch, *args, route="auto"):
  ghost = optax_gaf.ghost_microgradients(loss, n, route=route)
  return ghost(params, batch, *args)[1].gram()


def routes_of(loss, n, params, batch, *args):
  out = []

  def run(p, b):
    ghost = optax_gaf.ghost_microgradients(loss, n)(p, b, *args)[1]
    out[:] = ghost.routes
    return ghost.gram()

  jax.jit(run)(params, batch)
  return out


def gaf_step(producer, loss, n, params, batch, tau):
  tx = optax_gaf.gaf(tau, num_microbatches=n)

  @jax.jit
  def run(p, b):
    return tx.update(producer(loss, n)(p, b)[1], tx.init(p), p)

  return run(params, batch)


def assert_same_step(loss, n, params, batch, tau):
  got, state = gaf_step(
    optax_gaf.ghost_microgradients, loss, n, params, batch, tau
  )
  want, want_state = gaf_step(
    optax_gaf.microbatch_grads, loss, n, params, batch, tau
  )
  np.testing.assert_array_equal(state.accepted, want_state.accepted)
  np.testing.assert_allclose(
    state.cosine_distance, want_state.cosine_distance, rtol=1e-10
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14),
    got,
    want,
  )
  return want_state


def assert_same_decisions(gram, want_gram, taus):
  """The sequential rule decides alike from both Gram matrices."""
  for tau in taus:
    got = rules.sequential(*_gram.sanitized(gram), tau)
    want = rules.sequential(*_gram.sanitized(want_gram), tau)
    np.testing.assert_array_equal(got.accepted, want.accepted, err_msg=tau)


def normal(seed, shape, dtype=jnp.float64):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


# --- gathers: out-of-range ids


def padded_bag_loss(p, b):
  """An embedding bag whose padding id is the vocabulary size."""
  h = p["table"][b["ids"]].sum(axis=1)
  return jnp.sum(jnp.sin(h @ p["head"]) * b["t"][:, None])


def padded_bag_setup():
  params = {"table": normal(0, (6, 3)), "head": normal(1, (3, 2))}
  ids = jnp.array([[0, 2, 6], [2, 6, 1], [5, 6, 6], [1, 3, 2]] * 2)
  return params, {"ids": ids, "t": jnp.linspace(-1.0, 1.0, 8)}


@pytest.mark.parametrize("route", ["ghost", "materialize", "auto"])
def test_padding_id_past_the_table_is_dropped_as_autodiff_does(route):
  """``table[ids]`` reads an id past the table clamped, but its gradient
  drops that row: the Gram matrix must drop it too."""
  with jax.enable_x64(True):
    params, batch = padded_bag_setup()
    want = jax.jit(stacked_gram, static_argnums=(0, 1))(
      padded_bag_loss, 4, params, batch
    )
    got = jax.jit(ghost_gram, static_argnums=(0, 1), static_argnames="route")(
      padded_bag_loss, 4, params, batch, route=route
    )
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert_same_decisions(got, want, np.linspace(0.5, 1.5, 41))
    assert_same_step(padded_bag_loss, 4, params, batch, 1.1)


@pytest.mark.parametrize(
  "lookup, kind",
  [
    (lambda w, i: w.at[i].get(mode="clip"), EMB),
    (
      lambda w, i: w.at[i].get(mode="fill", fill_value=0.0),
      embedding.Embedding,
    ),
    (lambda w, i: w.at[i].get(mode="promise_in_bounds"), EMB),
    (lambda w, i: w[i], EMB),
    (
      lambda w, i: jax.lax.gather(
        w,
        i[:, None],
        jax.lax.GatherDimensionNumbers((1,), (0,), (0,)),
        (1, 3),
        unique_indices=True,
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
      ),
      layers.Opaque,
    ),
  ],
  ids=["clip", "fill", "promise_in_bounds", "index", "unique"],
)
def test_every_gather_mode_matches_autodiff(lookup, kind):
  """Ids below, inside and past the table, repeated across microbatches."""

  def loss(p, b):
    return jnp.sum(jnp.sin(lookup(p, b["ids"])) * b["t"])

  with jax.enable_x64(True):
    table = normal(0, (6, 3))
    ids = jnp.array([0, 2, 7, 2, 2, -1, 5, 9, 0, 1, -8, 6])
    if kind is layers.Opaque:  # it promises ids unique per microbatch
      ids = jnp.arange(12) % 6
    batch = {"ids": ids, "t": normal(2, (12, 3))}
    one = {"ids": ids[:3], "t": batch["t"][:3]}
    (site,) = trace.find_sites(loss, table, one).sites
    assert type(site.layer) is kind
    want = jax.jit(stacked_gram, static_argnums=(0, 1))(loss, 4, table, batch)
    for route in ("ghost", "materialize"):
      got = jax.jit(ghost_gram, static_argnums=(0, 1), static_argnames="route")(
        loss, 4, table, batch, route=route
      )
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# --- dtype casts


def complex_loss(p, b):
  """A real parameter cast to complex before a matmul."""
  y = b["x"] @ p["w"].astype(jnp.complex128)
  return jnp.sum(jnp.abs(y) ** 2) / 4 + jnp.sum(jnp.real(y * b["t"]))


def int_loss(p, b):
  """Parameters cast to int before an int matmul and a gather."""
  y = jnp.sin(b["x"] @ p["w"]).sum()
  counts = b["ids"] @ p["v"].astype(jnp.int32)
  rows = jnp.take(p["u"].astype(jnp.int32), b["ids"], axis=0)
  return y + 1e-3 * (counts.sum() + rows.sum()).astype(y.dtype)


@pytest.mark.parametrize(
  "loss", [complex_loss, int_loss], ids=["complex", "int"]
)
def test_casts_to_complex_or_int_take_the_direct_route(loss):
  """Autodiff takes the real part of a complex cast's gradient and gives an
  int cast none: the leaf goes direct, with autodiff's gradients."""
  with jax.enable_x64(True):
    params = {"w": normal(0, (3, 4))}
    if loss is int_loss:
      params |= {"u": 9 * normal(5, (3, 2)), "v": 9 * normal(6, (3, 4))}
    batch = {
      "x": normal(1, (8, 3)) + 1j * normal(2, (8, 3))
      if loss is complex_loss
      else normal(1, (8, 3)),
      "t": normal(3, (8, 4)) + 1j * normal(4, (8, 4)),
      "ids": jnp.arange(24).reshape(8, 3) % 3,
    }
    want = jax.jit(stacked_gram, static_argnums=(0, 1))(loss, 4, params, batch)
    for route in ("ghost", "materialize", "auto"):
      got = jax.jit(ghost_gram, static_argnums=(0, 1), static_argnames="route")(
        loss, 4, params, batch, route=route
      )
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    routes = routes_of(loss, 4, params, batch)
    # complex_loss: w; int_loss: u and v (the int casts), then w (a layer).
    assert routes[:2] == (
      ["direct"] if loss is complex_loss else ["direct"] * 2
    )


# --- odd trees, static arguments and misuse


def mlp(p, b):
  return jnp.mean(jnp.tanh(b["x"] @ p["w"] + p["b"]) ** 2)


def mlp_setup():
  params = {"w": normal(0, (3, 4), jnp.float32), "b": jnp.zeros(4)}
  return params, {"x": normal(1, (8, 3), jnp.float32)}


def test_params_with_no_leaves_get_the_stacked_routes_message():
  _, batch = mlp_setup()
  loss = lambda p, b: jnp.mean(b["x"] ** 2)
  with pytest.raises(ValueError, match="pytree has no leaves"):
    optax_gaf.ghost_microgradients(loss, 4)({}, batch)
  _, grads = optax_gaf.microbatch_grads(loss, 4)({}, batch)
  with pytest.raises(ValueError, match="pytree has no leaves"):
    optax_gaf.gaf().update(grads, optax_gaf.gaf().init({}))


@pytest.mark.parametrize("route", ["ghost", "materialize"])
def test_zero_size_and_none_leaves_work_as_stacked(route):
  """A zero-size leaf read by a dot, on a step with a NaN microbatch (the
  rescaled route, which asks every leaf for its largest entry)."""
  params, batch = mlp_setup()
  params |= {"none": None, "z": jnp.zeros((3, 0))}
  batch["x"] = batch["x"].at[2].set(jnp.nan)

  def loss(p, b):
    return mlp(p, b) + jnp.sum(b["x"] @ p["z"])

  def step(producer, **kw):
    tx = optax_gaf.gaf(1.5, num_microbatches=4)

    @jax.jit
    def run(p, b):
      grads = producer(loss, 4, **kw)(p, b)[1]
      return tx.update(grads, tx.init(p), p)

    return run(params, batch)

  got, state = step(optax_gaf.ghost_microgradients, route=route)
  want, want_state = step(optax_gaf.microbatch_grads)
  np.testing.assert_array_equal(state.accepted, want_state.accepted)
  assert got["none"] is None and got["z"].shape == (3, 0)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    got,
    want,
  )


def test_complex_leaf_gets_the_stacked_routes_message():
  params, batch = mlp_setup()
  params["w"] = params["w"].astype(jnp.complex64)

  def loss(p, b):
    return jnp.mean(jnp.abs(b["x"] @ p["w"]) ** 2)

  with pytest.raises(TypeError, match="is complex .* separate real leaves"):
    optax_gaf.ghost_microgradients(loss, 4)(params, batch)
  _, grads = optax_gaf.microbatch_grads(loss, 4)(params, batch)
  with pytest.raises(TypeError, match="is complex .* separate real leaves"):
    optax_gaf.gaf().update(grads, optax_gaf.gaf().init(params), params)


def test_static_python_arguments_as_microbatch_grads_takes_them():
  """A Python bool and a callable in *args, closed over per microbatch."""
  params, batch = mlp_setup()

  def loss(p, b, train, act):
    h = act(b["x"] @ p["w"] + p["b"])
    return jnp.mean(h**2) * (2.0 if train else 1.0)

  got = optax_gaf.ghost_microgradients(loss, 4)(params, batch, True, jnp.sin)
  want = optax_gaf.microbatch_grads(loss, 4)(params, batch, True, jnp.sin)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  g = _gram.gram(jax.tree.leaves(want[1]))
  np.testing.assert_allclose(got[1].gram(), g, rtol=1e-5)


def test_has_aux_with_a_scalar_loss_says_what_to_return():
  params, batch = mlp_setup()
  grad_fn = optax_gaf.ghost_microgradients(mlp, 4, has_aux=True)
  with pytest.raises(ValueError, match=r"has_aux=True, loss_fn must return"):
    grad_fn(params, batch)


_USE_STACKED = "microbatch_grads"


@pytest.mark.parametrize(
  "tx",
  [
    lambda: optax.MultiSteps(optax.chain(optax_gaf.gaf(0.9), optax.sgd(1)), 2),
    lambda: optax.apply_if_finite(
      optax.chain(optax_gaf.gaf(), optax.sgd(1)), 2
    ),
    lambda: optax_gaf.adacons(),
    lambda: optax_gaf.and_mask(),
    lambda: optax.chain(optax.scale(2.0), optax_gaf.gaf(0.9)),
  ],
  ids=["MultiSteps", "apply_if_finite", "adacons", "and_mask", "scale"],
)
def test_transforms_that_need_stacked_microgradients_say_so(tx):
  params, batch = mlp_setup()
  tx = tx()

  @jax.jit
  def step(p, b):
    _, ghost = optax_gaf.ghost_microgradients(mlp, 4)(p, b)
    return tx.update(ghost, tx.init(p), p)

  with pytest.raises(TypeError, match=_USE_STACKED):
    step(params, batch)


def test_returning_the_ghost_object_from_jit_says_so():
  params, batch = mlp_setup()
  grad_fn = jax.jit(optax_gaf.ghost_microgradients(mlp, 4))
  with pytest.raises(TypeError, match="same traced step"):
    grad_fn(params, batch)


# --- per_leaf diagnostics on one scale


def oracle_diversity(grads):
  """float64: sum_i ||g_i||^2 / ||sum_i g_i||^2 over the usable ones."""
  flat = np.concatenate(
    [np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in grads], 1
  )
  sq = np.sum(flat**2, axis=1)
  ok = np.isfinite(sq) & (sq > 0)
  return sq[ok].sum() / np.sum(flat[ok].sum(0) ** 2)


@pytest.mark.parametrize("bad", ["nan", "inf", "zero"])
@pytest.mark.parametrize("producer", ["stacked", "ghost"])
def test_per_leaf_gradient_diversity_on_a_rescaled_step(bad, producer):
  """A NaN, inf or zero microbatch sends stage 1 down the rescaled route,
  which scales each leaf by its own factor: the diversity must still be
  that of the microgradients themselves."""
  params = {
    "w": normal(0, (3, 4), jnp.float32),
    "v": normal(5, (4, 2), jnp.float32) * 1e3,  # leaves far apart in scale
  }
  batch = {"x": normal(1, (8, 3), jnp.float32), "s": jnp.ones(8)}
  batch["s"] = (
    batch["s"].at[2:4].set({"nan": jnp.nan, "inf": jnp.inf}.get(bad, 0.0))
  )

  def loss(p, b):
    return jnp.mean(
      jnp.sin(jnp.tanh(b["x"] @ p["w"]) @ p["v"]) * b["s"][:, None]
    )

  make = {
    "stacked": optax_gaf.microbatch_grads,
    "ghost": optax_gaf.ghost_microgradients,
  }[producer]
  tx = optax_gaf.gaf(1.5, granularity="per_leaf", num_microbatches=4)

  @jax.jit
  def step(p, b):
    return tx.update(make(loss, 4)(p, b)[1], tx.init(p), p)[1]

  state = step(params, batch)
  with jax.enable_x64(True):
    grads = optax_gaf.microbatch_grads(loss, 4)(_f64(params), _f64(batch))[1]
    want = oracle_diversity(jax.tree.leaves(grads))
  np.testing.assert_allclose(state.gradient_diversity, want, rtol=1e-4)


def _f64(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float64), tree)


# --- jax.checkpoint


@pytest.mark.parametrize(
  "wrap",
  [
    lambda f: jax.checkpoint(f),
    lambda f: jax.checkpoint(
      f, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    ),
  ],
  ids=["remat", "policy"],
)
def test_layers_inside_jax_checkpoint_keep_their_ghost_route(wrap):
  """The whole loss and one block under jax.checkpoint: the layers inside
  are still found (the re-run keeps the checkpoint), exact in float64."""
  with jax.enable_x64(True):
    params = {
      "w1": normal(0, (3, 5)),
      "b1": normal(1, (5,)),
      "w2": normal(2, (5, 2)),
    }
    batch = {"x": normal(3, (8, 3)), "t": normal(4, (8, 2))}
    block = wrap(lambda w, b, x: jnp.tanh(x @ w + b))

    def loss(p, b):
      h = block(p["w1"], p["b1"], b["x"])
      return jnp.sum(jnp.sin(h @ p["w2"]) * b["t"])

    for fn in (loss, wrap(loss)):
      routes = routes_of(fn, 4, params, batch)
      assert routes[0] == "direct" and "direct" not in routes[1:]
      want = jax.jit(stacked_gram, static_argnums=(0, 1))(fn, 4, params, batch)
      for route in ("ghost", "materialize"):
        got = jax.jit(
          ghost_gram, static_argnums=(0, 1), static_argnames="route"
        )(fn, 4, params, batch, route=route)
        np.testing.assert_allclose(got, want, rtol=1e-12)
