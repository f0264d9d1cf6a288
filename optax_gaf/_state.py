"""``GAFState``: what ``gaf`` and ``record_filtered`` keep, and how a step's
decisions are recorded in it."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_gaf import _stats
from optax_gaf import _threshold


class GAFState(NamedTuple):
  """State of :func:`gaf` and :func:`record_filtered`. Shapes never change.

  Fields whose feature is off are None (no arrays), so the state holds no
  zero-size arrays and checkpoints as it is.

  Attributes:
    count: int32, the number of ``update`` calls so far (saturating); a
      ``tau`` schedule is evaluated at it.
    ready: bool, False on a no-agreement step. ``aggregating.process`` reads it
      to skip the inner optimizer on that step.
    skipped_steps: int32, the number of no-agreement steps so far
      (saturating).
    gradient_diversity: float32, ``sum_i ||g_i||^2 / ||sum_i g_i||^2`` over the
      usable microgradients (Yin et al. 2018), free from the Gram matrix.
    tau: float32, the threshold used at the last step.
    num_accepted: int32, the number of marks in the step's ``accepted``
      (with ``per_leaf``: over all leaves, up to ``L x N``).
    acceptance_rate: float32, ``num_accepted / N`` at the last step (per
      leaf: ``/ (L x N)``, the mean of ``leaf_acceptance_rate``).
    accepted: bool ``[N]``, the anchor and every microgradient taken into the
      result (on a no-agreement step, the anchor only). None unless
      ``num_microbatches`` was given; ``[L, N]`` with ``per_leaf``.
    cosine_distance: float32 ``[N]``, each microgradient's cosine distance when
      it was compared: 0 for the anchor, NaN for a non-finite or zero one.
      None unless ``num_microbatches`` was given; ``[L, N]`` with ``per_leaf``.
    leaf_acceptance_rate: float32 ``[L]``, with ``granularity="per_leaf"`` the
      fraction of microgradients accepted in each leaf (in ``jax.tree.leaves``
      order); None otherwise.
    tau_history: float32 ``[M]``, the last M recorded cosine distances for an
      :class:`AdaptiveTau` threshold (NaN where empty); None without.
    chance_stats: float32 ``[3]`` for an :class:`AutoTau` (or
      :class:`WarmupAutoTau`) threshold: the EMA of the summed squares of
      negative cosine similarities, the EMA of their count, and the number
      seen so far; ``[L, 3]`` per leaf; None without.
  """

  count: jax.Array
  ready: jax.Array
  skipped_steps: jax.Array
  gradient_diversity: jax.Array
  tau: jax.Array
  num_accepted: jax.Array
  acceptance_rate: jax.Array
  accepted: jax.Array | None = None
  cosine_distance: jax.Array | None = None
  leaf_acceptance_rate: jax.Array | None = None
  tau_history: jax.Array | None = None
  chance_stats: jax.Array | None = None


def init_state(
  tau0, n: int | None, n_leaves: int = 0, policy_state=None
) -> GAFState:
  """The state before step 1.

  Args:
    tau0: the threshold recorded until the first step.
    n: N, to record ``accepted`` and ``cosine_distance``; None: not kept.
    n_leaves: L, with ``granularity="per_leaf"``; 0 otherwise.
    policy_state: the threshold policy's
      :class:`~optax_gaf._threshold.ThresholdState`, or None.
  """
  per_n = None if n is None else ((n_leaves, n) if n_leaves else (n,))
  policy_state = policy_state or _threshold.ThresholdState()
  return GAFState(
    **_stats.init_counters(),
    tau=jnp.asarray(tau0, jnp.float32),
    num_accepted=jnp.zeros([], jnp.int32),
    acceptance_rate=jnp.zeros([], jnp.float32),
    accepted=None if per_n is None else jnp.zeros(per_n, bool),
    cosine_distance=None if per_n is None else jnp.zeros(per_n, jnp.float32),
    leaf_acceptance_rate=(
      jnp.zeros([n_leaves], jnp.float32) if n_leaves else None
    ),
    **policy_state._asdict(),
  )


def policy_state(state: GAFState) -> _threshold.ThresholdState:
  """The threshold policy's part of ``state``."""
  return _threshold.ThresholdState(state.tau_history, state.chance_stats)


def record(state: GAFState, out, tau, diversity, policy=None) -> GAFState:
  """The new state from a step's decisions (``out``: a RuleOutput or alike).

  ``policy`` (a threshold policy) records the step's distances in its part.
  """
  ready = jnp.any(out.ready)
  kept = policy_state(state)
  if policy is not None:
    kept = policy.update(kept, out.cosine_distance)
  return GAFState(
    **_stats.advance_counters(state, ready, diversity),
    # Per leaf with AutoTau: the mean of the leaves' thresholds.
    tau=jnp.mean(jnp.asarray(tau, jnp.float32)),
    num_accepted=jnp.sum(out.accepted, dtype=jnp.int32),
    acceptance_rate=jnp.mean(out.accepted, dtype=jnp.float32),
    accepted=None if state.accepted is None else out.accepted,
    cosine_distance=None
    if state.cosine_distance is None
    else out.cosine_distance.astype(jnp.float32),
    leaf_acceptance_rate=None
    if state.leaf_acceptance_rate is None
    else jnp.mean(out.accepted, axis=-1, dtype=jnp.float32),
    **kept._asdict(),
  )
