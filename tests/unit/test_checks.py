"""Input checks shared by every aggregator (optax_gaf/_checks.py)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gaf
from optax_gaf import _checks

AGGREGATORS = {
  "gaf": lambda: optax_gaf.gaf(0.9),
  "and_mask": lambda: optax_gaf.and_mask(0.5),
  "adacons": lambda: optax_gaf.adacons(),
}


# --- num_microbatches


@pytest.mark.parametrize("value", [2.5, 4.0, "4", None, [4]])
def test_num_microbatches_that_is_no_int_is_a_type_error(value):
  with pytest.raises(TypeError, match="num_microbatches must be an int"):
    _checks.num_microbatches(value)


@pytest.mark.parametrize("value", [True, False])
def test_num_microbatches_refuses_bools(value):
  with pytest.raises(TypeError, match="must be an int; got"):
    _checks.num_microbatches(value, minimum=0)


@pytest.mark.parametrize("value, minimum", [(1, 2), (0, 1), (-3, 1)])
def test_num_microbatches_below_minimum_is_a_value_error(value, minimum):
  with pytest.raises(ValueError, match=f"must be >= {minimum}"):
    _checks.num_microbatches(value, minimum)


def test_num_microbatches_accepts_numpy_ints():
  for value in (np.int64(4), np.int32(4), 4):
    n = _checks.num_microbatches(value)
    assert n == 4 and type(n) is int
  assert _checks.num_microbatches(1, minimum=1) == 1
  tx = optax_gaf.gaf(0.9, num_microbatches=np.int64(3))
  assert tx.init(None).accepted.shape == (3,)


@pytest.mark.parametrize(
  "factory",
  [
    lambda n: optax_gaf.gaf(0.9, num_microbatches=n),
    lambda n: optax_gaf.adacons(num_microbatches=n),
    lambda n: optax_gaf.record_filtered(num_microbatches=n),
    lambda n: optax_gaf.gaf_accumulator(0.5, num_microbatches=n),
  ],
  ids=["gaf", "adacons", "streamed", "gaf_accumulator"],
)
def test_every_factory_checks_num_microbatches(factory):
  with pytest.raises(TypeError, match="must be an int"):
    factory(2.5)
  with pytest.raises(TypeError, match="must be an int"):
    factory("4")
  with pytest.raises(TypeError, match="must be an int"):
    factory(True)
  with pytest.raises(ValueError, match="must be >= 2"):
    factory(1)


def test_traced_num_microbatches_names_static_args():
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(_checks.num_microbatches)(4)


def test_num_microbatches_must_be_static_under_inject_hyperparams():
  tx = optax.inject_hyperparams(optax_gaf.gaf)(tau=0.9, num_microbatches=4)
  state = tx.init(jnp.zeros(2))
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(tx.update)(jnp.ones((4, 2)), state)
  tx = optax.inject_hyperparams(
    optax_gaf.gaf, static_args=("num_microbatches",)
  )(tau=0.9, num_microbatches=4)
  state = tx.init(jnp.zeros(2))
  _, state = jax.jit(tx.update)(jnp.ones((4, 2)), state)
  assert optax_gaf.stats(state)["accepted"].shape == (4,)


# --- choices and axis names


def test_choice():
  assert _checks.choice("a", "x", ("a", "b")) == "a"
  with pytest.raises(ValueError, match=r"x must be one of \('a', 'b'\)"):
    _checks.choice("c", "x", ("a", "b"))


def test_axis_name():
  for ok in (None, "data", ("x", "y"), 0):
    _checks.axis_name(ok)
  for bad in (["data"], ("x", ["y"]), {"a": 1}):
    with pytest.raises(TypeError, match="axis_name"):
      _checks.axis_name(bad)


# --- microgradients


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_leading_axes_differ(name):
  tx = AGGREGATORS[name]()
  with pytest.raises(ValueError, match="leading microbatch axis"):
    tx.update({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}, tx.init(None))


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_scalar_leaf_is_rejected(name):
  tx = AGGREGATORS[name]()
  with pytest.raises(ValueError, match=r"\['a'\] is a scalar.*\[N, \.\.\.\]"):
    tx.update({"a": jnp.ones(())}, tx.init(None))


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_trailing_shapes_must_match_params(name):
  params = {"w": jnp.zeros((3, 2))}
  tx = AGGREGATORS[name]()
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"\['w'\].*\(3, 2\)"):
    tx.update({"w": jnp.ones((4, 2, 3))}, state, params)
  with pytest.raises(ValueError, match="tree structures"):
    tx.update({"v": jnp.ones((4, 3, 2))}, state, params)
  with pytest.raises(ValueError, match="trailing shape"):
    tx.update({"w": jnp.ones((4, 3, 3))}, state, params)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_params_shaped_gradient_names_the_likely_causes(name):
  """An averaged gradient (or a wrapper outside gaf) passed by mistake."""
  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(3)}
  tx = AGGREGATORS[name]()
  with pytest.raises(ValueError, match=r"one gradient.*vmap.*MultiSteps"):
    tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)


@pytest.mark.parametrize(
  "dtype, match",
  [
    (jnp.int32, "floating point"),
    (jnp.bool_, "floating point"),
    (jnp.complex64, "complex"),
  ],
)
def test_leaves_that_are_not_real_floats_are_a_type_error(dtype, match):
  tx = optax_gaf.gaf(0.9)
  grads = {"a": jnp.ones((3, 2)), "b": jnp.ones((3, 2), dtype)}
  with pytest.raises(TypeError, match=r"\['b'\].*" + match):
    tx.update(grads, tx.init(None))


def test_inside_optax_masked_is_refused():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  tx = optax.masked(optax_gaf.gaf(0.9), {"a": True, "b": False})
  grads = {"a": jnp.ones((3, 2)), "b": jnp.ones((3, 2))}
  with pytest.raises(ValueError, match="MaskedNode.*multi_transform"):
    tx.update(grads, tx.init(params), params)


def test_empty_pytree_is_refused():
  with pytest.raises(ValueError, match="no leaves"):
    _checks.microgradients({})


def test_microgradients_returns_n():
  assert _checks.microgradients({"a": jnp.ones((5, 2)), "b": jnp.ones(5)}) == 5


# --- issue 19: every numeric hyperparameter may be traced by inject_hyperparams

# Per factory: a valid value for every numeric argument, and other arguments
# it needs. num_microbatches sets shapes: it goes in static_args.
_INJECTED = {
  optax_gaf.gaf: (
    {"tau": 0.5, "temperature": 0.1, "num_microbatches": 3},
    {"rule": "soft"},
  ),
  optax_gaf.adacons: ({"momentum": 0.5, "num_microbatches": 3}, {}),
  optax_gaf.and_mask: ({"agreement_threshold": 0.5}, {}),
}


def _numeric_arguments(factory):
  def numeric(annotation):
    text = str(annotation)
    return "float" in text or text.startswith(("int", "<class 'int'>"))

  params = inspect.signature(factory).parameters
  return {k for k, p in params.items() if numeric(p.annotation)}


@pytest.mark.parametrize("factory", list(_INJECTED), ids=lambda f: f.__name__)
def test_every_numeric_hyperparameter_can_be_traced(factory):
  """inject_hyperparams traces every int or float argument under jit: none
  may reach float() or int() (temperature and momentum did, issue 19)."""
  values, others = _INJECTED[factory]
  assert set(values) == _numeric_arguments(factory)  # a new one: list it
  static = [k for k in values if k == "num_microbatches"]
  tx = optax.inject_hyperparams(factory, static_args=static)(**values, **others)
  plain = factory(**values, **others)
  g = jnp.asarray([[1.0, 0.0], [1.0, 0.3], [0.8, -0.1]])
  state = tx.init(jnp.zeros(2))
  assert set(state.hyperparams) == set(values) - {"num_microbatches"}
  got, _ = jax.jit(tx.update)(g, state)
  want, _ = plain.update(g, plain.init(jnp.zeros(2)))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_concrete_number():
  assert _checks.concrete_number(np.float32(0.5), "x") == 0.5
  assert _checks.concrete_number(jnp.asarray(2), "x") == 2.0
  with pytest.raises(TypeError, match="x must be a number; got 'a'"):
    _checks.concrete_number("a", "x")
  with pytest.raises(TypeError, match="x must be a number; got True"):
    _checks.concrete_number(True, "x")
  seen = []
  jax.jit(lambda v: seen.append(_checks.concrete_number(v, "x")) or v)(1.0)
  assert seen == [None]  # traced: not checked
