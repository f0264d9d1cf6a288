"""``gaf()`` and ``streamed()``: the stages wired into Optax aggregators.

``gaf`` checks its arguments once, into a frozen :class:`_Config`; its
``update`` then validates the microgradients, resolves the placement, takes
a route (the Gram matrix, or blocks for running-aggregate rules on one
device) and records the decisions in :class:`GAFState`.
"""

import dataclasses
import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.experimental import aggregating

from optax_gaf import _blockwise
from optax_gaf import _checks
from optax_gaf import _ghost
from optax_gaf import _gram
from optax_gaf import _placement
from optax_gaf import _stats
from optax_gaf import _streaming
from optax_gaf import _threshold
from optax_gaf import rules


class GAFState(NamedTuple):
  """State of :func:`gaf` and :func:`streamed`. Shapes never change.

  Fields whose feature is off are None (no arrays), so the state holds no
  zero-size arrays and checkpoints as it is.

  Attributes:
    count: int32, the number of ``update`` calls so far (saturating); a
      ``tau`` schedule is evaluated at it.
    ready: bool, False on a no-agreement step. ``aggregating.process`` reads it
      to skip the inner optimizer on that step.
    skipped_steps: int32, the number of no-agreement steps so far
      (saturating).
    gradient_diversity: float32, ``sum_i ||g_i||^2 / ||sum_i g_i||^2`` over the
      usable microgradients (Yin et al. 2018), free from the Gram matrix.
    tau: float32, the threshold used at the last step.
    num_accepted: int32, the number of marks in the step's ``accepted``
      (with ``per_leaf``: over all leaves, up to ``L x N``).
    acceptance_rate: float32, ``num_accepted / N`` at the last step (per
      leaf: ``/ (L x N)``, the mean of ``leaf_acceptance_rate``).
    accepted: bool ``[N]``, the anchor and every microgradient taken into the
      result (on a no-agreement step, the anchor only). None unless
      ``num_microbatches`` was given; ``[L, N]`` with ``per_leaf``.
    cosine_distance: float32 ``[N]``, each microgradient's cosine distance when
      it was compared: 0 for the anchor, NaN for a non-finite or zero one.
      None unless ``num_microbatches`` was given; ``[L, N]`` with ``per_leaf``.
    leaf_acceptance_rate: float32 ``[L]``, with ``granularity="per_leaf"`` the
      fraction of microgradients accepted in each leaf (in ``jax.tree.leaves``
      order); None otherwise.
    tau_history: float32 ``[M]``, the last M recorded cosine distances for an
      :class:`AdaptiveTau` threshold (NaN where empty); None without.
    chance_stats: float32 ``[3]`` for an :class:`AutoTau` threshold: the EMA
      of the summed squares of negative cosine similarities, the EMA of their
      count, and the number seen so far; ``[L, 3]`` per leaf; None without.
  """

  count: jax.Array
  ready: jax.Array
  skipped_steps: jax.Array
  gradient_diversity: jax.Array
  tau: jax.Array
  num_accepted: jax.Array
  acceptance_rate: jax.Array
  accepted: jax.Array | None = None
  cosine_distance: jax.Array | None = None
  leaf_acceptance_rate: jax.Array | None = None
  tau_history: jax.Array | None = None
  chance_stats: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class _Config:
  """``gaf``'s arguments, checked once."""

  tau: optax.ScalarOrSchedule | _threshold.AutoTau
  rule: rules.Rule
  shrink: float | None  # set for running-aggregate rules: the block route
  num_microbatches: int | None
  axis_name: Any
  collective: str
  sharded_params: bool
  per_leaf: bool
  adaptive_tau: _threshold.AdaptiveTau | None


def _resolve_rule(rule: Any, temperature: float | None) -> rules.Rule:
  if isinstance(rule, str):
    if rule not in rules.BY_NAME:
      raise ValueError(
        f"Unknown GAF rule {rule!r}; choose one of {sorted(rules.BY_NAME)},"
        " or pass a function with the optax_gaf.rules.Rule signature."
      )
    rule = rules.BY_NAME[rule]
  elif not callable(rule):
    raise TypeError(
      "rule must be a rule's name or a function (gram, usable, tau) ->"
      f" RuleOutput; got {type(rule).__name__}."
    )
  if temperature is None:
    return rule
  if rule is not rules.soft:
    raise ValueError(f"temperature is a parameter of rule='soft', not {rule}.")
  value = _checks.concrete_number(temperature, "temperature")
  if value is not None and not value > 0:  # None: traced, not checked
    raise ValueError(f"temperature must be > 0; got {temperature}.")
  return functools.partial(rules.soft, temperature=temperature)


def _configure(
    tau, rule, num_microbatches, axis_name, collective, sharded_params,
    granularity, temperature, adaptive_tau,
) -> _Config:  # fmt: skip
  _threshold.check_tau(tau)
  _threshold.check_adaptive_tau(adaptive_tau)
  if adaptive_tau is not None and isinstance(tau, _threshold.AutoTau):
    raise ValueError(
      "tau=AutoTau() already adapts the threshold; drop adaptive_tau, or give"
      " a number as tau to cap AdaptiveTau's threshold."
    )
  _placement.check_placement(axis_name, collective, sharded_params)
  granularity = _checks.choice(
    granularity, "granularity", ("global", "per_leaf")
  )
  if num_microbatches is not None:
    num_microbatches = _checks.num_microbatches(num_microbatches)
  rule = _resolve_rule(rule, temperature)
  return _Config(
    tau=tau,
    rule=rule,
    shrink=_streaming.running_shrink(rule),
    num_microbatches=num_microbatches,
    axis_name=axis_name,
    collective=collective,
    sharded_params=sharded_params,
    per_leaf=granularity == "per_leaf",
    adaptive_tau=adaptive_tau,
  )


def _init_state(tau, n, n_leaves=0, n_history=0, auto=False) -> GAFState:
  per_n = None if n is None else ((n_leaves, n) if n_leaves else (n,))
  return GAFState(
    **_stats.init_counters(),
    tau=jnp.asarray(tau, jnp.float32),
    num_accepted=jnp.zeros([], jnp.int32),
    acceptance_rate=jnp.zeros([], jnp.float32),
    accepted=None if per_n is None else jnp.zeros(per_n, bool),
    cosine_distance=None if per_n is None else jnp.zeros(per_n, jnp.float32),
    leaf_acceptance_rate=jnp.zeros([n_leaves], jnp.float32)
    if n_leaves
    else None,
    tau_history=jnp.full([n_history], jnp.nan, jnp.float32)
    if n_history
    else None,
    chance_stats=_threshold.init_chance_stats((n_leaves,) if n_leaves else ())
    if auto
    else None,
  )


def _record(state: GAFState, out, tau, diversity, decay=None) -> GAFState:
  """The new state from a step's decisions (``out``: a RuleOutput or alike).

  ``decay`` is :class:`AutoTau`'s, when ``state.chance_stats`` is kept.
  """
  ready = jnp.any(out.ready)
  return GAFState(
    **_stats.advance_counters(state, ready, diversity),
    # Per leaf with AutoTau: the mean of the leaves' thresholds.
    tau=jnp.mean(jnp.asarray(tau, jnp.float32)),
    num_accepted=jnp.sum(out.accepted, dtype=jnp.int32),
    acceptance_rate=jnp.mean(out.accepted, dtype=jnp.float32),
    accepted=None if state.accepted is None else out.accepted,
    cosine_distance=None
    if state.cosine_distance is None
    else out.cosine_distance.astype(jnp.float32),
    leaf_acceptance_rate=None
    if state.leaf_acceptance_rate is None
    else jnp.mean(out.accepted, axis=-1, dtype=jnp.float32),
    tau_history=None
    if state.tau_history is None
    else _threshold.record_distances(state.tau_history, out.cosine_distance),
    chance_stats=None
    if state.chance_stats is None
    else _threshold.record_chance(
      state.chance_stats, out.cosine_distance, decay
    ),
  )


def _validate(config: _Config, grads, state: GAFState, params):
  """Checks the input; returns the flat leaves and the tree structure."""
  if isinstance(grads, _streaming.FilteredGradients):
    raise TypeError(
      "gaf() got FilteredGradients, which streaming_grads or gaf_accumulator"
      " filtered already; record them with optax_gaf.streamed() instead."
    )
  # Sharded params are shaped like this device's shard: the placement checks.
  _checks.microgradients(grads, None if config.sharded_params else params)
  leaves, treedef = jax.tree.flatten(grads)
  _check_leaf_count(config, state, leaves)
  return leaves, treedef


def _check_leaf_count(config: _Config, state: GAFState, leaves) -> None:
  if config.per_leaf and state.leaf_acceptance_rate.shape[0] != len(leaves):
    raise ValueError(
      f"gaf(granularity='per_leaf') was initialised for"
      f" {state.leaf_acceptance_rate.shape[0]} leaves but got microgradients"
      f" with {len(leaves)}; per-leaf statistics keep the params' tree."
    )


def _threshold_of(config: _Config, state: GAFState, leaves) -> jax.Array:
  """This step's threshold, in the statistics' dtype (float64 for float64).

  ``[L]`` (one per leaf) for an :class:`AutoTau` with ``per_leaf``.
  """
  dtype = _gram.stat_dtype(leaves)
  if isinstance(config.tau, _threshold.AutoTau):
    return _threshold.auto_threshold(state.chance_stats, config.tau, dtype)
  tau = _threshold.tau_at(config.tau, state.count, dtype)
  if config.adaptive_tau is None:
    return tau
  k, _, min_count = config.adaptive_tau
  return _threshold.adaptive_threshold(state.tau_history, tau, k, min_count)


def _checked_n(config: _Config, placement, leaves) -> int:
  n = placement.num_microgradients
  if n < 2:
    raise ValueError(
      f"GAF needs at least 2 microgradients to compare; got N={n}."
    )
  if config.num_microbatches is not None and n != config.num_microbatches:
    raise ValueError(
      f"gaf(num_microbatches={config.num_microbatches}) got {n} microgradients."
    )
  return n


def _apply_rule(config: _Config, gram, usable, tau) -> rules.RuleOutput:
  """Runs the rule (per leaf: vmapped) and checks what it returns."""
  rule = config.rule
  if config.per_leaf:
    rule = jax.vmap(rule, in_axes=(0, 0, 0 if jnp.ndim(tau) else None))
  out = rule(gram, usable, tau)
  if not isinstance(out, tuple) or len(out) != 4:
    raise TypeError(
      f"The rule {config.rule} must return a RuleOutput(weights, ready,"
      f" accepted, cosine_distance); got {type(out).__name__}."
    )
  out = rules.RuleOutput(*out)
  shapes = [jnp.shape(x) for x in out]
  want = [usable.shape, usable.shape[:-1], usable.shape, usable.shape]
  if shapes != want:
    raise ValueError(
      f"The rule {config.rule} returned shapes {shapes} for (weights, ready,"
      f" accepted, cosine_distance); expected {want}."
    )
  return rules.RuleOutput(
    jnp.asarray(out.weights, gram.dtype),
    jnp.asarray(out.ready, bool),
    jnp.asarray(out.accepted, bool),
    jnp.asarray(out.cosine_distance, gram.dtype),
  )


def _gram_route(config: _Config, placement, leaves, tau):
  gram, usable, _ = _gram.safe_gram(placement, config.per_leaf)
  out = _apply_rule(config, gram, usable, tau)
  updates = placement.combine(out.weights, usable)
  return updates, out, _gram.gradient_diversity(gram)


def _block_route(config: _Config, placement, leaves, tau):
  """O(NP) without the Gram matrix; the Gram route where norms leave range."""
  carry = _blockwise.filter_blocks(leaves, tau, config.shrink)
  dtypes = [x.dtype for x in leaves]
  return jax.lax.cond(
    _gram.in_safe_range(carry.sq_norms),
    lambda: _blockwise.finish(carry, config.shrink, dtypes),
    lambda: _gram_route(config, placement, leaves, tau),
  )


def _route(config: _Config, placement, leaves, tau):
  """Stages 1-3: ``(update leaves, RuleOutput, gradient diversity)``."""
  n = _checked_n(config, placement, leaves)
  blockwise = (
    config.shrink is not None
    and not config.per_leaf
    and n > _blockwise.BLOCK_SIZE
    and config.axis_name is None
    and isinstance(placement, _placement.LocalPlacement)
  )
  route = _block_route if blockwise else _gram_route
  return route(config, placement, leaves, tau)


def _init(config: _Config, params) -> GAFState:
  n_leaves = len(jax.tree.leaves(params)) if config.per_leaf else 0
  if config.per_leaf and not n_leaves:
    raise ValueError(
      "gaf(granularity='per_leaf') sizes its per-leaf statistics from the"
      " params: pass them to init (got no leaves)."
    )
  adaptive = config.adaptive_tau
  n_history = 0 if adaptive is None else adaptive.history
  tau0 = _threshold.tau_at(config.tau, jnp.zeros([], jnp.int32))
  auto = isinstance(config.tau, _threshold.AutoTau)
  return _init_state(tau0, config.num_microbatches, n_leaves, n_history, auto)


def _ghost_input(config: _Config, ghost, state: GAFState):
  """Ghost microgradients are their own placement, on one device."""
  if config.axis_name is not None or config.sharded_params:
    raise ValueError(
      "ghost_microgradients captures one device's layers; gaf(axis_name=...)"
      " and sharded_params need stacked microgradients from"
      " microbatch_grads (or use plain jax.jit over sharded arrays)."
    )
  _check_leaf_count(config, state, ghost.leaves)
  return ghost.leaves, ghost.treedef, ghost


def _update(config: _Config, grads, state, params=None, **extra_args):
  del extra_args  # e.g. value= for reduce_on_plateau, later in the chain
  if isinstance(grads, _placement.PlacedMicrogradients):
    leaves, treedef, placement = _ghost_input(config, grads, state)
  else:
    leaves, treedef = _validate(config, grads, state, params)
    params = _placement.param_leaves(treedef, params, config.sharded_params)
    placement = _placement.resolve_placement(
      leaves, config.axis_name, config.collective, params
    )
  tau = _threshold_of(config, state, leaves)
  updates, out, diversity = _route(config, placement, leaves, tau)
  auto = isinstance(config.tau, _threshold.AutoTau)
  decay = config.tau.decay if auto else None
  return treedef.unflatten(updates), _record(state, out, tau, diversity, decay)


def gaf(
  tau: optax.ScalarOrSchedule | _threshold.AutoTau = 0.97,
  *,
  rule: str | rules.Rule = "sequential",
  num_microbatches: int | None = None,
  axis_name: _placement.AxisName | None = None,
  collective: str = "all_to_all",
  sharded_params: bool = False,
  granularity: str = "global",
  temperature: float | None = None,
  adaptive_tau: _threshold.AdaptiveTau | None = None,
) -> aggregating.Aggregator:
  r"""Gradient Agreement Filtering: average only the microgradients that agree.

  Given microgradients ``g_1 .. g_N`` (every leaf ``[N, *param_shape]``, or
  a :class:`GhostMicrogradients`), GAF computes their Gram matrix
  ``G[i, j] = <g_i, g_j>`` in float32, lets ``rule`` decide from it which
  ones agree (cosine distances over the whole pytree), and returns their
  weighted sum in the gradients' dtype.

  Non-finite or zero microgradients are excluded, as if absent. When nothing
  agrees (or fewer than two are usable), the update is zeros and
  ``state.ready`` is False, so :func:`optax_gaf.process` skips its
  postprocessor (a true skip); in ``optax.chain`` the zeros reach the
  optimizer, whose momentum still moves the parameters.

  A plain transformation before gaf sees the stacked tree as one gradient
  (a clip acts on all N together); :func:`optax_gaf.per_microgradient`
  maps it over each microgradient.

  Args:
    tau: cosine distance threshold in ``[0, 2]`` (2: the plain mean), a
      schedule of the step count, or an :class:`AutoTau`.
    rule: ``"sequential"`` (the paper's), ``"pairwise"``, ``"medoid"``,
      ``"soft"`` (:mod:`optax_gaf.rules`) or a :class:`~optax_gaf.rules.Rule`.
    num_microbatches: N (global, with ``axis_name``). When given, the state
      records ``accepted`` and ``cosine_distance`` ``[N]`` and ``update``
      checks N; when None those fields are None and any N works.
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
    adaptive_tau: an :class:`AdaptiveTau` (``min(tau, mean + k * std)`` of
      recent cosine distances).

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` with
    :class:`GAFState`.

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
  config = _configure(
      tau, rule, num_microbatches, axis_name, collective, sharded_params,
      granularity, temperature, adaptive_tau,
  )  # fmt: skip
  return aggregating.Aggregator(
    functools.partial(_init, config), functools.partial(_update, config)
  )


def streamed(num_microbatches: int | None = None) -> aggregating.Aggregator:
  """Records :class:`FilteredGradients` in a :class:`GAFState`.

  :func:`streaming_grads` and :func:`gaf_accumulator` filter one microgradient
  at a time; this aggregator passes their update on and keeps the same state
  and diagnostics as :func:`gaf`, so ``aggregating.process`` can skip the
  optimizer on a no-agreement step.

  Args:
    num_microbatches: N. When given, the state records ``accepted`` and
      ``cosine_distance`` ``[N]``; when None they are None.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` whose ``update``
    takes :class:`FilteredGradients`.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> from optax.experimental import aggregating
    >>> loss = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
    >>> grad_fn = optax_gaf.streaming_grads(loss, 2, tau=0.5)
    >>> tx = aggregating.process(optax.identity(),
    ...                          optax_gaf.streamed(num_microbatches=2),
    ...                          optax.sgd(0.1))
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> _, filtered = grad_fn(params, jnp.array([[1.0, 0.0], [1.0, 0.1]]))
    >>> updates, state = tx.update(filtered, state, params)
    >>> optax_gaf.stats(state)["accepted"]
    Array([ True,  True], dtype=bool)
  """
  n = None
  if num_microbatches is not None:
    n = _checks.num_microbatches(num_microbatches)

  def init_fn(params):
    del params
    return _init_state(jnp.nan, n)

  def update_fn(filtered, state, params=None, **extra_args):
    del params, extra_args
    if not isinstance(filtered, _streaming.FilteredGradients):
      raise TypeError(
        "streamed() records the FilteredGradients of streaming_grads or"
        f" gaf_accumulator; got {type(filtered).__name__}. For stacked"
        " microgradients [N, ...] use gaf()."
      )
    if n is not None and filtered.accepted.shape[-1] != n:
      raise ValueError(
        f"streamed(num_microbatches={n}) got FilteredGradients of"
        f" {filtered.accepted.shape[-1]} microgradients."
      )
    state = _record(state, filtered, filtered.tau, filtered.gradient_diversity)
    if filtered.num_microgradients is not None:  # fewer fed than N
      fed = jnp.maximum(filtered.num_microgradients, 1)
      rate = (state.num_accepted / fed).astype(jnp.float32)
      state = state._replace(acceptance_rate=rate)
    return filtered.updates, state

  return aggregating.Aggregator(init_fn, update_fn)


def ghost_grads(
  loss_fn: Any,
  num_microbatches: int,
  tau: float | jax.Array,
  *,
  rule: str | rules.Rule = "sequential",
  has_aux: bool = False,
  route: str = "auto",
) -> Any:
  """:func:`streaming_grads`' contract on :func:`ghost_microgradients`.

  Filters inside the gradient function and returns
  :class:`FilteredGradients` for :func:`streamed`, with no N x P arrays.
  For schedules, :class:`AdaptiveTau`, :class:`AutoTau` or ``per_leaf``
  (which keep state) pass :func:`ghost_microgradients`' output to
  :func:`gaf` instead.

  Args:
    loss_fn: ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)``
      with ``has_aux=True``), the scalar mean loss of one microbatch.
    num_microbatches: N; the batch size must be a multiple of it.
    tau: the cosine distance threshold in ``[0, 2]``, a scalar.
    rule: any rule :func:`gaf` takes: a name or a
      :class:`~optax_gaf.rules.Rule`.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    route: as in :func:`ghost_microgradients`.

  Returns:
    ``fn(params, batch, *args) -> (losses, filtered)`` as
    :func:`streaming_grads` returns.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
    >>> batch = {"x": jnp.eye(4, 3), "y": jnp.array([1.0, 1.0, -1.0, 0.0])}
    >>> grad_fn = optax_gaf.ghost_grads(loss, 4, tau=0.9)
    >>> tx = optax_gaf.process(optax.identity(),
    ...     optax_gaf.streamed(num_microbatches=4), optax.sgd(0.1))
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> losses, filtered = grad_fn(params, batch)
    >>> updates, state = tx.update(filtered, state, params)
    >>> optax_gaf.stats(state)["ready"]  # orthogonal: nothing agrees
    Array(False, dtype=bool)
  """
  _threshold.check_tau(tau, allow_schedule=False)
  config = _configure(
      tau, rule, num_microbatches, None, "all_to_all", False, "global", None,
      None,
  )  # fmt: skip
  grad_fn = _ghost.ghost_microgradients(
    loss_fn, num_microbatches, has_aux=has_aux, route=route
  )

  def fn(params, batch, *args):
    values, ghost = grad_fn(params, batch, *args)
    leaves = ghost.virtual_leaves
    t = jnp.asarray(tau, _gram.stat_dtype(leaves))
    updates, out, diversity = _route(config, ghost, leaves, t)
    filtered = _streaming._filtered(
      ghost.treedef.unflatten(updates), out, tau, diversity
    )
    return values, filtered

  return fn
