"""``optax_gaf._ghost.trace``: which layer reads each parameter leaf.

Site finding through nested ``jit`` calls, structural chains and into
``lax.scan`` bodies, tied and non-linear reads (direct), unused leaves,
leaves returned as outputs, and the re-run that captures each layer's inputs
and output gradients.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_gaf._ghost import embedding
from optax_gaf._ghost import layers
from optax_gaf._ghost import scanned
from optax_gaf._ghost import trace

X = jnp.ones((6, 5))


def plan_of(loss, params, x=X):
  return trace.find_sites(loss, params, x)


def layer_kinds(plan):
  return {s.leaf: type(s.layer) for s in plan.sites}


def test_leaves_sorted_into_sites_direct_and_unused():
  params = {"b": jnp.zeros(3), "unused": jnp.zeros(2), "w": jnp.ones((5, 3))}

  def loss(p, x):  # leaves in order: b, unused, w
    return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]))

  plan = plan_of(loss, params)
  assert plan.n_leaves == 3
  assert layer_kinds(plan) == {2: layers.Dense}
  assert plan.direct == (0,) and plan.unused == (1,)
  (site,) = plan.sites
  assert site.param_pos == 1 and site.path == (0,)


def test_parameter_on_either_side_of_a_matmul():
  params = {"left": jnp.ones((3, 6)), "right": jnp.ones((5, 3))}

  def loss(p, x):
    return jnp.sum(p["left"] @ (x @ p["right"]))

  plan = plan_of(loss, params)
  assert layer_kinds(plan) == {0: layers.Dense, 1: layers.Dense}
  assert [s.param_pos for s in plan.sites] == [0, 1]


def test_nested_jit_calls_are_followed():
  @jax.jit
  def block(w, x):
    return jax.jit(lambda w, x: jnp.tanh(x @ w))(w, x)

  plan = plan_of(lambda w, x: jnp.sum(block(w, x)), jnp.ones((5, 3)))
  (site,) = plan.sites
  assert type(site.layer) is layers.Dense
  assert len(site.path) == 3  # two calls, then the dot_general


def test_a_leaf_passed_out_of_a_jit_call_is_followed():
  @jax.jit
  def passthrough(w):
    return w.T

  plan = plan_of(lambda w, x: jnp.sum(x @ passthrough(w).T), jnp.ones((5, 3)))
  assert layer_kinds(plan) == {0: layers.Dense}


def test_tied_and_nonlinear_reads_are_direct():
  params = {"tied": jnp.ones((5, 5)), "scale": jnp.ones(5)}

  def loss(p, x):
    h = x @ p["tied"] @ p["tied"].T  # read by two layers
    return jnp.sum(h * jnp.exp(p["scale"]) + p["scale"] @ p["tied"])

  plan = plan_of(loss, params)
  assert plan.sites == () and plan.direct == (0, 1)


def test_structural_chain_is_replayed_and_mapped_back():
  """Reshapes, transposes and casts keep a site; its chain maps a gradient
  of the layer's operand back to the leaf."""
  w = jnp.arange(15.0).reshape(3, 5)

  def loss(w, x):
    v = w.reshape(-1).reshape(5, 3).astype(jnp.float16).T.T
    return jnp.sum(x.astype(jnp.float16) @ v)

  (site,) = plan_of(loss, w).sites
  assert type(site.layer) is layers.Dense
  assert site.layer.operand.shape == (5, 3)
  assert site.layer.operand.dtype == jnp.float16
  operand = site.operand_of(w)
  np.testing.assert_array_equal(operand, w.reshape(5, 3).astype(jnp.float16))
  g = jnp.arange(15.0).reshape(5, 3)
  back = site.to_leaf(g, jax.ShapeDtypeStruct(w.shape, w.dtype))
  assert back.dtype == w.dtype
  np.testing.assert_array_equal(back, g.reshape(3, 5))


def test_flipped_kernel_of_a_transposed_convolution_is_a_site():
  """``conv_transpose(transpose_kernel=True)`` reads the kernel through
  ``rev`` and a transpose: the chain replays and maps a gradient back."""
  w = jnp.arange(24.0).reshape(2, 3, 4, 1)

  def loss(w, x):
    spec = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_transpose(
      x, w, (2, 2), "SAME", dimension_numbers=spec, transpose_kernel=True
    )
    return jnp.sum(y)

  (site,) = plan_of(loss, w, jnp.ones((1, 3, 3, 1))).sites
  assert type(site.layer) is layers.Conv
  assert [e.primitive.name for e in site.chain] == ["rev", "rev", "transpose"]
  want = w[::-1, ::-1].swapaxes(2, 3)
  np.testing.assert_array_equal(site.operand_of(w), want)
  g = jnp.arange(24.0).reshape(2, 3, 1, 4)
  back = site.to_leaf(g, jax.ShapeDtypeStruct(w.shape, w.dtype))
  np.testing.assert_array_equal(back, g.swapaxes(2, 3)[::-1, ::-1])


def test_a_leaf_also_read_outside_its_layer_is_a_residual_site():
  """A leaf returned as an output, or in an L2 term, besides its one layer:
  a site whose other reads are a residual; read outside layers only, or
  by two layers: direct."""
  params = {"w": jnp.ones((5, 3)), "v": jnp.ones((5, 3)), "u": jnp.ones(5)}

  def loss(p, x):
    l2 = jnp.sum(p["w"] ** 2) + jnp.sum(p["u"] ** 2)
    return jnp.sum(x @ p["w"]) + l2, (p["v"], x @ p["v"])

  plan = plan_of(loss, params)  # leaves: u, v, w
  assert layer_kinds(plan) == {1: layers.Dense, 2: layers.Dense}
  assert [s.residual for s in plan.sites] == [True, True]
  assert plan.direct == (0,)
  assert plan.out_tree == jax.tree.structure((0, (0, 0)))


def test_data_dependence_of_outputs():
  """Tainted inputs taint what they reach, through jit calls; an output
  built from untainted inputs alone is clean."""

  @jax.jit
  def block(w, x):
    return 2 * w, jnp.sin(x) * w

  def fn(w, x):
    a, b = block(w, x)
    return a + 1, b, jnp.sum(w**2) * jnp.mean(x)

  w, x = jnp.ones(3), jnp.ones(3)
  assert trace.data_dependent(fn, (w, x), [False, True]) == [
    False,
    True,
    True,
  ]
  assert trace.data_dependent(fn, (w, x), [False, False]) == [False] * 3


def test_declined_kinds_are_opaque():
  """A batch-grouped convolution and a gather of columns: Opaque layers."""

  def loss(p, b):
    y = jax.lax.conv_general_dilated(
      b["x"],
      p["conv"],
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      batch_group_count=2,
    )
    return jnp.sum(y) + jnp.sum(jnp.take(p["cols"], b["ids"], axis=1))

  params = {"conv": jnp.ones((3, 3, 4, 4)), "cols": jnp.ones((3, 4))}
  batch = {"x": jnp.ones((2, 6, 6, 4)), "ids": jnp.array([1, 3])}
  plan = plan_of(loss, params, batch)
  assert layer_kinds(plan) == {0: layers.Opaque, 1: layers.Opaque}
  assert all(s.layer.costs(4)[0] is None for s in plan.sites)


def test_embedding_lookup_is_an_embedding():
  ids = jnp.array([1, 0, 3])
  plan = plan_of(lambda t, i: jnp.sum(t[i] ** 2), jnp.ones((4, 2)), ids)
  (site,) = plan.sites
  assert type(site.layer) is embedding.Embedding


def test_run_captures_inputs_and_output_gradients():
  params = {"b": jnp.full(3, 0.5), "w": jnp.arange(15.0).reshape(5, 3) / 10}
  x = jnp.arange(30.0).reshape(6, 5) / 30

  def loss(p, x):
    return jnp.sum(jnp.sin(x @ p["w"] + p["b"]))

  plan = plan_of(loss, params, x)
  flat = [*jax.tree.leaves(params), x]
  z = jnp.zeros((6, 3))

  def total(z):
    outs, caps = trace.run(plan, flat, [z])
    return outs[0], caps

  d, (caps,) = jax.grad(total, has_aux=True)(z)
  np.testing.assert_array_equal(caps[0], x)
  np.testing.assert_allclose(d, jnp.cos(x @ params["w"] + params["b"]))
  outs, _ = trace.run(plan, flat, [z])
  np.testing.assert_allclose(outs[0], loss(params, x), rtol=1e-6)


def test_a_registered_kind_is_one_new_class(monkeypatch):
  """Registering a class for ``mul`` makes ``w * x`` a site of that class."""

  @dataclasses.dataclass(frozen=True, eq=False)
  class Scale(layers.Layer):
    pass

  monkeypatch.setitem(layers._REGISTRY, "mul", (Scale, (0, 1)))
  w, x = jnp.arange(5.0), jnp.linspace(0.0, 1.0, 5)
  plan = plan_of(lambda w, x: jnp.sum(jnp.sin(x * w)), w, x)
  (site,) = plan.sites
  assert type(site.layer) is Scale
  d = jnp.cos(x * w)
  got = site.layer.book_keeping([x[None]], d[None])
  np.testing.assert_allclose(got, x * d, rtol=1e-6)


@pytest.mark.parametrize("name", ["reshape", "transpose", "squeeze"])
def test_structural_ops_are_no_sites(name):
  w = jnp.ones((1, 5, 3))
  view = {
    "reshape": lambda w: w.reshape(5, 3),
    "transpose": lambda w: w[0].T.T,
    "squeeze": lambda w: w.squeeze(0),
  }[name]
  (site,) = plan_of(lambda w, x: jnp.sum(x @ view(w)), w).sites
  assert site.layer.operand.shape == (5, 3)


# --- lax.scan


def scan_stack(h, stack):
  return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, stack)[0]


def test_a_stacked_weight_is_a_site_inside_its_scan():
  """``xs [L, K, J]``, sliced per iteration, read by one matmul there."""
  plan = plan_of(lambda w, x: jnp.sum(scan_stack(x, w)), jnp.ones((3, 5, 5)))
  (site,) = plan.sites
  assert type(site.layer) is scanned.Scanned
  assert type(site.layer.inner) is layers.Dense
  assert site.layer.stacked and site.layer.length == 3
  assert site.layer.operand.shape == (3, 5, 5)
  assert site.layer.out.shape == (3, 6, 5)
  assert site.path == (0, 0)  # the scan, then the dot_general in its body


def test_a_scan_constant_is_a_site_inside_its_scan():
  """An RNN's weight, closed over: the same in every iteration."""

  def loss(p, x):
    rnn = lambda h, x_t: (jnp.tanh(h @ p["w"] + x_t), None)
    return jnp.sum(jax.lax.scan(rnn, jnp.zeros(5), x)[0] @ p["head"])

  plan = plan_of(loss, {"head": jnp.ones((5, 2)), "w": jnp.ones((5, 5))})
  kinds = layer_kinds(plan)
  assert kinds == {0: layers.Dense, 1: scanned.Scanned}
  site = next(s for s in plan.sites if s.leaf == 1)
  assert not site.layer.stacked and site.layer.length == 6
  assert site.layer.operand.shape == (5, 5)


def test_scan_chains_before_and_inside_map_back_to_the_stacked_leaf():
  """A reshape before the scan (on the stack) and a transpose inside it (on
  each slice): the operand is the stack of per-iteration operands."""
  w = jnp.arange(3 * 9.0).reshape(3, 9)

  def loss(w, x):
    body = lambda h, v: (jnp.tanh(h @ v.T), None)
    return jnp.sum(jax.lax.scan(body, x, w.reshape(3, 3, 3))[0])

  (site,) = plan_of(loss, w, jnp.ones((6, 3))).sites
  want = w.reshape(3, 3, 3).transpose(0, 2, 1)
  np.testing.assert_array_equal(site.operand_of(w), want)
  back = site.to_leaf(want, jax.ShapeDtypeStruct(w.shape, w.dtype))
  np.testing.assert_array_equal(back, w)


def test_scans_a_leaf_cannot_be_followed_through_are_direct():
  """In the carry, in a scan within a scan, read also outside the scan, or
  passed through the body to ys that are read: direct."""
  params = {
    "carried": jnp.ones((5, 5)),
    "nested": jnp.ones((5, 5)),
    "outside": jnp.ones((2, 5, 5)),
    "passed": jnp.ones((2, 5, 5)),
  }

  def loss(p, x):
    carry = lambda c, _: ((jnp.tanh(c[0] @ c[1]), 2 * c[1]), None)
    h = jax.lax.scan(carry, (x, p["carried"]), None, length=2)[0][0]
    inner = lambda h, _: (h @ p["nested"], None)
    outer = lambda h, _: (jax.lax.scan(inner, h, None, length=2)[0], None)
    h = jax.lax.scan(outer, h, None, length=2)[0]
    h = scan_stack(h, p["outside"]) + jnp.sum(p["outside"])
    h, ws = jax.lax.scan(lambda h, w: (h @ w, w), h, p["passed"])
    return jnp.sum(h) + jnp.sum(ws)

  plan = plan_of(loss, params)
  assert plan.sites == () and plan.direct == (0, 1, 2, 3)


def test_ys_no_one_reads_keep_a_site():
  """``nnx.remat`` passes a module's parameters out of its body; a scan's
  ys that nothing reads are no reader."""

  def loss(w, x):
    h, ws = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), w), x, w)
    return jnp.sum(h)

  (site,) = plan_of(loss, jnp.ones((2, 5, 5))).sites
  assert site.layer.stacked


def test_checkpoint_and_jit_inside_a_scan_body_are_followed():
  block = jax.checkpoint(jax.jit(lambda h, w: jnp.tanh(h @ w)))
  loss = lambda w, x: jnp.sum(
    jax.lax.scan(lambda h, w: (block(h, w), None), x, w)[0]
  )
  (site,) = plan_of(loss, jnp.ones((2, 5, 5))).sites
  assert len(site.path) == 4 and type(site.layer.inner) is layers.Dense


@pytest.mark.parametrize("reverse", [False, True])
def test_run_captures_each_iteration_in_a_scan(reverse):
  """Captures and output gradients stacked ``[L, ...]`` in the order of
  the stacked weight, also for a reverse scan."""
  w = jnp.arange(2 * 25.0).reshape(2, 5, 5) / 50
  x = jnp.arange(30.0).reshape(6, 5) / 30

  def loss(w, x):
    body = lambda h, w: (jnp.sin(h @ w), h)
    return jax.lax.scan(body, x, w, reverse=reverse)

  plan = plan_of(lambda w, x: jnp.sum(loss(w, x)[0]), w, x)
  z = jnp.zeros((2, 6, 5))

  def total(z):
    outs, caps = trace.run(plan, [w, x], [z])
    return outs[0], caps

  d, (caps,) = jax.grad(total, has_aux=True)(z)
  inputs = loss(w, x)[1]  # the carry each iteration read, as ys
  np.testing.assert_allclose(caps[0], inputs, rtol=1e-6)
  order = [1, 0] if reverse else [0, 1]
  np.testing.assert_allclose(
    d[order[-1]], jnp.cos(inputs[order[-1]] @ w[order[-1]]), rtol=1e-6
  )
