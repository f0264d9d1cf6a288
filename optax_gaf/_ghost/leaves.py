"""One object per params leaf: how its Gram matrix and weighted sum form.

:func:`per_leaf` chooses once per leaf, from ``trace.py``'s plan:

- :class:`UnusedLeaf`: the loss never reads it; zeros.
- :class:`DirectLeaf`: autodiff's per-microbatch gradients ``[N, ...]``.
- :class:`GhostLayerLeaf`: a layer's ghost Gram matrix from its captures,
  and the book-keeping weighted sum ``x^T (w * d)``.
- :class:`MaterializedLayerLeaf`: the layer's N microgradients, formed once
  for the Gram matrix and the weighted sum (cheaper for that layer, or the
  only way for an opaque one).

Each has ``gram(f)`` (``f``: None, or the rescaling factors ``[N]``),
``max_abs()``, ``combine(w, ok)`` (``ok``: None when every row is usable),
``prepare()`` (forms what ``combine`` needs outside ``lax.cond``) and
``stacked()`` (its N microgradients, formed, for the collectives of
``gaf(axis_name=...)``); its ``route`` names it in
``GhostMicrogradients.routes``.
"""

import jax
import jax.numpy as jnp

from optax_gaf import _combine
from optax_gaf import _gram


def _mask(ok, x):
  """Zeros the rows of unusable microbatches (``0 * nan`` is nan)."""
  if ok is None or not jnp.issubdtype(x.dtype, jnp.inexact):
    return x
  return _combine.zero_unusable(x, ok)


def _scaled(x, f):
  """``f_n x_n`` in the statistics' dtype, zero where ``f_n`` is 0."""
  return _gram.scale_leaves([x], f)[0]


class UnusedLeaf:
  """A leaf the loss never reads: zero microgradients."""

  route = "unused"

  def __init__(self, n, dtype, aval):
    self._n, self._dtype, self._aval = n, dtype, aval

  def prepare(self):
    pass

  def gram(self, f):
    del f
    return jnp.zeros((self._n, self._n), self._dtype)

  def max_abs(self):
    return jnp.zeros([self._n], self._dtype)

  def combine(self, w, ok):
    del w, ok
    return jnp.zeros(self._aval.shape, self._aval.dtype)

  def stacked(self):
    return jnp.zeros((self._n, *self._aval.shape), self._aval.dtype)


class DirectLeaf:
  """A leaf with per-microbatch gradients ``g [N, ...]`` from autodiff."""

  route = "direct"

  def __init__(self, g, dtype):
    self._g, self._dtype = g, dtype

  def prepare(self):
    pass

  def gram(self, f):
    g = self._g if f is None else _scaled(self._g, f)
    return _gram.cross_gram(g, g, self._dtype)

  def max_abs(self):
    return _gram.max_abs([self._g])[0]

  def combine(self, w, ok):
    return _combine.weighted_rows(w, _mask(ok, self._g))

  def stacked(self):
    return self._g


class LayerLeaf:
  """A leaf read by one layer: its captures ``others`` (x) and ``d``."""

  def __init__(self, site, others, d, aval, dtype):
    self._site, self._layer = site, site.layer
    self._others, self._d = others, d
    self._aval, self._dtype = aval, dtype

  def prepare(self):
    pass

  def max_abs(self):
    """``max|x_n| * max|d_n|``: at least ``max|g_n| / S`` for a layer."""
    scale = _gram.max_abs([self._d])[0].astype(self._dtype)
    x = self._others[0]
    if jnp.issubdtype(x.dtype, jnp.inexact):
      scale *= _gram.max_abs([x])[0].astype(self._dtype)
    return scale

  def _examples(self):
    return self._layer.per_example(self._others, self._d)

  def stacked(self):
    """The N microgradients ``[N, *leaf]``, formed (for collectives)."""
    n = self._d.shape[0]

    def one(g):
      return self._site.to_leaf(self._layer.to_operand(g, n), self._aval)

    return jax.vmap(one)(self._examples())


class GhostLayerLeaf(LayerLeaf):
  """The ghost Gram matrix and the book-keeping combine ``x^T (w * d)``."""

  route = "ghost"

  def gram(self, f):
    return self._layer.ghost_gram(self._others, self._d, self._dtype, f)

  def combine(self, w, ok):
    others = [_mask(ok, x) for x in self._others]
    d = _mask(ok, self._d)
    wd = d * w.reshape((-1,) + (1,) * (d.ndim - 1)).astype(d.dtype)
    g = self._layer.book_keeping(others, wd)
    return self._site.to_leaf(g, self._aval)


class MaterializedLayerLeaf(LayerLeaf):
  """The layer's N microgradients, formed once for Gram and combine."""

  route = "materialize"

  def __init__(self, *args):
    super().__init__(*args)
    self._formed = None

  def prepare(self):
    if self._formed is None:
      self._formed = self._examples()
    return self._formed

  def gram(self, f):
    g = self.prepare()
    g = g if f is None else _scaled(g, f)
    return _gram.cross_gram(g, g, self._dtype)

  def combine(self, w, ok):
    g = _combine.weighted_rows(w, _mask(ok, self.prepare()))
    g = self._layer.to_operand(g, self._d.shape[0])
    return self._site.to_leaf(g, self._aval)


def _layer_leaf(site, n: int, route: str):
  """The cheaper of ghost and materialize for one layer (or as forced)."""
  ghost, materialize = site.layer.costs(n)
  if ghost is None or route == "materialize":
    return MaterializedLayerLeaf
  if route == "ghost" or ghost <= materialize:
    return GhostLayerLeaf
  return MaterializedLayerLeaf


def per_leaf(plan, n, route, avals, captures, ds, direct) -> list:
  """One object per params leaf, which forms its Gram matrix and sum."""
  dtype = _gram.stat_dtype(
    [jax.ShapeDtypeStruct((n, *a.shape), a.dtype) for a in avals]
  )
  out = [UnusedLeaf(n, dtype, a) for a in avals]
  for i, g in zip(plan.direct, direct):
    out[i] = DirectLeaf(g, dtype)
  for site, others, d in zip(plan.sites, captures, ds):
    cls = _layer_leaf(site, n, route)
    out[site.leaf] = cls(site, others, d, avals[site.leaf], dtype)
  return out
