"""gaf across the float range, against the float64 NumPy oracle.

The same microgradients (decisions well away from tau) are scaled to norms
from 1e-30 to 1e30: every rule must make the oracle's decisions and return
its update to float32 rounding, on the Gram route (N=4) and the block route
(N=20, where ``sequential`` and ``pairwise`` take it), with one
microgradient 1e20 times off the others, in bf16, across devices
(``shard_map`` with both collectives; plain ``jit`` with Explicit sharding)
and in float64 (to float64 rounding).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gaf
from tests import oracle

RULES = ("sequential", "pairwise", "medoid", "soft")
TAU = 0.8
TEMPERATURE = 0.05  # the soft rule's default
SHAPES = ((7,), (2, 3))
SIZE = sum(int(np.prod(s)) for s in SHAPES)
# Seeds whose decisions sit at least MARGIN from tau for every rule.
SEEDS = {4: 1, 8: 1, 20: 1}
MARGIN = 1e-3
NORMS = tuple(10.0**k for k in range(-30, 31, 5))
D = 4  # devices for the sharded cases (of the 8 that conftest.py simulates)


def _base(n):
  """``[n, SIZE]`` float64 microgradients: a shared direction, every third
  one flipped, heavy noise; norms spread over [0.5, 2]."""
  rng = np.random.default_rng(SEEDS[n])
  d = rng.normal(size=SIZE)
  signs = np.where(np.arange(n) % 3 == 2, -1.0, 1.0)
  x = signs[:, None] * d + 1.3 * rng.normal(size=(n, SIZE))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x * rng.uniform(0.5, 2.0, size=(n, 1))


def _leaves(flat, dtype):
  out, start = [], 0
  for shape in SHAPES:
    size = int(np.prod(shape))
    piece = flat[:, start : start + size].reshape((-1,) + shape)
    out.append(jnp.asarray(piece, dtype))
    start += size
  return out


def _oracle(flat, rule):
  """(update or None, accepted, distances) of the float64 oracle."""
  if rule == "soft":
    update, accepted, dist, _ = oracle.soft(flat, TAU, TEMPERATURE)
    return update, accepted, dist
  return getattr(oracle, rule)(flat, TAU)


def _assert_unambiguous(flat):
  for rule in RULES:
    _, _, dist = _oracle(flat, rule)
    assert not oracle.is_ambiguous(dist, TAU, MARGIN), rule
  pair = oracle.pairwise_distances(flat)  # medoid's neighbour counts
  assert not oracle.is_ambiguous(pair, TAU, MARGIN)


def _aggregator(rule, n, **kw):
  return optax_gaf.gaf(TAU, rule=rule, num_microbatches=n, **kw)


@functools.cache
def _local_update(n):
  """One jitted function running every rule on the same microgradients."""
  aggs = {rule: _aggregator(rule, n) for rule in RULES}

  @jax.jit
  def update(leaves):
    return {r: agg.update(leaves, agg.init(None)) for r, agg in aggs.items()}

  return update


@functools.cache
def _shard_map_update(n, collective):
  mesh = jax.make_mesh((D,), ("data",), devices=jax.devices()[:D])
  aggs = {
    rule: _aggregator(rule, n, axis_name="data", collective=collective)
    for rule in RULES
  }

  def update(leaves):
    return {r: agg.update(leaves, agg.init(None)) for r, agg in aggs.items()}

  fn = jax.jit(
    jax.shard_map(update, mesh=mesh, in_specs=P("data"), out_specs=P())
  )
  sharding = NamedSharding(mesh, P("data"))
  return lambda leaves: fn(jax.device_put(leaves, sharding))


@functools.cache
def _explicit_update(n):
  """Plain jit over leaves sharded on an Explicit mesh: MeshPlacement."""
  explicit = (jax.sharding.AxisType.Explicit,)
  mesh = jax.make_mesh(
    (D,), ("data",), axis_types=explicit, devices=jax.devices()[:D]
  )
  sharding = NamedSharding(mesh, P("data"))
  update = _local_update(n)
  return lambda leaves: update(jax.device_put(leaves, sharding))


def _check(results, flat, rtol, what, distances=True):
  """Every rule's decisions, distances and update against the oracle.

  Args:
    results: ``{rule: (update leaves, GAFState)}``.
    flat: the microgradients as the library saw them, float64 ``[N, P]``.
    rtol: the update's error allowed, relative to its largest entry.
    what: a description for the failure message.
    distances: whether to compare the recorded (float32) distances.

  Returns:
    ``{rule: relative update error}``.
  """
  errors = {}
  for rule, (leaves, state) in results.items():
    update, accepted, dist = _oracle(flat, rule)
    msg = f"{rule}, {what}"
    np.testing.assert_array_equal(state.accepted, accepted, msg)
    assert bool(state.ready) == (update is not None), msg
    if distances:
      np.testing.assert_allclose(
        np.asarray(state.cosine_distance, np.float64),
        dist,
        atol=1e-5,
        err_msg=msg,
      )
    got = np.concatenate(
      [np.asarray(x, np.float64).reshape(-1) for x in leaves]
    )
    assert all(x.dtype == leaves[0].dtype for x in leaves)
    scale = np.max(np.abs(update))
    errors[rule] = float(np.max(np.abs(got - update)) / scale)
    assert errors[rule] <= rtol, (msg, errors[rule])
  return errors


def _as_seen(leaves):
  """The microgradients as the library got them, in float64."""
  return oracle.flatten(leaves)


@pytest.mark.parametrize("n", [4, 20], ids=["gram_N4", "block_N20"])
def test_float32_norms_1e_minus30_to_1e30(n):
  base = _base(n)
  _assert_unambiguous(base)
  update = _local_update(n)
  for norm in NORMS:
    leaves = _leaves(base * norm, jnp.float32)
    _check(update(leaves), _as_seen(leaves), 1e-5, f"N={n}, norm {norm:g}")


@pytest.mark.parametrize("n", [4, 20], ids=["gram_N4", "block_N20"])
@pytest.mark.parametrize("position", [0, 1], ids=["anchor", "second"])
@pytest.mark.parametrize("factor", [1e20, 1e-20], ids=["larger", "smaller"])
def test_float32_one_microgradient_1e20_off(n, position, factor):
  base = _base(n)
  update = _local_update(n)
  for norm in (1e-5, 1.0, 1e5):
    flat = base * norm
    flat[position] *= factor
    _assert_unambiguous(flat)
    leaves = _leaves(flat, jnp.float32)
    what = f"N={n}, norm {norm:g}, #{position} x {factor:g}"
    _check(update(leaves), _as_seen(leaves), 1e-5, what)


def test_float32_edges_of_the_range():
  """Norms 1e-36 and 1e36: the decisions hold; at 1e36 the update too.

  At 1e-36 the entries are near float32's smallest normal number (1.2e-38):
  the smallest ones are subnormal and XLA flushes them to zero (distances
  move by ~1e-4), and so are the weighted sum's terms ``w_i g_i`` (the update
  is off by a few percent). The decisions still hold.
  """
  for n in (4, 20):
    base = _base(n)
    update = _local_update(n)
    for norm, exact in ((1e-36, False), (1e36, True)):
      leaves = _leaves(base * norm, jnp.float32)
      rtol = 1e-5 if exact else np.inf
      what = f"N={n}, norm {norm:g}"
      _check(update(leaves), _as_seen(leaves), rtol, what, distances=exact)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_largest_entries_near_the_float32_maximum(dtype):
  base = _base(4)
  flat = base / np.max(np.abs(base)) * 1e38  # largest entry 1e38 < 3.4e38
  leaves = _leaves(flat, dtype)
  _check(_local_update(4)(leaves), _as_seen(leaves), 1e-2, "entries 1e38")


@pytest.mark.parametrize("n", [4, 20], ids=["gram_N4", "block_N20"])
def test_bfloat16_up_to_its_range(n):
  """bf16 has float32's exponent range; the Gram matrix is float32 (exact
  products), the update bf16: its error is bf16 rounding."""
  base = _base(n)
  update = _local_update(n)
  for norm in NORMS + (1e36,):
    leaves = _leaves(base * norm, jnp.bfloat16)
    flat = _as_seen(leaves)
    _assert_unambiguous(flat)
    results = update(leaves)
    assert all(
      x.dtype == jnp.bfloat16 for out, _ in results.values() for x in out
    )
    _check(results, flat, 2.0**-7, f"bf16 N={n}, norm {norm:g}")
  flat = base.copy()
  flat[1] *= 1e20
  leaves = _leaves(flat, jnp.bfloat16)
  _check(update(leaves), _as_seen(leaves), 2.0**-7, "bf16 #1 x 1e20")


CROSS_DEVICE_CASES = [(1e-30, None), (1.0, None), (1e30, None), (1.0, 1e20)]


def _check_cross_device_cases(update, n, label):
  """``update`` against the oracle at every ``CROSS_DEVICE_CASES`` scale."""
  base = _base(n)
  for norm, factor in CROSS_DEVICE_CASES:
    flat = base * norm
    if factor:
      flat[1] *= factor
    leaves = _leaves(flat, jnp.float32)
    what = f"{label}, norm {norm:g}, factor {factor}"
    _check(update(leaves), _as_seen(leaves), 1e-5, what)


@pytest.mark.parametrize("collective", ["all_to_all", "all_gather"])
def test_shard_map_over_4_devices(collective):
  n = 8
  update = _shard_map_update(n, collective)
  _check_cross_device_cases(update, n, f"shard_map {collective}")


def test_plain_jit_with_explicit_sharding():
  n = 8
  _check_cross_device_cases(_explicit_update(n), n, "explicit sharding")


def _float64_errors(n, rules):
  """The worst relative update error of ``rules`` on float64 microgradients
  scaled to norms 1e-200 .. 1e200, and with one 1e50 times the others.

  The oracle runs on the unscaled microgradients (its norms would underflow
  at 1e-200) and the update is scaled back; a common factor changes no
  decision.
  """
  base = _base(n)
  update = _local_update(n)  # jit caches per x64 setting
  worst = 0.0
  with jax.enable_x64(True):
    for norm in (1e-200, 1e-100, 1.0, 1e100, 1e200):
      leaves = _leaves(base * norm, jnp.float64)
      results = {r: update(leaves)[r] for r in rules}
      for rule, (out, _) in results.items():
        assert all(x.dtype == jnp.float64 for x in out), rule
      unscaled = {
        r: ([x / norm for x in out], state)
        for r, (out, state) in results.items()
      }
      errors = _check(unscaled, base, 1e-13, f"float64 N={n} norm {norm:g}")
      worst = max(worst, *errors.values())
    flat = base.copy()
    flat[1] *= 1e50
    results = update(_leaves(flat, jnp.float64))
    errors = _check(
      {r: results[r] for r in rules}, flat, 1e-13, "float64 #1 x 1e50"
    )
  return max(worst, *errors.values())


@pytest.mark.parametrize("n", [4, 20], ids=["gram_N4", "block_N20"])
def test_float64_is_computed_in_float64(n):
  """Under x64, float64 microgradients get float64 statistics: the update is
  exact to ~1e-15 (float32 statistics would leave ~1e-7), at any scale."""
  assert _float64_errors(n, ("sequential", "pairwise", "medoid")) < 1e-13


def test_float64_soft_rule_is_computed_in_float64():
  assert _float64_errors(4, ("soft",)) < 1e-13


@pytest.mark.parametrize(
  "dtype", [jnp.int32, jnp.bool_, jnp.complex64], ids=str
)
def test_non_real_floating_microgradients_raise_type_error(dtype):
  agg = optax_gaf.gaf(TAU)
  grads = {"w": jnp.ones((4, 3), dtype)}
  with pytest.raises(TypeError, match="Microgradient leaf"):
    agg.update(grads, agg.init(None))


def test_params_shaped_leaves_raise_the_wrapper_error():
  agg = optax_gaf.gaf(TAU)
  params = {"w": jnp.zeros((4, 3))}
  with pytest.raises(ValueError, match="missing jax.vmap"):
    agg.update({"w": jnp.ones((4, 3))}, agg.init(params), params)
