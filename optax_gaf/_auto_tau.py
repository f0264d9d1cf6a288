"""Thresholds from chance agreement: :class:`AutoTau`, :class:`WarmupAutoTau`
and the statistics they keep (``GAFState.chance_stats``).

Policies over them live in ``_threshold.py``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


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
