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


class AutoTau(NamedTuple):
  r"""A threshold from chance agreement: no tau to tune.

  Two unrelated microgradients have a cosine similarity spread around 0; how
  widely depends on the model, the microbatch size and the phase of training.
  ``AutoTau`` estimates that spread from the microgradients themselves and
  accepts only agreement well above it:

  .. math::

     \tau_t = \max\left(\text{floor},\ 1 - z\,\hat\sigma_t\right),
     \qquad
     \hat\sigma_t^2 = \frac{\mathrm{EMA}\left(\sum_{s<0} s^2\right)}
                            {\mathrm{EMA}\left(\#\{s<0\}\right)},

  where the ``s = 1 - d`` are the cosine similarities the rule compared at
  earlier steps (its ``cosine_distance`` output; anchors excluded). Only the
  negative ones enter: a shared signal pushes similarities up, so the
  negative half is (mostly) chance. Each step's sums are blended in with
  weight ``1 - decay``. Until ``min_count`` negative similarities have been
  seen, ``tau_t = warmup_tau``.

  The state holds three float32 numbers (``GAFState.chance_stats``; ``[L, 3]``
  with ``granularity="per_leaf"``, one threshold per leaf). The statistics
  come from the rule's decisions, which every device computes from the same
  replicated Gram matrix, so the threshold is identical on every device.

  Attributes:
    z: how many chance standard deviations of agreement are required.
    decay: the EMA's decay per step (a horizon of about ``1 / (1 - decay)``
      steps).
    min_count: negative similarities needed before the threshold adapts.
    warmup_tau: the threshold until then (1: accept any positive agreement).
    floor: the lowest threshold ``tau_t`` may take.

  Examples:
    >>> import jax.numpy as jnp, optax_gaf
    >>> tx = optax_gaf.gaf(optax_gaf.AutoTau(min_count=1), num_microbatches=2)
    >>> state = tx.init(jnp.zeros(2))
    >>> grads = jnp.array([[1.0, 0.0], [-0.2, 1.0]])  # similarity -0.196
    >>> _, state = tx.update(grads, state)
    >>> float(state.tau)  # warm-up: no negative similarity seen before
    1.0
    >>> _, state = tx.update(grads, state)
    >>> round(float(state.tau), 3)  # 1 - 2 * 0.196
    0.608

  References:
    ``docs/guides/choosing_tau.md`` (measurements and failure modes).
  """

  z: float = 2.0
  decay: float = 0.99
  min_count: int = 8
  warmup_tau: float = 1.0
  floor: float = 0.0


def check_auto_tau(auto: AutoTau) -> None:
  """Raises unless every field of ``auto`` is in range."""
  z, decay, min_count, warmup_tau, floor = auto
  if not (np.isfinite(z) and z > 0):
    raise ValueError(f"AutoTau.z must be a finite number > 0; got {z}.")
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"AutoTau.decay must lie in [0, 1); got {decay}.")
  if isinstance(min_count, bool) or not isinstance(min_count, int | np.integer):
    raise TypeError(f"AutoTau.min_count must be an int; got {min_count!r}.")
  if min_count < 1:
    raise ValueError(f"AutoTau.min_count must be >= 1; got {min_count}.")
  for name, value in (("warmup_tau", warmup_tau), ("floor", floor)):
    if not 0.0 <= value <= 2.0:
      raise ValueError(f"AutoTau.{name} must lie in [0, 2]; got {value}.")


class WarmupAutoTau(NamedTuple):
  r"""Averaging for a warm-up, then :class:`AutoTau`'s chance threshold.

  For the first ``warmup_steps`` steps the threshold is 2, which accepts
  every usable microgradient: the update is their plain mean (with the
  ``pairwise`` rule, its running pairwise average), as fast as averaging
  while the model learns what the microgradients share. From then on it is
  :class:`AutoTau`'s threshold,

  .. math::

     \tau_t = \max\left(\text{floor},\ 1 - z\,\hat\sigma_t\right),

  with the chance spread :math:`\hat\sigma_t` estimated from the negative
  cosine similarities the rule compared at every earlier step, the warm-up
  included (so the threshold is ready when the warm-up ends). If fewer than
  ``min_count`` negative similarities have been seen by then, averaging goes
  on until they have.

  This answers AutoTau's slow start: AutoTau filters from step 1, when the
  similarities of an untrained model spread widely, and its strict early
  threshold can skip nearly every step (a model trained with SGD then barely
  moves). It does not know when a model starts to memorise label noise:
  ``warmup_steps`` is a step count. In the study behind it, 500 steps were
  too few for one program and 1000 too many for another, and runs with adamw
  on large microbatches did worse than with :class:`AutoTau` (they probably
  memorise during the warm-up). It is an option, not ``gaf``'s default;
  ``docs/guides/choosing_tau.md`` gives the measurements.

  The state is :class:`AutoTau`'s (``GAFState.chance_stats``, three float32
  numbers; ``[L, 3]`` per leaf); the warm-up reads ``GAFState.count``. Both
  come from the rule's decisions on the replicated Gram matrix, so the
  threshold is identical on every device. Like :class:`AutoTau` it needs
  ``gaf``'s state: the streaming producers take a number.

  Attributes:
    warmup_steps: steps of averaging (tau = 2) before the threshold adapts.
    z: how many chance standard deviations of agreement are required.
    decay: the EMA's decay per step (a horizon of about ``1 / (1 - decay)``
      steps).
    min_count: negative similarities needed before the threshold adapts.
    floor: the lowest threshold ``tau_t`` may take.

  Examples:
    >>> import jax.numpy as jnp, optax_gaf
    >>> tx = optax_gaf.gaf(optax_gaf.WarmupAutoTau(warmup_steps=2, min_count=1),
    ...                    num_microbatches=2)
    >>> state = tx.init(jnp.zeros(2))
    >>> grads = jnp.array([[1.0, 0.0], [-0.2, 1.0]])  # similarity -0.196
    >>> for _ in range(3):
    ...   _, state = tx.update(grads, state)
    ...   print(round(float(state.tau), 3), bool(state.ready))
    2.0 True
    2.0 True
    0.608 False

  References:
    ``docs/guides/choosing_tau.md`` (the study, ``benchmarks/default_tau.py``).
  """

  warmup_steps: int = 500
  z: float = 2.0
  decay: float = 0.99
  min_count: int = 8
  floor: float = 0.0

  @property
  def auto(self) -> AutoTau:
    """The :class:`AutoTau` after the warm-up (averaging until min_count)."""
    return AutoTau(self.z, self.decay, self.min_count, AVERAGE_TAU, self.floor)


# The threshold that accepts every usable microgradient: the plain mean.
AVERAGE_TAU = 2.0


def check_warmup_auto_tau(cfg: WarmupAutoTau) -> None:
  """Raises unless every field of ``cfg`` is in range."""
  steps = cfg.warmup_steps
  if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
    raise TypeError(
      f"WarmupAutoTau.warmup_steps must be an int; got {steps!r}."
    )
  if steps < 0:
    raise ValueError(f"WarmupAutoTau.warmup_steps must be >= 0; got {steps}.")
  try:
    check_auto_tau(cfg.auto)
  except (TypeError, ValueError) as e:
    raise type(e)(str(e).replace("AutoTau.", "WarmupAutoTau.")) from None


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


def init_chance_stats(shape: tuple[int, ...] = ()) -> jax.Array:
  """Zeros ``[*shape, 3]``: the sums of :func:`record_chance` before step 1."""
  return jnp.zeros((*shape, 3), jnp.float32)


def auto_threshold(stats: jax.Array, auto: AutoTau, dtype) -> jax.Array:
  """``max(floor, 1 - z * sigma)`` from ``stats [..., 3]``; ``[...]``."""
  sq, count, seen = stats[..., 0], stats[..., 1], stats[..., 2]
  sigma = jnp.sqrt(sq / jnp.maximum(count, jnp.finfo(jnp.float32).tiny))
  adapted = jnp.clip(1.0 - auto.z * sigma, auto.floor, 2.0)
  return jnp.where(seen >= auto.min_count, adapted, auto.warmup_tau).astype(
    dtype
  )


def record_chance(
  stats: jax.Array, distances: jax.Array, decay: float
) -> jax.Array:
  """Blends one step's negative similarities into ``stats [..., 3]``.

  ``distances [..., N]`` are the rule's cosine distances; anchors (exact 0)
  and unusable ones (NaN) are left out. The last entry counts every negative
  similarity seen (it saturates at float32's integer range, far above any
  ``min_count``).
  """
  sims = 1.0 - distances.astype(jnp.float32)
  negative = jnp.isfinite(sims) & (sims < 0)
  sq = jnp.sum(jnp.where(negative, sims**2, 0.0), axis=-1)
  count = jnp.sum(negative, axis=-1, dtype=jnp.float32)
  blended = decay * stats[..., :2] + (1.0 - decay) * jnp.stack([sq, count], -1)
  seen = jnp.minimum(stats[..., 2] + count, 2.0**24)
  return jnp.concatenate([blended, seen[..., None]], axis=-1)


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
