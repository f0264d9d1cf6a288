"""Ghost microgradients: the Gram matrix and the combine from layer captures.

For a layer ``y = x W`` read by microbatch n at tokens ``s`` (inputs
``x_ns``, output gradients ``d_ns``) the microgradient is ``g_n = x_n^T d_n``,
so

- ``<g_n, g_m> = sum_{s,t} (x_ns . x_mt) (d_ns . d_mt)``: the Gram matrix
  without any microgradient (the "ghost norm" of DP-SGD, Goodfellow 2015;
  Li et al. 2021, extended to all inner products), and
- ``sum_n w_n g_n = x^T (w * d)``: one weight-gradient matmul, the one a
  plain backward pass does (the "book-keeping" trick of Bu et al. 2022).

Per layer the cheaper route is taken: ghost costs about ``(N S)^2 (K + J)``,
forming that layer's N microgradients about ``N S K J + N^2 K J`` (S tokens
per microbatch, K inputs, J outputs). Direct leaves (see ``_layers``) come
with their per-microbatch gradients from autodiff.

:class:`GhostMicrogradients` is a placement: ``gaf`` asks it for the Gram
matrix and the weighted sum exactly as it asks a device placement, so every
rule, threshold and state works unchanged.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_gaf import _checks
from optax_gaf import _combine
from optax_gaf import _gram
from optax_gaf import _layer_grads
from optax_gaf import _layers
from optax_gaf import _microbatching

ROUTES = ("auto", "ghost", "materialize")


def _mask(ok, x):
  """Zeros the rows of unusable microbatches (``0 * nan`` is nan)."""
  if ok is None or not jnp.issubdtype(x.dtype, jnp.inexact):
    return x
  return _combine.zero_unusable(x, ok)


def _scaled(x, f):
  """``f_n x_n`` in the statistics' dtype, zero where ``f_n`` is 0."""
  return _gram.scale_leaves([x], f)[0]


_NOT_ARRAYS = (
  "GhostMicrogradients holds layer inputs and output gradients, not stacked"
  " microgradients: pass it straight to optax_gaf.gaf() (or"
  " process(optax.identity(), gaf(...), opt)). A transform of each"
  " microgradient before gaf needs optax_gaf.microbatch_grads."
)


class NotArraysError(TypeError, AttributeError):
  """Raised when a transform treats :class:`GhostMicrogradients` as arrays."""


class GhostMicrogradients:
  """N microgradients held as layer captures; a placement for ``gaf``.

  Made by :func:`ghost_microgradients`; pass it to :func:`optax_gaf.gaf` (or
  ``process``/``chain`` with it) where stacked microgradients would go. It is
  no pytree on purpose: a transform placed before ``gaf`` would otherwise
  treat the captured activations as gradients. It lives inside one traced
  train step.

  Attributes:
    num_microbatches: N.
    treedef: the params' tree structure.
    virtual_leaves: ``jax.ShapeDtypeStruct`` ``[N, *param_shape]`` per leaf:
      the stacked microgradients this object stands for.
    routes: per parameter leaf, ``"ghost"``, ``"materialize"``, ``"direct"``
      or ``"unused"`` (how its Gram matrix is formed).
  """

  def __init__(self, plan, n, treedef, avals, captures, cotangents, direct,
               routes):  # fmt: skip
    self._plan, self._avals = plan, avals
    self._captures, self._cotangents = captures, cotangents
    self._direct = dict(zip(plan.direct, direct))
    self._site = {s.leaf: k for k, s in enumerate(plan.sites)}
    self.num_microbatches, self.treedef, self.routes = n, treedef, routes
    self._cache = {}
    self.virtual_leaves = [
      jax.ShapeDtypeStruct((n, *a.shape), a.dtype) for a in avals
    ]

  def __jax_array__(self):
    raise NotArraysError(_NOT_ARRAYS)

  def __getattr__(self, name):
    # Only for names not found: an array's .real, .shape, ... in a transform.
    if name.startswith("__"):
      raise AttributeError(name)
    raise NotArraysError(f"{_NOT_ARRAYS} (It has no attribute {name!r}.)")

  @property
  def num_microgradients(self) -> int:
    return self.num_microbatches

  @property
  def leaves(self) -> list[jax.ShapeDtypeStruct]:
    return self.virtual_leaves

  def _dtype(self):
    return _gram.stat_dtype(self.virtual_leaves)

  def _leaf_gram(self, i, f):
    """``[N, N]`` Gram matrix of leaf i's microgradients (scaled by ``f``)."""
    n, dtype = self.num_microbatches, self._dtype()
    if i in self._direct:
      g = self._direct[i]
      return _gram.cross_gram(*(2 * [g if f is None else _scaled(g, f)]), dtype)
    if i not in self._site:
      return jnp.zeros((n, n), dtype)
    k = self._site[i]
    site, others = self._plan.sites[k], self._captures[k]
    d = self._cotangents[k]
    if self.routes[i] == "ghost" and f is not None:
      # x to at most 1, d takes the rest: g_n becomes f_n g_n.
      others, d = _rescaled_captures(site, others, d, f)
    if self.routes[i] == "ghost":
      return _layer_grads.ghost_gram(site, others, d, dtype)
    g = self._examples(i)
    g = g if f is None else _scaled(g, f)
    return _gram.cross_gram(g, g, dtype)

  def _examples(self, i):
    """Leaf i's layer's N microgradients, formed once for Gram and combine."""
    if i not in self._cache:
      k = self._site[i]
      site = self._plan.sites[k]
      self._cache[i] = _layer_grads.per_example(
        site, self._captures[k], self._cotangents[k]
      )
    return self._cache[i]

  def gram(self, per_leaf=False, factors=None) -> jax.Array:
    """Stage 1, as ``Placement.gram``."""
    grams = []
    for i in range(len(self._avals)):
      f = None if factors is None else factors[i] if per_leaf else factors
      grams.append(self._leaf_gram(i, f))
    return jnp.stack(grams) if per_leaf else sum(grams[1:], grams[0])

  def max_abs(self) -> jax.Array:
    """``[L, N]`` bounds on each microgradient's largest entry, per leaf."""
    n, dtype = self.num_microbatches, self._dtype()
    out = []
    for i in range(len(self._avals)):
      if i in self._direct:
        out.append(_gram.max_abs([self._direct[i]])[0])
      elif i in self._site:
        k = self._site[i]
        out.append(_site_scale(self._captures[k], self._cotangents[k], dtype))
      else:
        out.append(jnp.zeros([n], dtype))
    return jnp.stack(out)

  def combine(self, weights, usable, leaves=None) -> list[jax.Array]:
    """Stage 3: ``sum_n w_n g_n`` per leaf, in each leaf's dtype."""
    if leaves is not None:
      raise NotArraysError(
        "GhostMicrogradients combines its own microgradients only; a"
        " transform that needs other arrays per microgradient (and_mask's"
        " signs) needs optax_gaf.microbatch_grads."
      )
    for i, route in enumerate(self.routes):  # formed once, outside the cond
      if route == "materialize":
        self._examples(i)
    # Unusable rows must be zeroed (0 * nan is nan): a pass over every
    # capture, taken only on the rare step that needs it.
    return jax.lax.cond(
      jnp.all(usable),
      lambda: self._combine(weights, None),
      lambda: self._combine(weights, usable),
    )

  def _combine(self, weights, usable):
    out = []
    for i, aval in enumerate(self._avals):
      w = weights if weights.ndim == 1 else weights[i]
      ok = None if usable is None else usable if usable.ndim == 1 else usable[i]
      if i in self._direct:
        g = _combine.weighted_rows(w, _mask(ok, self._direct[i]))
      elif self.routes[i] == "materialize":
        site = self._plan.sites[self._site[i]]
        g = _combine.weighted_rows(w, _mask(ok, self._examples(i)))
        g = _layer_grads.to_operand(site, g, self.num_microbatches)
        g = _layer_grads.to_leaf(site, g, aval)
      elif i in self._site:  # the book-keeping combine: x^T (w * d)
        k = self._site[i]
        site, d = self._plan.sites[k], self._cotangents[k]
        others = [_mask(ok, x) for x in self._captures[k]]
        wd = _mask(ok, d) * w.reshape((-1,) + (1,) * (d.ndim - 1)).astype(
          d.dtype
        )
        g = _layer_grads.book_keeping(site, others, wd)
        g = _layer_grads.to_leaf(site, g, aval)
      else:
        g = jnp.zeros(aval.shape, aval.dtype)
      out.append(g.astype(aval.dtype))
    return out


def _site_scale(others, d, dtype):
  """``max|x_n| * max|d_n|``: at least ``max|g_n| / S`` for a layer."""
  n = d.shape[0]
  scale = jnp.max(jnp.abs(d.reshape(n, -1)), axis=1).astype(dtype)
  x = others[0]
  if jnp.issubdtype(x.dtype, jnp.inexact):
    scale *= jnp.max(jnp.abs(x.reshape(n, -1)), axis=1).astype(dtype)
  return scale


def _rescaled_captures(site, others, d, f):
  """Captures whose microgradients are ``f_n g_n``, safe from overflow."""
  x = others[0]
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return others, _scaled(d, f)
  top = jnp.max(jnp.where(f.reshape((-1,) + (1,) * (x.ndim - 1)) > 0,
                          jnp.abs(x), 0))  # fmt: skip
  top = jnp.where(top > 0, top, 1).astype(f.dtype)
  x = _scaled(x, jnp.where(f > 0, 1 / top, 0))
  return [x, *others[1:]], _scaled(d, f * top)


def _routes(plan, n: int, route: str) -> list[str]:
  """Per leaf: how its Gram matrix is formed (see ``GhostMicrogradients``)."""
  routes = ["direct" if i in plan.direct else "unused"
            for i in range(plan.n_leaves)]  # fmt: skip
  for site in plan.sites:
    ghost, materialize = _layer_grads.costs(site, n)
    if ghost is None or route == "materialize":
      routes[site.leaf] = "materialize"
    elif route == "ghost" or ghost <= materialize:
      routes[site.leaf] = "ghost"
    else:
      routes[site.leaf] = "materialize"
  return routes


def _check_plan(plan, params, has_aux: bool) -> None:
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
      raise TypeError(
        f"ghost_microgradients differentiates every params leaf; leaf"
        f" {jax.tree_util.keystr(path)} has dtype {jnp.result_type(x)}. Keep"
        " non-float state out of params (pass it in the batch or *args)."
      )
  loss = plan.out_shape[0] if has_aux else plan.out_shape
  if has_aux and not (isinstance(plan.out_shape, tuple)
                      and len(plan.out_shape) == 2):  # fmt: skip
    raise ValueError("With has_aux=True, loss_fn must return (loss, aux).")
  if (
    not hasattr(loss, "shape")
    or loss.shape != ()
    or not jnp.issubdtype(loss.dtype, jnp.floating)
  ):
    raise ValueError(
      "loss_fn must return the scalar mean loss of one microbatch"
      f" (with has_aux=True: (loss, aux)); got {loss}."
    )


def _capture(plan, n, params, micro, args, has_aux):
  """One vmapped forward and backward: losses, aux and the layer captures."""
  leaves = jax.tree.leaves(params)
  stacked = [jnp.broadcast_to(leaves[i], (n, *leaves[i].shape))
             for i in plan.direct]  # fmt: skip
  zs = [jnp.zeros((n, *s.out.shape), s.out.dtype) for s in plan.sites]
  stacked, zs = _shard_like(stacked, micro), _shard_like(zs, micro)
  arg_leaves = jax.tree.leaves(args)

  def one(direct, z, mb):
    full = list(leaves)
    for i, x in zip(plan.direct, direct):
      full[i] = x
    outs, caps = _layers.run(plan, full + jax.tree.leaves(mb) + arg_leaves, z)
    value = plan.out_tree.unflatten(outs)
    loss = value[0] if has_aux else value
    return loss, (value, caps)

  def total(direct, z):
    losses, rest = jax.vmap(one)(direct, z, micro)
    return jnp.sum(losses), rest

  grad = jax.grad(total, argnums=(0, 1), has_aux=True)
  (direct, ds), (value, caps) = grad(stacked, zs)
  return value, caps, ds, direct


def _batch_axis(micro):
  """The Explicit mesh axes the microbatches are sharded over, or None."""
  spec = getattr(jax.typeof(jax.tree.leaves(micro)[0]).sharding, "spec", ())
  return spec[0] if spec else None


def _shard_like(arrays, micro):
  """With Explicit mesh axes vmap needs N sharded as the microbatches are."""
  axis = _batch_axis(micro)
  if axis is None:
    return arrays
  out = jax.sharding.PartitionSpec(axis)
  return [jax.sharding.reshard(x, out) for x in arrays]


def _gathered(tree, micro):
  """Captures sharded over Explicit axes, gathered for the Gram matrix."""
  if _batch_axis(micro) is None:
    return tree
  spec = jax.sharding.PartitionSpec()
  return jax.tree.map(lambda x: jax.sharding.reshard(x, spec), tree)


def ghost_microgradients(
  loss_fn: Callable[..., Any],
  num_microbatches: int,
  *,
  has_aux: bool = False,
  route: str = "auto",
) -> Callable[..., tuple[Any, GhostMicrogradients]]:
  r"""Like :func:`optax_gaf.microbatch_grads`, without forming N x P arrays.

  One forward and backward pass captures the inputs and output gradients of
  every layer that alone reads a parameter (``x @ W``, a convolution, an
  embedding); :func:`optax_gaf.gaf` takes the Gram matrix and the weighted
  sum from them (the ghost / book-keeping technique of DP-SGD), so every
  rule, threshold and the true skip work as on stacked microgradients. Per
  layer the cheaper route is taken: the ghost Gram matrix, or that layer's
  N microgradients. Other parameters (LayerNorm scales, biases, tied
  weights) get per-microbatch gradients from autodiff. Plain JAX, Linen
  ``apply`` and NNX ``nnx.merge`` inside ``loss_fn`` all work unchanged;
  ``loss_fn`` sees each microbatch alone, as in ``microbatch_grads``.

  Args:
    loss_fn: ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)``
      with ``has_aux=True``), the scalar mean loss of one microbatch.
    num_microbatches: N; the batch size must be a multiple of it.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    route: ``"auto"`` (the cheaper per layer), ``"ghost"`` or
      ``"materialize"`` (for every layer that has both).

  Returns:
    ``fn(params, batch, *args) -> (losses, ghost)``: ``losses`` is ``[N]``
    (or ``([N], aux with a leading N axis)``); ``ghost`` is a
    :class:`GhostMicrogradients`, the input of :func:`optax_gaf.gaf` within
    the same traced step.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, optax_gaf
    >>> def loss(p, b):
    ...   return jnp.mean((jnp.tanh(b["x"] @ p["w"]) @ p["v"] - b["y"]) ** 2)
    >>> params = {"w": jnp.ones((3, 4)) / 4, "v": jnp.ones(4)}
    >>> batch = {"x": jnp.eye(8, 3), "y": jnp.arange(8.0)}
    >>> tx = optax_gaf.process(optax.identity(), optax_gaf.gaf(0.97),
    ...                        optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> _, ghost = optax_gaf.ghost_microgradients(loss, 8)(params, batch)
    >>> updates, state = tx.update(ghost, state, params)
    >>> ghost.routes, updates["v"].shape
    (['materialize', 'ghost'], (4,))

  References:
    Goodfellow, `Efficient Per-Example Gradient Computations
    <https://arxiv.org/abs/1510.01799>`_, 2015.

    Bu, Mao and Xu, `Scalable and Efficient Training of Large Convolutional
    Neural Networks with Differential Privacy
    <https://arxiv.org/abs/2205.10683>`_, 2022.
  """
  n = _checks.num_microbatches(num_microbatches)
  route = _checks.choice(route, "route", ROUTES)

  def fn(params, batch, *args):
    micro = _microbatching.split_microbatches(batch, n)
    micro = jax.tree.map(jnp.asarray, micro)
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                       micro)  # fmt: skip
    plan = _layers.find_sites(loss_fn, params, one, *args)
    _check_plan(plan, params, has_aux)
    value, caps, ds, direct = _capture(plan, n, params, micro, args, has_aux)
    caps, ds, direct = _gathered((caps, ds, direct), micro)
    avals = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))
             for x in jax.tree.leaves(params)]  # fmt: skip
    ghost = GhostMicrogradients(
      plan, n, jax.tree.structure(params), avals, caps, ds, direct,
      _routes(plan, n, route),
    )  # fmt: skip
    return value, ghost

  return fn
