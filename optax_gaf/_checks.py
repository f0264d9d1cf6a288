"""Input checks shared by every aggregator: each idea checked in one place."""

import operator
from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import optax

_TRACED = (
  jax.errors.ConcretizationTypeError,
  jax.errors.TracerIntegerConversionError,
)


def num_microbatches(value: Any, minimum: int = 2) -> int:
  """Checks a static count of microbatches (``None`` is the caller's business).

  Args:
    value: a Python (or NumPy) int; floats, strings and bools are refused.
    minimum: the smallest count allowed (GAF compares, so 2 by default).

  Returns:
    ``value`` as an int.

  Raises:
    TypeError: if ``value`` is not an int, or is traced (it sets shapes).
    ValueError: if ``value < minimum``.
  """
  if isinstance(value, bool):
    raise TypeError(f"num_microbatches must be an int; got {value!r}.")
  try:
    n = operator.index(value)
  except _TRACED as e:
    raise TypeError(
      "num_microbatches sets the state's shapes and must be a static Python"
      " int. With optax.inject_hyperparams, pass"
      " static_args=('num_microbatches',)."
    ) from e
  except TypeError as e:
    raise TypeError(
      f"num_microbatches must be an int; got {type(value).__name__} {value!r}."
    ) from e
  if n < minimum:
    raise ValueError(
      f"num_microbatches must be >= {minimum}"
      + (" (GAF compares microgradients)" if minimum >= 2 else "")
      + f"; got {n}."
    )
  return n


def concrete_number(value: Any, name: str) -> float | None:
  """A hyperparameter as a float, or None when it is traced.

  ``optax.inject_hyperparams`` calls the factory under ``jit`` with its
  numeric arguments traced: those pass unchecked (their first, concrete
  values were checked when the optimizer was built).

  Raises:
    TypeError: if ``value`` is neither a number nor traced.
  """
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, bool | str | bytes):
    raise TypeError(f"{name} must be a number; got {value!r}.")
  try:
    return float(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be a number; got {value!r}.") from e


def choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
  """Returns ``value`` if it is one of ``choices``, else raises ValueError."""
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}; got {value!r}.")
  return value


def axis_name(value: Any) -> None:
  """Raises TypeError unless ``value`` is None, a name or a tuple of names."""
  names = value if isinstance(value, tuple) else (value,)
  if not all(isinstance(a, Hashable) for a in names):
    raise TypeError(
      f"axis_name must be a mesh axis name or a tuple of names; got {value!r}."
    )


_WRAPPED = (
  "Microgradient leaves are shaped exactly like the params, so gaf got one"
  " gradient, not [N, *param.shape] microgradients. Likely causes: a missing"
  " jax.vmap over the microbatches, or a wrapper outside gaf that expects"
  " params-shaped gradients (optax.MultiSteps, ...). Put such wrappers after"
  " gaf: optax_gaf.process(optax.identity(), gaf(...),"
  " optax.MultiSteps(inner, k))."
)


def microgradients(grads: Any, params: Any = None) -> int:
  """Validates the microgradient pytree and returns its leading size.

  Every leaf must be a real floating array ``[N, *param.shape]`` with one N
  for all leaves.

  Raises:
    TypeError: for integer, bool or complex leaves.
    ValueError: with a message that names the leaf and the problem.
  """
  _refuse_masked(grads)
  path_leaves = jax.tree_util.tree_leaves_with_path(grads)
  if not path_leaves:
    raise ValueError("The microgradients pytree has no leaves.")
  if params is not None and _shaped_like(grads, params):
    raise ValueError(_WRAPPED)
  sizes = {}
  for path, x in path_leaves:
    name = jax.tree_util.keystr(path) or "<root>"
    check_real_dtype(name, x)
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
    _match_params(path_leaves, grads, params)
  return next(iter(sizes.values()))


def _refuse_masked(grads: Any) -> None:
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  if any(is_masked(x) for x in jax.tree.leaves(grads, is_leaf=is_masked)):
    raise ValueError(
      "gaf got optax.MaskedNode leaves: it is inside optax.masked or"
      " optax.multi_transform (built on masked), which gaf cannot tell apart;"
      " under optax.masked the masked-out [N, ...] microgradients would pass"
      " on un-aggregated. Put gaf first: optax_gaf.process(optax.identity(),"
      " gaf(...), optax.multi_transform(...)) (with"
      " granularity='per_leaf' for a decision per tensor)."
    )


def _shaped_like(grads: Any, params: Any) -> bool:
  if jax.tree.structure(grads) != jax.tree.structure(params):
    return False
  pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(params))
  return all(jnp.shape(g) == jnp.shape(p) for g, p in pairs)


def check_real_dtype(name: str, x: Any) -> None:
  """Raises TypeError unless microgradient leaf ``name`` is real floating."""
  dtype = jnp.dtype(getattr(x, "dtype", None) or jnp.result_type(x))
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(
      f"Microgradient leaf {name} is complex ({dtype}); GAF's cosine"
      " distance is defined for real vectors. Pass the real and imaginary"
      " parts as separate real leaves."
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f"Microgradient leaf {name} has dtype {dtype}; gradients must be"
      " floating point (an integer or bool mean would be truncated)."
    )


def _match_params(path_leaves, grads, params) -> None:
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
