"""``gaf()``: GAF as an Optax aggregator.

Its arguments are checked once; ``update`` then validates the
microgradients, resolves the placement, takes this step's threshold from the
policy, runs the stages (``_stages.aggregate``) and records the decisions in
:class:`GAFState`.
"""

import jax
from optax.experimental import aggregating

from optax_gaf import _checks
from optax_gaf import _collectives
from optax_gaf import _gram
from optax_gaf import _placement
from optax_gaf import _stages
from optax_gaf import _state
from optax_gaf import _streaming
from optax_gaf import _threshold
from optax_gaf import rules
from optax_gaf._ghost import view as _ghost_view
from optax_gaf._state import GAFState

__all__ = ("GAFState", "gaf")


def _check_leaf_count(per_leaf: bool, state: GAFState, leaves) -> None:
  if per_leaf and state.leaf_acceptance_rate.shape[0] != len(leaves):
    raise ValueError(
      f"gaf(granularity='per_leaf') was initialised for"
      f" {state.leaf_acceptance_rate.shape[0]} leaves but got microgradients"
      f" with {len(leaves)}; per-leaf statistics keep the params' tree."
    )


def _check_n(n: int, num_microbatches: int | None) -> None:
  if n < 2:
    raise ValueError(
      f"GAF needs at least 2 microgradients to compare; got N={n}."
    )
  if num_microbatches is not None and n != num_microbatches:
    raise ValueError(
      f"gaf(num_microbatches={num_microbatches}) got {n} microgradients."
    )


def _placed(grads, params, axis_name, collective, sharded_params):
  """``(placement, treedef)`` of stacked or self-placed microgradients."""
  if not isinstance(grads, _placement.PlacedMicrogradients):
    ghost = _ghost_view.placed(grads)  # a tree of ghost placeholders
    grads = grads if ghost is None else ghost[0]
  if isinstance(grads, _placement.PlacedMicrogradients):
    if axis_name is None and not sharded_params:
      return grads, grads.treedef
    stacked = getattr(grads, "stacked", None)
    if stacked is None:
      raise ValueError(
        f"{type(grads).__name__} cannot form its microgradients;"
        " gaf(axis_name=...) and sharded_params need stacked microgradients"
        " (microbatch_grads)."
      )
    # Across devices: this device's microgradients, formed, for the plan.
    grads = grads.treedef.unflatten(stacked())
  if isinstance(grads, _streaming.FilteredGradients):
    raise TypeError(
      "gaf() got FilteredGradients, which streaming_filtered_grads or"
      " gaf_accumulator filtered already; record them with"
      " optax_gaf.record_filtered() instead."
    )
  # Sharded params are shaped like this device's shard: the placement checks.
  _checks.microgradients(grads, None if sharded_params else params)
  leaves, treedef = jax.tree.flatten(grads)
  params = _placement.param_leaves(treedef, params, sharded_params)
  placement = _placement.resolve_placement(
    leaves, axis_name, collective, params
  )
  return placement, treedef


def _aggregator(
  policy,
  rule_fn,
  *,
  granularity,
  num_microbatches,
  axis_name,
  collective,
  sharded_params,
) -> aggregating.Aggregator:
  """Checks ``gaf``'s other arguments; its ``init_fn`` and ``update_fn``."""
  _placement.check_placement(axis_name, collective, sharded_params)
  choices = ("global", "per_leaf")
  per_leaf = _checks.choice(granularity, "granularity", choices) == "per_leaf"
  if num_microbatches is not None:
    num_microbatches = _checks.num_microbatches(num_microbatches)

  def init_fn(params):
    n_leaves = len(jax.tree.leaves(params)) if per_leaf else 0
    if per_leaf and not n_leaves:
      raise ValueError(
        "gaf(granularity='per_leaf') sizes its per-leaf statistics from the"
        " params: pass them to init (got no leaves)."
      )
    count = jax.numpy.zeros([], jax.numpy.int32)
    kept = policy.init(n_leaves)
    tau0 = policy(count, kept)
    tau0 = tau0 if jax.numpy.ndim(tau0) == 0 else jax.numpy.mean(tau0)
    return _state.init_state(tau0, num_microbatches, n_leaves, kept)

  def update_fn(grads, state, params=None, **extra_args):
    del extra_args  # e.g. value= for reduce_on_plateau, later in the chain
    placement, treedef = _placed(
      grads, params, axis_name, collective, sharded_params
    )
    _check_leaf_count(per_leaf, state, placement.leaves)
    _check_n(placement.num_microgradients, num_microbatches)
    dtype = _gram.stat_dtype(placement.leaves)
    tau_t = policy(state.count, _state.policy_state(state), dtype)
    updates, out, diversity = _stages.aggregate(
      placement, rule_fn, tau_t, per_leaf=per_leaf, blocks=axis_name is None
    )
    new_state = _state.record(state, out, tau_t, diversity, policy)
    return treedef.unflatten(updates), new_state

  return aggregating.Aggregator(init_fn, update_fn)


def gaf(
  tau: _threshold.TauLike = 0.97,
  *,
  rule: str | rules.Rule = "sequential",
  num_microbatches: int | None = None,
  axis_name: _collectives.AxisName | None = None,
  collective: str = "all_to_all",
  sharded_params: bool = False,
  granularity: str = "global",
  temperature: float | None = None,
  adaptive_tau: _threshold.AdaptiveTau | None = None,
) -> aggregating.Aggregator:
  r"""Gradient Agreement Filtering: average only the microgradients that agree.

  Given microgradients ``g_1 .. g_N`` (every leaf ``[N, *param_shape]``, or
  a producer that is its own placement, such as
  :class:`GhostMicrogradients`), GAF computes their Gram matrix
  ``G[i, j] = <g_i, g_j>`` in float32, lets ``rule`` decide from it which
  ones agree (cosine distances over the whole pytree), and returns their
  weighted sum in the gradients' dtype.

  Non-finite or zero microgradients are excluded, as if absent. When nothing
  agrees (or fewer than two are usable), the update is zeros and
  ``state.ready`` is False, so :func:`optax_gaf.process` skips its
  postprocessor (a true skip); in ``optax.chain`` the zeros reach the
  optimizer, whose momentum still moves the parameters.

  A transformation before gaf sees the stacked tree as one gradient; map it
  over each microgradient with :func:`optax_gaf.per_microgradient`.

  Args:
    tau: cosine distance threshold in ``[0, 2]`` (2: the plain mean), a
      schedule of the step count, or a policy: :class:`AutoTau`,
      :class:`WarmupAutoTau` or :class:`AdaptiveTau`.
    rule: ``"sequential"`` (the paper's), ``"pairwise"``, ``"medoid"``,
      ``"soft"`` (:mod:`optax_gaf.rules`) or a :class:`~optax_gaf.rules.Rule`.
    num_microbatches: N (global, with ``axis_name``): the state then records
      ``accepted`` and ``cosine_distance`` ``[N]``; None: any N.
    axis_name: None on one device or under ``jax.jit`` over Explicit axes.
      In ``shard_map``/``pmap`` (or ``jit`` with ``jax.set_mesh``), the mesh
      axis name(s) the microgradients are spread over: GAF decides over all
      N, bitwise identically on every device.
    collective: with ``axis_name``, ``"all_to_all"`` (a ``pmean``'s bytes)
      or ``"all_gather"``.
    sharded_params: True when each device passes its shard of the params
      (FSDP in ``shard_map``); it gets its shard of the update.
    granularity: ``"global"`` (one decision over the whole pytree) or
      ``"per_leaf"`` (each parameter tensor filtered on its own).
    temperature: ``rule="soft"`` only, > 0; None: that rule's own 0.05.
    adaptive_tau: deprecated: pass ``tau=AdaptiveTau(..., cap=tau)``.

  Returns:
    An ``optax.experimental.aggregating.Aggregator`` with :class:`GAFState`.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> tx = optax.chain(optax_gaf.gaf(tau=0.5, num_microbatches=3),
    ...                  optax.sgd(1.0))
    >>> state = tx.init(jnp.zeros(3))
    >>> grads = jnp.array([[1.0, 0.0, 0.0], [1.0, 0.2, 0.0], [-1.0, 0.0, 0.0]])
    >>> updates, state = tx.update(grads, state)
    >>> updates
    Array([-1. , -0.1, -0. ], dtype=float32)
    >>> optax_gaf.stats(state)["accepted"]
    Array([ True,  True, False], dtype=bool)

  References:
    Chaubard, Eddy and Kochenderfer, `Beyond Gradient Averaging in Parallel
    Optimization: Improved Robustness through Gradient Agreement Filtering
    <https://arxiv.org/abs/2412.18052>`_, 2024.
  """
  return _aggregator(
    _threshold.threshold_policy(tau, adaptive_tau),
    _stages.resolve_rule(rule, temperature),
    granularity=granularity,
    num_microbatches=num_microbatches,
    axis_name=axis_name,
    collective=collective,
    sharded_params=sharded_params,
  )
