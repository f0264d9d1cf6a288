"""``ghost_filtered_grads``: streaming_filtered_grads' contract on ghosts."""

from typing import Any

import jax
import jax.numpy as jnp

from optax_gaf import _gram
from optax_gaf import _stages
from optax_gaf import _streaming
from optax_gaf import _threshold
from optax_gaf import rules
from optax_gaf._ghost import producer


def ghost_filtered_grads(
  loss_fn: Any,
  num_microbatches: int,
  tau: float | jax.Array,
  *,
  rule: str | rules.Rule = "sequential",
  has_aux: bool = False,
  route: str = "auto",
) -> Any:
  """:func:`optax_gaf.streaming_filtered_grads`' contract on ghosts.

  Filters inside the gradient function and returns
  :class:`optax_gaf.FilteredGradients` for :func:`optax_gaf.record_filtered`,
  with no N x P arrays. For schedules, :class:`optax_gaf.AdaptiveTau`,
  :class:`optax_gaf.AutoTau` or ``per_leaf`` (which keep state) pass
  :func:`optax_gaf.ghost_microgradients`' output to :func:`optax_gaf.gaf`
  instead.

  Args:
    loss_fn: ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)``
      with ``has_aux=True``), the scalar mean loss of one microbatch.
    num_microbatches: N; the batch size must be a multiple of it.
    tau: the cosine distance threshold in ``[0, 2]``, a scalar.
    rule: any rule :func:`optax_gaf.gaf` takes: a name or a
      :class:`~optax_gaf.rules.Rule`.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    route: as in :func:`optax_gaf.ghost_microgradients`.

  Returns:
    ``fn(params, batch, *args) -> (losses, filtered)`` as
    :func:`optax_gaf.streaming_filtered_grads` returns.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
    >>> batch = {"x": jnp.eye(4, 3), "y": jnp.array([1.0, 1.0, -1.0, 0.0])}
    >>> grad_fn = optax_gaf.ghost_filtered_grads(loss, 4, tau=0.9)
    >>> tx = optax_gaf.process(optax.identity(),
    ...     optax_gaf.record_filtered(num_microbatches=4), optax.sgd(0.1))
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> losses, filtered = grad_fn(params, batch)
    >>> updates, state = tx.update(filtered, state, params)
    >>> optax_gaf.stats(state)["ready"]  # orthogonal: nothing agrees
    Array(False, dtype=bool)
  """
  _threshold.check_tau(tau, allow_schedule=False)
  rule_fn = _stages.resolve_rule(rule, None)
  grad_fn = producer.ghost_microgradients(
    loss_fn, num_microbatches, has_aux=has_aux, route=route
  )

  def fn(params, batch, *args):
    values, ghost = grad_fn(params, batch, *args)
    t = jnp.asarray(tau, _gram.stat_dtype(ghost.leaves))
    updates, out, diversity = _stages.aggregate(ghost, rule_fn, t)
    updates = ghost.treedef.unflatten(updates)
    return values, _streaming.filtered_gradients(updates, out, tau, diversity)

  return fn
