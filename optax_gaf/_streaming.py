"""The running-aggregate rules without the Gram matrix: fast and streaming.

``sequential`` and ``pairwise`` compare each microgradient only with the
running aggregate of those accepted before it. So instead of the ``N x N`` Gram
matrix (``2 N^2 P`` flops) they need ``N`` dot products with a materialized
aggregate (``O(N P)``). Two entry points share one kernel, :func:`_absorb`:

* :func:`filter_microgradients` takes all N microgradients at once (leaves
  ``[N, ...]``, the ``vmap`` path). It walks them in blocks of ``block_size``:
  one small Gram matrix per block for the in-block comparisons, one dot product
  per microgradient with the aggregate carried in from earlier blocks, and one
  pass to fold the block into the aggregate. ``gaf()`` dispatches here on one
  device.
* :func:`gaf_accumulator` is an :class:`optax.microbatching.Accumulator`: it
  takes one microgradient at a time, so the N microgradients never sit in
  memory together. :func:`streaming_grads` runs it over microbatches in a
  ``lax.fori_loop``.

Both return :class:`FilteredGradients`, which :func:`optax_gaf.gaf` accepts in
place of the stacked microgradients, to record the same :class:`GAFState`.
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gaf import _microbatching
from optax_gaf import _rules
from optax_gaf import _statistics

# On agreement the aggregate becomes ``shrink * (aggregate + g_i)``.
RUNNING_RULES = {"sequential": 1.0, "pairwise": 0.5}

_PRECISION = jax.lax.Precision.HIGHEST

# Microgradients per block on the vmap path: up to 16 one Gram matrix is
# cheapest, beyond it blocks of 16 (measured with benchmarks/block_size.py).
BLOCK_SIZE = 16


class FilteredGradients(NamedTuple):
  """The outcome of one GAF step, before it reaches the optimizer state.

  Attributes:
    updates: the filtered update, shaped like the parameters, in the
      microgradients' dtype. Zeros on a no-agreement step.
    ready: bool, False on a no-agreement step.
    tau: float32, the threshold used.
    accepted: bool ``[N]``, as in :class:`optax_gaf.GAFState`.
    cosine_distance: float32 ``[N]``, as in :class:`optax_gaf.GAFState`.
    weights: float32 ``[N]``, ``updates = sum_i weights[i] * g_i``.
    sum_sq_norms: float32, ``sum_i ||g_i||^2`` over usable microgradients.
    sq_norm_of_sum: float32, ``||sum_i g_i||^2`` over usable microgradients.
  """

  updates: Any
  ready: jax.Array
  tau: jax.Array
  accepted: jax.Array
  cosine_distance: jax.Array
  weights: jax.Array
  sum_sq_norms: jax.Array
  sq_norm_of_sum: jax.Array


class _Carry(NamedTuple):
  aggregate: list  # float32 leaves: running sum (sequential) or average
  total: list  # float32 leaves: sum of all usable microgradients
  agg_sq_norm: jax.Array
  has_anchor: jax.Array
  weights: jax.Array  # [N]: aggregate = sum_i weights[i] g_i
  taken: jax.Array  # [N]: anchor or agreed
  agreed: jax.Array  # [N]
  distance: jax.Array  # [N]
  sum_sq_norms: jax.Array


def check_rule(rule: str) -> float:
  """Returns the rule's shrink factor; raises for rules that need the Gram."""
  if rule not in RUNNING_RULES:
    raise ValueError(
      f"Streaming GAF supports the running-aggregate rules"
      f" {sorted(RUNNING_RULES)}; got rule={rule!r}. Rules that need the"
      " whole Gram matrix work only on stacked microgradients via gaf()."
    )
  return RUNNING_RULES[rule]


def _init(shapes: Sequence[tuple[int, ...]], n: int, empty: bool) -> _Carry:
  zeros = None if empty else [jnp.zeros(s, jnp.float32) for s in shapes]
  return _Carry(
    aggregate=zeros,
    total=zeros,
    agg_sq_norm=jnp.zeros([], jnp.float32),
    has_anchor=jnp.zeros([], bool),
    weights=jnp.zeros([n], jnp.float32),
    taken=jnp.zeros([n], bool),
    agreed=jnp.zeros([n], bool),
    distance=jnp.zeros([n], jnp.float32),
    sum_sq_norms=jnp.zeros([], jnp.float32),
  )


def _dot_with(x: jax.Array, y: jax.Array) -> jax.Array:
  """``<x_i, y>`` for ``x [B, ...]`` and ``y [...]``, as ``[B]`` float32."""
  return jnp.einsum(
    "ip,p->i",
    x.reshape(x.shape[0], -1),
    y.reshape(-1),
    precision=_PRECISION,
    preferred_element_type=jnp.float32,
  )


def _absorb(
  carry: _Carry, block: Sequence[jax.Array], offset, tau, shrink: float
) -> _Carry:
  """Compares microgradients ``block`` (leaves ``[B, ...]``) in order.

  They sit at positions ``offset .. offset + B - 1``. Within the block the
  aggregate is ``alpha * carried + sum_j w_j x_j``, so the dot product of
  ``x_j`` with it is ``alpha * <x_j, carried> + (G_block w)_j``: one ``B x B``
  Gram matrix and ``B`` dot products with the carried aggregate, then one pass
  to fold the block in.
  """
  gram, ok = _statistics.sanitized(_statistics.gram(block))
  sq_norms = jnp.diagonal(gram)
  if carry.aggregate is None:  # nothing carried in yet
    cross = None
  else:
    cross = sum(_dot_with(x, a) for x, a in zip(block, carry.aggregate))
    cross = jnp.where(ok, cross, 0.0)
  alpha, w, sq, has, taken, agreed, dist = _rules.stream_decisions(
    gram, ok, tau, shrink, cross, carry.agg_sq_norm, carry.has_anchor
  )

  rows = jnp.stack([w, ok.astype(jnp.float32)])
  folded = [_statistics.masked_tensordot(rows, x, ok) for x in block]
  if carry.aggregate is None:
    aggregate = [f[0] for f in folded]
    total = [f[1] for f in folded]
  else:
    aggregate = [alpha * a + f[0] for a, f in zip(carry.aggregate, folded)]
    total = [t + f[1] for t, f in zip(carry.total, folded)]

  def put(vec, new):
    return jax.lax.dynamic_update_slice(vec, new.astype(vec.dtype), (offset,))

  return _Carry(
    aggregate=aggregate,
    total=total,
    agg_sq_norm=sq,
    has_anchor=has,
    weights=put(alpha * carry.weights, w),
    taken=put(carry.taken, taken),
    agreed=put(carry.agreed, agreed),
    distance=put(carry.distance, dist),
    sum_sq_norms=carry.sum_sq_norms + jnp.sum(sq_norms),
  )


def _finish(
  carry: _Carry, tau, shrink: float, dtypes
) -> tuple[list, FilteredGradients]:
  ready = jnp.any(carry.agreed)
  # On a no-agreement step only the anchor stays marked.
  accepted = jnp.where(ready, carry.taken, carry.taken & ~carry.agreed)
  # The running sum's weights are 1 on the taken ones: divide by their number.
  norm = jnp.maximum(jnp.sum(carry.weights), 1.0) if shrink == 1.0 else 1.0
  scale = jnp.where(ready, 1.0 / norm, 0.0)
  updates = [(scale * a).astype(dt) for a, dt in zip(carry.aggregate, dtypes)]
  sq_norm_of_sum = sum(
    jnp.sum(jnp.square(t), dtype=jnp.float32) for t in carry.total
  )
  return updates, FilteredGradients(
    updates=None,
    ready=ready,
    tau=jnp.asarray(tau, jnp.float32),
    accepted=accepted,
    cosine_distance=carry.distance,
    weights=scale * carry.weights,
    sum_sq_norms=carry.sum_sq_norms,
    sq_norm_of_sum=sq_norm_of_sum,
  )


def takes_fast_path(placement, leaves, rule: str, per_leaf: bool) -> bool:
  """Whether ``gaf()`` should skip the Gram matrix.

  Only on one device, for global decisions by a running-aggregate rule, and
  for ``N > BLOCK_SIZE``: up to that, one Gram matrix is the one-block case
  and the Gram route gives bitwise the same numbers as ``per_leaf`` and the
  multi-device placements.
  """
  return (
    rule in RUNNING_RULES
    and not per_leaf
    and leaves[0].shape[0] > BLOCK_SIZE
    and getattr(placement, "axis_name", None) is None
    and isinstance(placement.resolve(leaves), _statistics.LocalPlacement)
  )


def gradient_diversity(out: FilteredGradients) -> jax.Array:
  """``sum_i ||g_i||^2 / ||sum_i g_i||^2``, as ``_statistics`` computes it."""
  total = out.sq_norm_of_sum
  return jnp.where(
    total > 0, out.sum_sq_norms / jnp.where(total > 0, total, 1.0), jnp.inf
  )


def filter_microgradients(
  grads, tau, rule: str = "sequential", *, block_size: int | None = None
) -> FilteredGradients:
  """GAF on stacked microgradients without their Gram matrix.

  Args:
    grads: a pytree whose leaves are ``[N, *param_shape]``.
    tau: the cosine distance threshold (a scalar, possibly traced).
    rule: ``"sequential"`` or ``"pairwise"``.
    block_size: microgradients per block (default :data:`BLOCK_SIZE`).
      ``block_size >= N`` is one Gram matrix of all N; 1 is a pure stream.

  Returns:
    :class:`FilteredGradients` with the same decisions as the Gram route.
  """
  shrink = check_rule(rule)
  leaves, treedef = jax.tree.flatten(grads)
  n = leaves[0].shape[0]
  b = min(n, BLOCK_SIZE if block_size is None else block_size)
  if b < 1:
    raise ValueError(f"block_size must be positive; got {block_size}.")
  # The first block starts the aggregate; whole blocks follow in a scan (so
  # the program does not grow with N), then the remainder.
  carry = _init([x.shape[1:] for x in leaves], n, empty=True)
  carry = _absorb(carry, [x[:b] for x in leaves], 0, tau, shrink)
  m = (n - b) // b
  if m:
    blocks = [x[b : b + m * b].reshape((m, b) + x.shape[1:]) for x in leaves]

    def body(carry, xs):
      k, block = xs
      return _absorb(carry, block, b + k * b, tau, shrink), None

    carry, _ = jax.lax.scan(body, carry, (jnp.arange(m), blocks))
  if b + m * b < n:
    rest = [x[b + m * b :] for x in leaves]
    carry = _absorb(carry, rest, b + m * b, tau, shrink)
  updates, out = _finish(carry, tau, shrink, [x.dtype for x in leaves])
  return out._replace(updates=treedef.unflatten(updates))


def gaf_accumulator(
  tau: float | jax.Array,
  *,
  rule: str = "sequential",
  num_microbatches: int,
) -> optax.microbatching.Accumulator:
  """GAF as an :class:`optax.microbatching.Accumulator`: one microgradient at a time.

  The carry holds the running aggregate and the sum of the microgradients (two
  float32 copies of the parameters) and a few ``[N]`` vectors, so the memory
  does not grow with N. Feed the result to :func:`optax_gaf.gaf` in place of
  stacked microgradients.

  Args:
    tau: the cosine distance threshold, a scalar (evaluate a schedule yourself,
      e.g. at ``optax_gaf.stats(opt_state)["count"]``).
    rule: ``"sequential"`` or ``"pairwise"``. Rules that need the whole Gram
      matrix cannot stream.
    num_microbatches: N, the number of microgradients the loop will feed.

  Returns:
    An accumulator whose ``finalize`` gives :class:`FilteredGradients`. Its
    ``aggregate`` (used by ``micro_vmap``) filters stacked microgradients.

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
  shrink = check_rule(rule)
  n = _static_n(num_microbatches)

  def init(value):
    leaves = jax.tree.leaves(value)
    return _init([x.shape for x in leaves], n, empty=False)

  def update(carry, value, index):
    block = [x[None] for x in jax.tree.leaves(value)]
    return _absorb(carry, block, index, tau, shrink)

  # finalize needs the tree structure and dtypes, which only init sees: keep
  # them in the closure at trace time.
  meta = {}

  def init_with_meta(value):
    meta["treedef"] = jax.tree.structure(value)
    meta["dtypes"] = [x.dtype for x in jax.tree.leaves(value)]
    return init(value)

  def finalize(carry):
    updates, out = _finish(carry, tau, shrink, meta["dtypes"])
    return out._replace(updates=meta["treedef"].unflatten(updates))

  def aggregate(values):
    return filter_microgradients(values, tau, rule)

  return optax.microbatching.Accumulator(
    init_with_meta, update, finalize, aggregate
  )


def _static_n(n: Any) -> int:
  if not isinstance(n, int) or isinstance(n, bool) or n < 2:
    raise ValueError(
      f"num_microbatches must be a Python int >= 2 (GAF compares"
      f" microgradients); got {n!r}."
    )
  return n


def streaming_grads(
  loss_fn: Callable[..., Any],
  num_microbatches: int,
  tau: float | jax.Array,
  *,
  rule: str = "sequential",
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
    tau: the cosine distance threshold, a scalar.
    rule: ``"sequential"`` or ``"pairwise"``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``fn(params, batch, *args) -> (losses, filtered)``: ``losses`` is ``[N]``
    (or ``([N], aux with a leading N axis)``); ``filtered`` is
    :class:`FilteredGradients`, to pass to ``gaf(...).update`` in place of
    the stacked microgradients.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> from optax.experimental import aggregating
    >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
    >>> batch = {"x": jnp.eye(4, 3), "y": jnp.array([1.0, 1.0, -1.0, 0.0])}
    >>> grad_fn = optax_gaf.streaming_grads(loss, 4, tau=0.9)
    >>> tx = aggregating.process(
    ...     optax.identity(), optax_gaf.gaf(0.9, num_microbatches=4),
    ...     optax.sgd(0.1, momentum=0.9))  # skipped on no-agreement steps
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> losses, filtered = grad_fn(params, batch)
    >>> updates, state = tx.update(filtered, state, params)
    >>> optax_gaf.stats(state)["ready"]  # orthogonal: nothing agrees
    Array(False, dtype=bool)
  """
  check_rule(rule)
  n = _static_n(num_microbatches)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def fn(params, batch, *args):
    micro = _microbatching.split_microbatches(batch, n)

    def one(i):
      b = jax.tree.map(lambda x: x[i], micro)
      return grad_fn(params, b, *args)

    (loss0, grad0) = jax.eval_shape(one, 0)
    acc = gaf_accumulator(tau, rule=rule, num_microbatches=n)
    losses0 = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape, s.dtype), loss0)

    def body(i, carry):
      losses, acc_carry = carry
      loss, grad = one(i)
      losses = jax.tree.map(lambda l, v: l.at[i].set(v), losses, loss)
      return losses, acc.update(acc_carry, grad, i)

    losses, acc_carry = jax.lax.fori_loop(
      0, n, body, (losses0, acc.init(grad0))
    )
    return losses, acc.finalize(acc_carry)

  return fn
