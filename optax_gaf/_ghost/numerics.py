"""The ghost Gram matrix in float range and to the stacked route's precision.

A ghost Gram entry ``sum_{s,t} (x_ns . x_mt)(d_ns . d_mt)`` squares the
captures and sums products that may cancel, where the stacked route squares
only the microgradients. Four exact steps keep it as accurate:

1. **Scale per microbatch** (:func:`scaled`): each microbatch's inputs and
   output gradients are multiplied by a power of two (exact) that brings
   their largest entry to ``[0.5, 1)``; the Gram matrix is scaled back at the
   end (:func:`finish`), together with ``safe_gram``'s factors. A microbatch
   whose inputs are 1e20 and output gradients 1e-20 neither overflows nor
   drowns the others.
2. **Centre the inputs per microbatch** (:func:`matmul_gram`): with
   ``mu_n`` the mean input over tokens, ``x_n^T d_n = (x_n - mu_n)^T d_n +
   mu_n delta_n^T`` (``delta_n = sum_s d_ns``) exactly, so inputs with a
   common offset (pixels in ``[0, 255]``) cancel in no sum. The correction
   terms cost ``N^2 S (K + J)``, a factor ``S`` below the ghost Gram matrix.
3. **Bound the rounding** (:func:`flagged`): summing the products of
   ``g_n = sum_s x_ns d_ns^T`` costs ghost about ``eps * b_n`` on
   ``||g_n||^2``, with ``b_n = sum_s ||x_ns||^2 ||d_ns||^2`` (token by token),
   where the stacked route errs relative to ``||g_n||^2`` itself. A
   microbatch whose tokens cancel (``||g_n||^2 < b_n / RATIO``) is flagged.
4. **Exact rows** (:func:`with_exact_rows`): a flagged microbatch's
   microgradient is formed (one at a time, one layer's size) and its row of
   the Gram matrix is taken from it, as the stacked route would: only on the
   rare step that has one.
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
  """``(x_n * 2^-e_n in dtype, e)``: each microbatch's largest entry in
  ``[0.5, 1)``, exactly."""
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

  def fix(gram):
    def one(n, gram):
      def replace(gram):
        r = row(n)
        return gram.at[n, :].set(r).at[:, n].set(r)

      return jax.lax.cond(flags[n], replace, lambda g: g, gram)

    return jax.lax.fori_loop(0, gram.shape[0], one, gram)

  return jax.lax.cond(jnp.any(flags), fix, lambda g: g, gram)


def _token_gram(x, d, dtype):
  """``sum_{h,s,t} (x_nhs . x_mht)(d_nhs . d_mht)``: ``[N, N]``."""
  n, hb, s = x.shape[:3]
  # Tokens of all microbatches as rows of one matrix: plain 2-D matmuls.
  x = x.transpose(1, 0, 2, 3).reshape(hb, n * s, -1)
  d = d.transpose(1, 0, 2, 3).reshape(hb, n * s, -1)
  prods = jnp.matmul(x, x.swapaxes(1, 2), **_kw(dtype))
  prods *= jnp.matmul(d, d.swapaxes(1, 2), **_kw(dtype))
  return prods.reshape(hb, n, s, n, s).sum(axis=(0, 2, 4))


def matmul_gram(x, d, dtype, factors=None) -> jax.Array:
  """The Gram matrix of ``g_n = sum_h x_nh^T d_nh`` (steps 1 to 4).

  Args:
    x: ``[N, Hb, S, K]`` inputs.
    d: ``[N, Hb, S, J]`` output gradients.
    dtype: the statistics' dtype.
    factors: None, or ``safe_gram``'s ``[N]`` factors.
  """
  x, ex = scaled(x, dtype)
  d, ed = scaled(d, dtype)
  s = x.shape[2]
  ein = lambda spec, *ops: jnp.einsum(spec, *ops, **_kw(dtype))
  sq = lambda y: jnp.sum(y * y, axis=-1)
  if s == 1:  # one token: nothing to centre, nothing cancels
    x, d = x[:, :, 0], d[:, :, 0]
    gram = ein("nhk,mhk,nhj,mhj->nm", x, x, d, d)
    return finish(gram, ex + ed, factors)
  mu, delta = jnp.mean(x, axis=2), jnp.sum(d, axis=2)  # [N, Hb, K], [.., J]
  x = x - mu[:, :, None]
  gram = _token_gram(x, d, dtype)
  # <x_n^T d_n, mu_m delta_m^T> = sum_{h,s} (x_nhs . mu_mh)(d_nhs . delta_mh)
  cross = ein("nhsk,mhk,nhsj,mhj->nm", x, mu, d, delta)
  gram += cross + cross.T + ein("nhk,mhk,nhj,mhj->nm", mu, mu, delta, delta)
  b = jnp.sum(sq(x) * sq(d), axis=(1, 2)) + jnp.sum(sq(mu) * sq(delta), 1)

  def row(n):
    g = ein("hsk,hsj->hkj", x[n], d[n]) + ein("hk,hj->hkj", mu[n], delta[n])
    r = ein("mhsk,hkj,mhsj->m", x, g, d) + ein("mhk,hkj,mhj->m", mu, g, delta)
    return r.at[n].set(jnp.sum(g * g))

  gram = with_exact_rows(gram, flagged(gram, b), row)
  return finish(gram, ex + ed, factors)
