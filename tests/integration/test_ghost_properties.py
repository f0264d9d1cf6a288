"""Properties: on random small models the ghost route is the stacked one.

Each example draws a model that mixes an embedding lookup (ids inside and
outside the table, every gather mode), a convolution, dense layers (one read
through a cast), a ``lax.scan`` over a stack of layers and a parameter cast
to complex, then compares in float64 ``ghost_microgradients`` (both routes,
``ghost`` and ``materialize``) with ``microbatch_grads``: the per-leaf Gram
matrices, the decisions of the sequential rule at every threshold the
distances leave unambiguous, and the weighted sums. Derandomized in CI
(``tests/conftest.py``'s ``ci`` profile), with fewer examples there.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import assume
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import optax_gaf
from optax_gaf import _combine
from optax_gaf import _gram
from optax_gaf import rules
from tests import helpers

PARTS = ("embed", "conv", "dense", "scan", "complex")
T, E = 4, 3  # tokens per example, embedding width
NWC = ("NWC", "WIO", "NWC")
MODES = {
  "index": lambda w, i: w[i],
  "clip": lambda w, i: w.at[i].get(mode="clip"),
  "fill": lambda w, i: w.at[i].get(mode="fill", fill_value=0.0),
}


def model(parts, mode, stride, padding):
  """``loss(params, batch)`` made of the drawn parts, and its params'
  shapes."""
  shapes = {"head": (E, 2)}
  if "embed" in parts:
    shapes["table"] = (7, E)
  if "conv" in parts:
    shapes["conv"] = (2, E, E)
  if "dense" in parts:
    shapes["dense"] = (E, E)
  if "scan" in parts:
    shapes["stack"] = (2, E, E)
  if "complex" in parts:
    shapes["cmat"] = (E, E)

  def loss(p, b):
    h = b["x"]
    if "embed" in parts:
      h = h + MODES[mode](p["table"], b["ids"])
    if "conv" in parts:
      h = jax.lax.conv_general_dilated(
        h, p["conv"], (stride,), padding, dimension_numbers=NWC
      )
    if "dense" in parts:  # read through a cast to float32 and back
      h = jnp.tanh(h @ p["dense"].astype(jnp.float32).astype(h.dtype))
    if "scan" in parts:
      h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["stack"])
    if "complex" in parts:  # a matmul of the parameter cast to complex
      h = jnp.abs((h * (1 + 1j)) @ p["cmat"].astype(jnp.complex128))
    return jnp.sum(jnp.sin(h @ p["head"]) * b["t"][:, : h.shape[1]])

  return loss, shapes


TAUS = np.linspace(0.1, 1.9, 19)


def evaluate(loss, n, params, batch, weights):
  """Jitted, per route (stacked, ghost, materialize): the per-leaf Gram
  matrices, the weighted sums, and the sequential rule's decisions and
  distances at every threshold of ``TAUS``."""

  def decide(gram):
    gram, usable = _gram.sanitized(jnp.sum(gram, 0))
    out = jax.vmap(lambda t: rules.sequential(gram, usable, t))(TAUS)
    return usable, out.accepted, out.cosine_distance

  def run(p, b, w):
    ok = jnp.ones(n, bool)
    stacked = jax.tree.leaves(optax_gaf.microbatch_grads(loss, n)(p, b)[1])
    gram = _gram.gram(stacked, per_leaf=True)
    out = {"stacked": (gram, _combine.weighted_sum(stacked, w, ok))}
    for route in ("ghost", "materialize"):
      ghost = optax_gaf.ghost_microgradients(loss, n, route=route)(p, b)[1]
      out[route] = (ghost.gram(per_leaf=True), ghost.combine(w, ok))
    return {k: (*v, *decide(v[0])) for k, v in out.items()}

  return jax.jit(run)(params, batch, weights)


@settings(max_examples=helpers.examples(5, 2), deadline=None)
@example(  # every part at once, ids past the table under table[ids]
  parts=set(PARTS), mode="index", stride=2, padding="VALID", n=4, per=2, seed=1
)
@given(
  parts=st.sets(st.sampled_from(PARTS)),
  mode=st.sampled_from(sorted(MODES)),
  stride=st.sampled_from([1, 2]),
  padding=st.sampled_from(["SAME", "VALID"]),
  n=st.sampled_from([2, 4]),
  per=st.integers(1, 2),
  seed=st.integers(0, 2**16),
)
def test_ghost_is_the_stacked_route(parts, mode, stride, padding, n, per, seed):
  assume(parts)  # at least one part besides the head
  loss, shapes = model(parts, mode, stride, padding)
  with jax.enable_x64(True):
    keys = iter(jax.random.split(jax.random.key(seed), len(shapes) + 4))
    params = {
      k: jax.random.normal(next(keys), shape, jnp.float64)
      for k, shape in shapes.items()
    }
    b = n * per  # examples of T tokens
    batch = {
      "x": jax.random.normal(next(keys), (b, T, E), jnp.float64),
      # ids below (wrapped or not), inside and past the 7-row table
      "ids": jax.random.randint(next(keys), (b, T), -9, 10),
      "t": jax.random.normal(next(keys), (b, T, 2), jnp.float64),
    }
    weights = jnp.linspace(-1.0, 1.0, n, dtype=jnp.float64)
    out = evaluate(loss, n, params, batch, weights)
  want, want_sum, usable, accepted, dist = out["stacked"]
  # Autodiff rounds the gradient of a float32 cast to float32; ghost not.
  rtol = 1e-5 if "dense" in parts else 1e-10
  scale = np.max(np.abs(np.asarray(want))) or 1.0
  # The thresholds no distance lies near decide alike.
  near = np.abs(np.asarray(dist) - TAUS[:, None]) < 1e3 * rtol
  clear = ~np.any(near, axis=1)
  for route in ("ghost", "materialize"):
    gram, combined, got_usable, got_accepted, _ = out[route]
    np.testing.assert_allclose(gram, want, rtol=rtol, atol=rtol * scale)
    np.testing.assert_array_equal(got_usable, usable)
    np.testing.assert_array_equal(got_accepted[clear], accepted[clear])
    for a, c in zip(combined, want_sum):
      np.testing.assert_allclose(a, c, rtol=rtol, atol=rtol * scale)
