"""float32 on the ghost route: no less accurate than the stacked route.

Against the float64 Gram matrix of the same float32 inputs, the ghost Gram
matrix (every layer forced to ``route="ghost"``) must err by at most 10x the
stacked route's error (``microbatch_grads``), and ``gaf`` must make the same
decisions at every threshold that the float64 distances leave unambiguous.
Errors are on the cosine scale, ``|dG_nm| / sqrt(G_nn G_mm)``, which is what
the decisions see.

The cases of issue 26: inputs with a common offset (pixels in [0, 255], 1000
+ N(0, 1)) under a loss whose output gradients sum to zero per microbatch,
tokens whose gradients cancel, and one microbatch's inputs scaled by 1e20 or
1e-20 with a compensating output scale.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gaf
from optax_gaf import _gram
from optax_gaf import rules

N = 8
TAUS = np.linspace(0.05, 1.95, 39)


def xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def bn_loss(p, b):
  """Batch norm after the first layer: its output gradients sum to zero
  over each microbatch, so an input offset cancels in g_n = x_n^T d_n."""
  h = (b["x"] @ p["w1"]) * b["s"][:, None]
  h = (h - h.mean(0)) / (h.std(0) + 1e-3)
  return xent(jnp.tanh(h + p["b1"]) @ p["w2"], b["y"])


def setup(seed, offset=0.0, batch=64, d=12, h=16, c=4):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {
    "w1": jax.random.normal(k[0], (d, h)) / d**0.5,
    "b1": jnp.zeros(h),
    "w2": jax.random.normal(k[1], (h, c)),
  }
  x = offset + jax.random.normal(k[2], (batch, d))
  y = jax.random.randint(k[3], (batch,), 0, c)
  return params, {"x": x, "y": y, "s": jnp.ones(batch)}


def _f64(tree):
  def cast(x):
    return x.astype(jnp.float64) if x.dtype == jnp.float32 else x

  return jax.tree.map(cast, tree)


def _gram_of(loss, params, batch, route):
  if route == "stacked":
    g = optax_gaf.microbatch_grads(loss, N)(params, batch)[1]
    return _gram.gram(jax.tree.leaves(g))
  ghost = optax_gaf.ghost_microgradients(loss, N, route=route)
  return ghost(params, batch)[1].gram()


_gram_jit = jax.jit(_gram_of, static_argnums=(0, 3))


def cosine_error(gram, want):
  d = np.sqrt(np.abs(np.diagonal(want)))
  return float(
    np.max(np.abs(np.asarray(gram, np.float64) - want) / d / d[:, None])
  )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _accepted(loss, producer, p, b, tau):
  _, grads = producer(loss, N)(p, b)
  tx = optax_gaf.gaf(tau, num_microbatches=N)
  return tx.update(grads, tx.init(p), p)[1].accepted


def decisions(loss, params, batch, producer):
  """One jitted function per (loss, producer), shared across the tests."""
  return [
    np.asarray(_accepted(loss, producer, params, batch, tau)) for tau in TAUS
  ]


@jax.jit
def _distances(gram, usable):
  """The sequential rule's distances at every threshold of ``TAUS``."""
  run = lambda tau: rules.sequential(gram, usable, tau).cosine_distance
  return jax.vmap(run)(jnp.asarray(TAUS, gram.dtype))


def unambiguous(want):
  """The thresholds no float64 distance lies within 1e-3 of."""
  gram, usable = _gram.sanitized(jnp.asarray(want))
  dist = np.asarray(_distances(gram, usable))
  return [not np.any(np.abs(d - tau) < 1e-3) for d, tau in zip(dist, TAUS)]


def assert_as_accurate(loss, params, batch):
  """Ghost errs by at most 10x the stacked route; the same decisions."""
  with jax.enable_x64(True):
    want = np.asarray(_gram_jit(loss, _f64(params), _f64(batch), "stacked"))
  errors = {
    route: cosine_error(_gram_jit(loss, params, batch, route), want)
    for route in ("stacked", "ghost")
  }
  assert errors["ghost"] <= 10 * max(errors["stacked"], 1e-7), errors
  ghost = decisions(loss, params, batch, optax_gaf.ghost_microgradients)
  stacked = decisions(loss, params, batch, optax_gaf.microbatch_grads)
  for tau, keep, a, b in zip(TAUS, unambiguous(want), ghost, stacked):
    if keep:
      np.testing.assert_array_equal(a, b, err_msg=f"tau={tau}")
  return errors


@pytest.mark.parametrize("offset", [255.0, 1000.0])
def test_inputs_with_a_common_offset(offset):
  params, batch = setup(0, offset)
  assert_as_accurate(bn_loss, params, batch)


def test_tokens_whose_gradients_cancel():
  """Microbatch 2's second half repeats its first half's inputs (up to
  1e-3) with the output scale negated: its gradient is 1e-3 of its tokens'."""
  params, batch = setup(1, batch=64)
  per = 64 // N
  x, s = batch["x"], batch["s"]
  first = slice(2 * per, 2 * per + per // 2)
  second = slice(2 * per + per // 2, 3 * per)
  noise = 1e-3 * jax.random.normal(jax.random.key(9), x[first].shape)
  batch["x"] = x.at[second].set(x[first] + noise)
  batch["s"] = s.at[second].set(-1.0)
  batch["y"] = batch["y"].at[second].set(batch["y"][first])

  def loss(p, b):  # no batch norm: the tokens' gradients add up
    h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
    return jnp.mean(jnp.sum(h * p["w2"][:, 0], axis=1) * b["s"])

  assert_as_accurate(loss, params, batch)


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_one_microbatch_scaled_far_out_of_range(scale):
  """Microbatch 1's inputs times ``scale``, its layer output times
  ``1 / scale``: its microgradient is as the others' are."""
  params, batch = setup(2)
  per = 64 // N
  rows = slice(per, 2 * per)
  batch["x"] = batch["x"].at[rows].multiply(scale)
  batch["s"] = batch["s"].at[rows].set(1 / scale)
  assert_as_accurate(bn_loss, params, batch)
