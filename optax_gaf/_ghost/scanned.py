"""A layer read inside ``lax.scan``: its captures gain an iteration axis L.

``trace.py`` makes a layer in a scan's body a site when its parameter enters
the scan in one of two ways:

- **stacked**: as the scan's ``xs``, ``W [L, ...]`` sliced per iteration
  (Flax's ``nn.scan``/``nnx.scan`` over layers). Microbatch n's
  microgradient is ``g_n[l] = x_nl^T d_nl``: the layer with one more batch
  axis, so the Gram matrix is the sum over l of each iteration's;
- **constant**: a scan constant, the same every iteration (an RNN's weight).
  Then ``g_n = sum_l x_nl^T d_nl``: the L iterations are L times the tokens.

The captures ``others`` and output gradients ``d`` are ``[N, L, ...]``, the
iteration axis after the microbatch axis. A dense layer or convolution
(:class:`~optax_gaf._ghost.layers.Matmul`) keeps its matmul maths on both,
an embedding lookup its ghost Gram matrix on both; other layers (Opaque) are
formed by ``jax.vjp``.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from optax_gaf._ghost import embedding
from optax_gaf._ghost import layers
from optax_gaf._ghost import numerics


@dataclasses.dataclass(frozen=True, eq=False)
class Scanned(layers.Layer):
  """``inner``, read in each of a scan's ``length`` iterations.

  Its operand is the stacked ``[L, *inner operand]`` (stacked) or the inner
  operand itself (constant); its output ``[L, *inner output]``.

  Attributes:
    inner: the layer of one iteration.
    length: L, the scan's iterations.
    stacked: whether the parameter is sliced per iteration (``xs``), else
      a constant.
  """

  inner: layers.Layer
  length: int
  stacked: bool

  @classmethod
  def wrap(cls, inner: layers.Layer, length: int, stacked: bool) -> "Scanned":
    """The layer of ``inner`` read in every iteration of a scan."""
    lead = (length,) if stacked else ()
    op = inner.operand
    out = inner.out
    # One microbatch: the L iterations at once (slices of w, or w each time).
    apply = jax.vmap(inner.apply, in_axes=(0 if stacked else None, 0))
    return cls(
      jax.ShapeDtypeStruct((*lead, *op.shape), op.dtype),
      jax.ShapeDtypeStruct((length, *out.shape), out.dtype),
      apply,
      inner=inner,
      length=length,
      stacked=stacked,
    )

  def _matmul(self) -> bool:
    return isinstance(self.inner, layers.Matmul)

  def _tokens(self) -> embedding.Embedding | None:
    """A constant embedding as one of L times the lookups, else None.

    It reads its ids and output gradients lookup by lookup, whatever their
    leading axes: the L iterations are just more lookups.
    """
    if self.stacked or not isinstance(self.inner, embedding.Embedding):
      return None
    return dataclasses.replace(
      self.inner, lookups=self.inner.lookups * self.length
    )

  def _merged(self, others, d):
    """A Matmul's canonical ``[N, Hb, S, K]``, ``[N, Hb, S, J]`` with L
    merged into the batch axis Hb (stacked) or the tokens S (constant)."""
    x, d = jax.vmap(jax.vmap(self.inner.canon))(others[0], d)

    def merge(a):  # [N, L, Hb, S, F]
      n, length, hb, s, f = a.shape
      if self.stacked:
        return a.reshape(n, length * hb, s, f)
      return a.transpose(0, 2, 1, 3, 4).reshape(n, hb, length * s, f)

    return merge(x), merge(d)

  def _const_matmuls(self, n: int) -> bool:
    """Whether a constant's microgradients are formed as one matmul (the
    inner layer's test, at L times the tokens)."""
    return self._matmul() and self.inner.as_matmuls(n * self.length)

  def costs(self, n):
    ghost, formed = self.inner.costs(n)
    length = self.length
    if self.stacked:
      return (None if ghost is None else length * ghost), length * formed
    if self._tokens() is not None:
      return self._tokens().costs(n)
    if not self._matmul():
      return None, length * formed
    hb, s, k, j = self.inner.sizes
    s *= length  # the iterations as tokens
    p = math.prod(self.operand.shape)
    return hb * (n * s) ** 2 * (k + j), n * hb * s * k * j + n * n * p

  def ghost_gram(self, others, d, dtype, factors=None):
    if self._matmul():
      return numerics.matmul_gram(*self._merged(others, d), dtype, factors)
    if self._tokens() is not None:
      return self._tokens().ghost_gram(others, d, dtype, factors)
    if not self.stacked:  # costs has none
      raise NotImplementedError(f"{type(self.inner).__name__} in a scan.")

    # <g_n, g_m> = sum_l <g_nl, g_ml>: one iteration's Gram matrix at a time.
    def add(gram, od):
      return gram + self.inner.ghost_gram(*od, dtype, factors), None

    n = d.shape[0]
    per_l = ([jnp.moveaxis(x, 1, 0) for x in others], jnp.moveaxis(d, 1, 0))
    return jax.lax.scan(add, jnp.zeros((n, n), dtype), per_l)[0]

  def per_example(self, others, d):
    if self.stacked:  # [N, L, ...], each iteration as the inner layer has it
      vmapped = jax.vmap(self.inner.per_example, in_axes=1, out_axes=1)
      return vmapped(others, d)
    if self._const_matmuls(d.shape[0]):
      x, d = self._merged(others, d)
      return jnp.einsum(
        "nhsk,nhsj->nhkj", x, d, preferred_element_type=self.operand.dtype
      )
    return super().per_example(others, d)

  def to_operand(self, g, n):
    if self.stacked:
      return jax.vmap(lambda g_l: self.inner.to_operand(g_l, n))(g)
    return self.inner._from_canon(g) if self._const_matmuls(n) else g

  def book_keeping(self, others, wd):
    if self.stacked:
      return jax.vmap(self.inner.book_keeping, in_axes=1)(others, wd)
    if not self._matmul():
      return super().book_keeping(others, wd)
    x, wd = self._merged(others, wd)
    g = jnp.einsum(
      "nhsk,nhsj->hkj", x, wd, preferred_element_type=self.operand.dtype
    )
    return self.inner._from_canon(g)
