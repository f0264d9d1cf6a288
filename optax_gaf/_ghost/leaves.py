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
``prepare()`` (forms what ``combine`` needs outside ``lax.cond``),
``gram_cost()`` (the multiply-adds of its Gram matrix) and
``stacked()`` (its N microgradients, formed, for the collectives of
``gaf(axis_name=...)``); its ``route`` names it in
``GhostMicrogradients.routes``, its ``residual`` (None, ``"shared"`` or
``"per_microbatch"``) in ``GhostMicrogradients.residuals``.

A layer's leaf that the loss also reads elsewhere (an L2 term) adds those
reads' gradient, the residual, formed by autodiff: once when no microbatch
changes it (:class:`GhostResidualLeaf`), else per microbatch, added to the
layer's formed microgradients.
"""

import math

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
  residual = kind = None

  def __init__(self, n, dtype, aval):
    self._n, self._dtype, self._aval = n, dtype, aval

  def prepare(self):
    pass

  def gram(self, f):
    del f
    return jnp.zeros((self._n, self._n), self._dtype)

  def max_abs(self):
    return jnp.zeros([self._n], self._dtype)

  def gram_cost(self):
    return 0

  def combine(self, w, ok):
    del w, ok
    return jnp.zeros(self._aval.shape, self._aval.dtype)

  def stacked(self):
    return jnp.zeros((self._n, *self._aval.shape), self._aval.dtype)


class DirectLeaf:
  """A leaf with per-microbatch gradients ``g [N, ...]`` from autodiff (or
  a layer's formed microgradients plus a residual: ``route`` says which)."""

  def __init__(self, g, dtype, route="direct", residual=None, kind=None):
    self._g, self._dtype = g, dtype
    self.route, self.residual, self.kind = route, residual, kind

  def prepare(self):
    pass

  def gram(self, f):
    g = self._g if f is None else _scaled(self._g, f)
    return _gram.cross_gram(g, g, self._dtype)

  def max_abs(self):
    return _gram.max_abs([self._g])[0]

  def gram_cost(self):
    n = self._g.shape[0]
    return n * n * math.prod(self._g.shape[1:])

  def combine(self, w, ok):
    return _combine.weighted_rows(w, _mask(ok, self._g))

  def stacked(self):
    return self._g


class LayerLeaf:
  """A leaf read by one layer: its captures ``others`` (x) and ``d``."""

  residual = None

  def __init__(self, site, others, d, aval, dtype):
    self._site, self._layer = site, site.layer
    self.kind = type(site.layer).__name__
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

  def gram_cost(self):
    return self._layer.costs(self._d.shape[0])[0]

  def combine(self, w, ok):
    others = [_mask(ok, x) for x in self._others]
    d = _mask(ok, self._d)
    wd = d * w.reshape((-1,) + (1,) * (d.ndim - 1)).astype(d.dtype)
    g = self._layer.book_keeping(others, wd)
    return self._site.to_leaf(g, self._aval)


class GhostResidualLeaf(GhostLayerLeaf):
  """A ghost layer leaf also read outside its layer (an L2 term), with a
  residual ``r`` that is the same for every microbatch.

  ``<a_n + r, a_m + r>`` takes ``<a_n, r> = sum_s x_ns^T r d_ns`` (one pass
  over the captures, as the layer's forward) besides the ghost Gram matrix;
  the weighted sum is ``x^T (w * d) + (sum_n w_n) r``.
  """

  residual = "shared"

  def __init__(self, site, others, d, aval, dtype, r):
    super().__init__(site, others, d, aval, dtype)
    self._r = r

  def gram(self, f):
    r = self._site.operand_of(self._r, cast=False)
    return self._layer.ghost_gram(self._others, self._d, self._dtype, f, r)

  def max_abs(self):
    return super().max_abs() + _gram.max_abs([self._r[None]])[0][0]

  def gram_cost(self):
    return super().gram_cost() + self._layer.residual_cost(self._d.shape[0])

  def combine(self, w, ok):
    g = super().combine(w, ok)
    total = jnp.sum(w if ok is None else jnp.where(ok, w, 0))
    return g + total.astype(g.dtype) * self._r.astype(g.dtype)

  def stacked(self):
    return super().stacked() + self._r.astype(self._aval.dtype)


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

  def gram_cost(self):
    # Forming them replaces the plain step's weight gradient: left out.
    n = self._d.shape[0]
    return n * n * math.prod(self._layer.operand.shape)

  def gram(self, f):
    g = self.prepare()
    g = g if f is None else _scaled(g, f)
    return _gram.cross_gram(g, g, self._dtype)

  def combine(self, w, ok):
    g = _combine.weighted_rows(w, _mask(ok, self.prepare()))
    g = self._layer.to_operand(g, self._d.shape[0])
    return self._site.to_leaf(g, self._aval)


def _layer_leaf(site, n: int, route: str, residual: bool = False):
  """The cheaper of ghost and materialize for one layer (or as forced).

  ``residual``: the leaf has a residual shared by every microbatch, which
  the ghost route takes where the layer's class can (``takes_residual``).
  """
  ghost, materialize = site.layer.costs(n)
  if residual and ghost is not None:
    ok = site.layer.takes_residual
    ghost = ghost + site.layer.residual_cost(n) if ok else None
  if ghost is None or route == "materialize":
    return MaterializedLayerLeaf
  if route == "ghost" or ghost <= materialize:
    return GhostLayerLeaf
  return MaterializedLayerLeaf


def _site_leaf(site, n, route, aval, others, d, r, dtype):
  """A site's leaf; ``r``: None, its residual ``[...]`` shared by every
  microbatch, or ``[N, ...]`` per microbatch."""
  shared = r is not None and r.ndim == len(aval.shape)
  cls = _layer_leaf(site, n, route, residual=shared)
  if r is None:
    return cls(site, others, d, aval, dtype)
  if shared and cls is GhostLayerLeaf:
    return GhostResidualLeaf(site, others, d, aval, dtype, r)
  # Formed (materialize), plus the residual: the stacked route's cost.
  layer = cls(site, others, d, aval, dtype)
  g = layer.stacked().astype(aval.dtype) + r.astype(aval.dtype)
  residual = "shared" if shared else "per_microbatch"
  return DirectLeaf(g, dtype, "materialize", residual, layer.kind)


def per_leaf(plan, n, route, avals, captures, ds, grads) -> list:
  """One object per params leaf, which forms its Gram matrix and sum.

  ``grads`` maps a leaf's index to autodiff's gradient: ``[N, ...]`` for a
  direct leaf or a residual that differs per microbatch, ``[...]`` for a
  residual shared by every microbatch.
  """
  dtype = _gram.stat_dtype(
    [jax.ShapeDtypeStruct((n, *a.shape), a.dtype) for a in avals]
  )
  out = [UnusedLeaf(n, dtype, a) for a in avals]
  for i in plan.direct:
    out[i] = DirectLeaf(grads[i], dtype)
  for site, others, d in zip(plan.sites, captures, ds):
    i = site.leaf
    r = grads[i] if site.residual else None
    out[i] = _site_leaf(site, n, route, avals[i], others, d, r, dtype)
  return out
