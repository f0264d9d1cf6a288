"""The threshold tau as one stateful policy, in the manner of Optax's
``StatefulSchedule``: ``init``, ``__call__`` (this step's tau) and ``update``
(record the step's cosine distances).

Its kinds, dispatched once by :func:`threshold_policy`: a number or a
schedule of the step count, :class:`AutoTau` (from chance agreement),
:class:`WarmupAutoTau` (averaging, then AutoTau's threshold) and
:class:`AdaptiveTau` (from recent distances). Their state lives in
``GAFState`` (``tau_history``, ``chance_stats``), None where unused.
"""

import warnings
from typing import Any
from typing import NamedTuple
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_gaf._auto_tau import AVERAGE_TAU
from optax_gaf._auto_tau import AutoTau
from optax_gaf._auto_tau import WarmupAutoTau
from optax_gaf._auto_tau import auto_threshold
from optax_gaf._auto_tau import check_auto_tau
from optax_gaf._auto_tau import check_warmup_auto_tau
from optax_gaf._auto_tau import init_chance_stats
from optax_gaf._auto_tau import record_chance


def check_tau(tau: Any, allow_schedule: bool = True) -> None:
  """Raises on a tau outside ``[0, 2]``; traced values pass through.

  Args:
    tau: a scalar or (with ``allow_schedule``) a schedule of the step
      count, checked at step 0, an :class:`AutoTau`, a
      :class:`WarmupAutoTau` or an :class:`AdaptiveTau`.
    allow_schedule: whether a schedule or a stateful policy is allowed.
  """
  if isinstance(tau, AutoTau):
    if not allow_schedule:
      raise TypeError(
        "AutoTau needs the statistics kept in gaf()'s state; pass a number"
        " here, e.g. the tau optax_gaf.stats reports for a gaf(AutoTau()) run."
      )
    return check_auto_tau(tau)
  if isinstance(tau, AdaptiveTau):
    if not allow_schedule:
      raise TypeError(
        "AdaptiveTau needs the distances kept in gaf()'s state; pass a"
        " number here."
      )
    return check_adaptive_tau(tau)
  if isinstance(tau, WarmupAutoTau):
    if not allow_schedule:
      raise TypeError(
        "WarmupAutoTau needs the statistics kept in gaf()'s state; pass a"
        " number here."
      )
    return check_warmup_auto_tau(tau)
  if callable(tau):
    if not allow_schedule:
      raise TypeError(
        "tau must be a scalar here; evaluate a schedule yourself, e.g. at"
        " optax_gaf.stats(opt_state)['count']."
      )
    tau = tau(0)
  if isinstance(tau, jax.core.Tracer):
    return  # traced (e.g. inject_hyperparams under jit): checked at step 0
  if tau is None or isinstance(tau, bool | str | bytes):
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
  if isinstance(tau, AutoTau):
    return jnp.asarray(tau.warmup_tau, dtype)
  if isinstance(tau, WarmupAutoTau):
    return jnp.asarray(AVERAGE_TAU, dtype)
  if isinstance(tau, AdaptiveTau):
    tau = tau.cap
  return jnp.asarray(tau(count) if callable(tau) else tau, dtype)


class AdaptiveTau(NamedTuple):
  """An adaptive threshold ``tau_t = min(cap, mean + k * std)`` for ``gaf``.

  Pass it as ``gaf(tau=AdaptiveTau(...))``. (``gaf(cap,
  adaptive_tau=AdaptiveTau(...))`` still works but is deprecated.)

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
    cap: the largest threshold, and the threshold until ``min_count``: a
      number in ``[0, 2]`` or a schedule of the step count.

  Examples:
    >>> import jax.numpy as jnp, optax_gaf
    >>> tx = optax_gaf.gaf(optax_gaf.AdaptiveTau(k=1.0, cap=0.9))
    >>> state = tx.init(jnp.zeros(2))
    >>> float(state.tau)
    0.8999999761581421
  """

  k: float = 1.0
  history: int = 256
  min_count: int = 2
  cap: Any = 0.97


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
  if isinstance(adaptive_tau.cap, AutoTau | AdaptiveTau | WarmupAutoTau):
    raise TypeError("AdaptiveTau.cap must be a number or a schedule.")
  check_tau(adaptive_tau.cap)


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


# What gaf(tau=...) takes.
TauLike = optax.ScalarOrSchedule | AutoTau | AdaptiveTau | WarmupAutoTau


class ThresholdState(NamedTuple):
  """A threshold policy's state: ``GAFState``'s fields of the same names.

  Attributes:
    tau_history: :class:`AdaptiveTau`'s ``[M]`` recent distances, or None.
    chance_stats: :class:`AutoTau`'s (and :class:`WarmupAutoTau`'s) ``[3]``
      (``[L, 3]``) sums, or None.
  """

  tau_history: jax.Array | None = None
  chance_stats: jax.Array | None = None


class Threshold(Protocol):
  """A threshold policy (see the module docstring)."""

  def init(self, n_leaves: int) -> ThresholdState:
    """The state before step 1 (``n_leaves`` > 0: one threshold per leaf)."""

  def __call__(self, count, state: ThresholdState, dtype) -> jax.Array:
    """The threshold at step ``count``, in ``dtype``; ``[L]`` per leaf."""

  def update(self, state: ThresholdState, distances) -> ThresholdState:
    """The state after a step whose rule gave ``distances`` ``[..., N]``."""


class _Fixed(NamedTuple):
  """A number, or a schedule of the step count: no state."""

  tau: optax.ScalarOrSchedule

  def init(self, n_leaves):
    del n_leaves
    return ThresholdState()

  def __call__(self, count, state, dtype=jnp.float32):
    del state
    return tau_at(self.tau, count, dtype)

  def update(self, state, distances):
    del distances
    return state


class _Auto(NamedTuple):
  """:class:`AutoTau`: ``chance_stats`` (``[L, 3]`` per leaf)."""

  auto: AutoTau

  def init(self, n_leaves):
    shape = (n_leaves,) if n_leaves else ()
    return ThresholdState(chance_stats=init_chance_stats(shape))

  def __call__(self, count, state, dtype=jnp.float32):
    del count
    return auto_threshold(state.chance_stats, self.auto, dtype)

  def update(self, state, distances):
    stats = record_chance(state.chance_stats, distances, self.auto.decay)
    return state._replace(chance_stats=stats)


class _WarmupAuto(NamedTuple):
  """:class:`WarmupAutoTau`: ``chance_stats`` as :class:`AutoTau`'s."""

  cfg: WarmupAutoTau

  def init(self, n_leaves):
    shape = (n_leaves,) if n_leaves else ()
    return ThresholdState(chance_stats=init_chance_stats(shape))

  def __call__(self, count, state, dtype=jnp.float32):
    auto = auto_threshold(state.chance_stats, self.cfg.auto, dtype)
    warm = count < self.cfg.warmup_steps
    return jnp.where(warm, jnp.asarray(AVERAGE_TAU, dtype), auto)

  def update(self, state, distances):
    stats = record_chance(state.chance_stats, distances, self.cfg.decay)
    return state._replace(chance_stats=stats)


class _Adaptive(NamedTuple):
  """:class:`AdaptiveTau`: ``tau_history`` ``[M]``."""

  adaptive: AdaptiveTau

  def init(self, n_leaves):
    del n_leaves
    history = jnp.full([self.adaptive.history], jnp.nan, jnp.float32)
    return ThresholdState(tau_history=history)

  def __call__(self, count, state, dtype=jnp.float32):
    k, _, min_count, cap = self.adaptive
    tau = tau_at(cap, count, dtype)
    return adaptive_threshold(state.tau_history, tau, k, min_count)

  def update(self, state, distances):
    history = record_distances(state.tau_history, distances)
    return state._replace(tau_history=history)


def threshold_policy(tau: Any, adaptive_tau: Any = None) -> Threshold:
  """``gaf``'s ``tau`` (and deprecated ``adaptive_tau``) as one policy.

  Raises:
    ValueError, TypeError: on a tau out of range or a bad combination.
  """
  check_tau(tau)
  if adaptive_tau is not None:
    check_adaptive_tau(adaptive_tau)
    if isinstance(tau, AutoTau | AdaptiveTau | WarmupAutoTau):
      raise ValueError(
        f"tau={type(tau).__name__}() already adapts the threshold; drop"
        " adaptive_tau, or give a number as tau to cap AdaptiveTau's"
        " threshold."
      )
    warnings.warn(
      "gaf(tau, adaptive_tau=AdaptiveTau(...)) is deprecated; pass"
      " gaf(tau=AdaptiveTau(..., cap=tau)).",
      DeprecationWarning,
      stacklevel=3,
    )
    tau = adaptive_tau._replace(cap=tau)
  if isinstance(tau, AutoTau):
    return _Auto(tau)
  if isinstance(tau, WarmupAutoTau):
    return _WarmupAuto(tau)
  if isinstance(tau, AdaptiveTau):
    return _Adaptive(tau)
  return _Fixed(tau)
