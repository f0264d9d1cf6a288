"""The three stages wired for a bound placement: safe Gram -> rule -> combine.

Every aggregator that decides from the Gram matrix runs :func:`aggregate`;
the placement (where the microgradients live) and the producer (stacked,
ghost) are invisible here. Running-aggregate rules on one device with many
microgradients take the block route of ``_running.py`` instead, which needs
no ``N x N`` matrix and gives the same decisions.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from optax_gaf import _checks
from optax_gaf import _gram
from optax_gaf import _placement
from optax_gaf import _running
from optax_gaf import rules


def resolve_rule(rule: Any, temperature: float | None = None) -> rules.Rule:
  """A rule's name or function (with ``soft``'s temperature) as a function.

  Raises:
    ValueError: for an unknown name, or a temperature for another rule.
    TypeError: if ``rule`` is neither a name nor callable.
  """
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


def apply_rule(rule, gram, usable, tau, per_leaf=False) -> rules.RuleOutput:
  """Runs the rule (per leaf: vmapped) and checks what it returns."""
  fn = rule
  if per_leaf:
    fn = jax.vmap(rule, in_axes=(0, 0, 0 if jnp.ndim(tau) else None))
  out = fn(gram, usable, tau)
  if not isinstance(out, tuple) or len(out) != 4:
    raise TypeError(
      f"The rule {rule} must return a RuleOutput(weights, ready,"
      f" accepted, cosine_distance); got {type(out).__name__}."
    )
  out = rules.RuleOutput(*out)
  shapes = [jnp.shape(x) for x in out]
  want = [usable.shape, usable.shape[:-1], usable.shape, usable.shape]
  if shapes != want:
    raise ValueError(
      f"The rule {rule} returned shapes {shapes} for (weights, ready,"
      f" accepted, cosine_distance); expected {want}."
    )
  return rules.RuleOutput(
    jnp.asarray(out.weights, gram.dtype),
    jnp.asarray(out.ready, bool),
    jnp.asarray(out.accepted, bool),
    jnp.asarray(out.cosine_distance, gram.dtype),
  )


def by_gram(placement, rule, tau, per_leaf=False):
  """Stages 1-3 through the Gram matrix."""
  gram, usable, factors = _gram.safe_gram(placement, per_leaf)
  out = apply_rule(rule, gram, usable, tau, per_leaf)
  updates = placement.combine(out.weights, usable)
  return updates, out, _gram.gradient_diversity(gram, factors)


def aggregate(placement, rule, tau, *, per_leaf=False, blocks=True):
  """Stages 1-3: ``(update leaves, RuleOutput, gradient diversity)``.

  Args:
    placement: a bound :class:`optax_gaf.placement.Placement`.
    rule: a rule function (:func:`resolve_rule`).
    tau: the threshold (``[L]`` per leaf for a per-leaf AutoTau).
    per_leaf: one decision per leaf.
    blocks: whether the block route may be taken (one device, a
      running-aggregate rule, N above one block).

  Raises:
    ValueError: with fewer than 2 microgradients.
  """
  n = placement.num_microgradients
  if n < 2:
    raise ValueError(
      f"GAF needs at least 2 microgradients to compare; got N={n}."
    )
  shrink = _running.shrink_of(rule)
  if (
    blocks
    and shrink is not None
    and not per_leaf
    and n > _running.BLOCK_SIZE
    and isinstance(placement, _placement.LocalPlacement)
  ):
    fallback = lambda: by_gram(placement, rule, tau)
    return _running.by_blocks(placement, tau, shrink, fallback)
  return by_gram(placement, rule, tau, per_leaf)
