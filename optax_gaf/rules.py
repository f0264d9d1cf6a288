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

from optax_gaf._rules import TAU_SLACK_ULPS
from optax_gaf._rules import Rule
from optax_gaf._rules import RuleOutput
from optax_gaf._rules import cosine_distance
from optax_gaf._rules import cosine_distance_matrix
from optax_gaf._rules import medoid
from optax_gaf._rules import soft
from optax_gaf._rules import within_tau
from optax_gaf._running import pairwise
from optax_gaf._running import sequential

__all__ = (
  "TAU_SLACK_ULPS",
  "Rule",
  "RuleOutput",
  "cosine_distance",
  "cosine_distance_matrix",
  "medoid",
  "pairwise",
  "sequential",
  "soft",
  "within_tau",
)

# The named rules, as gaf(rule=...) takes them.
BY_NAME: dict[str, Rule] = {
  "sequential": sequential,
  "pairwise": pairwise,
  "medoid": medoid,
  "soft": soft,
}
