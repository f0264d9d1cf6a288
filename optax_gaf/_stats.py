"""The counters every aggregator state shares, and :func:`stats` for logging."""

import jax
import jax.numpy as jnp
import optax
from optax import tree

# The states stats() reads, by name (optax.tree.get matches NamedTuple names).
_STATE_NAMES = ("GAFState", "AndMaskState", "AdaConsState")


def init_counters() -> dict[str, jax.Array]:
  """``count``, ``ready``, ``skipped_steps``, ``gradient_diversity`` at init."""
  return {
    "count": jnp.zeros([], jnp.int32),
    "ready": jnp.ones([], bool),
    "skipped_steps": jnp.zeros([], jnp.int32),
    "gradient_diversity": jnp.zeros([], jnp.float32),
  }


def advance_counters(state, ready, gradient_diversity) -> dict[str, jax.Array]:
  """The shared fields after a step; the counts saturate instead of wrapping."""
  return {
    "count": optax.safe_increment(state.count),
    "ready": ready,
    "skipped_steps": jnp.where(
      ready, state.skipped_steps, optax.safe_increment(state.skipped_steps)
    ),
    "gradient_diversity": gradient_diversity,
  }


def stats(opt_state: optax.OptState) -> dict[str, jax.Array]:
  """Collects an aggregator's diagnostics for logging.

  Args:
    opt_state: an optimizer state that holds exactly one ``GAFState``,
      ``AndMaskState`` or ``AdaConsState``, anywhere (``optax.chain``,
      ``aggregating.process``, ``inject_hyperparams``).

  Returns:
    A dict of plain arrays (also for a Flax NNX optimizer's state) with the
    state's fields that are in use (a field that is None because its feature
    is off is left out), plus ``skip_rate``, the fraction of steps so far
    that were no-agreement steps.

  Raises:
    ValueError: if the state holds none or several aggregator states.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_gaf
    >>> tx = optax.chain(optax_gaf.gaf(0.9), optax.sgd(0.1))
    >>> state = tx.init(jnp.zeros(2))
    >>> _, state = tx.update(jnp.eye(2), state)  # orthogonal: distance 1
    >>> s = optax_gaf.stats(state)
    >>> bool(s["ready"]), int(s["skipped_steps"]), float(s["skip_rate"])
    (False, 1, 1.0)
  """
  found = [s for s in map(_find(opt_state), _STATE_NAMES) if s is not None]
  if not found:
    raise ValueError(
      "opt_state holds no GAFState, AndMaskState or AdaConsState; is an"
      " optax_gaf aggregator in the optimizer?"
    )
  if len(found) > 1:
    raise ValueError("opt_state holds more than one aggregator state.")
  # Flax NNX wraps every array of its optimizer state in a Variable.
  out = {k: _unwrap(v) for k, v in found[0]._asdict().items() if v is not None}
  out["skip_rate"] = out["skipped_steps"] / jnp.maximum(out["count"], 1)
  return out


def _find(opt_state):
  def find(name):
    try:
      return tree.get(opt_state, name, None)
    except KeyError as e:  # optax found several
      raise ValueError(
        f"opt_state holds more than one {name}; call stats() on the part of"
        " the state that holds the one you want (e.g. opt_state[0])."
      ) from e

  return find


def _unwrap(value):
  leaves = jax.tree.leaves(value)
  return leaves[0] if len(leaves) == 1 else value
