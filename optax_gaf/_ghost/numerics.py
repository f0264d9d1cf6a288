"""The ghost Gram matrix in float range and to the stacked route's precision.

A ghost Gram entry ``sum_{s,t} (x_ns . x_mt)(d_ns . d_mt)`` squares the
captures and sums products that may cancel, where the stacked route squares
only the microgradients. Exact steps keep it as accurate:

1. **Scale per microbatch** (:func:`scaled`): each microbatch's inputs and
   output gradients are multiplied by a power of two (exact) that brings
   their largest entry to ``[0.5, 1)``; the Gram matrix is scaled back at the
   end (:func:`finish`), together with ``safe_gram``'s factors. A microbatch
   whose inputs are 1e20 and output gradients 1e-20 neither overflows nor
   drowns the others.
2. **Bound the rounding** (:func:`flagged`): summing the products of
   ``g_n = sum_s x_ns d_ns^T`` costs ghost about ``eps * b_n`` on
   ``||g_n||^2``, with ``b_n = sum_s ||x_ns||^2 ||d_ns||^2`` (token by token,
   the diagonal of the products), where the stacked route errs relative to
   ``||g_n||^2`` itself. A microbatch whose tokens cancel (``||g_n||^2 < b_n
   / RATIO``) is flagged. Only on a step that flags one:
3. **Centre the inputs per microbatch** (:func:`_centred_gram`): with
   ``mu_n`` the mean input over tokens, ``x_n^T d_n = (x_n - mu_n)^T d_n +
   mu_n delta_n^T`` (``delta_n = sum_s d_ns``) exactly, so inputs with a
   common offset (pixels in ``[0, 255]`` under a batch norm) cancel in no
   sum. The correction is one more token per microbatch.
4. **Exact rows** (:func:`with_exact_rows`): a microbatch still flagged
   after centring has its microgradient formed (one at a time, one layer's
   size) and its row of the Gram matrix taken from it, as the stacked route
   would.
"""

import jax
import jax.numpy as jnp

from optax_gaf import _gram

# ||g_n||^2 below b_n / RATIO: the ghost sum would lose more than about
# log2(RATIO) bits to cancellation that the stacked route does not lose.
RATIO = 64.0


def _kw(dtype):
  return {"precision": _gram.PRECISION, "preferred_element_type": dtype}


def exponents(x: jax.Array) -> jax.Array:
  """``[N]`` ints ``e_n`` with ``max|x_n| in [2^(e_n - 1), 2^e_n)``.

  0 for a zero, empty or non-finite microbatch (then left as it is).
  """
  n = x.shape[0]
  flat = x.reshape(n, -1)
  if flat.shape[1] == 0:
    return jnp.zeros([n], jnp.int32)
  top = jnp.max(jnp.abs(flat), axis=1)
  return jnp.where(jnp.isfinite(top), jnp.frexp(top)[1], 0)


def _times_pow2(x: jax.Array, e: jax.Array) -> jax.Array:
  """``x_n * 2^e_n`` exactly: two normal factors (2^-149 would flush)."""
  half = e // 2
  shape = (-1,) + (1,) * (x.ndim - 1)
  one = jnp.ones((), x.dtype)
  f1 = jnp.ldexp(one, half).reshape(shape)
  f2 = jnp.ldexp(one, e - half).reshape(shape)
  return x * f1 * f2


def scaled(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """``(x_n * 2^-e_n, e)``: each microbatch's largest entry in ``[0.5, 1)``,
  exactly.

  In ``dtype``, or kept in bfloat16, whose exponent range is float32's (its
  products are exact in the float32 matmuls that take it).
  """
  if x.dtype != jnp.bfloat16 or jnp.dtype(dtype) != jnp.float32:
    x = x.astype(dtype)
  e = exponents(x)
  return _times_pow2(x, -e), e


def finish(gram, e, factors) -> jax.Array:
  """The Gram matrix of ``f_n g_n`` from that of ``g_n * 2^-e_n``.

  ``f`` (``safe_gram``'s factors, or None for ones) is 0 for a microgradient
  left out: its row and column are zeroed (``0 * nan`` is nan).
  """
  f = jnp.ones(e.shape, gram.dtype) if factors is None else factors
  c = jnp.ldexp(f.astype(gram.dtype), e)
  gram = gram * c[:, None] * c[None, :]
  used = f > 0
  return jnp.where(used[:, None] & used[None, :], gram, 0)


def flagged(gram, b) -> jax.Array:
  """``[N]``: the microbatches whose ghost squared norm lost precision."""
  sq = jnp.diagonal(gram)
  ok = jnp.isfinite(b) & (b > 0)
  return ok & ~(sq * RATIO >= b)


def with_exact_rows(gram, flags, row) -> jax.Array:
  """``gram`` with the rows and columns of flagged microbatches replaced.

  Args:
    gram: ``[N, N]``.
    flags: ``[N]`` bools.
    row: ``row(n) -> [N]``, the inner products of microgradient n (formed
      exactly) with every microgradient, its squared norm at ``n``.
  """
  order = jnp.argsort(~flags, stable=True)  # the flagged ones first

  def one(carry):
    i, gram = carry
    n = order[i]
    r = row(n)
    return i + 1, gram.at[n, :].set(r).at[:, n].set(r)

  count = jnp.sum(flags)
  return jax.lax.while_loop(lambda c: c[0] < count, one, (0, gram))[1]


def _token_gram(x, d, dtype):
  """``(sum_{h,s,t} (x_nhs . x_mht)(d_nhs . d_mht) [N, N], b [N])``.

  ``b_n = sum_{h,s} ||x_nhs||^2 ||d_nhs||^2``, the diagonal's products.
  """
  n, hb, s = x.shape[:3]
  # Tokens of all microbatches as rows of one matrix: plain 2-D matmuls.
  x = x.transpose(1, 0, 2, 3).reshape(hb, n * s, -1)
  d = d.transpose(1, 0, 2, 3).reshape(hb, n * s, -1)
  prods = jnp.matmul(x, x.swapaxes(1, 2), **_kw(dtype))
  prods *= jnp.matmul(d, d.swapaxes(1, 2), **_kw(dtype))
  b = jnp.diagonal(prods, axis1=1, axis2=2).reshape(hb, n, s).sum((0, 2))
  return prods.reshape(hb, n, s, n, s).sum(axis=(0, 2, 4)), b


def _with_residual(gram, x, d, res, dtype):
  """``(gram + <a_n, r_m> + <r_n, a_m> + <r_n, r_m>, error scale [N])``.

  ``res`` is None or ``(r [Hb, K, J], rho [N])``: microbatch n's residual is
  ``rho_n r`` (a residual shared by all, in each row's scale). ``<a_n, r>``
  is one pass over the captures, ``sum_s x_ns^T r d_ns``.
  """
  if res is None:
    return gram, 0.0
  r, rho = res
  c = jnp.einsum("nhsk,hkj,nhsj->n", x, r, d, **_kw(dtype))
  rr = jnp.sum(jnp.square(r.astype(dtype)))
  cross = c[:, None] * rho[None, :]
  gram = gram + cross + cross.T + rho[:, None] * rho[None, :] * rr
  return gram, 2 * rho * jnp.abs(c) + rho * rho * rr


def _centred_gram(x, d, dtype, res=None) -> jax.Array:
  """The Gram matrix with every microbatch's inputs centred (step 2), and
  exact rows for those that still lose precision (steps 3, 4).

  The correction ``mu_n delta_n^T`` is one more token of each microbatch
  (input ``mu_n``, output gradient ``delta_n``).
  """
  x, d = x.astype(dtype), d.astype(dtype)  # centred in float32, not bf16
  mu = jnp.mean(x, axis=2, keepdims=True)
  x = jnp.concatenate([x - mu, mu], axis=2)
  d = jnp.concatenate([d, jnp.sum(d, axis=2, keepdims=True)], axis=2)
  gram, b = _token_gram(x, d, dtype)
  gram, extra = _with_residual(gram, x, d, res, dtype)

  def row(n):
    ein = lambda spec, *ops: jnp.einsum(spec, *ops, **_kw(dtype))
    g = ein("hsk,hsj->hkj", x[n], d[n])
    if res is not None:  # g_n = a_n + rho_n r
      g = g + res[1][n] * res[0]
    out = ein("mhsk,hkj,mhsj->m", x, g, d)
    if res is not None:  # against every a_m + rho_m r
      out = out + res[1] * jnp.sum(g * res[0])
    return out.at[n].set(jnp.sum(g * g))

  return with_exact_rows(gram, flagged(gram, b + extra), row)


def _residual(residual, e, dtype):
  """``(res, e)`` for :func:`_with_residual`: ``r`` scaled to ``[0.5, 1)``,
  and each row's exponent raised to cover it (``rho_n <= 1``)."""
  r, er = scaled(residual[None], dtype)
  top = jnp.maximum(e, er[0])
  rho = _times_pow2(jnp.ones(e.shape, dtype), er[0] - top)
  return (r[0].astype(dtype), rho), top


def matmul_gram(x, d, dtype, factors=None, residual=None) -> jax.Array:
  """The Gram matrix of ``g_n = sum_h x_nh^T d_nh (+ r)`` (steps 1 to 4).

  Centring and exact rows are taken only on a step where the plain ghost
  sum flags a microbatch: then the matrix is taken again, centred.

  Args:
    x: ``[N, Hb, S, K]`` inputs.
    d: ``[N, Hb, S, J]`` output gradients.
    dtype: the statistics' dtype.
    factors: None, or ``safe_gram``'s ``[N]`` factors.
    residual: None, or ``r [Hb, K, J]`` added to every microgradient (the
      gradient of reads outside the layer that no microbatch changes).
  """
  x, ex = scaled(x, dtype)
  d, ed = scaled(d, dtype)
  e, res = ex + ed, None
  if residual is not None:
    res, top = _residual(residual, e, dtype)
    d, e = _times_pow2(d, e - top), top  # rows scaled to cover r too
  gram, b = _token_gram(x, d, dtype)
  gram, extra = _with_residual(gram, x, d, res, dtype)
  if x.shape[2] > 1 or res is not None:  # one token alone cancels nothing
    gram = jax.lax.cond(
      jnp.any(flagged(gram, b + extra)),
      lambda g: _centred_gram(x, d, dtype, res),
      lambda g: g,
      gram,
    )
  return finish(gram, e, factors)
