"""Each layer kind of ``optax_gaf._ghost.layers`` against ``vmap(grad)``.

For one layer ``y = apply(w, x)`` and the loss ``sum(sin(y) * t)`` of each
microbatch, the layer's ``ghost_gram``, ``per_example`` and ``book_keeping``
(from the captured ``x`` and output gradients ``d``) must give the Gram
matrix, the microgradients and their weighted sum that ``jax.vmap`` of
``jax.grad`` gives, in float64.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from optax_gaf._ghost import embedding
from optax_gaf._ghost import layers
from optax_gaf._ghost import numerics
from optax_gaf._ghost import trace
from optax_gaf._ghost.scanned import Scanned as scan_layer

N = 4


def head(y, t):
  return jnp.sum(jnp.sin(y) * t)


def captured(apply, w, xs, seed=0):
  """The layer's site, its captures ``(others, d)`` and ``vmap(grad)``."""
  plan = trace.find_sites(apply, w, xs[0])
  (site,) = plan.sites
  out = site.layer.out
  ts = jax.random.normal(jax.random.key(seed), (N, *out.shape), out.dtype)

  @jax.jit
  def run(w, xs, ts):
    def one(z, x, t):
      outs, caps = trace.run(plan, [w, x], [z])
      return head(outs[0], t), caps

    zs = jnp.zeros((N, *out.shape), out.dtype)
    d, (others,) = jax.vmap(jax.grad(one, has_aux=True))(zs, xs, ts)
    loss = lambda w, x, t: head(apply(w, x), t)
    want = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(w, xs, ts)
    return others, d, want

  return site, *run(w, xs, ts)


def layer_results(site, aval, others, d, weights, ghost):
  """Jitted: the layer's Gram matrix (or None), its N microgradients and
  their weighted sum, these two mapped back to the parameter leaf."""
  layer = site.layer

  @jax.jit
  def run(others, d, weights):
    gram = layer.ghost_gram(others, d, jnp.float64) if ghost else None
    per = layer.per_example(others, d)
    to_leaf = lambda g: site.to_leaf(layer.to_operand(g, N), aval)
    wd = d * weights.reshape((-1,) + (1,) * (d.ndim - 1))
    book = site.to_leaf(layer.book_keeping(others, wd), aval)
    return gram, jax.vmap(to_leaf)(per), book

  return run(others, d, weights)


def check_layer(apply, w, xs, kind, ghost=True):
  """The layer is a ``kind``; its three results match ``vmap(grad)``."""
  with jax.enable_x64(True):
    site, others, d, want = captured(apply, w, xs)
    layer = site.layer
    assert type(layer) is kind
    assert (layer.costs(N)[0] is not None) == ghost
    if not ghost:
      with pytest.raises(NotImplementedError):
        layer.ghost_gram(others, d, jnp.float64)
    weights = jnp.linspace(-1.0, 1.0, N, dtype=jnp.float64)
    aval = jax.ShapeDtypeStruct(w.shape, w.dtype)
    gram, per, book = layer_results(site, aval, others, d, weights, ghost)
    flat = np.asarray(want).reshape(N, -1)
    if ghost:
      np.testing.assert_allclose(gram, flat @ flat.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(per, want, rtol=1e-12)
    np.testing.assert_allclose(
      book, jnp.tensordot(weights, want, axes=1), rtol=1e-12, atol=1e-12
    )
    return layer


def normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float64)


class TestDense:
  @pytest.mark.parametrize(
    "apply, w_shape, x_shape",
    [
      (lambda w, x: x @ w, (5, 3), (6, 5)),  # tokens S = 6
      (lambda w, x: x @ w, (5, 3), (5,)),  # one token
      (lambda w, x: w @ x, (3, 5), (5, 6)),  # the parameter on the left
      (lambda w, x: jnp.einsum("abk,kj->abj", x, w), (4, 3), (2, 3, 4)),
      (lambda w, x: jnp.einsum("ckj,sck->sj", w, x), (2, 4, 3), (5, 2, 4)),
    ],
    ids=["tokens", "vector", "left", "two_free", "two_contracting"],
  )
  def test_matmuls(self, apply, w_shape, x_shape):
    with jax.enable_x64(True):
      w, xs = normal(0, w_shape), normal(1, (N, *x_shape))
    layer = check_layer(apply, w, xs, layers.Dense)
    assert layer.sizes[0] == 1

  @pytest.mark.parametrize(
    "spec",
    ["hsk,hkj->hsj", "hkj,hsk->hsj", "shk,hkj->hjs"],
    ids=["right", "left", "batch_in_the_middle"],
  )
  def test_batch_dimensions(self, spec):
    """Heads as dot_general batch dimensions: Hb independent matmuls."""
    lhs, rhs = spec.split("->")[0].split(",")
    w_spec = lhs if "s" not in lhs else rhs
    x_spec = rhs if w_spec == lhs else lhs
    sizes = {"h": 2, "s": 3, "k": 4, "j": 5}
    with jax.enable_x64(True):
      w = normal(0, [sizes[c] for c in w_spec])
      xs = normal(1, (N, *[sizes[c] for c in x_spec]))

    def apply(w, x):
      return jnp.einsum(spec, *((w, x) if w_spec == lhs else (x, w)))

    layer = check_layer(apply, w, xs, layers.Dense)
    assert layer.sizes == (2, 3, 4, 5)

  def test_costs(self):
    with jax.enable_x64(True):
      w, xs = normal(0, (5, 3)), normal(1, (N, 6, 5))
      site = captured(lambda w, x: x @ w, w, xs)[0]
    hb, s, k, j = site.layer.sizes
    assert (hb, s, k, j) == (1, 6, 5, 3)
    ghost, materialize = (N * s) ** 2 * (k + j), N * s * k * j + N * N * 15
    assert site.layer.costs(N) == (ghost, materialize)


CONVS = [
  (("NHWC", "HWIO", "NHWC"), (1, 1), "SAME", (1, 1)),
  (("NHWC", "HWIO", "NHWC"), (2, 1), "VALID", (1, 1)),
  (("NCHW", "OIHW", "NCHW"), (2, 2), ((1, 2), (0, 1)), (2, 1)),
  (("NHWC", "HWIO", "NHWC"), (1, 2), "SAME", (1, 2)),
]


def conv(spec, strides, padding, dilation, groups=1, lhs_dilation=None):
  def apply(w, x):
    return jax.lax.conv_general_dilated(
      x,
      w,
      strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=dilation,
      dimension_numbers=spec,
      feature_group_count=groups,
    )

  return apply


def conv_data(spec, channels=3, groups=1, features=4):
  with jax.enable_x64(True):
    xs = normal(0, (N, 2, 7, 9, channels))
    w = normal(1, (3, 2, channels // groups, features))
  if spec[0] == "NCHW":
    xs, w = xs.transpose(0, 1, 4, 2, 3), w.transpose(3, 2, 0, 1)
  return w, xs


def flax_apply(module):
  """``apply(kernel, x)`` of a bias-free Flax Linen module."""
  return lambda w, x: module.apply({"params": {"kernel": w}}, x)


def flax_kernel(module, x):
  with jax.enable_x64(True):
    params = module.init(jax.random.key(3), x)
    return params["params"]["kernel"].astype(jnp.float64)


class TestConv:
  @pytest.mark.parametrize("spec, strides, padding, dilation", CONVS)
  @pytest.mark.parametrize("patches", [True, False])
  def test_strides_padding_dilation_layouts(
    self, spec, strides, padding, dilation, patches, monkeypatch
  ):
    """As im2col matmuls, or above PATCHES_MAX per-example convolutions."""
    if not patches:
      monkeypatch.setattr(layers, "PATCHES_MAX", 0)
    w, xs = conv_data(spec)
    apply = conv(spec, strides, padding, dilation)
    layer = check_layer(apply, w, xs, layers.Conv)
    assert layer.as_matmuls(N) == patches

  def test_one_spatial_axis(self):
    with jax.enable_x64(True):
      w, xs = normal(0, (3, 2, 5)), normal(1, (N, 2, 8, 2))
    apply = conv(("NWC", "WIO", "NWC"), (1,), "SAME", (1,))
    layer = check_layer(apply, w, xs, layers.Conv)
    assert layer.sizes == (1, 16, 6, 5)

  @pytest.mark.parametrize("groups", [1, 3])
  def test_three_spatial_axes(self, groups):
    """``NDHWC``, strided, kernel-dilated, padded unevenly; grouped too."""
    with jax.enable_x64(True):
      w = normal(0, (2, 3, 2, 6 // groups, 3))
      xs = normal(1, (N, 2, 4, 6, 5, 6))
    spec = ("NDHWC", "DHWIO", "NDHWC")
    padding = ((1, 0), (0, 2), (1, 1))
    apply = conv(spec, (1, 2, 2), padding, (2, 1, 2), groups=groups)
    layer = check_layer(apply, w, xs, layers.Conv)
    assert layer.sizes[0] == groups
    assert layer.sizes[2:] == (12 * 6 // groups, 3 // groups)


GROUPED = [
  # (spec, strides, padding, dilation, in channels, groups, out features)
  (("NHWC", "HWIO", "NHWC"), (1, 1), "SAME", (1, 1), 4, 2, 6),
  (("NHWC", "HWIO", "NHWC"), (2, 1), "VALID", (1, 2), 4, 4, 4),  # depthwise
  (("NCHW", "OIHW", "NCHW"), (2, 2), ((1, 2), (0, 1)), (2, 1), 6, 3, 6),
  (("NHWC", "HWIO", "NHWC"), (1, 2), "SAME", (1, 1), 3, 3, 6),  # x2 per group
]


class TestGroupedConv:
  """``feature_group_count = G``: G ungrouped convolutions, Hb = G."""

  @pytest.mark.parametrize(
    "spec, strides, padding, dilation, channels, groups, features", GROUPED
  )
  @pytest.mark.parametrize("patches", [True, False])
  def test_groups_strides_padding_dilation_layouts(
    self,
    spec,
    strides,
    padding,
    dilation,
    channels,
    groups,
    features,
    patches,
    monkeypatch,
  ):
    if not patches:
      monkeypatch.setattr(layers, "PATCHES_MAX", 0)
    w, xs = conv_data(spec, channels, groups, features)
    apply = conv(spec, strides, padding, dilation, groups=groups)
    layer = check_layer(apply, w, xs, layers.Conv)
    assert layer.as_matmuls(N) == patches
    assert layer.sizes[0] == groups
    assert layer.sizes[2:] == (6 * channels // groups, features // groups)

  @pytest.mark.parametrize("multiplier", [1, 2])
  def test_flax_depthwise(self, multiplier):
    """``nn.Conv(feature_group_count=C)``, as in a MobileNet block."""
    module = nn.Conv(
      4 * multiplier, (3, 3), (2, 1), feature_group_count=4, use_bias=False
    )
    with jax.enable_x64(True):
      xs = normal(0, (N, 2, 7, 6, 4))
    w = flax_kernel(module, xs[0])
    layer = check_layer(flax_apply(module), w, xs, layers.Conv)
    assert layer.sizes == (4, 2 * 4 * 6, 9, multiplier)

  def test_haiku_depthwise(self):
    """``hk.DepthwiseConv2D``, MobileNetV1's: two features per channel."""
    f = hk.without_apply_rng(
      hk.transform(
        lambda x: hk.DepthwiseConv2D(2, 3, (1, 2), with_bias=False)(x)
      )
    )
    with jax.enable_x64(True):
      xs = normal(0, (N, 2, 6, 7, 3))
      params = f.init(jax.random.key(3), xs[0])
      (name,) = params
      w = params[name]["w"].astype(jnp.float64)
    apply = lambda w, x: f.apply({name: {"w": w}}, x)
    layer = check_layer(apply, w, xs, layers.Conv)
    assert layer.sizes == (3, 2 * 6 * 4, 9, 2)

  def test_costs(self):
    """Ghost: G Gram matrices of all tokens; materialize: G matmuls."""
    spec = ("NHWC", "HWIO", "NHWC")
    w, xs = conv_data(spec, 4, 2, 6)
    with jax.enable_x64(True):
      site = captured(conv(spec, (1, 1), "SAME", (1, 1), 2), w, xs)[0]
    hb, s, k, j = site.layer.sizes
    assert (hb, s, k, j) == (2, 2 * 7 * 9, 6 * 2, 3)
    p = w.size
    assert p == hb * k * j
    ghost = hb * (N * s) ** 2 * (k + j)
    assert site.layer.costs(N) == (ghost, N * hb * s * k * j + N * N * p)


TRANSPOSED = [
  # (strides, padding, kernel dilation, transpose_kernel)
  ((2, 2), "SAME", (1, 1), False),
  ((2, 1), "VALID", (1, 2), True),
  ((3, 2), ((2, 0), (1, 3)), (2, 1), False),
  ((1, 1), "SAME", (1, 1), True),
]


class TestTransposedConv:
  """``lhs_dilation``: patches of the input dilated by zeros."""

  @pytest.mark.parametrize("strides, padding, dilation, flip", TRANSPOSED)
  @pytest.mark.parametrize("patches", [True, False])
  def test_conv_transpose(
    self, strides, padding, dilation, flip, patches, monkeypatch
  ):
    if not patches:
      monkeypatch.setattr(layers, "PATCHES_MAX", 0)
    spec = ("NHWC", "HWIO", "NHWC")
    w, xs = conv_data(spec)
    if flip:  # the kernel is [H, W, out, in], flipped and swapped
      w = w.swapaxes(2, 3)

    def apply(w, x):
      return jax.lax.conv_transpose(
        x,
        w,
        strides,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=spec,
        transpose_kernel=flip,
      )

    layer = check_layer(apply, w, xs, layers.Conv)
    assert layer.lhs_dilation == strides
    assert layer.as_matmuls(N) == patches

  def test_grouped_and_input_dilated(self):
    spec = ("NCHW", "OIHW", "NCHW")
    w, xs = conv_data(spec, channels=4, groups=2, features=6)
    apply = conv(spec, (1, 2), ((2, 1), (0, 2)), (1, 2), 2, (2, 3))
    layer = check_layer(apply, w, xs, layers.Conv)
    assert layer.sizes[0] == 2

  @pytest.mark.parametrize("flip", [False, True])
  def test_flax_conv_transpose(self, flip):
    """``nn.ConvTranspose``; with ``transpose_kernel`` its kernel reaches
    the convolution through ``rev`` and a transpose."""
    module = nn.ConvTranspose(
      5, (3, 2), (2, 2), transpose_kernel=flip, use_bias=False
    )
    with jax.enable_x64(True):
      xs = normal(0, (N, 2, 4, 5, 3))
    w = flax_kernel(module, xs[0])
    layer = check_layer(flax_apply(module), w, xs, layers.Conv)
    assert layer.lhs_dilation == (2, 2)


class TestEmbedding:
  @pytest.mark.parametrize(
    "lookup, drops",
    [
      (lambda w, i: jnp.take(w, i, axis=0, mode="clip"), False),
      (
        lambda w, i: jnp.take(w, i, axis=0, mode="fill", fill_value=0.0),
        True,
      ),
      (lambda w, i: w.at[i].get(mode="drop", fill_value=0.0), True),
    ],
    ids=["clip", "fill", "drop"],
  )
  def test_modes_with_out_of_range_ids(self, lookup, drops):
    """Repeated ids across microbatches; ids past the table are clipped, or
    read nothing, as the gather's mode says."""
    with jax.enable_x64(True):
      table = normal(0, (6, 3))
    ids = jnp.array([[0, 2, 7], [2, 2, -1], [5, 9, 0], [1, 3, 2]])
    layer = check_layer(lookup, table, ids, embedding.Embedding)
    assert layer.drops == drops
    assert layer.lookups == 3

  @pytest.mark.parametrize(
    "lookup",
    [lambda w, i: w[i], lambda w, i: w.at[i].get(mode="promise_in_bounds")],
    ids=["index", "promise_in_bounds"],
  )
  def test_promised_in_bounds_and_many_axes(self, lookup):
    with jax.enable_x64(True):
      table = normal(0, (6, 2, 3))
    ids = jax.random.randint(jax.random.key(1), (N, 2, 3), -6, 6)
    layer = check_layer(lookup, table, ids, embedding.Embedding)
    assert layer.lookups == 6 and layer.drops

  def test_out_of_range_ids_promised_in_bounds(self):
    """table[ids] reads an id past the table clamped; autodiff drops its
    gradient, and so does the ghost Gram matrix (issue 26)."""
    with jax.enable_x64(True):
      table = normal(0, (6, 3))
    ids = jnp.array([[0, 2, 7], [2, 2, 1], [5, 9, 0], [1, 3, 2]])
    check_layer(lambda w, i: w[i], table, ids, embedding.Embedding)


class TestExactRows:
  """Every microbatch flagged (``numerics.RATIO = 0``): the rows formed from
  each microgradient give the same Gram matrix."""

  @pytest.fixture(autouse=True)
  def flag_all(self, monkeypatch):
    monkeypatch.setattr(numerics, "RATIO", 0.0)

  def test_dense_with_batch_dimensions(self):
    with jax.enable_x64(True):
      w, xs = normal(0, (2, 4, 5)), normal(1, (N, 3, 2, 4))
    apply = lambda w, x: jnp.einsum("shk,hkj->hsj", x, w)
    check_layer(apply, w, xs, layers.Dense)

  def test_convolution(self):
    w, xs = conv_data(CONVS[2][0])
    check_layer(conv(*CONVS[2]), w, xs, layers.Conv)

  def test_grouped_convolution(self):
    spec, strides, padding, dilation, c, g, f = GROUPED[2]
    w, xs = conv_data(spec, c, g, f)
    check_layer(conv(spec, strides, padding, dilation, g), w, xs, layers.Conv)

  @pytest.mark.parametrize("mode", ["clip", "fill", "promise_in_bounds"])
  def test_embedding(self, mode):
    with jax.enable_x64(True):
      table = normal(0, (6, 3))
    ids = jnp.array([[0, 2, 7], [2, 2, -1], [5, 9, 0], [1, 3, 2]])
    lookup = lambda w, i: w.at[i].get(mode=mode, fill_value=0.0)
    check_layer(lookup, table, ids, embedding.Embedding)


class TestOpaque:
  def test_batch_grouped_convolution(self):
    """``batch_group_count`` (as in a weight-gradient convolution)."""
    spec = ("NHWC", "HWIO", "NHWC")
    w, xs = conv_data(spec)

    def apply(w, x):
      return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=spec, batch_group_count=2
      )

    check_layer(apply, w, xs, layers.Opaque, ghost=False)

  def test_gather_of_columns(self):
    with jax.enable_x64(True):
      table = normal(0, (5, 6))
    ids = jnp.array([[0, 5], [2, 2], [1, 3], [4, 0]])
    lookup = lambda w, i: jnp.take(w, i, axis=1)
    check_layer(lookup, table, ids, layers.Opaque, ghost=False)


def scanned(inner, stacked):
  """``inner`` in each of a scan's iterations: its parameter sliced per
  iteration (stacked, ``w [L, ...]``) or the same each time (constant); the
  input ``x [L, ...]`` per microbatch, the outputs as ``ys``."""

  def apply(w, x):
    if stacked:
      body = lambda c, wx: (c, inner(*wx))
      return jax.lax.scan(body, 0.0, (w, x))[1]
    return jax.lax.scan(lambda c, x_l: (c, inner(w, x_l)), 0.0, x)[1]

  return apply


L = 3
DENSE_HEADS = lambda w, x: jnp.einsum("shk,hkj->hsj", x, w)


def batch_grouped(w, x):
  """``batch_group_count``: still Opaque (a weight-gradient convolution)."""
  return jax.lax.conv_general_dilated(
    x, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"),
    batch_group_count=2,
  )  # fmt: skip


SCANNED = {  # inner layer, w shape, x shape per iteration, x dtype
  "dense": (lambda w, x: x @ w, (5, 3), (6, 5), None),
  "heads": (DENSE_HEADS, (2, 4, 5), (3, 2, 4), None),
  "conv": (
    conv(("NWC", "WIO", "NWC"), (2,), "SAME", (1,)),
    (3, 2, 4),
    (2, 7, 2),
    None,
  ),
  "embedding": (
    lambda w, i: w.at[i].get(mode="fill", fill_value=0.0),
    (6, 3),
    (3,),
    int,
  ),
  "opaque": (batch_grouped, (3, 4, 4), (2, 7, 4), None),
}


class TestScanned:
  """A layer inside ``lax.scan``: its Gram matrix, microgradients and
  weighted sum over the L iterations match ``vmap(grad)``."""

  @pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "const"])
  @pytest.mark.parametrize("inner", sorted(SCANNED))
  def test_inner_layers(self, inner, stacked):
    apply, w_shape, x_shape, dtype = SCANNED[inner]
    with jax.enable_x64(True):
      w = normal(0, (L, *w_shape) if stacked else w_shape)
      if dtype is int:  # ids below, inside and past the 6-row table
        xs = jax.random.randint(jax.random.key(1), (N, L, *x_shape), -2, 8)
      else:
        xs = normal(1, (N, L, *x_shape))
    layer = check_layer(
      scanned(apply, stacked), w, xs, scan_layer, ghost=inner != "opaque"
    )
    assert layer.stacked == stacked and layer.length == L
    assert layer.out.shape[0] == L

  @pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "const"])
  def test_convolution_without_patches(self, stacked, monkeypatch):
    monkeypatch.setattr(layers, "PATCHES_MAX", 0)
    apply, w_shape, x_shape, _ = SCANNED["conv"]
    with jax.enable_x64(True):
      w = normal(0, (L, *w_shape) if stacked else w_shape)
      xs = normal(1, (N, L, *x_shape))
    check_layer(scanned(apply, stacked), w, xs, scan_layer)

  @pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "const"])
  def test_exact_rows(self, stacked, monkeypatch):
    monkeypatch.setattr(numerics, "RATIO", 0.0)
    with jax.enable_x64(True):
      w = normal(0, (L, 2, 4, 5) if stacked else (2, 4, 5))
      xs = normal(1, (N, L, 3, 2, 4))
    check_layer(scanned(DENSE_HEADS, stacked), w, xs, scan_layer)

  def test_costs(self):
    """Stacked: L times one iteration's; constant: L times the tokens."""
    with jax.enable_x64(True):
      xs = normal(1, (N, L, 6, 5))
      stacked = captured(
        scanned(lambda w, x: x @ w, True), normal(0, (L, 5, 3)), xs
      )[0]
      const = captured(
        scanned(lambda w, x: x @ w, False), normal(0, (5, 3)), xs
      )[0]
    ghost, formed = stacked.layer.inner.costs(N)
    assert stacked.layer.costs(N) == (L * ghost, L * formed)
    s = L * 6
    assert const.layer.costs(N) == ((N * s) ** 2 * 8, N * s * 15 + N * N * 15)


def test_registry():
  assert layers.registered("dot_general") is layers.Dense
  assert layers.registered("conv_general_dilated") is layers.Conv
  assert layers.registered("gather") is embedding.Embedding
  assert layers.registered("mul") is None
  assert layers.param_operands("dot_general") == (0, 1)
  assert layers.param_operands("conv_general_dilated") == (1,)
  assert layers.param_operands("tanh") == ()
