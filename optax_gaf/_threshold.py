"""The threshold tau: range checks, schedules and :class:`AdaptiveTau`."""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def check_tau(tau: Any, allow_schedule: bool = True) -> None:
  """Raises on a tau outside ``[0, 2]``; traced values pass through.

  Args:
    tau: a scalar, or (with ``allow_schedule``) a schedule of the step count,
      checked at step 0.
    allow_schedule: whether a callable is allowed.
  """
  if callable(tau):
    if not allow_schedule:
      raise TypeError(
        "tau must be a scalar here; evaluate a schedule yourself, e.g. at"
        " optax_gaf.stats(opt_state)['count']."
      )
    tau = tau(0)
  if isinstance(tau, jax.core.Tracer):
    return  # traced (e.g. inject_hyperparams under jit): checked at step 0
  if isinstance(tau, bool | str | bytes):
    raise TypeError(f"tau must be a number; got {tau!r}.")
  try:
    value = np.asarray(tau, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise TypeError(f"tau must be a number; got {tau!r}.") from e
  if value.shape != ():
    raise ValueError(f"tau must be a scalar, got shape {value.shape}.")
  if not 0.0 <= float(value) <= 2.0:
    raise ValueError(
      f"tau is a cosine distance threshold and must lie in [0, 2]; got {tau}."
    )


def tau_at(
  tau: optax.ScalarOrSchedule, count: jax.Array, dtype=jnp.float32
) -> jax.Array:
  """The threshold at step ``count``, in ``dtype`` (the statistics' dtype)."""
  return jnp.asarray(tau(count) if callable(tau) else tau, dtype)


class AdaptiveTau(NamedTuple):
  """An adaptive threshold ``tau_t = min(tau, mean + k * std)`` for ``gaf``.

  The mean and (population) standard deviation are those of the last
  ``history`` recorded cosine distances; the idea is credited to the authors'
  CIFAR-100N script, but the version we could read has a fixed threshold, so
  the details here are ours. They live in the state as a fixed-shape
  ``[history]`` buffer (``GAFState.tau_history``, NaN where empty). Every step
  records the rule's ``cosine_distance`` of the usable microgradients, except
  exact zeros (the anchor, and exact copies of it), and the threshold of a
  step uses only earlier steps' distances. Until at least ``min_count``
  distances are recorded, ``tau_t = tau``.

  Attributes:
    k: how many standard deviations above the mean.
    history: M, the number of most recent distances kept.
    min_count: distances needed before the threshold adapts (>= 2).
  """

  k: float = 1.0
  history: int = 256
  min_count: int = 2


def check_adaptive_tau(adaptive_tau: Any) -> None:
  """Raises unless ``adaptive_tau`` is None or a valid :class:`AdaptiveTau`."""
  if adaptive_tau is None:
    return
  if not isinstance(adaptive_tau, AdaptiveTau):
    raise TypeError(
      "adaptive_tau must be an optax_gaf.AdaptiveTau(k, history, min_count);"
      f" got {type(adaptive_tau).__name__}."
    )
  history, min_count = adaptive_tau.history, adaptive_tau.min_count
  ints = all(
    isinstance(v, int | np.integer) and not isinstance(v, bool)
    for v in (history, min_count)
  )
  if not ints or not 2 <= min_count <= history:
    raise ValueError(
      "AdaptiveTau needs history >= 2 and 2 <= min_count <= history; got"
      f" {adaptive_tau}."
    )
  if not np.isfinite(adaptive_tau.k):
    raise ValueError(f"AdaptiveTau.k must be finite; got {adaptive_tau.k}.")


def adaptive_threshold(history, tau, k, min_count):
  """``min(tau, mean + k * std)`` over the finite entries of ``history``.

  In ``tau``'s dtype.
  """
  tau = jnp.asarray(tau)
  ok = jnp.isfinite(history)
  count = jnp.sum(ok)
  safe = jnp.where(ok, history, 0.0)
  mean = jnp.sum(safe) / jnp.maximum(count, 1)
  sq_dev = jnp.where(ok, (history - mean) ** 2, 0.0)
  var = jnp.sum(sq_dev) / jnp.maximum(count, 1)  # population variance
  adapted = jnp.minimum(tau, mean + k * jnp.sqrt(var))
  return jnp.where(count >= min_count, adapted, tau).astype(tau.dtype)


def record_distances(history, distances):
  """Appends the finite, nonzero ``distances`` to the ``[M]`` history.

  The buffer keeps its entries in arrival order with the NaN (empty) slots
  first, so the last M recorded distances are always its last finite entries.
  """
  distances = jnp.ravel(distances).astype(history.dtype)
  distances = jnp.where(distances == 0, jnp.nan, distances)
  both = jnp.concatenate([history, distances])
  # A stable sort on "is recorded" moves the empty slots to the front and keeps
  # the recorded ones in arrival order.
  order = jnp.argsort(jnp.isfinite(both), stable=True)
  return both[order][-history.shape[0] :]
