"""Per-microbatch losses and gradients, the input that ``gaf`` expects."""

from collections.abc import Callable
from typing import Any

import jax

from optax_gaf import _checks


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
  """Reshapes every leaf ``[B, ...]`` of ``batch`` to ``[N, B // N, ...]``.

  Raises:
    TypeError: if ``num_microbatches`` is not an int.
    ValueError: if the leaves disagree on B, or B is not a multiple of N.
  """
  num_microbatches = _checks.num_microbatches(num_microbatches, minimum=1)
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError("The batch pytree has no leaves.")
  sizes = {}
  for path, x in leaves:
    if jax.numpy.ndim(x) < 1:
      raise ValueError(
        f"Batch leaf {jax.tree_util.keystr(path)} is a scalar; every leaf"
        " needs a leading batch axis."
      )
    sizes[jax.tree_util.keystr(path) or "<root>"] = x.shape[0]
  if len(set(sizes.values())) > 1:
    raise ValueError(f"Batch leaves disagree on the batch size: {sizes}.")
  batch_size = next(iter(sizes.values()))
  if batch_size % num_microbatches:
    raise ValueError(
      f"A batch of {batch_size} does not split evenly into"
      f" {num_microbatches} microbatches."
    )
  size = batch_size // num_microbatches
  return jax.tree.map(
    lambda x: x.reshape((num_microbatches, size) + x.shape[1:]), batch
  )


def microbatch_grads(
  loss_fn: Callable[..., Any],
  num_microbatches: int,
  *,
  has_aux: bool = False,
) -> Callable[..., tuple[Any, Any]]:
  """Wraps ``loss_fn(params, batch, *args)`` to give per-microbatch gradients.

  The returned function splits ``batch`` (any pytree of arrays with a leading
  batch axis B) into ``num_microbatches`` equal microbatches and ``vmap``\\ s
  ``jax.value_and_grad(loss_fn)`` over them. Extra positional arguments are
  shared by all microbatches.

  Args:
    loss_fn: ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)``
      with ``has_aux=True``), the mean loss of one microbatch.
    num_microbatches: N; the batch size must be a multiple of it.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``fn(params, batch, *args) -> (losses, grads)``, where ``losses`` is
    ``[N]`` (or ``([N], aux with a leading N axis)``) and every leaf of
    ``grads`` is ``[N, *param_shape]``, ready for :func:`optax_gaf.gaf`.

  Examples:
    >>> import jax.numpy as jnp, optax_gaf
    >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.zeros(8)}
    >>> losses, grads = optax_gaf.microbatch_grads(loss, 4)(jnp.ones(3), batch)
    >>> losses.shape, grads.shape
    ((4,), (4, 3))
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def fn(params, batch, *args):
    micro = split_microbatches(batch, num_microbatches)
    return jax.vmap(lambda b: grad_fn(params, b, *args))(micro)

  return fn
