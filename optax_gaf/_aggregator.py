"""``gaf()``: the three stages wired into an Optax aggregator."""

import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree
from optax.experimental import aggregating

from optax_gaf import _collectives
from optax_gaf import _rules
from optax_gaf import _statistics
from optax_gaf import _streaming


class GAFState(NamedTuple):
  """State of :func:`gaf`. Shapes and dtypes never change after ``init``.

  Attributes:
    count: int32, the number of ``update`` calls so far; a ``tau`` schedule is
      evaluated at it.
    ready: bool, False on a no-agreement step. ``aggregating.process`` reads it
      to skip the inner optimizer on that step.
    tau: float32, the threshold used at the last step.
    num_accepted: int32, the number of marks in ``accepted``.
    acceptance_rate: float32, ``num_accepted / N`` at the last step.
    accepted: bool ``[N]``, the anchor and every microgradient taken into the
      result (on a no-agreement step, the anchor only). Shape ``[0]`` when
      ``num_microbatches`` was not given to :func:`gaf`.
    cosine_distance: float32 ``[N]``, each microgradient's cosine distance when
      it was compared: 0 for the anchor, NaN for a non-finite or zero one.
      Shape ``[0]`` when ``num_microbatches`` was not given.
    skipped_steps: int32, the number of no-agreement steps so far.
    gradient_diversity: float32, ``sum_i ||g_i||^2 / ||sum_i g_i||^2`` over the
      usable microgradients (Yin et al. 2018), free from the Gram matrix.
    leaf_acceptance_rate: float32 ``[L]``, with ``granularity="per_leaf"`` the
      fraction of microgradients accepted in each leaf (in ``jax.tree.leaves``
      order); shape ``[0]`` otherwise. With ``per_leaf``, ``accepted`` and
      ``cosine_distance`` have shape ``[L, N]``.
    tau_history: float32 ``[M]``, the last M recorded cosine distances for an
      :class:`AdaptiveTau` threshold (NaN where empty); shape ``[0]`` without.
  """

  count: jax.Array
  ready: jax.Array
  tau: jax.Array
  num_accepted: jax.Array
  acceptance_rate: jax.Array
  accepted: jax.Array
  cosine_distance: jax.Array
  skipped_steps: jax.Array
  gradient_diversity: jax.Array
  leaf_acceptance_rate: jax.Array
  tau_history: jax.Array


def _check_tau(tau: Any) -> None:
  """Raises on a concrete tau outside [0, 2]; traced values pass through."""
  try:
    value = np.asarray(tau, dtype=np.float64)
  except (
    TypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.ConcretizationTypeError,
  ):
    return  # a tracer (e.g. inside inject_hyperparams under jit)
  if value.shape != ():
    raise ValueError(f"tau must be a scalar, got shape {value.shape}.")
  if not 0.0 <= float(value) <= 2.0:
    raise ValueError(
      f"tau is a cosine distance threshold and must lie in [0, 2]; got {tau}."
    )


def _static_int(value: Any, name: str) -> int:
  try:
    return int(value)
  except jax.errors.ConcretizationTypeError as e:
    raise TypeError(
      f"{name} sets the state's shapes and must be a static Python int. With"
      f" optax.inject_hyperparams, pass static_args=('{name}',)."
    ) from e


def check_microgradients(grads, params=None) -> int:
  """Validates the microgradient pytree and returns its leading size.

  Raises:
    ValueError: with a message that names the problem.
  """
  path_leaves = jax.tree_util.tree_leaves_with_path(grads)
  if not path_leaves:
    raise ValueError("The microgradients pytree has no leaves.")
  sizes = {}
  for path, x in path_leaves:
    name = jax.tree_util.keystr(path) or "<root>"
    if jnp.ndim(x) < 1:
      raise ValueError(
        f"Microgradient leaf {name} is a scalar; every leaf needs a leading"
        " microbatch axis [N, ...]. Did you pass an averaged gradient?"
      )
    sizes[name] = jnp.shape(x)[0]
  if len(set(sizes.values())) > 1:
    raise ValueError(
      f"Microgradient leaves disagree on the leading microbatch axis: {sizes}."
    )
  if params is not None:
    if jax.tree.structure(params) != jax.tree.structure(grads):
      raise ValueError(
        "The microgradients and params have different tree structures:"
        f" {jax.tree.structure(grads)} vs {jax.tree.structure(params)}."
      )
    for (path, g), p in zip(path_leaves, jax.tree.leaves(params)):
      if jnp.shape(g)[1:] != jnp.shape(p):
        raise ValueError(
          f"Microgradient leaf {jax.tree_util.keystr(path)} has shape"
          f" {jnp.shape(g)}, so its trailing shape {jnp.shape(g)[1:]} does"
          f" not match the parameter's shape {jnp.shape(p)}. Leaves must be"
          " [N, *param.shape]."
        )
  return next(iter(sizes.values()))


def gram_stage(grads, params, placement, per_leaf=False):
  """Stage 1 as every aggregator runs it: checks, Gram matrix, usable mask.

  Returns:
    ``(leaves, treedef, n, gram, usable)``: the flat leaves, N over all
    devices, the sanitized Gram matrix (``[N, N]``, or ``[L, N, N]``) and the
    mask of finite, nonzero microgradients.
  """
  n_local = check_microgradients(grads, params)
  n = placement.num_microgradients(n_local)
  leaves, treedef = jax.tree.flatten(grads)
  gram, usable = _statistics.sanitized(
    placement.gram(leaves, per_leaf=per_leaf)
  )
  return leaves, treedef, n, gram, usable


def _check_adaptive_tau(adaptive_tau) -> int:
  """Validates an :class:`AdaptiveTau` and returns its history length."""
  if adaptive_tau is None:
    return 0
  if not isinstance(adaptive_tau, _rules.AdaptiveTau):
    raise TypeError(
      "adaptive_tau must be an optax_gaf.AdaptiveTau(k, history, min_count);"
      f" got {type(adaptive_tau).__name__}."
    )
  history = _static_int(adaptive_tau.history, "history")
  if history < 2 or not 2 <= adaptive_tau.min_count <= history:
    raise ValueError(
      "AdaptiveTau needs history >= 2 and 2 <= min_count <= history; got"
      f" {adaptive_tau}."
    )
  if not np.isfinite(adaptive_tau.k):
    raise ValueError(f"AdaptiveTau.k must be finite; got {adaptive_tau.k}.")
  return history


def gaf(
  tau: float | optax.ScalarOrSchedule = 0.97,
  *,
  rule: str = "sequential",
  num_microbatches: int | None = None,
  axis_name: _collectives.AxisName | None = None,
  collective: str = "all_to_all",
  granularity: str = "global",
  temperature: float | None = None,
  adaptive_tau: _rules.AdaptiveTau | None = None,
) -> aggregating.Aggregator:
  r"""Gradient Agreement Filtering: average only the microgradients that agree.

  Given microgradients ``g_1 .. g_N`` (every leaf ``[N, *param_shape]``), GAF
  computes their Gram matrix ``G[i, j] = <g_i, g_j>`` in float32, lets ``rule``
  decide from it which ones agree, and returns their weighted sum in the
  gradients' dtype. Cosine distances are taken over the whole pytree.

  Rules:

  * ``"sequential"`` (the paper's Algorithm 1): the first usable
    microgradient is the anchor; each later ``g_i`` is accepted iff
    ``1 - cos(g_i, mean of accepted so far) <= tau``. Output: the mean of the
    accepted microgradients.
  * ``"pairwise"`` (the authors' package, ``step_GAF``): as above, but on
    agreement the aggregate becomes ``(G + g_i) / 2``.
  * ``"medoid"`` (order-invariant): the anchor is the microgradient with the
    most neighbours within ``tau``; output: the mean of it and its neighbours.
  * ``"soft"``: weights ``sigmoid((tau - d_i) / temperature)`` on the cosine
    distances ``d_i`` to the medoid anchor, output ``sum w_i g_i / sum w_i``;
    a no-agreement step when ``sum`` of the non-anchor weights is below 1/2.

  Microgradients that are non-finite or zero are excluded, as if absent. When
  no microgradient agrees with the anchor (or fewer than two are usable), the
  step is a *no-agreement step*: the updates are zeros and ``state.ready`` is
  False, so :func:`optax.experimental.aggregating.process` skips its
  postprocessor. In ``optax.chain(gaf(...), opt)`` the zeros still reach
  ``opt``, whose momentum and weight decay move the parameters.

  Speed and memory: on one device, ``"sequential"`` and ``"pairwise"`` with
  N > 16 skip the Gram matrix and compare each microgradient with a
  materialized running aggregate, in blocks of 16 (same decisions; distances
  and update equal to float32 rounding). ``update`` also accepts the
  :class:`FilteredGradients` of :func:`streaming_grads` or
  :func:`gaf_accumulator`, which filter one microgradient at a time so the N
  microgradients never sit in memory together.

  Args:
    tau: cosine distance threshold in ``[0, 2]``, or a schedule of the step
      count. ``tau=2`` accepts everything (the plain mean); ``tau=0`` accepts
      only exact alignment.
    rule: ``"sequential"``, ``"pairwise"``, ``"medoid"`` or ``"soft"``.
    num_microbatches: N. When given, the state records per-microgradient
      ``accepted`` and ``cosine_distance`` of shape ``[N]`` and ``update``
      checks N. When None, those fields have shape ``[0]`` and the same
      optimizer state works for any N. With ``axis_name``, N is the global
      count over all devices.
    axis_name: None on one device. Inside ``jax.shard_map`` or ``jax.pmap``,
      the mesh axis name (or tuple of names, as in ``jax.lax.psum``) that the
      microgradients are spread over: each device passes its own
      ``[n_local, ...]`` leaves, and GAF decides over all
      ``N = D * n_local`` in device-major order, exactly as one device would.
      The updates and state are bitwise identical on every device (declarable
      with ``out_specs=P()``). Under plain ``jax.jit`` with global ``[N, ...]``
      microgradients sharded over a mesh axis, name that axis (and enter
      ``jax.set_mesh``) or shard over Explicit axes: sharding constraints then
      make XLA take the all-to-all plan instead of gathering all N.
    collective: with ``axis_name``, ``"all_to_all"`` (default; about the
      traffic of one all-reduce, like ``pmean``) or ``"all_gather"`` (gathers
      every microgradient onto every device).
    granularity: ``"global"`` (the paper: one decision over the whole pytree)
      or ``"per_leaf"`` (every parameter tensor is filtered on its own, with
      its own Gram matrix, decisions and no-agreement; ``state.ready`` is False
      only when no leaf agrees).
    temperature: the ``"soft"`` rule's temperature (default 0.05); > 0.
    adaptive_tau: an :class:`AdaptiveTau` to use ``min(tau, mean + k * std)``
      of recent cosine distances as the threshold; works with every rule.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` with
    :class:`GAFState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_gaf
    >>> params = jnp.zeros(3)
    >>> tx = optax.chain(optax_gaf.gaf(tau=0.5, num_microbatches=3),
    ...                  optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> grads = jnp.array([[1.0, 0.0, 0.0], [1.0, 0.2, 0.0], [-1.0, 0.0, 0.0]])
    >>> updates, state = tx.update(grads, state, params)
    >>> updates
    Array([-1. , -0.1, -0. ], dtype=float32)
    >>> optax_gaf.stats(state)["accepted"]
    Array([ True,  True, False], dtype=bool)

  References:
    Chaubard, Eddy and Kochenderfer, `Beyond Gradient Averaging in Parallel
    Optimization: Improved Robustness through Gradient Agreement Filtering
    <https://arxiv.org/abs/2412.18052>`_, 2024.
  """
  if rule not in _rules.RULES:
    raise ValueError(
      f"Unknown GAF rule {rule!r}; choose one of {sorted(_rules.RULES)}."
    )
  rule_fn = _rules.RULES[rule]
  if temperature is not None:
    if rule != "soft":
      raise ValueError(
        f"temperature is a parameter of rule='soft', not {rule!r}."
      )
    if not float(temperature) > 0:
      raise ValueError(f"temperature must be > 0; got {temperature}.")
    rule_fn = functools.partial(rule_fn, temperature=temperature)
  if granularity not in ("global", "per_leaf"):
    raise ValueError(
      f"granularity must be 'global' or 'per_leaf'; got {granularity!r}."
    )
  per_leaf = granularity == "per_leaf"
  if per_leaf:
    rule_fn = jax.vmap(rule_fn, in_axes=(0, 0, None))
  n_history = _check_adaptive_tau(adaptive_tau)
  if callable(tau):
    _check_tau(tau(0))
  else:
    _check_tau(tau)
  if num_microbatches is not None:
    num_microbatches = _static_int(num_microbatches, "num_microbatches")
    if num_microbatches < 2:
      raise ValueError(
        f"GAF compares microgradients and needs num_microbatches >= 2; got"
        f" {num_microbatches}."
      )
  n_state = 0 if num_microbatches is None else num_microbatches
  placement = _collectives.make_placement(axis_name, collective)

  def init_fn(params):
    n_leaves = len(jax.tree.leaves(params)) if per_leaf else 0
    if per_leaf and not n_leaves:
      raise ValueError(
        "gaf(granularity='per_leaf') sizes its per-leaf statistics from the"
        " params: pass them to init (got no leaves)."
      )
    per_n = (n_leaves, n_state) if per_leaf and n_state else (n_state,)
    return GAFState(
      count=jnp.zeros([], jnp.int32),
      ready=jnp.ones([], bool),
      tau=jnp.asarray(tau(0) if callable(tau) else tau, jnp.float32),
      num_accepted=jnp.zeros([], jnp.int32),
      acceptance_rate=jnp.zeros([], jnp.float32),
      accepted=jnp.zeros(per_n, bool),
      cosine_distance=jnp.zeros(per_n, jnp.float32),
      skipped_steps=jnp.zeros([], jnp.int32),
      gradient_diversity=jnp.zeros([], jnp.float32),
      leaf_acceptance_rate=jnp.zeros([n_leaves], jnp.float32),
      tau_history=jnp.full([n_history], jnp.nan, jnp.float32),
    )

  def update_fn(grads, state, params=None):
    if isinstance(grads, _streaming.FilteredGradients):
      # Filtered already, one microgradient at a time (streaming_grads).
      _check_filtered(grads)
      return grads.updates, _record(
        state, grads, grads.tau, _streaming.gradient_diversity(grads)
      )
    n_local = check_microgradients(grads, params)
    n = placement.num_microgradients(n_local)
    if n < 2:
      raise ValueError(
        f"GAF needs at least 2 microgradients to compare; got N={n}."
      )
    if num_microbatches is not None and n != num_microbatches:
      raise ValueError(
        f"gaf(num_microbatches={num_microbatches}) got {n} microgradients."
      )
    tau_t = jnp.asarray(tau(state.count) if callable(tau) else tau, jnp.float32)
    leaves, treedef = jax.tree.flatten(grads)

    if adaptive_tau is not None:
      tau_t = _rules.adaptive_threshold(
        state.tau_history, tau_t, adaptive_tau.k, adaptive_tau.min_count
      )

    if _streaming.takes_fast_path(placement, leaves, rule, per_leaf):
      # No Gram matrix: N dot products with the running aggregate.
      out = _streaming.filter_microgradients(grads, tau_t, rule)
      return out.updates, _record(
        state, out, tau_t, _streaming.gradient_diversity(out)
      )

    # per_leaf: [L, N, N] Gram matrices, [L, N] usable/weights/decisions.
    gram, usable = _statistics.sanitized(
      placement.gram(leaves, per_leaf=per_leaf)
    )
    out = rule_fn(gram, usable, tau_t)
    updates = treedef.unflatten(placement.combine(leaves, out.weights, usable))
    return updates, _record(
      state, out, tau_t, _statistics.gradient_diversity(gram)
    )

  def _check_filtered(filtered):
    n = filtered.accepted.shape[-1]
    if per_leaf or axis_name is not None:
      raise ValueError(
        "FilteredGradients (streaming GAF) work with gaf()'s default"
        " granularity='global' on one device (axis_name=None)."
      )
    if rule not in _streaming.RUNNING_RULES or adaptive_tau is not None:
      # The decisions were made upstream; these settings would be ignored.
      raise ValueError(
        "FilteredGradients were already filtered by streaming_grads or"
        " gaf_accumulator, with their own tau and rule; gaf(rule="
        f"{rule!r}, adaptive_tau={adaptive_tau!r}) cannot apply here. Use"
        f" rule in {sorted(_streaming.RUNNING_RULES)} and no adaptive_tau."
      )
    if num_microbatches is not None and n != num_microbatches:
      raise ValueError(
        f"gaf(num_microbatches={num_microbatches}) got FilteredGradients of"
        f" {n} microgradients."
      )

  def _record(state, out, tau_t, diversity):
    """The new state from a step's decisions (any path)."""
    ready = jnp.any(out.ready)
    num_accepted = jnp.sum(out.accepted, dtype=jnp.int32)
    return GAFState(
      count=optax.safe_increment(state.count),
      ready=ready,
      tau=tau_t,
      num_accepted=num_accepted,
      acceptance_rate=jnp.mean(out.accepted, dtype=jnp.float32),
      accepted=out.accepted if n_state else state.accepted,
      cosine_distance=out.cosine_distance if n_state else state.cosine_distance,
      skipped_steps=state.skipped_steps + (~ready).astype(jnp.int32),
      gradient_diversity=diversity,
      leaf_acceptance_rate=jnp.mean(out.accepted, axis=-1, dtype=jnp.float32)
      if per_leaf
      else state.leaf_acceptance_rate,
      tau_history=_rules.record_distances(
        state.tau_history, out.cosine_distance
      )
      if adaptive_tau is not None
      else state.tau_history,
    )

  return aggregating.Aggregator(init_fn, update_fn)


_STAT_FIELDS = (
  "count",
  "ready",
  "tau",
  "num_accepted",
  "acceptance_rate",
  "accepted",
  "cosine_distance",
  "skipped_steps",
  "gradient_diversity",
  "leaf_acceptance_rate",
  "tau_history",
)


# The states stats() reads, by name (optax.tree.get matches NamedTuple names).
_STATE_NAMES = ("GAFState", "AndMaskState", "AdaConsState")


def stats(opt_state: optax.OptState) -> dict[str, jax.Array]:
  """Collects the :class:`GAFState` diagnostics for logging.

  Args:
    opt_state: an optimizer state that holds exactly one :class:`GAFState`
      (or ``AndMaskState`` / ``AdaConsState`` of :func:`and_mask` /
      :func:`adacons`, whose fields are returned as they are), anywhere
      (``optax.chain``, ``aggregating.process``, ``inject_hyperparams``).

  Returns:
    A dict with the state's fields (``count``, ``ready``, ``tau``,
    ``num_accepted``, ``acceptance_rate``, ``accepted``, ``cosine_distance``,
    ``skipped_steps``, ``gradient_diversity``) and ``skip_rate``, the fraction
    of steps so far that were no-agreement steps.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> tx = optax.chain(optax_gaf.gaf(0.9), optax.sgd(0.1))
    >>> state = tx.init(jnp.zeros(2))
    >>> _, state = tx.update(jnp.eye(2), state)  # orthogonal: distance 1
    >>> s = optax_gaf.stats(state)
    >>> bool(s["ready"]), int(s["skipped_steps"]), float(s["skip_rate"])
    (False, 1, 1.0)
  """
  found = [tree.get(opt_state, name, None) for name in _STATE_NAMES]
  found = [s for s in found if s is not None]
  if not found:
    raise ValueError("opt_state holds no GAFState; is gaf() in the optimizer?")
  if len(found) > 1:
    raise ValueError("opt_state holds more than one aggregator state.")
  gaf_state = found[0]
  if isinstance(gaf_state, GAFState):
    out = {name: getattr(gaf_state, name) for name in _STAT_FIELDS}
  else:  # and_mask, adacons: all their fields are diagnostics
    out = gaf_state._asdict()
  out["skip_rate"] = gaf_state.skipped_steps / jnp.maximum(gaf_state.count, 1)
  return out
