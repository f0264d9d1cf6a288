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

from optax_gaf import _aggregator
from optax_gaf import _collectives
from optax_gaf import _statistics


class AndMaskState(NamedTuple):
  """State of :func:`and_mask`.

  Attributes:
    count: int32, the number of ``update`` calls so far.
    ready: bool, False when no coordinate survived the mask (or no
      microgradient was usable): the update is zero and
      ``aggregating.process`` skips the inner optimizer.
    agreement_threshold: float32, the threshold used at the last step.
    mask_fraction: float32, the fraction of all coordinates kept.
    leaf_mask_fraction: float32 ``[L]``, the fraction kept in each leaf, in
      ``jax.tree.leaves`` order; shape ``[0]`` when ``init`` got no params.
    skipped_steps: int32, the number of steps with ``ready`` False.
    gradient_diversity: float32, ``sum_i ||g_i||^2 / ||sum_i g_i||^2``.
  """

  count: jax.Array
  ready: jax.Array
  agreement_threshold: jax.Array
  mask_fraction: jax.Array
  leaf_mask_fraction: jax.Array
  skipped_steps: jax.Array
  gradient_diversity: jax.Array


def _check_threshold(value) -> None:
  try:
    value = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return  # traced (inject_hyperparams)
  if not 0.0 <= value <= 1.0:
    raise ValueError(
      f"agreement_threshold is a fraction of sign agreement in [0, 1]; got"
      f" {value}."
    )


def and_mask(
  agreement_threshold: float | optax.ScalarOrSchedule = 1.0,
  *,
  scale_grad_inverse_sparsity: bool = False,
  axis_name: _collectives.AxisName | None = None,
  collective: str = "all_to_all",
) -> aggregating.Aggregator:
  r"""AND-mask: average the microgradients where their signs agree.

  For every coordinate, the agreement is ``|mean_i sign(g_i)|`` over the usable
  microgradients; coordinates with agreement ``>= agreement_threshold`` keep
  the mean of the microgradients, the others are zeroed. This is
  ``get_grads(method='and_mask')`` of the authors' ``and_mask_utils.py``
  (learning-explanations-hard-to-vary), with microgradients in place of
  environments. With ``scale_grad_inverse_sparsity`` every leaf is divided by
  ``1e-10 + `` the fraction of its coordinates kept, as there.

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
  if callable(agreement_threshold):
    _check_threshold(agreement_threshold(0))
  else:
    _check_threshold(agreement_threshold)
  placement = _collectives.make_placement(axis_name, collective)

  def threshold_at(count):
    value = (
      agreement_threshold(count)
      if callable(agreement_threshold)
      else agreement_threshold
    )
    return jnp.asarray(value, jnp.float32)

  def init_fn(params):
    # Per-leaf fractions are recorded when init sees the params (else [0]).
    n_leaves = len(jax.tree.leaves(params))
    return AndMaskState(
      count=jnp.zeros([], jnp.int32),
      ready=jnp.ones([], bool),
      agreement_threshold=threshold_at(0),
      mask_fraction=jnp.zeros([], jnp.float32),
      leaf_mask_fraction=jnp.zeros([n_leaves], jnp.float32),
      skipped_steps=jnp.zeros([], jnp.int32),
      gradient_diversity=jnp.zeros([], jnp.float32),
    )

  def update_fn(grads, state, params=None):
    leaves, treedef, n, gram, usable = _aggregator.gram_stage(
      grads, params, placement
    )
    threshold = threshold_at(state.count)
    n_ok = jnp.maximum(jnp.sum(usable), 1).astype(jnp.float32)
    # Sums of +-1 and 0 are exact in float32.
    signs = [jnp.sign(x).astype(jnp.float32) for x in leaves]
    sign_sums = placement.combine(signs, jnp.ones([n], jnp.float32), usable)
    means = placement.combine(
      leaves, jnp.full([n], 1.0, jnp.float32) / n_ok, usable
    )
    masks = [jnp.abs(s) / n_ok >= threshold for s in sign_sums]
    fractions = jnp.stack([jnp.mean(m, dtype=jnp.float32) for m in masks])
    out = []
    for mean, mask, frac in zip(means, masks, fractions):
      y = jnp.where(mask, mean, jnp.zeros((), mean.dtype))
      if scale_grad_inverse_sparsity:
        y = (y.astype(jnp.float32) / (1e-10 + frac)).astype(mean.dtype)
      out.append(y)
    sizes = np.array([np.prod(m.shape) for m in masks], np.float64)
    # Weighted in float32: an int32 count would overflow past 2**31 params.
    mask_fraction = jnp.sum(
      fractions * (sizes / sizes.sum()).astype(np.float32)
    )
    ready = jnp.any(usable) & jnp.any(fractions > 0)
    new_state = AndMaskState(
      count=optax.safe_increment(state.count),
      ready=ready,
      agreement_threshold=threshold,
      mask_fraction=mask_fraction,
      leaf_mask_fraction=fractions
      if state.leaf_mask_fraction.shape == fractions.shape
      else state.leaf_mask_fraction,
      skipped_steps=state.skipped_steps + (~ready).astype(jnp.int32),
      gradient_diversity=_statistics.gradient_diversity(gram),
    )
    return treedef.unflatten(out), new_state

  return aggregating.Aggregator(init_fn, update_fn)
