"""One layer's microgradients from its inputs and output gradients.

A dense layer (``dot_general``) or an ungrouped convolution is a matmul
``y = x W`` once its input is laid out as ``x [S, K]`` (a convolution's
input as patches, ``im2col``) and its output as ``d [S, J]``, with ``Hb``
independent such products for ``dot_general`` batch dimensions. Then the
microgradient of microbatch n is ``x_n^T d_n`` (``[Hb, K, J]``), and

- the ghost Gram matrix ``<g_n, g_m> = sum_{s,t} (x_ns . x_mt)(d_ns . d_mt)``
  costs about ``Hb (N S)^2 (K + J)``;
- forming the N microgradients costs ``N Hb S K J``, their Gram matrix
  ``N^2 Hb K J``;
- the weighted sum is one matmul, ``x^T (w * d)`` (book-keeping).

An embedding lookup (``table[ids]``) has a ghost Gram matrix of its own,
``sum_{s,t} [ids_ns == ids_mt] (d_ns . d_mt)``. Other sites (grouped
convolutions, other gathers) form their microgradients with ``jax.vjp``.
"""

import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_gaf import _gram
from optax_gaf import _layers


class Layout(NamedTuple):
  """A site as ``Hb`` matmuls ``x [S, K] @ W [K, J]`` (see the module)."""

  sizes: tuple[int, int, int, int]  # (Hb, S, K, J)
  canon: Any  # (x_n, d_n) -> ([Hb, S, K], [Hb, S, J]), one microbatch
  to_operand: Any  # [Hb, K, J] -> the parameter operand's layout


def _dot_layout(site: _layers.Site) -> Layout:
  (lc, rc), (lb, rb) = site.eqn.params["dimension_numbers"]
  p = site.param_pos
  xc, xb, wc, wb = (rc, rb, lc, lb) if p == 0 else (lc, lb, rc, rb)
  x_shape, w_shape = site.eqn.invars[1 - p].aval.shape, site.operand.shape
  xf = [i for i in range(len(x_shape)) if i not in (*xc, *xb)]
  wf = [i for i in range(len(w_shape)) if i not in (*wc, *wb)]
  nb, nxf, nwf = len(xb), len(xf), len(wf)
  # The output is [batch, lhs free, rhs free]; bring x's free dims first.
  out_perm = list(range(nb)) + (
    list(range(nb, nb + nxf + nwf))
    if p == 1
    else list(range(nb + nwf, nb + nwf + nxf)) + list(range(nb, nb + nwf))
  )
  size = lambda shape, dims: math.prod(shape[i] for i in dims)
  hb, s = size(x_shape, xb), size(x_shape, xf)
  k, j = size(x_shape, xc), size(w_shape, wf)

  def canon(x, d):
    x = x.transpose([*xb, *xf, *xc]).reshape(hb, s, k)
    return x, d.transpose(out_perm).reshape(hb, s, j)

  order = [*wb, *wc, *wf]  # the operand axis of each canonical axis
  shape = [w_shape[i] for i in order]
  to_operand = lambda g: g.reshape(shape).transpose(np.argsort(order))
  return Layout((hb, s, k, j), canon, to_operand)


def _patches(x, params, filt, out_spatial):
  """im2col by slicing: ``[batch, *out_spatial, prod(filt) * C]``.

  ``x`` is ``[batch, *spatial, C]``; the features are ordered with the
  filter offsets slowest (row-major), the input channel fastest.
  """
  pads = [(0, 0)] + list(params["padding"]) + [(0, 0)]
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), [(lo, hi, 0) for lo, hi in pads])
  strides, dilation = params["window_strides"], params["rhs_dilation"]
  views = []
  for offset in np.ndindex(*filt):
    start = [0] + [k * r for k, r in zip(offset, dilation)] + [0]
    limit = [x.shape[0]]
    limit += [b + (o - 1) * s + 1 for b, o, s in
              zip(start[1:-1], out_spatial, strides)]  # fmt: skip
    limit += [x.shape[-1]]
    views.append(jax.lax.slice(x, start, limit, (1, *strides, 1)))
  return jnp.concatenate(views, axis=-1)


def _conv_layout(site: _layers.Site) -> Layout | None:
  params = site.eqn.params
  if (
    site.param_pos != 1
    or params["feature_group_count"] != 1
    or params["batch_group_count"] != 1
    or any(d != 1 for d in params["lhs_dilation"])
  ):
    return None
  dn = params["dimension_numbers"]
  lhs, rhs, out = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  w_shape = site.operand.shape
  filt = [w_shape[i] for i in rhs[2:]]
  k = w_shape[rhs[1]] * math.prod(filt)
  j = w_shape[rhs[0]]
  s = math.prod(site.out.shape) // j
  out_spatial = [site.out.shape[i] for i in out[2:]]

  def canon(x, d):
    x = x.transpose([lhs[0], *lhs[2:], lhs[1]])
    patches = _patches(x, params, filt, out_spatial).reshape(1, s, k)
    return patches, d.transpose([out[0], *out[2:], out[1]]).reshape(1, s, j)

  order = [*rhs[2:], rhs[1], rhs[0]]
  shape = [w_shape[i] for i in order]
  to_operand = lambda g: g.reshape(shape).transpose(np.argsort(order))
  return Layout((1, s, k, j), canon, to_operand)


def layout(site: _layers.Site) -> Layout | None:
  """The site as matmuls, or None (gathers, grouped convolutions)."""
  if site.kind == "dot_general":
    return _dot_layout(site)
  if site.kind == "conv_general_dilated":
    return _conv_layout(site)
  return None


def _take_rows(site: _layers.Site) -> bool:
  """Whether a gather site is ``table[ids]`` (an embedding lookup)."""
  if site.kind != "gather":
    return False
  dn = site.eqn.params["dimension_numbers"]
  table = site.operand.shape
  out_rank = len(site.out.shape)
  return (
    site.param_pos == 0
    and tuple(dn.collapsed_slice_dims) == (0,)
    and tuple(dn.start_index_map) == (0,)
    and not dn.operand_batching_dims
    and tuple(site.eqn.params["slice_sizes"]) == (1, *table[1:])
    and tuple(dn.offset_dims)
    == tuple(range(out_rank - len(table) + 1, out_rank))
    and site.eqn.invars[1].aval.shape[-1] == 1
  )


def costs(site: _layers.Site, n: int) -> tuple[float | None, float]:
  """FLOPs of ``(ghost Gram or None, forming N microgradients + Gram)``."""
  p = math.prod(site.operand.shape)
  lay = layout(site)
  if lay is not None:
    hb, s, k, j = lay.sizes
    return hb * (n * s) ** 2 * (k + j), n * hb * s * k * j + n * n * p
  rows = math.prod(site.eqn.invars[1].aval.shape[:-1])
  width = math.prod(site.operand.shape[1:])
  ghost = (n * rows) ** 2 * width if _take_rows(site) else None
  return ghost, n * rows * width + n * n * p


def _canonical(site, others, d):
  """``[N, Hb, S, K]`` inputs and ``[N, Hb, S, J]`` output gradients."""
  return jax.vmap(layout(site).canon)(others[0], d)


def ghost_gram(site, others, d, dtype) -> jax.Array:
  """``[N, N]`` Gram matrix of one site from its captures alone."""
  kw = {"precision": _gram.PRECISION, "preferred_element_type": dtype}
  if site.kind == "gather":
    n = d.shape[0]
    ids = others[0][..., 0].reshape(n, -1)
    rows = site.operand.shape[0]
    if site.eqn.params["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP:
      valid = (ids >= 0) & (ids < rows)
    else:
      ids, valid = jnp.clip(ids, 0, rows - 1), jnp.ones(ids.shape, bool)
    d = d.reshape(n * ids.shape[1], -1)
    dd = jnp.matmul(d, d.T, **kw).reshape(n, ids.shape[1], n, -1)
    same = ids[:, :, None, None] == ids[None, None, :, :]
    same &= valid[:, :, None, None] & valid[None, None, :, :]
    return jnp.sum(jnp.where(same, dd, 0), axis=(1, 3))
  x, d = _canonical(site, others, d)
  n, hb, s = x.shape[:3]
  # Tokens of all microbatches as rows of one matrix: plain 2-D matmuls.
  x = x.transpose(1, 0, 2, 3).reshape(hb, n * s, -1)
  d = d.transpose(1, 0, 2, 3).reshape(hb, n * s, -1)
  prods = jnp.matmul(x, x.swapaxes(1, 2), **kw)
  prods *= jnp.matmul(d, d.swapaxes(1, 2), **kw)
  return prods.reshape(hb, n, s, n, s).sum(axis=(0, 2, 4))


def _vjp_zero(fn, aval, cotangent):
  _, vjp = jax.vjp(fn, jnp.zeros(aval.shape, aval.dtype))
  return vjp(cotangent)[0]


# Above this many numbers, im2col patches cost more memory traffic than
# XLA's own per-example convolutions (benchmarks/vs_plain_step.py, CPU).
PATCHES_MAX = 2**20


def _as_matmuls(site, n: int) -> bool:
  lay = layout(site)
  if lay is None:
    return False
  hb, s, k, _ = lay.sizes
  return site.kind == "dot_general" or n * hb * s * k <= PATCHES_MAX


def per_example(site, others, d) -> jax.Array:
  """The site's N microgradients: ``[N, Hb, K, J]``, or ``[N, *operand]``."""
  if _as_matmuls(site, d.shape[0]):
    x, d = _canonical(site, others, d)
    return jnp.einsum(
      "nhsk,nhsj->nhkj", x, d, preferred_element_type=site.operand.dtype
    )

  def one(others_n, d_n):
    fn = lambda w: site.apply(w, others_n)
    return _vjp_zero(fn, site.operand, d_n.astype(site.out.dtype))

  return jax.vmap(one)(others, d)


def to_operand(site, g, n: int) -> jax.Array:
  """A combined microgradient (as :func:`per_example` lays it out)."""
  return layout(site).to_operand(g) if _as_matmuls(site, n) else g


def book_keeping(site, others, wd) -> jax.Array:
  """``sum_n`` of the site's microgradients at output gradients ``wd``."""
  if layout(site) is not None:
    x, wd = _canonical(site, others, wd)
    g = jnp.einsum(
      "nhsk,nhsj->hkj", x, wd, preferred_element_type=site.operand.dtype
    )
    return layout(site).to_operand(g)
  fn = lambda w: jax.vmap(lambda o: site.apply(w, o))(others)
  return _vjp_zero(fn, site.operand, wd.astype(site.out.dtype))


def to_leaf(site, operand_grad, leaf_aval) -> jax.Array:
  """Maps a gradient of the site's operand back to its parameter leaf."""
  fn = lambda leaf: _layers.replay_chain(site.chain, leaf)
  return _vjp_zero(fn, leaf_aval, operand_grad.astype(site.operand.dtype))
