"""One layer's microgradients from its inputs and output gradients.

Each layer kind is one class here, registered for the jaxpr operation it
stands for (in the manner of Opacus' ``grad_sample`` samplers). It receives
arrays and its own typed fields, never a jaxpr: ``trace.py`` describes each
operation as a :class:`LinearOp` and hands it to the registered class, which
builds itself or declines (then the layer is :class:`Opaque`).

A dense layer (``dot_general``) or a convolution is a matmul ``y = x W``
once its input is laid out as ``x [S, K]`` (a convolution's input as
patches, ``im2col``) and its output as ``d [S, J]``, with ``Hb``
independent such products for ``dot_general`` batch dimensions or the
groups of a grouped convolution. Then the microgradient of microbatch n is
``x_n^T d_n`` (``[Hb, K, J]``), and

- the ghost Gram matrix ``<g_n, g_m> = sum_{s,t} (x_ns . x_mt)(d_ns . d_mt)``
  costs about ``Hb (N S)^2 (K + J)``;
- forming the N microgradients costs ``N Hb S K J``, their Gram matrix
  ``N^2 Hb K J``;
- the weighted sum is one matmul, ``x^T (w * d)`` (book-keeping).

An embedding lookup (``table[ids]``) has a ghost Gram matrix of its own,
``sum_{s,t} [ids_ns == ids_mt] (d_ns . d_mt)``. Other layers (other gathers,
``batch_group_count`` convolutions) form their microgradients with
``jax.vjp``.
"""

import dataclasses
import math
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_gaf._ghost import numerics

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class LinearOp:
  """An operation of the loss, linear in its parameter operand.

  ``trace.py`` makes it from a jaxpr equation; the layer classes read it.

  Attributes:
    kind: the operation's name (``"dot_general"``).
    params: its static parameters (dimension numbers, padding, ...).
    ins: each operand's shape and dtype, one microbatch.
    out: the output's shape and dtype, one microbatch.
    param_pos: which operand is (derived from) the parameter.
    apply: ``apply(w, others)``, the operation with the parameter operand
      ``w`` and the other operands.
  """

  kind: str
  params: Mapping[str, Any]
  ins: tuple[jax.ShapeDtypeStruct, ...]
  out: jax.ShapeDtypeStruct
  param_pos: int
  apply: Callable[[jax.Array, Any], jax.Array]

  @property
  def operand(self) -> jax.ShapeDtypeStruct:
    return self.ins[self.param_pos]


_REGISTRY: dict[str, tuple[type["Layer"], tuple[int, ...]]] = {}


def register(kind: str, operands: tuple[int, ...]):
  """Class decorator: ``cls`` is the layer of ``kind`` operations.

  Args:
    kind: the jaxpr operation's name.
    operands: the operands it is linear in, which may be a parameter; a
      parameter read as one of them alone makes the operation a layer.
  """

  def decorate(cls):
    _REGISTRY[kind] = (cls, tuple(operands))
    return cls

  return decorate


def param_operands(kind: str) -> tuple[int, ...]:
  """The operands of a ``kind`` operation that make it a layer, or ``()``."""
  return _REGISTRY[kind][1] if kind in _REGISTRY else ()


def registered(kind: str) -> type["Layer"] | None:
  """The layer class registered for ``kind``, or None."""
  return _REGISTRY[kind][0] if kind in _REGISTRY else None


def varying_axes(x) -> frozenset:
  """The manual mesh axes ``x`` varies over (inside ``jax.shard_map``)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def varying(x, axes) -> jax.Array:
  """``x`` marked as varying over ``axes`` too (a no-op outside shard_map).

  A zero perturbation, a broadcast parameter or a vjp's zero primal must vary
  as the microbatches do: JAX's autodiff would otherwise ``psum`` its
  gradient over the devices.
  """
  missing = tuple(sorted(set(axes) - varying_axes(x), key=str))
  if not missing:
    return x
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, missing, to="varying")
  return jax.lax.pvary(x, missing)


def _vjp_zero(fn, aval, cotangent):
  """``fn``'s (linear) vjp at ``cotangent``, taken at zero."""
  zero = varying(jnp.zeros(aval.shape, aval.dtype), varying_axes(cotangent))
  _, vjp = jax.vjp(fn, zero)
  return vjp(cotangent)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
  """The interface of a layer kind; by default every step by ``jax.vjp``.

  ``others`` are the captured operands other than the parameter and ``d``
  the output gradients, each with a leading N (microbatch) axis.

  Attributes:
    operand: the parameter operand's shape and dtype.
    out: the output's shape and dtype, one microbatch.
    apply: ``apply(w, others)``, the operation itself (one microbatch).
  """

  operand: jax.ShapeDtypeStruct
  out: jax.ShapeDtypeStruct
  apply: Callable[[jax.Array, Any], jax.Array]

  @classmethod
  def from_op(cls, op: LinearOp) -> "Layer | None":
    """The layer of ``op``, or None where this kind cannot take it."""
    return cls(op.operand, op.out, op.apply)

  # Whether ghost_gram takes a residual shared by every microbatch.
  takes_residual = False

  def costs(self, n: int) -> tuple[float | None, float]:
    """FLOPs of ``(ghost Gram or None, forming N microgradients + Gram)``."""
    return None, n * n * math.prod(self.operand.shape)

  def residual_cost(self, n: int) -> float:
    """FLOPs a shared residual adds to the ghost Gram (``<a_n, r>``)."""
    del n
    return math.inf

  def ghost_gram(self, others, d, dtype, factors=None) -> jax.Array:
    """``[N, N]`` Gram matrix from the captures alone (when costs has one).

    With ``factors`` (``safe_gram``'s ``[N]``), that of ``f_n g_n``. A
    class with ``takes_residual`` also takes ``residual=r`` (the operand's
    layout): the Gram matrix of ``g_n + r``.
    """
    raise NotImplementedError(f"{type(self).__name__} has no ghost Gram.")

  def per_example(self, others, d) -> jax.Array:
    """The N microgradients, ``[N, ...]`` as :meth:`to_operand` reads them."""

    def one(others_n, d_n):
      fn = lambda w: self.apply(w, others_n)
      return _vjp_zero(fn, self.operand, d_n.astype(self.out.dtype))

    return jax.vmap(one)(others, d)

  def to_operand(self, g, n: int) -> jax.Array:
    """One combined microgradient of :meth:`per_example`, as the operand."""
    del n
    return g

  def book_keeping(self, others, wd) -> jax.Array:
    """``sum_n`` of the microgradients at output gradients ``wd``."""
    fn = lambda w: jax.vmap(lambda o: self.apply(w, o))(others)
    return _vjp_zero(fn, self.operand, wd.astype(self.out.dtype))


@dataclasses.dataclass(frozen=True, eq=False)
class Opaque(Layer):
  """A layer with no maths of its own (a gather that is no embedding
  lookup, a ``batch_group_count`` convolution): per-example ``jax.vjp``, no
  ghost Gram."""


@dataclasses.dataclass(frozen=True, eq=False)
class Matmul(Layer):
  """A layer as ``Hb`` matmuls ``x [S, K] @ W [K, J]`` (see the module).

  Attributes:
    sizes: ``(Hb, S, K, J)``.
    order: the operand axis of each axis of ``[Hb, K, J]`` reshaped back.
  """

  sizes: tuple[int, int, int, int]
  order: Shape
  takes_residual = True

  def canon(self, x, d):
    """One microbatch's ``([Hb, S, K], [Hb, S, J])``."""
    raise NotImplementedError

  def as_matmuls(self, n: int) -> bool:
    """Whether :meth:`per_example` forms the microgradients as matmuls."""
    del n
    return True

  def _canonical(self, others, d):
    """``[N, Hb, S, K]`` inputs and ``[N, Hb, S, J]`` output gradients."""
    return jax.vmap(self.canon)(others[0], d)

  def _from_canon(self, g):
    shape = [self.operand.shape[i] for i in self.order]
    return g.reshape(shape).transpose(np.argsort(self.order))

  def _to_canon(self, w):
    """The operand ``w`` as ``[Hb, K, J]`` (inverse of ``_from_canon``)."""
    hb, _, k, j = self.sizes
    return w.transpose(self.order).reshape(hb, k, j)

  def costs(self, n):
    hb, s, k, j = self.sizes
    p = math.prod(self.operand.shape)
    return hb * (n * s) ** 2 * (k + j), n * hb * s * k * j + n * n * p

  def residual_cost(self, n):
    hb, s, k, j = self.sizes
    return n * hb * s * k * j

  def ghost_gram(self, others, d, dtype, factors=None, residual=None):
    x, d = self._canonical(others, d)
    r = None if residual is None else self._to_canon(residual)
    return numerics.matmul_gram(x, d, dtype, factors, r)

  def per_example(self, others, d):
    if not self.as_matmuls(d.shape[0]):
      return super().per_example(others, d)
    x, d = self._canonical(others, d)
    return jnp.einsum(
      "nhsk,nhsj->nhkj", x, d, preferred_element_type=self.operand.dtype
    )

  def to_operand(self, g, n):
    return self._from_canon(g) if self.as_matmuls(n) else g

  def book_keeping(self, others, wd):
    x, wd = self._canonical(others, wd)
    g = jnp.einsum(
      "nhsk,nhsj->hkj", x, wd, preferred_element_type=self.operand.dtype
    )
    return self._from_canon(g)


def _size(shape, dims) -> int:
  return math.prod(shape[i] for i in dims)


@register("dot_general", operands=(0, 1))
@dataclasses.dataclass(frozen=True, eq=False)
class Dense(Matmul):
  """``dot_general``: ``x @ W``, ``W @ x``, einsums with batch dimensions.

  Attributes:
    x_perm: the input's axes as ``[batch, free, contracting]``.
    out_perm: the output's axes as ``[batch, x's free, W's free]``.
  """

  x_perm: Shape
  out_perm: Shape

  @classmethod
  def from_op(cls, op):
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    p = op.param_pos
    xc, xb, wc, wb = (rc, rb, lc, lb) if p == 0 else (lc, lb, rc, rb)
    x_shape, w_shape = op.ins[1 - p].shape, op.operand.shape
    xf = [i for i in range(len(x_shape)) if i not in (*xc, *xb)]
    wf = [i for i in range(len(w_shape)) if i not in (*wc, *wb)]
    nb, nxf, nwf = len(xb), len(xf), len(wf)
    # The output is [batch, lhs free, rhs free]; bring x's free dims first.
    out_perm = list(range(nb)) + (
      list(range(nb, nb + nxf + nwf))
      if p == 1
      else list(range(nb + nwf, nb + nwf + nxf)) + list(range(nb, nb + nwf))
    )
    hb, s = _size(x_shape, xb), _size(x_shape, xf)
    k, j = _size(x_shape, xc), _size(w_shape, wf)
    return cls(
      op.operand,
      op.out,
      op.apply,
      sizes=(hb, s, k, j),
      order=(*wb, *wc, *wf),
      x_perm=(*xb, *xf, *xc),
      out_perm=tuple(out_perm),
    )

  def canon(self, x, d):
    hb, s, k, j = self.sizes
    x = x.transpose(self.x_perm).reshape(hb, s, k)
    return x, d.transpose(self.out_perm).reshape(hb, s, j)


# Above this many numbers (16 MiB of float32), im2col patches take XLA's own
# per-example convolutions instead, to bound memory. Below it patches are
# faster on CPU (2**22 against 2**20: MobileNetV1 per example went from
# about 2.5x to 1.2x a plain step; benchmarks/results/outside_models.md).
PATCHES_MAX = 2**22


@register("conv_general_dilated", operands=(1,))
@dataclasses.dataclass(frozen=True, eq=False)
class Conv(Matmul):
  """A convolution of the kernel: matmuls over im2col patches.

  A grouped convolution (``feature_group_count = G``; depthwise: ``G`` input
  channels) is ``Hb = G`` independent ungrouped ones: group g reads input
  channels ``[g C_in/G, (g+1) C_in/G)`` and writes the g-th contiguous block
  of ``C_out/G`` output features, as XLA splits them. A transposed one
  (``lhs_dilation``, ``jax.lax.conv_transpose``) takes its patches of the
  input dilated by zeros. ``batch_group_count != 1`` (which appears in
  weight-gradient convolutions, not in models) declines: Opaque.

  Above ``PATCHES_MAX`` numbers of patches, :meth:`per_example` takes XLA's
  per-example convolutions instead.

  Attributes:
    lhs_perm: the input's axes as ``[batch, *spatial, channel]``.
    out_perm: the output's axes as ``[batch, *spatial, feature]``.
    padding: ``(low, high)`` per spatial axis.
    strides: the window strides.
    dilation: the kernel (rhs) dilation.
    lhs_dilation: the input's dilation (transposed convolutions).
    filt: the kernel's spatial shape.
    out_spatial: the output's spatial shape.
  """

  lhs_perm: Shape
  out_perm: Shape
  padding: tuple[tuple[int, int], ...]
  strides: Shape
  dilation: Shape
  lhs_dilation: Shape
  filt: Shape
  out_spatial: Shape

  @classmethod
  def from_op(cls, op):
    params = op.params
    if op.param_pos != 1 or params["batch_group_count"] != 1:
      return None
    dn = params["dimension_numbers"]
    lhs, rhs, out = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    w_shape = op.operand.shape
    filt = tuple(w_shape[i] for i in rhs[2:])
    groups = params["feature_group_count"]
    j = w_shape[rhs[0]] // groups
    s = math.prod(op.out.shape) // (groups * j)
    k = w_shape[rhs[1]] * math.prod(filt)
    return cls(
      op.operand,
      op.out,
      op.apply,
      sizes=(groups, s, k, j),
      order=(*rhs[2:], rhs[1], rhs[0]),
      lhs_perm=(lhs[0], *lhs[2:], lhs[1]),
      out_perm=(out[0], *out[2:], out[1]),
      padding=tuple((lo, hi) for lo, hi in params["padding"]),
      strides=tuple(params["window_strides"]),
      dilation=tuple(params["rhs_dilation"]),
      lhs_dilation=tuple(params["lhs_dilation"]),
      filt=filt,
      out_spatial=tuple(op.out.shape[i] for i in out[2:]),
    )

  def canon(self, x, d):
    g, s, k, j = self.sizes
    patches = self._patches(x.transpose(self.lhs_perm))
    # [S, filter offsets, G, C_in/G] -> [G, S, K]: channels split by group.
    offsets = math.prod(self.filt)
    patches = patches.reshape(s, offsets, g, k // max(offsets, 1))
    patches = patches.transpose(2, 0, 1, 3).reshape(g, s, k)
    d = d.transpose(self.out_perm).reshape(s, g, j).transpose(1, 0, 2)
    return patches, d

  def _from_canon(self, g):
    # [G, K, C_out/G] -> [K, C_out]: group g's features are block g.
    return super()._from_canon(g.transpose(1, 0, 2))

  def _to_canon(self, w):
    g, _, k, j = self.sizes
    return w.transpose(self.order).reshape(k, g, j).transpose(1, 0, 2)

  def as_matmuls(self, n):
    hb, s, k, _ = self.sizes
    return n * hb * s * k <= PATCHES_MAX

  def _patches(self, x):
    """im2col by slicing: ``[batch, *out_spatial, prod(filt) * C]``.

    ``x`` is ``[batch, *spatial, C]``; the features are ordered with the
    filter offsets slowest (row-major), the input channel fastest. The input
    is dilated (interior zeros) before it is padded, as XLA does.
    """
    pads = [
      (lo, hi, r - 1) for (lo, hi), r in zip(self.padding, self.lhs_dilation)
    ]
    pads = [(0, 0, 0), *pads, (0, 0, 0)]
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), pads)
    views = []
    for offset in np.ndindex(*self.filt):
      start = [0] + [k * r for k, r in zip(offset, self.dilation)] + [0]
      limit = [
        b + (o - 1) * s + 1
        for b, o, s in zip(start[1:-1], self.out_spatial, self.strides)
      ]
      limit = [x.shape[0], *limit, x.shape[-1]]
      views.append(jax.lax.slice(x, start, limit, (1, *self.strides, 1)))
    return jnp.concatenate(views, axis=-1)
