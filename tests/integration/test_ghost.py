"""ghost_microgradients, ghost_filtered_grads: no N x P arrays, the same GAF.

Checked against float64 NumPy oracles (tests/oracle_models.py) and against
the materialized route (microbatch_grads), which the rest of the suite
checks against its own oracles.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax.extend import core as jcore

import optax_gaf
from optax_gaf import _combine
from optax_gaf import _gram
from optax_gaf import rules
from optax_gaf._ghost import layers
from tests import helpers
from tests import oracle
from tests import oracle_models


def xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def mlp_loss(p, b):
  h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
  return xent(h @ p["w2"] + p["b2"], b["y"])


def mlp_setup(seed=0, batch=8, d=5, h=7, c=3, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {
    "w1": jax.random.normal(k[0], (d, h), dtype),
    "b1": jnp.full((h,), 0.1, dtype),
    "w2": jax.random.normal(k[1], (h, c), dtype),
    "b2": jnp.zeros((c,), dtype),
  }
  data = {
    "x": jax.random.normal(k[2], (batch, d), dtype),
    "y": jax.random.randint(k[3], (batch,), 0, c),
  }
  return params, data


def ghost_of(loss, n, params, batch, route="auto"):
  return optax_gaf.ghost_microgradients(loss, n, route=route)(params, batch)[1]


def materialized(loss, n, params, batch):
  return optax_gaf.microbatch_grads(loss, n)(params, batch)[1]


def ghost_eval(loss, n, params, batch, route="auto", weights=None):
  """Jitted: the ghost route's per-leaf Gram matrices, its weighted sum at
  ``weights`` (all usable) and its routes."""
  routes = []

  @jax.jit
  def run(p, b, w):
    ghost = ghost_of(loss, n, p, b, route)
    routes[:] = ghost.routes
    return ghost.gram(per_leaf=True), ghost.combine(w, jnp.ones(n, bool))

  dtype = jax.tree.leaves(params)[0].dtype
  w = jnp.full(n, 1 / n, dtype) if weights is None else weights
  grams, combined = run(params, batch, w)
  return grams, combined, routes


def materialized_eval(loss, n, params, batch, weights):
  @jax.jit
  def run(p, b, w):
    leaves = jax.tree.leaves(materialized(loss, n, p, b))
    ok = jnp.ones(n, bool)
    return _gram.gram(leaves, per_leaf=True), _combine.weighted_sum(
      leaves, w, ok
    )

  return run(params, batch, weights)


def two_gaf_steps(producer, loss, n, params, batch, **gaf_kw):
  tx = optax_gaf.gaf(**gaf_kw)

  @jax.jit
  def run(p, b):
    state, out = tx.init(p), []
    for _ in range(2):
      updates, state = tx.update(producer(loss, n, p, b), state, p)
      out.append((updates, state))
    return out

  return run(params, batch)


def assert_same_gaf(loss, n, params, batch, rtol=1e-5, **gaf_kw):
  """Two jitted steps of gaf on both routes: the same updates and state."""
  got = two_gaf_steps(ghost_of, loss, n, params, batch, **gaf_kw)
  want = two_gaf_steps(materialized, loss, n, params, batch, **gaf_kw)
  for (u_ghost, s_ghost), (u_mat, s_mat) in zip(got, want):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6),
      u_ghost,
      u_mat,
    )
    np.testing.assert_array_equal(s_ghost.ready, s_mat.ready)
    if s_mat.accepted is not None:
      np.testing.assert_array_equal(s_ghost.accepted, s_mat.accepted)
      np.testing.assert_allclose(
        s_ghost.cosine_distance, s_mat.cosine_distance, atol=1e-5
      )
    np.testing.assert_allclose(s_ghost.tau, s_mat.tau, rtol=1e-5)
  return got[-1][1]


# --- float64 oracles


@pytest.mark.parametrize("route", ["ghost", "materialize", "auto"])
@pytest.mark.parametrize("n", [8, 4])
def test_mlp_against_numpy_oracle(route, n):
  with jax.enable_x64(True):
    params, batch = mlp_setup(dtype=jnp.float64)
    grams, _, _ = ghost_eval(mlp_loss, n, params, batch, route)
    x = np.asarray(batch["x"]).reshape(n, -1, 5)
    y = np.asarray(batch["y"]).reshape(n, -1)
    flat = np.stack(
      [oracle_models.mlp_grads(params, x[i], y[i]) for i in range(n)]
    )
    np.testing.assert_allclose(
      grams.sum(0), flat @ flat.T, rtol=1e-12, atol=1e-14
    )
    # A threshold that accepts some and rejects some, far from every distance.
    tau = next(
      t
      for t in (0.9, 0.95, 1.0, 1.05, 0.8, 1.1)
      if not oracle.is_ambiguous(oracle.sequential(flat, t)[2], t, 1e-3)
      and 1 < oracle.sequential(flat, t)[1].sum() < n
    )
    want, accepted, dist = oracle.sequential(flat, tau)
    updates, state = two_gaf_steps(
      ghost_of, mlp_loss, n, params, batch, tau=tau, num_microbatches=n
    )[0]
    np.testing.assert_array_equal(state.accepted, accepted)
    np.testing.assert_allclose(state.cosine_distance, dist, atol=1e-6)
    got = oracle.flatten([updates[k][None] for k in sorted(updates)])[0]
    np.testing.assert_allclose(
      got, np.zeros_like(got) if want is None else want, rtol=1e-10
    )


def embedding_bag_loss(p, b):
  h = jnp.take(p["table"], b["ids"], axis=0).mean(axis=1)
  return xent(h @ p["table_head"], b["y"])


@pytest.mark.parametrize("route", ["ghost", "materialize"])
def test_embedding_against_numpy_oracle(route):
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(3), 3)
    params = {
      "table": jax.random.normal(k[0], (11, 4), jnp.float64),
      "table_head": jax.random.normal(k[1], (4, 3), jnp.float64),
    }
    # Repeated ids within and across microbatches: the ghost Gram's matches.
    ids = jax.random.randint(k[2], (6, 5), 0, 6)
    batch = {"ids": ids, "y": jnp.arange(6) % 3}
    w = jnp.array([0.5, 0.0, 0.25], jnp.float64)
    grams, got, routes = ghost_eval(
      embedding_bag_loss, 3, params, batch, route, w
    )
    assert routes[0] == route
    flat = np.stack(
      [
        oracle_models.embedding_bag_grads(
          params["table"], params["table_head"], ids[2 * i : 2 * i + 2],
          np.arange(6)[2 * i : 2 * i + 2] % 3,
        )
        for i in range(3)
      ]
    )  # fmt: skip
    np.testing.assert_allclose(grams.sum(0), flat @ flat.T, rtol=1e-12)
    np.testing.assert_allclose(
      np.concatenate([np.ravel(g) for g in got]), w @ flat, rtol=1e-12
    )


# --- models with every layer kind, against the materialized route


NHWC = ("NHWC", "HWIO", "NHWC")


def conv_loss(p, b):
  y = jax.lax.conv_general_dilated(
    b["x"],
    p["conv"],
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  y = jax.nn.relu(y + p["conv_b"]).mean(axis=(1, 2))
  return xent(y @ p["dense"], b["y"])


class NNXModel(nnx.Module):
  """Embedding, attention, LayerNorm, a conv and a dense head."""

  def __init__(self, rngs, dtype=jnp.float64):
    kw = {"rngs": rngs, "param_dtype": dtype}
    self.emb = nnx.Embed(13, 8, **kw)
    self.att = nnx.MultiHeadAttention(
      num_heads=2, in_features=8, qkv_features=8, decode=False, **kw
    )
    self.ln = nnx.LayerNorm(8, **kw)
    self.conv = nnx.Conv(8, 6, kernel_size=(3,), **kw)
    self.head = nnx.Linear(6, 13, **kw)

  def __call__(self, ids):
    x = self.emb(ids)
    x = self.ln(x + self.att(x, mask=nnx.make_causal_mask(ids)))
    return self.head(jax.nn.relu(self.conv(x)))


def nnx_setup(dtype=jnp.float64):
  model = NNXModel(nnx.Rngs(0), dtype)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p, b):
    return xent(nnx.merge(graphdef, p, rest)(b["ids"]), b["y"])

  ids = jax.random.randint(jax.random.key(1), (8, 6), 0, 13)
  return loss, params, {"ids": ids, "y": jnp.roll(ids, -1, axis=1)}


class LinenModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.LayerNorm()(jax.nn.relu(x)).mean(axis=(1, 2))
    return nn.Dense(3)(nn.Dense(8)(x))


def linen_setup():
  model = LinenModel()
  x = jax.random.normal(jax.random.key(2), (8, 6, 6, 2))
  params = model.init(jax.random.key(0), x[:1])["params"]

  def loss(p, b):
    return xent(model.apply({"params": p}, b["x"]), b["y"])

  return loss, params, {"x": x, "y": jnp.arange(8) % 3}


@pytest.mark.parametrize("route", ["ghost", "materialize"])
def test_nnx_embedding_attention_layernorm_conv_float64(route):
  with jax.enable_x64(True):
    loss, params, batch = nnx_setup()
    n = 4
    w = jnp.linspace(-1.0, 1.0, n, dtype=jnp.float64)
    grams, combined, routes = ghost_eval(loss, n, params, batch, route, w)
    want_grams, want = materialized_eval(loss, n, params, batch, w)
    np.testing.assert_allclose(grams, want_grams, rtol=1e-11, atol=1e-15)
    for got, expected in zip(combined, want):
      np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-15)
  # The embedding, four attention kernels, the conv (as patches), the head.
  assert routes.count(route) == 7
  assert routes.count("direct") == 8  # biases and LayerNorm


@pytest.mark.parametrize("setup", ["linen", "plain_conv"])
def test_linen_and_plain_conv_float32(setup):
  loss, params, batch = (
    linen_setup() if setup == "linen" else (conv_loss, *conv_setup())
  )
  _, _, routes = ghost_eval(loss, 4, params, batch)
  assert "materialize" in routes  # the conv kernel
  assert_same_gaf(loss, 4, params, batch, tau=0.9, num_microbatches=4)


def conv_setup():
  k = jax.random.split(jax.random.key(4), 3)
  params = {
    "conv": jax.random.normal(k[0], (3, 3, 2, 4)) / 4,
    "conv_b": jnp.zeros(4),
    "dense": jax.random.normal(k[1], (4, 3)),
  }
  return params, {
    "x": jax.random.normal(k[2], (8, 6, 6, 2)),
    "y": jnp.arange(8) % 3,
  }


# --- every rule, threshold and granularity


def near_mean(gram, usable, tau):
  return rules.sequential(gram[::-1, ::-1], usable[::-1], tau)._replace(
    accepted=usable
  )


@pytest.mark.parametrize(
  "kw",
  [
    {"rule": "sequential", "num_microbatches": 8},
    {"rule": "pairwise", "num_microbatches": 8},
    {"rule": "medoid", "num_microbatches": 8},
    {"rule": "soft", "temperature": 0.1, "num_microbatches": 8},
    {"rule": "sequential", "granularity": "per_leaf", "num_microbatches": 8},
    {"tau": optax_gaf.AutoTau(min_count=2), "num_microbatches": 8},
    {"tau": optax_gaf.AdaptiveTau(k=0.5, history=16, min_count=2, cap=1.0)},
    {"tau": optax.linear_schedule(1.2, 0.8, 2)},
  ],
  ids=lambda kw: (
    "-".join(
      "schedule"
      if callable(v) and not hasattr(v, "_fields")
      else str(v).split("(")[0]
      for v in kw.values()
      if not isinstance(v, int)
    )  # fmt: skip
    or "default"
  ),
)
def test_every_rule_and_threshold_matches_materialized(kw):
  params, batch = mlp_setup(batch=16)
  kw = {"tau": 1.0} | kw
  assert_same_gaf(mlp_loss, 8, params, batch, **kw)


def test_ghost_grads_equals_gaf_on_materialized():
  params, batch = mlp_setup(batch=16)
  for rule in ("sequential", "medoid"):
    got_losses, filtered = jax.jit(
      optax_gaf.ghost_filtered_grads(mlp_loss, 8, 0.9, rule=rule)
    )(params, batch)
    want_losses = optax_gaf.microbatch_grads(mlp_loss, 8)(params, batch)[0]
    (want, state), _ = two_gaf_steps(
      materialized, mlp_loss, 8, params, batch, tau=0.9, rule=rule,
      num_microbatches=8,
    )  # fmt: skip
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-6)
    np.testing.assert_array_equal(filtered.accepted, state.accepted)
    np.testing.assert_array_equal(filtered.ready, state.ready)
    np.testing.assert_allclose(
      filtered.gradient_diversity, state.gradient_diversity, rtol=1e-5
    )
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
      filtered.updates,
      want,
    )
  tx = optax_gaf.process(
    optax.identity(),
    optax_gaf.record_filtered(num_microbatches=8),
    optax.sgd(0.1),
  )
  _, state = tx.update(filtered, tx.init(params), params)
  np.testing.assert_array_equal(
    optax_gaf.stats(state)["accepted"], filtered.accepted
  )


# --- unusable microgradients, float range, coupled losses


def test_nan_microbatch_is_excluded():
  params, batch = mlp_setup(batch=16)
  batch["x"] = batch["x"].at[4].set(jnp.nan)  # microbatch 2 of 8
  state = assert_same_gaf(
    mlp_loss, 8, params, batch, tau=2.0, num_microbatches=8
  )
  assert np.isnan(state.cosine_distance[2]) and not state.accepted[2]
  assert state.num_accepted == 7


@pytest.mark.parametrize("scale", [1e-25, 1e18])
def test_out_of_range_norms_take_the_rescaled_route(scale):
  """Squared norms out of float32's safe window: the decisions still hold."""
  params, batch = mlp_setup(batch=16)

  def loss(p, b):  # the microgradients scale with `scale`
    return scale * mlp_loss(p, b)

  grams = ghost_eval(loss, 8, params, batch)[0]
  assert not _gram.in_safe_range(jnp.diagonal(grams.sum(0)))
  kw = {"tau": 0.9, "num_microbatches": 8}
  (updates, state), _ = two_gaf_steps(ghost_of, loss, 8, params, batch, **kw)
  (want, want_state), _ = two_gaf_steps(
    ghost_of, mlp_loss, 8, params, batch, **kw
  )
  assert 1 < want_state.num_accepted < 8
  np.testing.assert_array_equal(state.accepted, want_state.accepted)
  np.testing.assert_allclose(
    state.cosine_distance, want_state.cosine_distance, atol=1e-5
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a / scale, b, rtol=1e-4),
    updates,
    want,
  )


def test_loss_coupling_examples_within_a_microbatch():
  """Batch statistics couple the examples of one microbatch only."""
  params, batch = mlp_setup(batch=16)

  def loss(p, b):
    h = b["x"] @ p["w1"]
    h = (h - h.mean(0)) / (h.std(0) + 1e-3)  # batch norm, training mode
    return xent(jnp.tanh(h + p["b1"]) @ p["w2"] + p["b2"], b["y"])

  assert_same_gaf(
    loss, 4, params, batch, rtol=1e-4, tau=0.95, num_microbatches=4
  )


def test_shared_and_reshaped_weights():
  """Reshapes and transposes keep a site; a weight read by one layer and
  sliced twice besides is that layer's site plus a per-microbatch residual
  (formed: "materialize")."""
  params, batch = mlp_setup(batch=16, h=5, d=5)

  def loss(p, b):
    h = jnp.tanh(b["x"] @ p["w1"].reshape(-1).reshape(5, 5).T.T)
    h = jnp.tanh(h @ p["w2"][:, :3] @ p["w2"].T[:3] + p["b1"][:5])
    return xent(h @ p["w2"] + p["b2"], b["y"])

  params["w2"], params["b2"] = params["w1"], jnp.zeros(5)
  routes = ghost_eval(loss, 8, params, batch)[2]
  assert routes[:2] == ["direct", "direct"]  # biases
  assert routes[2] in ("ghost", "materialize")  # w1, reshaped
  assert routes[3] == "materialize"  # w2: one layer and two slices
  assert_same_gaf(loss, 8, params, batch, tau=0.95, num_microbatches=8)


# --- training: jit, scan, the true skip, no N x P arrays


def test_scan_over_steps_with_the_true_skip():
  params, batch = mlp_setup(batch=16)
  tx = optax_gaf.process(optax.identity(), optax_gaf.gaf(0.3), optax.adam(1e-2))
  grad_fn = optax_gaf.ghost_microgradients(mlp_loss, 8)

  def step(carry, _):
    p, s = carry
    _, ghost = grad_fn(p, batch)
    u, s = tx.update(ghost, s, p)
    return (optax.apply_updates(p, u), s), s[1].ready

  (p, s), ready = jax.jit(lambda p, s: jax.lax.scan(step, (p, s), length=6))(
    params, tx.init(params)
  )
  assert not ready.all()  # tau 0.3: some steps skip
  adam_count = s[2][0].count
  assert adam_count == ready.sum()  # adam moved only on ready steps
  assert optax_gaf.stats(s)["skipped_steps"] == (~ready).sum()


def test_no_microgradient_array_of_a_ghost_layer():
  """The step's program holds no [N, 64, 96] array for the [64, 96] layer."""
  params, batch = mlp_setup(batch=32, d=64, h=96)
  tx = optax_gaf.gaf(0.97)
  grad_fn = optax_gaf.ghost_microgradients(mlp_loss, 32)

  def step(p):
    _, ghost = grad_fn(p, batch)
    assert ghost.routes[2] == "ghost"
    return tx.update(ghost, tx.init(p), p)

  shapes = set()

  def collect(jaxpr):
    for eqn in jaxpr.eqns:
      shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
    for sub in jcore.subjaxprs(jaxpr):
      collect(sub)

  collect(jax.make_jaxpr(step)(params).jaxpr)
  assert (32, 64, 96) not in shapes and (32, 6144) not in shapes
  stacked = jax.make_jaxpr(lambda p: materialized(mlp_loss, 32, p, batch))
  assert (32, 64, 96) in {
    tuple(v.aval.shape) for v in stacked(params).jaxpr.outvars
  }


# --- refused input


def test_errors_name_the_problem_and_the_fix():
  params, batch = mlp_setup(batch=16)
  ghost = ghost_of(mlp_loss, 8, params, batch)
  with pytest.raises(ValueError, match="axis_name"):
    optax_gaf.gaf(axis_name="data").update(ghost, None)
  with pytest.raises(TypeError, match="pass it straight to optax_gaf.gaf"):
    optax.clip_by_global_norm(1.0).update(ghost, optax.EmptyState())
  with pytest.raises(TypeError, match="leaf \\['step'\\] has dtype int32"):
    ghost_of(mlp_loss, 8, params | {"step": jnp.zeros((), jnp.int32)}, batch)
  with pytest.raises(ValueError, match="scalar mean loss"):
    ghost_of(lambda p, b: jnp.tanh(b["x"] @ p["w1"]), 8, params, batch)
  with pytest.raises(ValueError, match="route must be one of"):
    optax_gaf.ghost_microgradients(mlp_loss, 8, route="fast")
  with pytest.raises(ValueError, match="does not split evenly"):
    ghost_of(mlp_loss, 5, params, batch)
  tx = optax_gaf.gaf(granularity="per_leaf")
  with pytest.raises(ValueError, match="initialised for 1 leaves"):
    tx.update(ghost, tx.init(jnp.zeros(3)), params)


@settings(max_examples=helpers.examples(8, 3), deadline=None)
@given(
  n=st.sampled_from([2, 4, 8]),
  per=st.integers(1, 3),
  d=st.integers(1, 6),
  h=st.integers(1, 6),
  seed=st.integers(0, 2**16),
)
def test_gram_property_random_mlps(n, per, d, h, seed):
  """Ghost and materialized Gram matrices agree for any MLP shape."""
  assume(d * h > 1)
  with jax.enable_x64(True):
    params, batch = mlp_setup(seed, n * per, d, h, 3, jnp.float64)
    w = jnp.linspace(0.0, 1.0, n, dtype=jnp.float64)
    want, want_sum = materialized_eval(mlp_loss, n, params, batch, w)
    for route in ("ghost", "materialize"):
      got, got_sum, _ = ghost_eval(mlp_loss, n, params, batch, route, w)
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
      for a, b in zip(got_sum, want_sum):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_plain_jit_over_a_sharded_batch(axis_type):
  """Captures of a batch sharded over 8 devices: the one-device result."""
  params, batch = mlp_setup(batch=32)
  tx = optax_gaf.gaf(0.9, num_microbatches=16)

  def step(p, b):
    _, ghost = optax_gaf.ghost_microgradients(mlp_loss, 16)(p, b)
    return tx.update(ghost, tx.init(p), p)

  want, want_state = jax.jit(step)(params, batch)
  kind = getattr(jax.sharding.AxisType, axis_type)
  mesh = jax.make_mesh((8,), ("data",), (kind,))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  with jax.set_mesh(mesh):
    got, state = jax.jit(step)(params, jax.device_put(batch, spec))
  assert 1 < want_state.num_accepted < 16
  np.testing.assert_array_equal(state.accepted, want_state.accepted)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    got,
    want,
  )


@pytest.mark.parametrize(
  "spec, strides, padding, dilation",
  [
    (("NHWC", "HWIO", "NHWC"), (2, 1), "VALID", (1, 1)),
    (("NCHW", "OIHW", "NCHW"), (2, 2), ((1, 2), (0, 1)), (2, 1)),
    (("NHWC", "HWIO", "NHWC"), (1, 2), "SAME", (1, 2)),
  ],
)
@pytest.mark.parametrize("patches", [True, False])
def test_convolutions_float64(
  spec, strides, padding, dilation, patches, monkeypatch
):
  """Strides, padding, dilation, layouts: as im2col matmuls or per-example
  convolutions (above ``PATCHES_MAX``), the layer is exact."""
  if not patches:
    monkeypatch.setattr(layers, "PATCHES_MAX", 0)
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (8, 7, 9, 3), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (3, 2, 3, 4), jnp.float64)
    if spec[0] == "NCHW":
      x, w = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)

    def loss(p, b):
      y = jax.lax.conv_general_dilated(
        b["x"], p["w"], strides, padding, rhs_dilation=dilation,
        dimension_numbers=spec,
      )  # fmt: skip
      return jnp.sum(jnp.tanh(y) * b["t"].reshape(-1, 1, 1, 1))

    batch, params = {"x": x, "t": jnp.arange(8.0)}, {"w": w}
    weights = jnp.linspace(0.0, 1.0, 4, dtype=jnp.float64)
    want, want_sum = materialized_eval(loss, 4, params, batch, weights)
    for route in ("ghost", "materialize") if patches else ("materialize",):
      got, got_sum, routes = ghost_eval(loss, 4, params, batch, route, weights)
      assert routes == [route]
      np.testing.assert_allclose(got, want, rtol=1e-12)
      np.testing.assert_allclose(got_sum[0], want_sum[0], rtol=1e-12)
