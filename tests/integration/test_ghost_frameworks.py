"""The ghost guide's Haiku and Equinox recipes against microbatch_grads.

In float64: the ghost route's update (and the Haiku state) equals the
stacked route's on the same per-microbatch keys, and every microbatch draws
its own dropout mask.
"""

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gaf

N = 4
B = 16


def _close(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def _gaf_update(grads, params):
  tx = optax_gaf.process(optax.identity(), optax_gaf.gaf(0.5), optax.sgd(0.1))
  return tx.update(grads, tx.init(params), params)[0]


def _distinct(masks):
  return len({np.asarray(m).tobytes() for m in masks})


def _data(seed=0):
  k = jax.random.split(jax.random.key(seed))
  return {
    "x": 1.0 + jax.random.uniform(k[0], (B, 6), jnp.float64),
    "y": jax.random.randint(k[1], (B,), 0, 3),
  }


def _forward(x, is_training):
  x = hk.dropout(hk.next_rng_key(), 0.5, x)
  mask = x != 0
  h = hk.Linear(5)(x)
  h = hk.BatchNorm(True, True, decay_rate=0.9)(h, is_training)
  return hk.Linear(3)(jax.nn.relu(h)), mask


def _mean_state(states):
  return jax.tree.map(
    lambda s: (
      s.mean(0).astype(s.dtype)
      if jnp.issubdtype(s.dtype, jnp.floating)
      else s[0]
    ),
    states,
  )


def test_haiku_recipe_equals_microbatch_grads():
  net = hk.transform_with_state(_forward)

  def loss(params, batch, state):
    (logits, mask), state = net.apply(
      params, state, batch["rng"][0], batch["x"], is_training=True
    )
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return xent.mean(), (state, mask)

  with jax.enable_x64(True):
    batch = _data()
    params, state = net.init(jax.random.key(0), batch["x"], is_training=True)
    keys = jax.random.split(jax.random.key(1), N)
    batch["rng"] = jnp.repeat(keys, B // N, axis=0)

    @jax.jit
    def run(params, state, batch):
      out = []
      for fn in (optax_gaf.ghost_microgradients, optax_gaf.microbatch_grads):
        (_, (states, masks)), grads = fn(loss, N, has_aux=True)(
          params, batch, state
        )
        out.append((_gaf_update(grads, params), _mean_state(states), masks))
      return out

    (got, got_state, masks), (want, want_state, _) = run(params, state, batch)
    _close(got, want)
    _close(got_state, want_state)
    assert _distinct(masks) == N


class _Net(eqx.Module):
  hidden: eqx.nn.Linear
  dropout: eqx.nn.Dropout
  out: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.hidden = eqx.nn.Linear(6, 5, key=k1)
    self.dropout = eqx.nn.Dropout(0.5)
    self.out = eqx.nn.Linear(5, 3, key=k2)

  def __call__(self, x, key):
    h = self.dropout(jax.nn.relu(self.hidden(x)), key=key)
    return self.out(h), h != 0


def test_equinox_recipe_equals_microbatch_grads():
  with jax.enable_x64(True):
    model = jax.tree.map(
      lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x,
      _Net(jax.random.key(0)),
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    batch = {**_data(), "key": jax.random.split(jax.random.key(2), B)}

    def loss(params, batch):
      logits, mask = jax.vmap(eqx.combine(params, static))(
        batch["x"], batch["key"]
      )
      xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
      return xent.mean(), mask

    @jax.jit
    def run(params, batch):
      out = []
      for fn in (optax_gaf.ghost_microgradients, optax_gaf.microbatch_grads):
        (_, masks), grads = fn(loss, N, has_aux=True)(params, batch)
        out.append((_gaf_update(grads, params), masks))
      return out

    (got, masks), (want, _) = run(params, batch)
    _close(got, want)
    assert _distinct(masks) == N
