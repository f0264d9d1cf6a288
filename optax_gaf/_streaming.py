"""Streaming GAF: one microgradient at a time, memory independent of N.

With ``vmap`` all N microgradients sit in memory together. Here they are
computed one at a time and folded into the running aggregate of the
running-aggregate rules (``sequential``, ``pairwise``) with the block route's
kernel, :func:`optax_gaf._running.absorb`, in blocks of one. The carry holds
the running aggregate and the running sum (two float32 copies of the
parameters) and a few ``[N]`` vectors.

Both entry points return :class:`FilteredGradients`, which
:func:`optax_gaf.record_filtered` records into a ``GAFState`` (whose
``ready`` lets ``aggregating.process`` skip the optimizer).
"""

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.experimental import aggregating

from optax_gaf import _checks
from optax_gaf import _gram
from optax_gaf import _microbatching
from optax_gaf import _running
from optax_gaf import _state
from optax_gaf import _threshold
from optax_gaf import rules


class FilteredGradients(NamedTuple):
  """The outcome of one streamed GAF step, before it reaches the optimizer.

  Attributes:
    updates: the filtered update, shaped like the parameters, in the
      microgradients' dtype. Zeros on a no-agreement step.
    ready: bool, False on a no-agreement step.
    tau: float32, the threshold used.
    accepted: bool ``[N]``, as in ``GAFState``.
    cosine_distance: float32 ``[N]``, as in ``GAFState``.
    weights: float32 ``[N]``, ``updates = sum_i weights[i] * g_i``.
    gradient_diversity: float32, ``sum_i ||g_i||^2 / ||sum_i g_i||^2`` over
      the usable microgradients.
    num_microgradients: int32, how many were fed: N, or fewer when the loop
      stopped early (``num_real_microbatches``); the slots past it are not
      accepted and their distance is NaN. ``acceptance_rate`` divides by it.
  """

  updates: Any
  ready: jax.Array
  tau: jax.Array
  accepted: jax.Array
  cosine_distance: jax.Array
  weights: jax.Array
  gradient_diversity: jax.Array
  num_microgradients: jax.Array | None = None


def _check_stream_args(tau, rule) -> float:
  _threshold.check_tau(tau, allow_schedule=False)
  fn = rules.BY_NAME.get(rule) if isinstance(rule, str) else rule
  shrink = _running.shrink_of(fn)
  if shrink is None:
    raise ValueError(
      "Streaming GAF supports the running-aggregate rules 'sequential' and"
      f" 'pairwise'; got rule={rule!r}. Rules that need the whole Gram"
      " matrix work only on stacked microgradients via gaf()."
    )
  return shrink


def filtered_gradients(updates, out, tau, diversity) -> FilteredGradients:
  """:class:`FilteredGradients` from an update tree and a step's decisions.

  Args:
    updates: the filtered update, shaped like the params.
    out: the step's :class:`~optax_gaf.rules.RuleOutput`.
    tau: the threshold used (a scalar).
    diversity: the step's gradient diversity.
  """
  return FilteredGradients(
    updates=updates,
    ready=out.ready,
    tau=jnp.asarray(tau, jnp.float32),
    accepted=out.accepted,
    cosine_distance=out.cosine_distance,
    weights=out.weights,
    gradient_diversity=diversity,
  )


def gaf_accumulator(
  tau: float | jax.Array,
  *,
  rule: str | rules.Rule = "sequential",
  num_microbatches: int,
) -> optax.microbatching.Accumulator:
  """GAF as an :class:`optax.microbatching.Accumulator`, one at a time.

  Feed the result to :func:`optax_gaf.record_filtered` (see there for the
  pattern).

  Args:
    tau: the cosine distance threshold in ``[0, 2]``, a scalar (evaluate a
      schedule yourself, e.g. at ``optax_gaf.stats(opt_state)["count"]``).
    rule: ``"sequential"`` or ``"pairwise"``. Rules that need the whole Gram
      matrix cannot stream.
    num_microbatches: N, the number of microgradients the loop will feed.

  Returns:
    An accumulator whose ``finalize`` gives :class:`FilteredGradients`. Its
    ``aggregate`` filters stacked microgradients. More than N fed is an
    error when the result is read; fewer (``num_real_microbatches``) are
    filtered as they are. ``micro_vmap``, which would filter the filtered
    chunks again, is refused.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_gaf
    >>> loss = lambda w, x: jnp.sum(w * x)  # gradient: x
    >>> acc = optax_gaf.gaf_accumulator(0.5, num_microbatches=3)
    >>> xs = jnp.array([[1.0, 0.0], [1.0, 0.2], [-1.0, 0.0]])
    >>> grad_fn = optax.microbatching.microbatch(
    ...     jax.grad(loss), argnums=1, microbatch_size=1, accumulator=acc)
    >>> out = grad_fn(jnp.zeros(2), xs)
    >>> out.updates, out.accepted
    (Array([1. , 0.1], dtype=float32), Array([ True,  True, False], dtype=bool))
  """
  shrink = _check_stream_args(tau, rule)
  n = _checks.num_microbatches(num_microbatches)
  # finalize needs the tree structure and dtypes, which only init sees: keep
  # them in the closure at trace time.
  meta = {}

  def init(value):
    _refuse_filtered(value)
    leaves, meta["treedef"] = jax.tree.flatten(value)
    meta["dtypes"] = [x.dtype for x in leaves]
    dtype = _gram.stat_dtype(leaves)
    carry = _running.init_carry([x.shape for x in leaves], n, dtype)
    return carry, jnp.zeros([], jnp.int32)

  def update(state, value, index):
    _refuse_filtered(value)
    index = jnp.asarray(index, jnp.int32)
    _raise_if(index >= n, _too_many, index, n)
    return _absorb_one(state, value, index, n, tau, shrink)

  def finalize(state):
    carry, fed = state
    updates, out, diversity = _running.finish_guarded(
      carry, shrink, meta["dtypes"]
    )
    # Slots never fed (num_real_microbatches < N) were not compared.
    fed_mask = jnp.arange(n) < fed
    out = out._replace(
      cosine_distance=jnp.where(fed_mask, out.cosine_distance, jnp.nan)
    )
    updates = meta["treedef"].unflatten(updates)
    filtered = filtered_gradients(updates, out, tau, diversity)
    return filtered._replace(num_microgradients=jnp.minimum(fed, n))

  aggregate = functools.partial(_filter_stacked, tau=tau, shrink=shrink)
  return optax.microbatching.Accumulator(init, update, finalize, aggregate)


def _filter_stacked(values, *, tau, shrink) -> FilteredGradients:
  """``gaf_accumulator``'s ``aggregate``: stacked microgradients, blocks."""
  _refuse_filtered(values)
  leaves, treedef = jax.tree.flatten(values)
  carry = _running.filter_blocks(leaves, tau, shrink)
  dtypes = [x.dtype for x in leaves]
  updates, out, diversity = _running.finish_guarded(carry, shrink, dtypes)
  updates = treedef.unflatten(updates)
  filtered = filtered_gradients(updates, out, tau, diversity)
  return filtered._replace(num_microgradients=jnp.int32(leaves[0].shape[0]))


def _absorb_one(state, value, index, n, tau, shrink, guard=True):
  """Folds one microgradient in at ``index``; counts it as fed.

  Past N there is no slot: with ``guard`` the carry stays as it is (one
  select per carry entry; off where ``index < n`` is known).
  """
  carry, fed = state
  block = [x[None] for x in jax.tree.leaves(value)]
  if not guard:
    return _running.absorb(carry, block, index, tau, shrink), fed + 1
  new = _running.absorb(carry, block, jnp.minimum(index, n - 1), tau, shrink)
  carry = jax.tree.map(lambda a, b: jnp.where(index < n, a, b), new, carry)
  return carry, fed + 1


def _refuse_filtered(value) -> None:
  if isinstance(value, FilteredGradients):
    raise TypeError(
      "gaf_accumulator got FilteredGradients as a microgradient: inside"
      " optax.microbatching.micro_vmap its aggregate filters each chunk and"
      " the chunks' results would be filtered again, bookkeeping included."
      " Use optax.microbatching.microbatch(jax.grad(loss), ...,"
      " microbatch_size=1, accumulator=gaf_accumulator(...)) for one"
      " microgradient per microbatch, optax_gaf.streaming_filtered_grads, or"
      " optax_gaf.microbatch_grads with gaf()."
    )


def _too_many(index, n):
  raise ValueError(
    f"gaf_accumulator(num_microbatches={n}) was fed microgradient index"
    f" {int(index)}: more microbatches than declared. Set num_microbatches"
    " to the number the loop feeds (batch size / microbatch_size for"
    " optax.microbatching.microbatch)."
  )


def _raise_if(pred, fn, *args) -> None:
  """Calls ``fn(*args)`` (which raises) on the host when ``pred`` holds.

  The index is traced inside the loop, so this is a runtime check: under
  ``jit`` the error surfaces when the result is read.
  """
  jax.lax.cond(
    pred,
    lambda: jax.debug.callback(fn, *args),
    lambda: None,
  )


def streaming_filtered_grads(
  loss_fn: Callable[..., Any],
  num_microbatches: int,
  tau: float | jax.Array,
  *,
  rule: str | rules.Rule = "sequential",
  has_aux: bool = False,
) -> Callable[..., tuple[Any, FilteredGradients]]:
  """Like :func:`optax_gaf.microbatch_grads`, but filters as it goes.

  The microbatches are the same contiguous slices as in ``microbatch_grads``;
  a ``lax.fori_loop`` computes one microgradient at a time and folds it into a
  :func:`gaf_accumulator`, so peak memory does not grow with N.

  Args:
    loss_fn: ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)``
      with ``has_aux=True``), the mean loss of one microbatch.
    num_microbatches: N; the batch size must be a multiple of it.
    tau: the cosine distance threshold in ``[0, 2]``, a scalar.
    rule: ``"sequential"`` or ``"pairwise"``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``fn(params, batch, *args) -> (losses, filtered)``: ``losses`` is ``[N]``
    (or ``([N], aux with a leading N axis)``); ``filtered`` is
    :class:`FilteredGradients`, for :func:`optax_gaf.record_filtered`.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> from optax.experimental import aggregating
    >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
    >>> batch = {"x": jnp.eye(4, 3), "y": jnp.array([1.0, 1.0, -1.0, 0.0])}
    >>> grad_fn = optax_gaf.streaming_filtered_grads(loss, 4, tau=0.9)
    >>> tx = aggregating.process(
    ...     optax.identity(), optax_gaf.record_filtered(num_microbatches=4),
    ...     optax.sgd(0.1, momentum=0.9))  # skipped on no-agreement steps
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> losses, filtered = grad_fn(params, batch)
    >>> updates, state = tx.update(filtered, state, params)
    >>> optax_gaf.stats(state)["ready"]  # orthogonal: nothing agrees
    Array(False, dtype=bool)
  """
  shrink = _check_stream_args(tau, rule)
  n = _checks.num_microbatches(num_microbatches)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def fn(params, batch, *args):
    # jnp: a NumPy batch cannot be indexed with the loop's traced index.
    micro = _microbatching.split_microbatches(batch, n)
    micro = jax.tree.map(jnp.asarray, micro)

    def one(i):
      b = jax.tree.map(lambda x: x[i], micro)
      return grad_fn(params, b, *args)

    loss0, grad0 = jax.eval_shape(one, 0)
    acc = gaf_accumulator(tau, rule=rule, num_microbatches=n)
    losses0 = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape, s.dtype), loss0)

    def body(i, carry):
      losses, acc_carry = carry
      loss, grad = one(i)
      losses = jax.tree.map(lambda l_, v: l_.at[i].set(v), losses, loss)
      # i < n here: no check or guard needed (acc.update has both).
      return losses, _absorb_one(acc_carry, grad, i, n, tau, shrink, False)

    losses, acc_carry = jax.lax.fori_loop(
      0, n, body, (losses0, acc.init(grad0))
    )
    return losses, acc.finalize(acc_carry)

  return fn


def record_filtered(
  num_microbatches: int | None = None,
) -> aggregating.Aggregator:
  """Records :class:`FilteredGradients` in a :class:`GAFState`.

  :func:`streaming_filtered_grads`, :func:`gaf_accumulator` and
  :func:`ghost_filtered_grads` filter one microgradient
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
    >>> grad_fn = optax_gaf.streaming_filtered_grads(loss, 2, tau=0.5)
    >>> tx = aggregating.process(optax.identity(),
    ...                          optax_gaf.record_filtered(num_microbatches=2),
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
    return _state.init_state(jnp.nan, n)

  def update_fn(filtered, state, params=None, **extra_args):
    del params, extra_args
    if not isinstance(filtered, FilteredGradients):
      raise TypeError(
        "record_filtered() records the FilteredGradients of"
        " streaming_filtered_grads, ghost_filtered_grads or gaf_accumulator;"
        f" got {type(filtered).__name__}. For stacked"
        " microgradients [N, ...] use gaf()."
      )
    if n is not None and filtered.accepted.shape[-1] != n:
      raise ValueError(
        f"record_filtered(num_microbatches={n}) got FilteredGradients of"
        f" {filtered.accepted.shape[-1]} microgradients."
      )
    state = _state.record(
      state, filtered, filtered.tau, filtered.gradient_diversity
    )
    if filtered.num_microgradients is not None:  # fewer fed than N
      fed = jnp.maximum(filtered.num_microgradients, 1)
      rate = (state.num_accepted / fed).astype(jnp.float32)
      state = state._replace(acceptance_rate=rate)
    return filtered.updates, state

  return aggregating.Aggregator(init_fn, update_fn)
