"""``process()``: the true skip, also for mixed precision.

``optax.experimental.aggregating.process`` skips its postprocessor (the
optimizer) on a step whose aggregator state says ``ready=False``, returning
zeros in the *gradients'* dtype. With bf16 microgradients and float32 params
the optimizer returns float32 updates, and the two branches of its
``lax.cond`` no longer match. This ``process`` returns zeros in the dtype the
optimizer would have returned, and lets schedules count every step.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from optax import tree
from optax.experimental import aggregating


# Optimizer states whose ``count`` only feeds a schedule (a learning rate, an
# injected hyperparameter). ScaleByAdamState's count is not among them: it
# corrects the bias of moments that a skipped step did not update.
@functools.cache
def _schedule_states() -> tuple[type, ...]:
  # Looked up on first use: init() makes an array, and an array at import
  # would start the JAX backend before the user configures it.
  wrapped = type(optax.WrappedSchedule(lambda count: count).init())
  return (
    optax.ScaleByScheduleState,
    optax.InjectHyperparamsState,
    optax.InjectStatefulHyperparamsState,
    wrapped,
  )


_SCHEDULE_STEPS = ("all", "applied")


def _is_schedule_state(x) -> bool:
  return isinstance(x, _schedule_states())


def _advance_schedules(state):
  """Adds one to the ``count`` of every schedule state inside ``state``."""

  def visit(node):
    if not _is_schedule_state(node):
      return node
    inner = {
      k: jax.tree.map(visit, v, is_leaf=_is_schedule_state)
      for k, v in node._asdict().items()
      if k != "count"
    }
    return node._replace(count=optax.safe_increment(node.count), **inner)

  return jax.tree.map(visit, state, is_leaf=_is_schedule_state)


def _check_schedule_steps(schedule_steps: str) -> str:
  if schedule_steps not in _SCHEDULE_STEPS:
    raise ValueError(
      f"schedule_steps={schedule_steps!r}; choose 'all' (schedules count"
      " every step) or 'applied' (only the steps the optimizer ran)."
    )
  return schedule_steps


def _post_or_skip(post, ready, combined, post_state, advance: bool):
  """The optimizer on a ready step; else zeros in the dtype it returns."""

  def skip(g, s):
    out = jax.eval_shape(post, g, s)[0]
    zeros = jax.tree.map(lambda x, o: jnp.zeros_like(x, o.dtype), g, out)
    return zeros, _advance_schedules(s) if advance else s

  return jax.lax.cond(ready, post, skip, combined, post_state)


def process(
  preprocessor: optax.GradientTransformation,
  aggregator: aggregating.Aggregator,
  postprocessor: optax.GradientTransformation,
  *,
  schedule_steps: str = "all",
) -> aggregating.Aggregator:
  """``aggregating.process`` that also works when dtypes change on the way.

  A drop-in for :func:`optax.experimental.aggregating.process`: the
  postprocessor (the optimizer) runs only on steps whose aggregator state
  has ``ready`` True; on the others the updates are zeros in the dtype the
  postprocessor returns (float32 for float32 params, whatever the
  gradients' dtype).

  ``schedule_steps`` says which steps a schedule inside the postprocessor
  counts. ``"all"`` (the default): every call, as ``TrainState.step`` and
  ``nnx.Optimizer`` count; on a skip only the ``count`` of each
  ``ScaleByScheduleState`` and ``inject_hyperparams`` state advances
  (adamw's moments and their bias correction stay untouched).
  ``"applied"``: only the steps the optimizer ran; a skip leaves its whole
  state bitwise untouched, as ``optax.experimental.aggregating.process``
  does. Other counters (``optax.MultiSteps``) count applied steps in both.

  Args:
    preprocessor: a transformation of the microgradients, e.g.
      ``optax.identity()``.
    aggregator: an aggregator with a ``ready`` field in its state.
    postprocessor: the optimizer, skipped when not ready.
    schedule_steps: ``"all"`` (schedules count every call) or
      ``"applied"`` (only the steps the postprocessor ran).

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` whose state is the
    tuple of the three states.

  Raises:
    ValueError: an unknown ``schedule_steps``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> tx = optax_gaf.process(optax.identity(), optax_gaf.gaf(0.5),
    ...                        optax.adamw(1e-3))
    >>> params = jnp.zeros(2, jnp.float32)
    >>> state = tx.init(params)
    >>> grads = jnp.array([[1.0, 0.0], [0.0, 1.0]], jnp.bfloat16)  # disagree
    >>> updates, state = tx.update(grads, state, params)
    >>> updates
    Array([0., 0.], dtype=float32)
  """

  advance = _check_schedule_steps(schedule_steps) == "all"
  # As optax.chain does: plain transformations ignore extra args (value=).
  preprocessor = optax.with_extra_args_support(preprocessor)
  postprocessor = optax.with_extra_args_support(postprocessor)

  def init_fn(params):
    return (
      preprocessor.init(params),
      aggregator.init(params),
      postprocessor.init(params),
    )

  def update_fn(grads, states, params=None, **extra_args):
    pre_state, agg_state, post_state = states
    grads, pre_state = preprocessor.update(
      grads, pre_state, params, **extra_args
    )
    combined, agg_state = aggregator.update(
      grads, agg_state, params, **extra_args
    )

    post = functools.partial(postprocessor.update, params=params, **extra_args)
    ready = tree.get(agg_state, "ready", True)
    updates, post_state = _post_or_skip(
      post, ready, combined, post_state, advance
    )
    return updates, (pre_state, agg_state, post_state)

  return aggregating.Aggregator(init_fn, update_fn)
