"""``adacons()``: adaptive consensus weighting (Choukroun et al., 2024).

A rule on the Gram matrix plus state: the coefficients need only the inner
products ``<g_i, sum_j g_j>`` and the norms, so it runs unchanged on every
device of a multi-device placement.

The steps of :func:`adacons` follow the authors' sample implementation
(``AdaConsAggregator`` in ``Main.py`` of github.com/yoniLc/AdaCons, without its
``1e-8`` in the norms), with two differences, both choices of this library: (a)
there the averaged sorted coefficients are put back with ``m[argsort(a)]``,
which is the inverse permutation only when it is an involution; here
``alpha_i`` is ``m`` at ``a_i``'s rank, as the paper's "momentum on the sorted
coefficients" describes; (b) the sample returns the unit-norm combination (its
demo picks the step size by line search); the paper's exact rescaling was not
available to us, so ``rescale=True`` gives the direction the plain mean's
length, and ``rescale=False`` returns the sample's output.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from optax.experimental import aggregating

from optax_gaf import _checks
from optax_gaf import _gram
from optax_gaf import _placement
from optax_gaf import _stats


class AdaConsState(NamedTuple):
  """State of :func:`adacons`.

  Attributes:
    count: int32, the number of ``update`` calls so far (saturating).
    ready: bool, False when no consensus exists (no usable microgradient, or
      coefficients that do not sum to a positive number): the update is zero
      and ``aggregating.process`` skips the inner optimizer.
    skipped_steps: int32, the number of steps with ``ready`` False.
    gradient_diversity: float32, ``sum_i ||g_i||^2 / ||sum_i g_i||^2``.
    coefficients: float32 ``[N]``, the normalised coefficients ``alpha_i`` of
      the last step (summing to one). None without ``num_microbatches``.
    sorted_momentum: float32 ``[N]``, the moving average of the sorted raw
      coefficients (the subspace momentum). None without
      ``num_microbatches``.
  """

  count: jax.Array
  ready: jax.Array
  skipped_steps: jax.Array
  gradient_diversity: jax.Array
  coefficients: jax.Array | None = None
  sorted_momentum: jax.Array | None = None


def consensus_weights(gram, usable, sorted_momentum, first, momentum, rescale):
  """AdaCons from the sanitized Gram matrix.

  Returns ``(weights [N], length, ready, coefficients [N], new
  sorted_momentum)``: ``sum_i weights[i] h_i``, with ``h_i`` the vectors of
  ``gram``, is the direction (each ``h_i`` enters as ``h_i / ||h_i||``, so
  any per-microgradient factor in them cancels), and ``length`` the factor
  that gives it the mean's length (None without ``rescale``). A common
  factor ``c`` in the ``h_i`` multiplies ``length`` by ``c``; the caller
  divides.
  """
  n_ok = jnp.maximum(jnp.sum(usable), 1).astype(gram.dtype)
  norms = jnp.sqrt(jnp.diagonal(gram))
  inv_norm = jnp.where(usable, 1.0 / jnp.where(usable, norms, 1.0), 0.0)
  # <g_i, sum_j g_j> / ||g_i|| / N: the mean projected on g_i's direction.
  raw = jnp.where(usable, jnp.sum(gram, axis=1) * inv_norm / n_ok, 0.0)
  order = jnp.argsort(raw, stable=True)
  sorted_raw = raw[order]
  if sorted_momentum is not None:
    sorted_raw = jnp.where(
      first,
      sorted_raw,
      momentum * sorted_momentum + (1.0 - momentum) * sorted_raw,
    )
  # Give back to the microgradient of rank k the k-th averaged coefficient.
  alpha = jnp.zeros_like(raw).at[order].set(sorted_raw)
  alpha = jnp.where(usable, alpha, 0.0)
  total = jnp.sum(alpha)
  ready = jnp.any(usable) & (total > 0)
  alpha = jnp.where(ready, alpha / jnp.where(ready, total, 1.0), 0.0)
  weights = alpha * inv_norm
  length = None
  if rescale:
    # The direction sum_i alpha_i g_i / ||g_i|| gets the plain mean's length.
    sq_dir = weights @ gram @ weights
    sq_mean = jnp.sum(gram) / n_ok**2
    length = jnp.where(
      sq_dir > 0, jnp.sqrt(sq_mean / jnp.where(sq_dir > 0, sq_dir, 1.0)), 0.0
    )
  return weights.astype(gram.dtype), length, ready, alpha, sorted_raw


def _check_args(momentum, num_microbatches, axis_name, collective):
  """Returns ``(momentum, whether the momentum state is used)``.

  A traced momentum (``optax.inject_hyperparams`` under ``jit``) is not
  range-checked; it may be positive, so it needs ``num_microbatches``.
  """
  value = _checks.concrete_number(momentum, "momentum")
  traced = value is None
  if not traced:
    momentum = value
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f"momentum must lie in [0, 1); got {momentum}.")
  if num_microbatches is not None:
    _checks.num_microbatches(num_microbatches)
  elif traced or momentum > 0:
    raise ValueError(
      "adacons(momentum > 0) keeps the sorted coefficients in the state and"
      " needs num_microbatches=N to fix their shape (with"
      " optax.inject_hyperparams, which traces momentum, pass it and"
      " static_args=('num_microbatches',))."
    )
  _placement.check_placement(axis_name, collective)
  return momentum, traced or momentum > 0


def adacons(
  momentum: float = 0.0,
  *,
  num_microbatches: int | None = None,
  rescale: bool = True,
  axis_name: _placement.AxisName | None = None,
  collective: str = "all_to_all",
) -> aggregating.Aggregator:
  r"""Adaptive consensus gradient aggregation (AdaCons).

  With usable microgradients ``g_1 .. g_N``:

  1. raw coefficients ``a_i = <g_i, sum_j g_j> / (N ||g_i||)``;
  2. subspace momentum: ``m <- momentum * m + (1 - momentum) * sort(a)``
     (``m = sort(a)`` at the first step) and every microgradient gets the
     entry of ``m`` at its rank, ``alpha_i = m[rank(a_i)]``;
  3. normalisation ``alpha <- alpha / sum_i alpha_i``;
  4. the update ``sum_i alpha_i g_i / ||g_i||``, and with ``rescale`` (the
     default) rescaled to the length of the plain mean ``||mean_i g_i||``.

  Steps 1-4 follow the authors' sample implementation, with two differences
  explained in this module's docstring.

  Non-finite or zero microgradients are excluded (raw coefficient 0, weight 0).
  If the coefficients do not sum to a positive number, the step is a
  no-agreement step: zero update, ``ready`` False.

  Args:
    momentum: subspace momentum in ``[0, 1)``; 0 disables it.
    num_microbatches: N. Required when ``momentum > 0`` (the momentum state has
      shape ``[N]``); when given, ``coefficients`` are recorded in the state.
    rescale: give the update the plain mean's norm (see above).
    axis_name: as in :func:`gaf`: the mesh axis the microgradients are spread
      over (``shard_map``/``pmap``/a ``jax.set_mesh`` mesh), or None; N is
      then the global count. The coefficients come from the replicated Gram
      matrix, so every device computes the same ones.
    collective: as in :func:`gaf`.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` with
    :class:`AdaConsState`.

  Examples:
    >>> import jax.numpy as jnp, optax_gaf
    >>> tx = optax_gaf.adacons(num_microbatches=2)
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.array([[3.0, 4.0], [3.0, 4.0]]), state)
    >>> updates
    Array([3., 4.], dtype=float32)
    >>> state.coefficients
    Array([0.5, 0.5], dtype=float32)

  References:
    Choukroun, Azoulay and Kisilev, `Adaptive Consensus Gradients Aggregation
    for Scaled Distributed Training <https://arxiv.org/abs/2411.03742>`_, 2024.
  """
  momentum, use_momentum = _check_args(
    momentum, num_microbatches, axis_name, collective
  )
  if num_microbatches is not None:
    num_microbatches = _checks.num_microbatches(num_microbatches)

  def init_fn(params):
    return _init(num_microbatches, params)

  def update_fn(grads, state, params=None, **extra_args):
    del extra_args
    return _update(
      grads,
      state,
      params,
      num_microbatches=num_microbatches,
      momentum=momentum,
      use_momentum=use_momentum,
      rescale=rescale,
      axis_name=axis_name,
      collective=collective,
    )

  return aggregating.Aggregator(init_fn, update_fn)


def _init(num_microbatches, params):
  del params
  per_n = None
  if num_microbatches is not None:
    per_n = jnp.zeros([num_microbatches], jnp.float32)
  return AdaConsState(
    **_stats.init_counters(), coefficients=per_n, sorted_momentum=per_n
  )


def _update(
  grads,
  state,
  params,
  *,
  num_microbatches,
  momentum,
  use_momentum,
  rescale,
  axis_name,
  collective,
):
  _checks.microgradients(grads, params)
  leaves, treedef = jax.tree.flatten(grads)
  placement = _placement.resolve_placement(leaves, axis_name, collective)
  n = placement.num_microgradients
  if num_microbatches is not None and n != num_microbatches:
    raise ValueError(
      f"adacons(num_microbatches={num_microbatches}) got {n} microgradients."
    )
  gram, usable, factors = _gram.safe_gram(placement)
  weights, length, ready, alpha, sorted_m = consensus_weights(
    gram,
    usable,
    state.sorted_momentum if use_momentum else None,
    state.count == 0,
    momentum,
    rescale,
  )
  # The Gram matrix is of f_i g_i: weights carry 1 / ||f_i g_i||, so they
  # take f_i once to apply to the g_i. The length is the mean's of the
  # f_i g_i: c times the mean's of the g_i, for the common factor
  # c = min_i f_i (larger f_i are below float32 resolution in the sums).
  weights = weights * factors
  if rescale:
    c = jnp.min(jnp.where(usable, factors, jnp.inf))
    c = jnp.where(jnp.any(usable), c, 1.0)
    weights = weights * (length * (1.0 / c))
  updates = treedef.unflatten(placement.combine(weights, usable))
  recorded = num_microbatches is not None
  new_state = AdaConsState(
    **_stats.advance_counters(
      state, ready, _gram.gradient_diversity(gram, factors)
    ),
    coefficients=alpha.astype(jnp.float32) if recorded else None,
    sorted_momentum=sorted_m.astype(jnp.float32) if recorded else None,
  )
  return updates, new_state
