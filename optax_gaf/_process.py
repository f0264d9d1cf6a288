"""``process()``: the true skip, also for mixed precision.

``optax.experimental.aggregating.process`` skips its postprocessor (the
optimizer) on a step whose aggregator state says ``ready=False``, returning
zeros in the *gradients'* dtype. With bf16 microgradients and float32 params
the optimizer returns float32 updates, and the two branches of its
``lax.cond`` no longer match. This ``process`` returns zeros in the dtype the
optimizer would have returned.
"""

import jax
import jax.numpy as jnp
import optax
from optax import tree
from optax.experimental import aggregating


def process(
  preprocessor: optax.GradientTransformation,
  aggregator: aggregating.Aggregator,
  postprocessor: optax.GradientTransformation,
) -> aggregating.Aggregator:
  """``aggregating.process`` that also works when dtypes change on the way.

  A drop-in for :func:`optax.experimental.aggregating.process`: the
  preprocessor maps the microgradients, the aggregator (e.g. :func:`gaf`)
  combines them, and the postprocessor (the optimizer) runs only on steps
  whose aggregator state has ``ready`` True; on the others its state is left
  untouched and the updates are zeros, in the dtype the postprocessor returns
  (float32 for float32 params, whatever the gradients' dtype).

  Args:
    preprocessor: a transformation of the microgradients, e.g.
      ``optax.identity()``.
    aggregator: an aggregator with a ``ready`` field in its state.
    postprocessor: the optimizer, skipped when not ready.

  Returns:
    An :class:`optax.experimental.aggregating.Aggregator` whose state is the
    tuple of the three states.

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

    def post(g, s):
      return postprocessor.update(g, s, params, **extra_args)

    def skip(g, s):
      out = jax.eval_shape(post, g, s)[0]
      return jax.tree.map(lambda x, o: jnp.zeros_like(x, o.dtype), g, out), s

    ready = tree.get(agg_state, "ready", True)
    updates, post_state = jax.lax.cond(ready, post, skip, combined, post_state)
    return updates, (pre_state, agg_state, post_state)

  return aggregating.Aggregator(init_fn, update_fn)
