"""Stage 2: the rules' types, cosine distances, and the whole-matrix rules.

A rule turns the sanitized ``[N, N]`` Gram matrix, the usable mask and the
threshold into a :class:`RuleOutput`. ``medoid`` and ``soft`` need the whole
matrix; the running-aggregate rules (``sequential``, ``pairwise``) live with
their engine in ``_running.py``. ``rules.py`` is the public facade.
"""

from typing import NamedTuple
from typing import Protocol

import jax
import jax.numpy as jnp


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
