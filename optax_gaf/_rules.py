"""Stage 2: agreement rules, from the Gram matrix to weights.

A rule sees only the ``[N, N]`` float32 Gram matrix ``G[i, j] = <g_i, g_j>``
(already zeroed on unusable rows and columns), the ``[N]`` mask of usable
microgradients and the threshold ``tau``. It returns a :class:`RuleOutput`.
It never touches the gradients themselves, so it runs unchanged on every device
and costs O(N^2) scalar work, nothing per parameter.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class RuleOutput(NamedTuple):
  """What a rule decides for one step.

  Attributes:
    weights: ``[N]`` float32. The update is ``sum_i weights[i] * g_i``. All zero
      on a no-agreement step.
    ready: bool scalar. False on a no-agreement step.
    accepted: ``[N]`` bool. The anchor and every microgradient taken into the
      result; on a no-agreement step only the anchor.
    cosine_distance: ``[N]`` float32. Each microgradient's cosine distance when
      it was compared (0 for the anchor, NaN for unusable ones).
  """

  weights: jax.Array
  ready: jax.Array
  accepted: jax.Array
  cosine_distance: jax.Array


Rule = Callable[[jax.Array, jax.Array, jax.Array], RuleOutput]


def cosine_distance(dot, sq_norm_a, sq_norm_b):
  """``1 - cos`` from an inner product and two squared norms, in [0, 2].

  A zero norm gives cosine 0 (distance 1), as ``torch.cosine_similarity`` does.
  """
  denom = jnp.sqrt(sq_norm_a) * jnp.sqrt(sq_norm_b)
  cos = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)
  return 1.0 - jnp.clip(cos, -1.0, 1.0)


def stream_decisions(
  gram, usable, tau, shrink, cross=None, sq_norm=0.0, has_anchor=False
):
  """Streams microgradients in order against a running aggregate.

  The aggregate is ``A = alpha * C + sum_j w_j g_j``, where ``C`` is an
  aggregate carried in from earlier microgradients (none by default), so
  ``<g_j, A> = alpha * <g_j, C> + G[j] @ w`` and ``||A||^2`` is updated
  incrementally. On acceptance ``A <- shrink * (A + g_j)``: ``shrink=1`` is
  the running sum (its direction is the running mean's), ``shrink=1/2`` the
  pairwise average. The Gram route is one call with nothing carried in; the
  fast path calls it once per block.

  Args:
    gram: ``[B, B]`` sanitized Gram matrix of these microgradients.
    usable: ``[B]`` bool.
    tau: the threshold.
    shrink: 1 or 1/2, as above.
    cross: ``[B]`` float32 ``<g_j, C>`` (zero for unusable ones), or None.
    sq_norm: ``||C||^2``.
    has_anchor: whether ``C`` holds an anchor already.

  Returns:
    ``(alpha, w, sq_norm, has_anchor, taken, agreed, cosine_distance)``:
    the aggregate's coefficients and state after the stream, and per
    microgradient whether it was taken (anchor or agreed), agreed, and its
    distance (0 for the anchor, NaN when unusable).
  """
  n = gram.shape[-1]
  if cross is None:
    cross = jnp.zeros([n], jnp.float32)

  def step(carry, xs):
    alpha, w, sq, has = carry
    j, row, cross_j, sq_j, ok = xs
    dot = alpha * cross_j + jnp.dot(row, w, precision=jax.lax.Precision.HIGHEST)
    dist = cosine_distance(dot, sq_j, sq)
    is_anchor = ok & ~has
    agrees = ok & has & (dist <= tau)
    e_j = jax.nn.one_hot(j, n, dtype=jnp.float32)
    alpha = jnp.where(agrees, shrink * alpha, alpha)
    w = jnp.where(is_anchor, e_j, jnp.where(agrees, shrink * (w + e_j), w))
    sq = jnp.where(
      is_anchor, sq_j, jnp.where(agrees, shrink**2 * (sq + 2 * dot + sq_j), sq)
    )
    dist = jnp.where(is_anchor, 0.0, jnp.where(ok, dist, jnp.nan))
    return (alpha, w, sq, has | ok), (is_anchor | agrees, agrees, dist)

  init = (
    jnp.ones([], jnp.float32),
    jnp.zeros([n], jnp.float32),
    jnp.asarray(sq_norm, jnp.float32),
    jnp.asarray(has_anchor, bool),
  )
  xs = (jnp.arange(n), gram, cross, jnp.diagonal(gram), usable)
  (alpha, w, sq, has), (taken, agreed, dist) = jax.lax.scan(step, init, xs)
  return alpha, w, sq, has, taken, agreed, dist.astype(jnp.float32)


def _running_aggregate(gram, usable, tau, shrink):
  """The whole stream from the Gram matrix: ``(a, ready, accepted, dist)``."""
  _, a, _, _, taken, agreed, dist = stream_decisions(gram, usable, tau, shrink)
  ready = jnp.any(agreed)
  # On a no-agreement step only the anchor stays marked.
  accepted = jnp.where(ready, taken, taken & ~agreed)
  return a, ready, accepted, dist


def sequential(gram, usable, tau) -> RuleOutput:
  """The paper's Algorithm 1 against the running mean of accepted microgradients.

  The first usable microgradient is the anchor; each later one is accepted iff
  its cosine distance to the mean of those accepted so far is ``<= tau``. The
  output weights are ``1/k`` on the ``k`` accepted microgradients.
  """
  a, ready, accepted, dist = _running_aggregate(gram, usable, tau, 1.0)
  weights = jnp.where(ready, a / jnp.maximum(jnp.sum(a), 1.0), 0.0)
  return RuleOutput(weights, ready, accepted, dist)


def pairwise(gram, usable, tau) -> RuleOutput:
  """The authors' package ``step_GAF``: on agreement ``G <- (G + g_i) / 2``.

  Earlier microgradients' weights halve with each later acceptance.
  """
  a, ready, accepted, dist = _running_aggregate(gram, usable, tau, 0.5)
  weights = jnp.where(ready, a, 0.0)
  return RuleOutput(weights, ready, accepted, dist)


def cosine_distance_matrix(gram):
  """All pairwise cosine distances ``[N, N]`` from the Gram matrix."""
  diag = jnp.diagonal(gram)
  return cosine_distance(gram, diag[:, None], diag[None, :])


def _medoid_anchor(gram, usable, tau):
  """The microgradient with the most neighbours within ``tau``.

  Returns ``(anchor one-hot [N], has_anchor, neighbours of the anchor [N],
  distances to the anchor [N] (0 at the anchor, NaN where unusable))``.
  """
  n = gram.shape[-1]
  dist = cosine_distance_matrix(gram)
  pair = usable[:, None] & usable[None, :] & ~jnp.eye(n, dtype=bool)
  neighbours = pair & (dist <= tau)
  counts = jnp.where(usable, jnp.sum(neighbours, axis=1), -1)
  # argmax returns the first maximum: ties go to the lowest index.
  anchor = jnp.argmax(counts)
  has_anchor = jnp.any(usable)
  is_anchor = jax.nn.one_hot(anchor, n, dtype=bool) & has_anchor
  to_anchor = jnp.where(
    is_anchor, 0.0, jnp.where(usable, dist[anchor], jnp.nan)
  )
  return is_anchor, has_anchor, neighbours[anchor], to_anchor


def medoid(gram, usable, tau) -> RuleOutput:
  """Order-invariant GAF: the anchor is the best-connected microgradient.

  The anchor is the usable microgradient with the most neighbours within
  cosine distance ``tau`` (ties go to the lowest index). The anchor and its
  neighbours are accepted and averaged. An anchor without any neighbour is a
  no-agreement step. Up to ties, the decisions do not depend on the order of the
  microgradients, unlike Algorithm 1 whose first microgradient is the anchor.
  """
  is_anchor, _, neighbours, to_anchor = _medoid_anchor(gram, usable, tau)
  ready = jnp.any(neighbours)
  members = is_anchor | neighbours
  weights = jnp.where(ready, members / jnp.maximum(jnp.sum(members), 1), 0.0)
  accepted = jnp.where(ready, members, is_anchor)
  return RuleOutput(weights.astype(jnp.float32), ready, accepted, to_anchor)


def soft(gram, usable, tau, temperature=0.05) -> RuleOutput:
  """Soft medoid GAF: sigmoid weights instead of a hard gate.

  Each usable microgradient gets ``w_i = sigmoid((tau - d_i) / temperature)``,
  where ``d_i`` is its cosine distance to the medoid anchor (see
  :func:`medoid`); the output is ``sum_i w_i g_i / sum_i w_i``. As
  ``temperature -> 0`` the weights become the hard medoid rule's, and as
  ``temperature -> inf`` they become equal (the plain mean).

  No-agreement step: the soft count of the anchor's neighbours,
  ``sum_{i != anchor} w_i``, is below 1/2 (less than half a neighbour). At
  ``temperature -> 0`` this is the medoid rule's "no neighbour within tau"; at
  ``temperature -> inf`` it never happens when two or more are usable.
  ``accepted`` marks ``d_i <= tau`` (weight >= 1/2).
  """
  is_anchor, has_anchor, _, to_anchor = _medoid_anchor(gram, usable, tau)
  z = (tau - jnp.where(usable, to_anchor, 0.0)) / temperature
  w = jnp.where(usable, jax.nn.sigmoid(z), 0.0)
  ready = has_anchor & (jnp.sum(jnp.where(is_anchor, 0.0, w)) >= 0.5)
  weights = jnp.where(ready, w / jnp.where(ready, jnp.sum(w), 1.0), 0.0)
  accepted = jnp.where(ready, usable & (to_anchor <= tau), is_anchor)
  return RuleOutput(weights.astype(jnp.float32), ready, accepted, to_anchor)


RULES: dict[str, Rule] = {
  "sequential": sequential,
  "pairwise": pairwise,
  "medoid": medoid,
  "soft": soft,
}


class AdaptiveTau(NamedTuple):
  """An adaptive threshold ``tau_t = min(tau, mean + k * std)`` for :func:`gaf`.

  The mean and (population) standard deviation are those of the last
  ``history`` recorded cosine distances; the idea is credited to the authors'
  CIFAR-100N script, but the version we could read has a fixed threshold, so
  the details here are ours. They live in the state as a fixed-shape ``[history]`` buffer (``GAFState.tau_history``, NaN where
  empty). Every step records the rule's ``cosine_distance`` of the usable
  microgradients, except exact zeros (the anchor, and exact copies of it), and
  the threshold of a step uses only earlier steps' distances. Until at least
  ``min_count`` distances are recorded, ``tau_t = tau``.

  Attributes:
    k: how many standard deviations above the mean.
    history: M, the number of most recent distances kept.
    min_count: distances needed before the threshold adapts (>= 2).
  """

  k: float = 1.0
  history: int = 256
  min_count: int = 2


def adaptive_threshold(history, tau, k, min_count):
  """``min(tau, mean + k * std)`` over the finite entries of ``history``."""
  ok = jnp.isfinite(history)
  count = jnp.sum(ok)
  safe = jnp.where(ok, history, 0.0)
  mean = jnp.sum(safe) / jnp.maximum(count, 1)
  sq_dev = jnp.where(ok, (history - mean) ** 2, 0.0)
  var = jnp.sum(sq_dev) / jnp.maximum(count, 1)  # population variance
  adapted = jnp.minimum(tau, mean + k * jnp.sqrt(var))
  return jnp.where(count >= min_count, adapted, tau).astype(jnp.float32)


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
