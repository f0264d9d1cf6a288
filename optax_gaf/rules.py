"""Stage 2: agreement rules, from the Gram matrix to weights.

A rule sees only the ``[N, N]`` float32 Gram matrix ``G[i, j] = <g_i, g_j>``
(already zeroed on unusable rows and columns), the ``[N]`` mask of usable
microgradients and the threshold ``tau``. It returns a :class:`RuleOutput`.
It never touches the gradients themselves, so it runs unchanged on every device
and costs O(N^2) scalar work, nothing per parameter.

Any callable with the :class:`Rule` signature can be passed to
``optax_gaf.gaf(rule=...)``; it then works on one device, across devices and
per leaf with no other code.

Examples:
  A rule that accepts every usable microgradient within ``tau`` of the mean
  of the usable ones, from the Gram matrix alone (``<g_i, m> = (G u)_i / k``
  and ``||m||^2 = u^T G u / k^2``):

  >>> import jax.numpy as jnp, optax, optax_gaf
  >>> from optax_gaf import rules
  >>> def near_mean(gram, usable, tau):
  ...   u = usable.astype(gram.dtype)
  ...   dist = rules.cosine_distance(gram @ u, jnp.diagonal(gram), u @ gram @ u)
  ...   dist = jnp.where(usable, dist, jnp.nan)
  ...   accepted = usable & (dist <= tau)
  ...   ready = jnp.sum(accepted) >= 2
  ...   weights = jnp.where(ready, accepted / jnp.maximum(accepted.sum(), 1), 0)
  ...   return rules.RuleOutput(weights, ready, accepted, dist)
  >>> tx = optax_gaf.gaf(0.5, rule=near_mean, num_microbatches=3)
  >>> state = tx.init(jnp.zeros(2))
  >>> grads = jnp.array([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.5]])
  >>> updates, state = tx.update(grads, state)
  >>> updates, state.accepted
  (Array([1.  , 0.05], dtype=float32), Array([ True,  True, False], dtype=bool))
"""

from typing import NamedTuple
from typing import Protocol

import jax
import jax.numpy as jnp

from optax_gaf import _gram

__all__ = (
  "Rule",
  "RuleOutput",
  "cosine_distance",
  "medoid",
  "pairwise",
  "sequential",
  "soft",
)


class RuleOutput(NamedTuple):
  """What a rule decides for one step.

  Attributes:
    weights: ``[N]``, in the Gram matrix's dtype. The update is
      ``sum_i weights[i] * g_i``. All zero on a no-agreement step.
    ready: bool scalar. False on a no-agreement step.
    accepted: ``[N]`` bool. The microgradients taken into the result (for the
      built-in rules: the anchor and those that agree; on a no-agreement step
      only the anchor).
    cosine_distance: ``[N]``, in the Gram matrix's dtype. Each
      microgradient's cosine distance when it was compared (0 for the anchor,
      NaN for unusable ones).
  """

  weights: jax.Array
  ready: jax.Array
  accepted: jax.Array
  cosine_distance: jax.Array


class Rule(Protocol):
  """The signature of an agreement rule.

  A rule must be a pure, jit-able function of small arrays; it is traced once
  per ``update`` (and ``vmap``-ed over leaves with ``granularity="per_leaf"``).
  """

  def __call__(
    self, gram: jax.Array, usable: jax.Array, tau: jax.Array
  ) -> RuleOutput:
    """Decides one step.

    Args:
      gram: ``[N, N]`` Gram matrix (float32; float64 for float64
        microgradients), zero on unusable rows and columns. It may be that of
        rescaled microgradients ``f_i g_i`` (on a step whose norms would
        under- or overflow); the weights still apply to the ``g_i``, so they
        must not change when the Gram matrix is scaled by a common factor.
      usable: ``[N]`` bool, the finite and nonzero microgradients.
      tau: float32 scalar, the threshold of this step.

    Returns:
      A :class:`RuleOutput`; the weights of unusable microgradients are
      ignored.
    """


# Cosine distances within this many ulps of the statistics' dtype above tau
# count as within tau: the rounding of the Gram entries and of the running
# sums (a few ulps, measured up to 3 for 256 copies) must not turn exact
# alignment into a rejection at tau=0 (docs/guides/semantics.md).
TAU_SLACK_ULPS = 64


def within_tau(dist, tau):
  """``dist <= tau`` up to rounding: ``TAU_SLACK_ULPS`` ulps of slack.

  NaN distances are never within tau.
  """
  dist = jnp.asarray(dist)
  slack = TAU_SLACK_ULPS * jnp.finfo(dist.dtype).eps
  return dist <= tau + slack


def cosine_distance(dot, sq_norm_a, sq_norm_b):
  """``1 - cos`` from an inner product and two squared norms, in ``[0, 2]``.

  A zero norm gives cosine 0 (distance 1), as ``torch.cosine_similarity`` does.
  """
  denom = jnp.sqrt(sq_norm_a) * jnp.sqrt(sq_norm_b)
  cos = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)
  return 1.0 - jnp.clip(cos, -1.0, 1.0)


class StreamResult(NamedTuple):
  """The outcome of :func:`stream_decisions` (see there)."""

  alpha: jax.Array
  w: jax.Array
  sq_norm: jax.Array
  has_anchor: jax.Array
  taken: jax.Array
  agreed: jax.Array
  cosine_distance: jax.Array


def stream_decisions(
  gram, usable, tau, shrink, cross=None, sq_norm=0.0, has_anchor=False
) -> StreamResult:
  """Streams microgradients in order against a running aggregate.

  The aggregate is ``A = alpha * C + sum_j w_j g_j``, where ``C`` is an
  aggregate carried in from earlier microgradients (none by default), so
  ``<g_j, A> = alpha * <g_j, C> + G[j] @ w`` and ``||A||^2`` is updated
  incrementally. On acceptance ``A <- shrink * (A + g_j)``: ``shrink=1`` is
  the running sum (its direction is the running mean's), ``shrink=1/2`` the
  pairwise average. The Gram route is one call with nothing carried in; the
  block route calls it once per block.

  Args:
    gram: ``[B, B]`` sanitized Gram matrix of these microgradients.
    usable: ``[B]`` bool.
    tau: the threshold.
    shrink: 1 or 1/2, as above.
    cross: ``[B]`` float32 ``<g_j, C>`` (zero for unusable ones), or None.
    sq_norm: ``||C||^2``.
    has_anchor: whether ``C`` holds an anchor already.

  Returns:
    The aggregate's coefficients and state after the stream, and per
    microgradient whether it was taken (anchor or agreed), agreed, and its
    distance (0 for the anchor, NaN when unusable).
  """
  n, dtype = gram.shape[-1], gram.dtype
  if cross is None:
    cross = jnp.zeros([n], dtype)

  def step(carry, xs):
    alpha, w, sq, has = carry
    j, row, cross_j, sq_j, ok = xs
    dot = alpha * cross_j + jnp.dot(row, w, precision=_gram.PRECISION)
    dist = cosine_distance(dot, sq_j, sq)
    is_anchor = ok & ~has
    agrees = ok & has & within_tau(dist, tau)
    e_j = jax.nn.one_hot(j, n, dtype=dtype)
    alpha = jnp.where(agrees, shrink * alpha, alpha)
    w = jnp.where(is_anchor, e_j, jnp.where(agrees, shrink * (w + e_j), w))
    sq = jnp.where(
      is_anchor,
      sq_j,
      jnp.where(agrees, shrink**2 * (sq + 2 * dot + sq_j), sq),
    )
    dist = jnp.where(is_anchor, 0.0, jnp.where(ok, dist, jnp.nan))
    return (alpha, w, sq, has | ok), (is_anchor | agrees, agrees, dist)

  init = (
    jnp.ones([], dtype),
    jnp.zeros([n], dtype),
    jnp.asarray(sq_norm, dtype),
    jnp.asarray(has_anchor, bool),
  )
  xs = (jnp.arange(n), gram, cross, jnp.diagonal(gram), usable)
  (alpha, w, sq, has), (taken, agreed, dist) = jax.lax.scan(step, init, xs)
  return StreamResult(alpha, w, sq, has, taken, agreed, dist.astype(dtype))


def running_output(w, taken, agreed, dist, shrink) -> RuleOutput:
  """The :class:`RuleOutput` of a finished stream with coefficients ``w``.

  On a no-agreement step only the anchor stays marked. The running sum's
  coefficients are 1 on the taken ones, so ``shrink=1`` divides by their
  number; the pairwise average's are the weights already.
  """
  ready = jnp.any(agreed)
  accepted = jnp.where(ready, taken, taken & ~agreed)
  norm = jnp.maximum(jnp.sum(w), 1.0) if shrink == 1.0 else 1.0
  weights = jnp.where(ready, w / norm, 0.0)
  return RuleOutput(weights, ready, accepted, dist)


def sequential(gram, usable, tau) -> RuleOutput:
  """The paper's Algorithm 1 against the running mean of accepted ones.

  The first usable microgradient is the anchor; each later one is accepted iff
  its cosine distance to the mean of those accepted so far is ``<= tau`` (up
  to rounding: ``within_tau``). The
  output weights are ``1/k`` on the ``k`` accepted microgradients.
  """
  s = stream_decisions(gram, usable, tau, 1.0)
  return running_output(s.w, s.taken, s.agreed, s.cosine_distance, 1.0)


def pairwise(gram, usable, tau) -> RuleOutput:
  """The authors' package ``step_GAF``: on agreement ``G <- (G + g_i) / 2``.

  Earlier microgradients' weights halve with each later acceptance.
  """
  s = stream_decisions(gram, usable, tau, 0.5)
  return running_output(s.w, s.taken, s.agreed, s.cosine_distance, 0.5)


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
  neighbours = pair & within_tau(dist, tau)
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
  no-agreement step. Up to ties, the decisions do not depend on the order of
  the microgradients, unlike Algorithm 1 whose first one is the anchor.
  """
  is_anchor, _, neighbours, to_anchor = _medoid_anchor(gram, usable, tau)
  ready = jnp.any(neighbours)
  members = is_anchor | neighbours
  weights = jnp.where(ready, members / jnp.maximum(jnp.sum(members), 1), 0.0)
  accepted = jnp.where(ready, members, is_anchor)
  return RuleOutput(weights.astype(gram.dtype), ready, accepted, to_anchor)


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
  # Distances within the rounding slack of tau count as at tau.
  d = jnp.where(usable, to_anchor, 0.0)
  d = jnp.where(within_tau(d, tau), jnp.minimum(d, tau), d)
  z = (tau - d) / temperature
  w = jnp.where(usable, jax.nn.sigmoid(z), 0.0)
  ready = has_anchor & (jnp.sum(jnp.where(is_anchor, 0.0, w)) >= 0.5)
  weights = jnp.where(ready, w / jnp.where(ready, jnp.sum(w), 1.0), 0.0)
  accepted = jnp.where(ready, usable & within_tau(to_anchor, tau), is_anchor)
  return RuleOutput(weights.astype(gram.dtype), ready, accepted, to_anchor)


BY_NAME: dict[str, Rule] = {
  "sequential": sequential,
  "pairwise": pairwise,
  "medoid": medoid,
  "soft": soft,
}

# The running-aggregate rules and their shrink factor: they compare each
# microgradient only with the aggregate of those before it, so they can take
# the O(NP) block route and stream.
RUNNING: dict[Rule, float] = {sequential: 1.0, pairwise: 0.5}
