"""``and_mask()``: sign agreement (Parascandolo et al., 2020) as an aggregator.

Unlike GAF's rules, the AND-mask decides per coordinate, not per microgradient,
so it cannot be computed from the Gram matrix. It reuses stage 3 instead: the
mean of the signs and the mean of the microgradients are both weighted sums,
so ``placement.combine`` computes them on one device or across devices alike.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.experimental import aggregating

from optax_gaf import _checks
from optax_gaf import _gram
from optax_gaf import _placement
from optax_gaf import _stats


class AndMaskState(NamedTuple):
  """State of :func:`and_mask`.

  Attributes:
    count: int32, the number of ``update`` calls so far (saturating).
    ready: bool, False when no coordinate survived the mask (or no
      microgradient was usable): the update is zero and
      ``aggregating.process`` skips the inner optimizer.
    skipped_steps: int32, the number of steps with ``ready`` False.
    gradient_diversity: float32, ``sum_i ||g_i||^2 / ||sum_i g_i||^2``.
    agreement_threshold: float32, the threshold used at the last step.
    mask_fraction: float32, the fraction of all coordinates kept.
    leaf_mask_fraction: float32 ``[L]``, the fraction kept in each leaf, in
      ``jax.tree.leaves`` order (0 for a zero-size leaf); None when ``init``
      got no params.
  """

  count: jax.Array
  ready: jax.Array
  skipped_steps: jax.Array
  gradient_diversity: jax.Array
  agreement_threshold: jax.Array
  mask_fraction: jax.Array
  leaf_mask_fraction: jax.Array | None = None


def _check_threshold(value) -> None:
  value = _checks.concrete_number(value, "agreement_threshold")
  if value is not None and not 0.0 <= value <= 1.0:  # None: traced
    raise ValueError(
      f"agreement_threshold is a fraction of sign agreement in [0, 1]; got"
      f" {value}."
    )


def and_mask(
  agreement_threshold: float | optax.ScalarOrSchedule = 1.0,
  *,
  scale_grad_inverse_sparsity: bool = False,
  axis_name: _placement.AxisName | None = None,
  collective: str = "all_to_all",
) -> aggregating.Aggregator:
  r"""AND-mask: average the microgradients where their signs agree.

  For every coordinate, the agreement is ``|mean_i sign(g_i)|`` over the usable
  microgradients; coordinates with agreement ``>= agreement_threshold`` keep
  the mean of the microgradients, the others are zeroed. This is
  ``get_grads(method='and_mask')`` of the authors' ``and_mask_utils.py``
  (learning-explanations-hard-to-vary), with microgradients in place of
  environments. With ``scale_grad_inverse_sparsity`` every leaf is divided by
  ``1e-10`` plus the fraction of its coordinates kept, as there.

  It is elementwise and does not fit GAF's Gram matrix -> rule design: it reads
  the Gram matrix only for ``gradient_diversity`` and to exclude non-finite or
  zero microgradients (as if absent, like :func:`gaf`); ``sign(0) = 0`` counts
  as disagreement.

  Args:
    agreement_threshold: in ``[0, 1]``, or a schedule of the step count. 0
      keeps every coordinate (the plain mean); 1 keeps only coordinates where
      all microgradients have the same nonzero sign.
    scale_grad_inverse_sparsity: rescale each leaf by the inverse of its kept
      fraction, to make up for the magnitude lost to the mask.
    axis_name: as in :func:`gaf`: the mesh axis the microgradients are spread
      over (``shard_map``/``pmap``/a ``jax.set_mesh`` mesh), or None. The
      sign sums and the mean are weighted sums, so across devices they cost
      two of :func:`gaf`'s combines.
    collective: as in :func:`gaf`.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` with
    :class:`AndMaskState`.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> tx = optax_gaf.and_mask(1.0)
    >>> state = tx.init(jnp.zeros(3))
    >>> grads = jnp.array([[1.0, 2.0, -1.0], [3.0, -2.0, -3.0]])
    >>> updates, state = tx.update(grads, state)
    >>> updates
    Array([ 2.,  0., -2.], dtype=float32)

  References:
    Parascandolo, Neitz, Orvieto, Gresele and Schölkopf, `Learning explanations
    that are hard to vary <https://arxiv.org/abs/2009.00329>`_, ICLR 2021.
  """
  _check_threshold(
    agreement_threshold(0)
    if callable(agreement_threshold)
    else agreement_threshold
  )
  _placement.check_placement(axis_name, collective)

  def init_fn(params):
    return _init(agreement_threshold, params)

  def update_fn(grads, state, params=None, **extra_args):
    del extra_args
    return _update(
      grads,
      state,
      params,
      agreement_threshold=agreement_threshold,
      rescale=scale_grad_inverse_sparsity,
      axis_name=axis_name,
      collective=collective,
    )

  return aggregating.Aggregator(init_fn, update_fn)


def _init(agreement_threshold, params):
  # Per-leaf fractions are recorded when init sees the params.
  n_leaves = len(jax.tree.leaves(params))
  return AndMaskState(
    **_stats.init_counters(),
    agreement_threshold=_threshold_at(agreement_threshold, 0),
    mask_fraction=jnp.zeros([], jnp.float32),
    leaf_mask_fraction=jnp.zeros([n_leaves], jnp.float32) if n_leaves else None,
  )


def _update(
  grads, state, params, *, agreement_threshold, rescale, axis_name, collective
):
  _checks.microgradients(grads, params)
  leaves, treedef = jax.tree.flatten(grads)
  kept = state.leaf_mask_fraction
  if kept is not None and kept.shape[0] != len(leaves):
    raise ValueError(
      f"and_mask was initialised with params of {kept.shape[0]} leaves but"
      f" got microgradients with {len(leaves)}; leaf_mask_fraction keeps the"
      " params' tree: init with params shaped like the microgradients (or"
      " with None to record no per-leaf fractions)."
    )
  placement = _placement.resolve_placement(leaves, axis_name, collective)
  gram, usable, factors = _gram.safe_gram(placement)
  threshold = _threshold_at(agreement_threshold, state.count)
  out, fractions = _masked_mean(placement, usable, threshold, rescale)
  sizes = np.array([np.prod(x.shape[1:]) for x in leaves], np.float64)
  ready = jnp.any(usable) & jnp.any(fractions > 0)
  new_state = AndMaskState(
    **_stats.advance_counters(
      state, ready, _gram.gradient_diversity(gram, factors)
    ),
    agreement_threshold=threshold,
    # Weighted in float32: an int32 count would overflow past 2**31.
    mask_fraction=jnp.sum(
      fractions * (sizes / max(sizes.sum(), 1.0)).astype(np.float32)
    ),
    leaf_mask_fraction=None if state.leaf_mask_fraction is None else fractions,
  )
  return treedef.unflatten(out), new_state


def _threshold_at(agreement_threshold, count) -> jax.Array:
  if callable(agreement_threshold):
    agreement_threshold = agreement_threshold(count)
  return jnp.asarray(agreement_threshold, jnp.float32)


def _masked_mean(placement, usable, threshold, rescale):
  """The AND-masked mean per leaf, and the fraction kept in each leaf."""
  n = placement.num_microgradients
  n_ok = jnp.maximum(jnp.sum(usable), 1).astype(jnp.float32)
  # Sums of +-1 and 0 are exact in float32.
  signs = [jnp.sign(x).astype(jnp.float32) for x in placement.leaves]
  sign_sums = placement.combine(jnp.ones([n], jnp.float32), usable, signs)
  means = placement.combine(jnp.ones([n], jnp.float32) / n_ok, usable)
  masks = [jnp.abs(s) / n_ok >= threshold for s in sign_sums]
  # A zero-size leaf keeps no coordinate (jnp.mean would give NaN).
  fractions = jnp.stack(
    [jnp.mean(m, dtype=jnp.float32) if m.size else 0.0 for m in masks]
  )
  out = []
  for mean, mask, frac in zip(means, masks, fractions):
    y = jnp.where(mask, mean, jnp.zeros((), mean.dtype))
    if rescale:
      y = (y.astype(jnp.float32) / (1e-10 + frac)).astype(mean.dtype)
    out.append(y)
  return out, fractions
