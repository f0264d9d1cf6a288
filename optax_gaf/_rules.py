"""Stage 2: agreement rules, from the Gram matrix to weights.

A rule sees only the ``[N, N]`` float32 Gram matrix ``G[i, j] = <g_i, g_j>``
(already zeroed on unusable rows and columns), the ``[N]`` mask of usable
microgradients and the threshold ``tau``. It returns a :class:`RuleOutput`.
It never touches the gradients themselves, so it runs unchanged on every device
and costs O(N^2) scalar work, nothing per parameter.
"""

from typing import Callable, NamedTuple

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


def _running_aggregate(gram, usable, tau, shrink):
  """Streams the microgradients in order against a running aggregate.

  The aggregate is kept as a weight vector ``a`` over microgradients, so
  ``<g_i, A> = G[i] @ a`` and ``||A||^2`` is updated incrementally. On
  acceptance ``a <- shrink * (a + e_i)``: ``shrink=1`` is the running sum (its
  direction is the running mean's), ``shrink=1/2`` is the pairwise average.
  """
  n = gram.shape[-1]
  diag = jnp.diagonal(gram)

  def step(carry, xs):
    a, sq_norm, has_anchor = carry
    i, row, sq_norm_i, ok = xs
    dot = jnp.dot(row, a, precision=jax.lax.Precision.HIGHEST)
    dist = cosine_distance(dot, sq_norm_i, sq_norm)
    is_anchor = ok & ~has_anchor
    agrees = ok & has_anchor & (dist <= tau)
    e_i = jax.nn.one_hot(i, n, dtype=jnp.float32)
    a = jnp.where(is_anchor, e_i, jnp.where(agrees, shrink * (a + e_i), a))
    sq_norm = jnp.where(
        is_anchor, sq_norm_i,
        jnp.where(agrees, shrink**2 * (sq_norm + 2 * dot + sq_norm_i), sq_norm))
    dist = jnp.where(is_anchor, 0.0, jnp.where(ok, dist, jnp.nan))
    return (a, sq_norm, has_anchor | ok), (is_anchor | agrees, agrees, dist)

  init = (jnp.zeros([n], jnp.float32), jnp.zeros([], jnp.float32),
          jnp.zeros([], bool))
  xs = (jnp.arange(n), gram, diag, usable)
  (a, _, _), (taken, agreed, dist) = jax.lax.scan(step, init, xs)
  ready = jnp.any(agreed)
  # On a no-agreement step only the anchor stays marked.
  accepted = jnp.where(ready, taken, taken & ~agreed)
  return a, ready, accepted, dist.astype(jnp.float32)


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


RULES: dict[str, Rule] = {
    "sequential": sequential,
    "pairwise": pairwise,
}
