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
per microbatch, K inputs, J outputs); ``layers.py`` has each layer kind's
maths. Direct leaves (see ``trace.py``) come with their per-microbatch
gradients from autodiff. Each leaf gets one object here that forms its Gram
matrix, its largest entries and its weighted sum; ``routes`` names them.

:class:`GhostMicrogradients` is a placement: ``gaf`` asks it for the Gram
matrix and the weighted sum exactly as it asks a device placement, so every
rule, threshold and state works unchanged.
"""

import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_gaf import _checks
from optax_gaf import _microbatching
from optax_gaf._ghost import capture
from optax_gaf._ghost import layers
from optax_gaf._ghost import leaves
from optax_gaf._ghost import trace

ROUTES = ("auto", "ghost", "materialize")


_NOT_ARRAYS = (
  "GhostMicrogradients holds layer inputs and output gradients, not stacked"
  " microgradients: pass it straight to optax_gaf.gaf() (or"
  " process(optax.identity(), gaf(...), opt)) within the same traced step."
  " A transform of each microgradient before gaf (optax.scale, clipping),"
  " a wrapper around gaf (optax.MultiSteps, optax.apply_if_finite: put it"
  " after gaf in process), adacons, and_mask, or returning it from jax.jit"
  " need stacked microgradients: use optax_gaf.microbatch_grads."
)


class NotArraysError(TypeError, AttributeError):
  """Raised when a transform treats :class:`GhostMicrogradients` as arrays."""


class GhostMicrogradients:
  """N microgradients held as layer captures; a placement for ``gaf``.

  Made by :func:`ghost_microgradients`; pass it to :func:`optax_gaf.gaf` (or
  ``process``/``chain`` with it) where stacked microgradients would go. It is
  no pytree on purpose (it is registered as one whose flattening raises
  :class:`NotArraysError`): a transform placed before ``gaf`` would otherwise
  treat the captured activations as gradients. It lives inside one traced
  train step. Code that looks into the gradients before the optimizer
  (``TrainState.apply_gradients``, ``nnx.Optimizer.update``) gets
  :meth:`tree`, the params' tree of placeholders, which ``gaf`` also takes.

  Attributes:
    num_microbatches: N.
    treedef: the params' tree structure.
    virtual_leaves: ``jax.ShapeDtypeStruct`` ``[N, *param_shape]`` per leaf:
      the stacked microgradients this object stands for.
    routes: per parameter leaf, ``"ghost"``, ``"materialize"``, ``"direct"``
      or ``"unused"`` (how its Gram matrix is formed).
    residuals: per parameter leaf, None, or for a layer's leaf the loss
      also reads elsewhere (an L2 term), ``"shared"`` (those reads'
      gradient is the same for every microbatch: taken once) or
      ``"per_microbatch"`` (formed per microbatch, as the stacked route).
    gram_costs: per parameter leaf, the multiply-adds of its Gram matrix
      on its route (a formed layer's N microgradients are left out: they
      replace the plain step's weight gradient). With a plain step's FLOPs
      ``F``, ``1 + 2 * sum(gram_costs) / F`` is a floor of GAF's cost.
    kinds: per parameter leaf, the class name of the layer that reads it
      (``"Dense"``, ``"Conv"``, ``"Embedding"``, ``"Opaque"``: no maths of
      its own, per-example ``jax.vjp``), or None (direct, unused).
  """

  def __init__(self, per_leaf, n, treedef, avals):
    self._per_leaf, self._avals = per_leaf, avals
    self.num_microbatches, self.treedef = n, treedef
    self.routes = [leaf.route for leaf in per_leaf]
    self.residuals = [leaf.residual for leaf in per_leaf]
    self.kinds = [leaf.kind for leaf in per_leaf]
    self.gram_costs = [float(leaf.gram_cost()) for leaf in per_leaf]
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

  def tree(self) -> Any:
    """The params' tree with a placeholder per leaf; ``gaf`` takes it too.

    Code that indexes or filters the gradients before the optimizer
    (``nnx.state(grads, nnx.Param)``, ``grads["params"]``) gets this tree;
    ``gaf`` takes it, or any part of it, as this ghost restricted to those
    leaves. Its leaves (``GhostLeaf``) are no arrays.
    """
    from optax_gaf._ghost import view  # view imports this module

    return view.tree(self)

  def __contains__(self, key) -> bool:
    # TrainState.apply_gradients asks '"_overwrite_with_gradient" in grads'.
    from optax_gaf._ghost import view

    return view.contains(self, key)

  def __getitem__(self, key):
    return self.tree()[key]

  @property
  def num_microgradients(self) -> int:
    return self.num_microbatches

  @property
  def leaves(self) -> list[jax.ShapeDtypeStruct]:
    return self.virtual_leaves

  def gram(self, per_leaf=False, factors=None) -> jax.Array:
    """Stage 1, as ``Placement.gram``."""
    grams = []
    for i, leaf in enumerate(self._per_leaf):
      f = None if factors is None else factors[i] if per_leaf else factors
      grams.append(leaf.gram(f))
    return jnp.stack(grams) if per_leaf else sum(grams[1:], grams[0])

  def max_abs(self) -> jax.Array:
    """``[L, N]`` bounds on each microgradient's largest entry, per leaf."""
    return jnp.stack([leaf.max_abs() for leaf in self._per_leaf])

  def stacked(self) -> list[jax.Array]:
    """The N microgradients per leaf, ``[N, *param_shape]``, formed.

    N x P numbers, as ``microbatch_grads`` gives them: ``gaf(axis_name=...)``
    (and ``sharded_params``) hand them to the collectives' plan.
    """
    out = [
      leaf.stacked().astype(a.dtype)
      for leaf, a in zip(self._per_leaf, self._avals)
    ]
    axes = frozenset().union(*map(layers.varying_axes, out))
    return [layers.varying(x, axes) for x in out]

  def combine(self, weights, usable, leaves=None) -> list[jax.Array]:
    """Stage 3: ``sum_n w_n g_n`` per leaf, in each leaf's dtype."""
    if leaves is not None:
      raise NotArraysError(
        "GhostMicrogradients combines its own microgradients only; a"
        " transform that needs other arrays per microgradient (and_mask's"
        " signs) needs optax_gaf.microbatch_grads."
      )
    for leaf in self._per_leaf:  # formed once, outside the cond
      leaf.prepare()
    # Unusable rows must be zeroed (0 * nan is nan): a pass over every
    # capture, taken only on the rare step that needs it.
    return jax.lax.cond(
      jnp.all(usable),
      lambda: self._combine(weights, None),
      lambda: self._combine(weights, usable),
    )

  def _combine(self, weights, usable):
    out = []
    for i, (leaf, aval) in enumerate(zip(self._per_leaf, self._avals)):
      w = weights if weights.ndim == 1 else weights[i]
      ok = None if usable is None else usable if usable.ndim == 1 else usable[i]
      out.append(leaf.combine(w, ok).astype(aval.dtype))
    return out


def _no_leaves(ghost):
  """Its pytree flattening: every tree operation on it (a transform, a
  wrapper, ``jax.jit``'s outputs) raises, naming the fix."""
  del ghost
  raise NotArraysError(_NOT_ARRAYS)


jax.tree_util.register_pytree_node(
  GhostMicrogradients, _no_leaves, lambda aux, children: None
)


def _check_params(params) -> None:
  """The stacked route's messages, before any trace: odd leaves."""
  path_leaves = jax.tree_util.tree_leaves_with_path(params)
  if not path_leaves:
    raise ValueError(
      "The params pytree has no leaves, so the microgradients pytree has no"
      " leaves: there is nothing for GAF to compare."
    )
  for path, x in path_leaves:
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.complexfloating):
      _checks.check_real_dtype(jax.tree_util.keystr(path), x)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
        f"ghost_microgradients differentiates every params leaf; leaf"
        f" {jax.tree_util.keystr(path)} has dtype {dtype}. Keep"
        " non-float state out of params (pass it in the batch or *args)."
      )


def _check_plan(plan, has_aux: bool) -> None:
  pair = isinstance(plan.out_shape, tuple) and len(plan.out_shape) == 2
  if has_aux and not pair:
    raise ValueError(
      "With has_aux=True, loss_fn must return (loss, aux); it returned"
      f" {plan.out_shape}. Return (loss, aux), or leave has_aux=False."
    )
  loss = plan.out_shape[0] if has_aux else plan.out_shape
  if (
    not hasattr(loss, "shape")
    or loss.shape != ()
    or not jnp.issubdtype(loss.dtype, jnp.floating)
  ):
    raise ValueError(
      "loss_fn must return the scalar mean loss of one microbatch"
      f" (with has_aux=True: (loss, aux)); got {loss}."
    )


# A direct leaf this large costs N copies worth a warning (a 256 x 256
# kernel); LayerNorm scales and biases stay quiet.
WARN_SIZE = 2**16
_WARNED: set = set()


def _warn_direct(plan, params, n: int) -> None:
  """Warns once per leaf, at trace time, when a large leaf goes direct."""
  path_leaves = jax.tree_util.tree_leaves_with_path(params)
  for i in plan.direct:
    path, x = path_leaves[i]
    key = (jax.tree_util.keystr(path), np.shape(x), plan.layer_reads[i])
    if np.size(x) < WARN_SIZE or key in _WARNED:
      continue
    _WARNED.add(key)
    k = plan.layer_reads[i]
    why = (
      f"{k} layers read it (tied weights)"
      if k > 1
      else "no layer the ghost route knows reads it alone: it is read in"
      " a lax.scan's carry, a scan within a scan, a while loop or a"
      " custom derivative, by a layer in a scan and elsewhere, or only"
      " non-linearly"
    )
    warnings.warn(
      f"ghost_microgradients: params leaf {key[0]} {key[1]} takes the"
      f" direct route because {why}. Autodiff forms its {n} microgradients"
      f" from {n} copies of it, as costly as microbatch_grads for this leaf"
      " (for a convolution kernel, far more). Read it in one layer (untie"
      " the weights, unroll the loop), or use microbatch_grads.",
      stacklevel=3,
    )


def _ghost_step(loss_fn, n, has_aux, route, params, batch, args):
  """``(losses, GhostMicrogradients)``: :func:`ghost_microgradients`' work."""
  if "flax.nnx" in sys.modules:  # nnx.Optimizer.update(model, ghost)
    importlib.import_module("optax_gaf.flax")
  micro = _microbatching.split_microbatches(batch, n)
  micro = jax.tree.map(jnp.asarray, micro)
  _check_params(params)
  params, one = capture.traced_like(params, micro)
  loss_of, arrays = capture.static_args(loss_fn, args)
  plan = trace.find_sites(loss_of, params, one, *arrays)
  _check_plan(plan, has_aux)
  _warn_direct(plan, params, n)
  residual = capture.residual_leaves(plan, params, one, arrays, has_aux)
  value, caps, ds, grads = capture.capture(
    plan, n, params, micro, arrays, has_aux, residual
  )
  caps, ds, grads = capture.gathered((caps, ds, grads), micro)
  avals = [
    jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))
    for x in jax.tree.leaves(params)
  ]
  per_leaf = leaves.per_leaf(plan, n, route, avals, caps, ds, grads)
  treedef = jax.tree.structure(params)
  return value, GhostMicrogradients(per_leaf, n, treedef, avals)


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
    return _ghost_step(loss_fn, n, has_aux, route, params, batch, args)

  return fn
