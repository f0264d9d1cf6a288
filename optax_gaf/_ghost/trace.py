"""The layers that read each parameter, found in the loss function's jaxpr.

With ``scan.py`` (its part for ``lax.scan``) the only module of optax_gaf
that reads jaxpr equations. It traces ``loss_fn(params, microbatch)`` once
and sorts every parameter leaf:

- a **site** leaf is read by exactly one linear operation that a layer class
  of ``layers.py`` is registered for (``dot_general``,
  ``conv_general_dilated``, ``gather``), possibly through reshapes,
  transposes, reversals and casts to other real floating dtypes (a cast to
  complex or int makes the leaf direct: :func:`_exact_types`). Its
  microgradient is a function of that layer's other operand ``x`` and output
  gradient ``d`` alone, which :func:`run` captures. Each site holds a typed
  layer object (the registered class, or
  :class:`~optax_gaf._ghost.layers.Opaque` where that class declines). A
  site leaf may also be read outside its layer (an L2 term in the loss, a
  weight norm): those reads add a **residual** to its gradient, which
  autodiff forms (:func:`data_dependent` tells whether it differs between
  microbatches);
- an **unused** leaf has a zero gradient;
- every other leaf (LayerNorm scales, biases, tied weights, parameters read
  inside a custom derivative, in a ``scan``'s carry or in a scan within a
  scan) is **direct**: autodiff forms its per-microbatch gradients, one copy
  of that leaf per microbatch.

Nested ``jit`` calls and ``jax.checkpoint`` regions are followed, so layers
wrapped by ``jnp.take``, a jitted block or a rematerialized block are found
too; a checkpoint is re-run as a checkpoint, so it still saves its memory.
So is the body of a ``lax.scan`` that a leaf enters as ``xs`` (layers
stacked on an axis L, sliced per iteration: ``nnx.scan`` over layers) or as
a constant (an RNN's weight, read every iteration); a layer there is
:class:`~optax_gaf._ghost.scanned.Scanned` (``scan.py``), and the scan is
re-run as a scan.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from optax_gaf._ghost import embedding  # noqa: F401 (registers gather)
from optax_gaf._ghost import layers
from optax_gaf._ghost import scan
from optax_gaf._ghost import scanned

# Isometries of a tensor: they keep inner products, so a layer that reads a
# parameter through them still has a ghost Gram matrix. ``rev`` (a kernel
# flipped by ``conv_transpose(transpose_kernel=True)``) is a permutation.
_STRUCTURAL = frozenset(
  {
    "reshape",
    "transpose",
    "convert_element_type",
    "squeeze",
    "expand_dims",
    "rev",
  }
)
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})
# jax.checkpoint (remat): followed too, and re-run under jax.checkpoint.
_REMAT = frozenset({"checkpoint", "remat2"})


def _replay(chain, x, cast: bool = True):
  """Applies a chain's structural equations to ``x`` (its dtype casts only
  with ``cast``)."""
  for j, step in enumerate(chain):
    if isinstance(step, scan.ScanEntry):
      if step.stacked:  # the rest of the chain, on each slice
        rest = chain[j + 1 :]
        return jax.vmap(lambda s, rest=rest: _replay(rest, s, cast))(x)
    elif cast or step.primitive.name != "convert_element_type":
      x = _bind(step, [x])[0]
  return x


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
  """A layer that is the only reader of one parameter leaf.

  Attributes:
    path: the layer's equation index, through nested ``jit`` calls.
    leaf: the parameter's index in ``jax.tree.leaves(params)``.
    param_pos: which operand of the layer is (derived from) the parameter.
    layer: the typed layer (``layers.Dense``, ``layers.Conv``...).
    chain: the structural equations from the leaf to that operand, and
      where it enters a scan (:class:`~optax_gaf._ghost.scan.ScanEntry`).
    residual: whether the leaf is also read outside this layer (an L2
      term, a norm): its gradient adds those reads' part, the residual.
  """

  path: tuple[int, ...]
  leaf: int
  param_pos: int
  layer: layers.Layer
  chain: tuple[Any, ...]
  residual: bool = False

  def operand_of(self, leaf: jax.Array, cast: bool = True) -> jax.Array:
    """The layer's parameter operand, from the leaf (replays the chain).

    With ``cast=False`` the chain's dtype casts are skipped: the operand's
    layout in the leaf's dtype (a residual added to float32 gradients must
    not be rounded to a bfloat16 operand's precision first).
    """
    return _replay(self.chain, leaf, cast)

  def to_leaf(self, operand_grad: jax.Array, leaf_aval) -> jax.Array:
    """Maps a gradient of the layer's parameter operand back to its leaf."""
    zero = jnp.zeros(leaf_aval.shape, leaf_aval.dtype)
    zero = layers.varying(zero, layers.varying_axes(operand_grad))
    _, vjp = jax.vjp(self.operand_of, zero)
    return vjp(operand_grad.astype(self.layer.operand.dtype))[0]


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """What :func:`find_sites` learnt from one trace of the loss function."""

  jaxpr: Any  # ClosedJaxpr of loss_fn(params, microbatch, *args)
  out_tree: Any
  out_shape: Any
  n_leaves: int
  sites: tuple[Site, ...]
  direct: tuple[int, ...]
  unused: tuple[int, ...]
  layer_reads: tuple[int, ...] = ()  # per leaf: how many layers read it


def _inner(eqn) -> tuple[Any, list] | None:
  """``(jaxpr, consts)`` of a call or checkpoint equation, else None."""
  name = eqn.primitive.name
  if name not in _CALLS and name not in _REMAT:
    return None
  inner = eqn.params.get("jaxpr")
  if isinstance(inner, jcore.ClosedJaxpr):
    return inner.jaxpr, list(inner.consts)
  return (inner, []) if isinstance(inner, jcore.Jaxpr) else None


def _bind(eqn, ins) -> list:
  """Applies ``eqn``'s primitive to ``ins`` (as ``jax.core.eval_jaxpr``)."""
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
  return list(out) if eqn.primitive.multiple_results else [out]


def _aval(v) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)


def _layer(eqn, param_pos: int, chain=()) -> layers.Layer:
  """The typed layer of ``eqn`` read at ``param_pos``; Opaque if none fits.

  Read through a ``ScanEntry`` of ``chain``: that layer, scanned.
  """

  def apply(w, others):
    ins = list(others)
    ins.insert(param_pos, w)
    return _bind(eqn, ins)[0]

  kind = eqn.primitive.name
  op = layers.LinearOp(
    kind=kind,
    params=dict(eqn.params),
    ins=tuple(_aval(v) for v in eqn.invars),
    out=_aval(eqn.outvars[0]),
    param_pos=param_pos,
    apply=apply,
  )
  cls = layers.registered(kind)
  layer = None if cls is None else cls.from_op(op)
  layer = layers.Opaque.from_op(op) if layer is None else layer
  for step in chain:
    if isinstance(step, scan.ScanEntry):
      layer = scanned.Scanned.wrap(layer, step.length, step.stacked)
  return layer


def _real(v) -> bool:
  return jnp.issubdtype(v.aval.dtype, jnp.floating)


def _exact_types(eqn) -> bool:
  """Whether a layer's captures give its parameter's gradient as they are:
  real floating operands and output (integer ids allowed). A complex one
  would need conjugates, an integer one has no gradient: those go direct."""
  ins_ok = all(
    _real(v) or jnp.issubdtype(v.aval.dtype, jnp.integer) for v in eqn.invars
  )
  return ins_ok and _real(eqn.outvars[0])


def _walk(jaxpr, origins: dict, path: tuple, uses: dict) -> None:
  """Follows each parameter leaf through ``jaxpr``, recording its readers.

  ``origins`` maps a variable derived from a leaf by structural ops to
  ``(leaf, chain)``; ``uses[leaf]`` collects ``(path, eqn, operand, chain)``
  per linear reader and None per any other reader.
  """
  for i, eqn in enumerate(jaxpr.eqns):
    src = [
      origins.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars
    ]
    if not any(src):
      continue
    name = eqn.primitive.name
    if name in _STRUCTURAL and len(eqn.invars) == 1 and _real(eqn.outvars[0]):
      leaf, chain = src[0]
      origins[eqn.outvars[0]] = (leaf, chain + (eqn,))
    elif name == "scan":
      scan.walk(eqn, src, path + (i,), uses, jaxpr, _walk)
    elif _inner(eqn) is not None:
      inner = _inner(eqn)[0]
      inner_origins = {v: o for v, o in zip(inner.invars, src) if o}
      _walk(inner, inner_origins, path + (i,), uses)
      for outer, v in zip(eqn.outvars, inner.outvars):
        if isinstance(v, jcore.Var) and v in inner_origins:
          origins[outer] = inner_origins[v]
    else:
      readers = [k for k, o in enumerate(src) if o]
      if (
        len(readers) == 1
        and readers[0] in layers.param_operands(name)
        and _exact_types(eqn)
      ):
        k = readers[0]
        leaf, chain = src[k]
        uses[leaf].append((path + (i,), eqn, k, chain))
      else:
        for o in src:
          if o:
            uses[o[0]].append(None)


def _one_layer(uses: list) -> bool:
  """Whether one layer reads the leaf; other reads (None) are a residual,
  unless the layer is inside a scan (its operand is one slice there)."""
  layer = [u for u in uses if u is not None]
  if len(layer) != 1:
    return False
  in_scan = any(isinstance(s, scan.ScanEntry) for s in layer[0][3])
  return len(uses) == 1 or not in_scan


def find_sites(fn, params, *args) -> Plan:
  """Traces ``fn(params, *args)`` and sorts the leaves of ``params``.

  Args:
    fn: the loss function of one microbatch.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    *args: the other arguments, as ``fn`` takes them.

  Returns:
    The :class:`Plan`: the jaxpr, its sites, direct and unused leaves.
  """
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, *args)
  n = len(jax.tree.leaves(params))
  origins = {v: (i, ()) for i, v in enumerate(closed.jaxpr.invars[:n])}
  uses = {i: [] for i in range(n)}
  _walk(closed.jaxpr, origins, (), uses)
  # A leaf that is also an output of fn is read outside any layer.
  for v in closed.jaxpr.outvars:
    if isinstance(v, jcore.Var) and v in origins:
      uses[origins[v][0]].append(None)
  sites = tuple(
    Site(path, leaf, k, _layer(eqn, k, chain), chain, residual=len(u) > 1)
    for leaf, u in uses.items()
    if _one_layer(u)
    for path, eqn, k, chain in filter(None, u)
  )
  site_leaves = {s.leaf for s in sites}
  return Plan(
    jaxpr=closed,
    out_tree=jax.tree.structure(out_shape),
    out_shape=out_shape,
    n_leaves=n,
    sites=sites,
    direct=tuple(i for i in range(n) if uses[i] and i not in site_leaves),
    unused=tuple(i for i in range(n) if not uses[i]),
    layer_reads=tuple(sum(u is not None for u in uses[i]) for i in range(n)),
  )


def run(
  plan: Plan,
  flat_args: Sequence[Any],
  zs: Sequence[jax.Array],
  originals: Sequence[Any] | None = None,
):
  """Evaluates the traced function, adding ``zs[k]`` to site k's output.

  Args:
    plan: from :func:`find_sites`.
    flat_args: the flat leaves of ``(params, *args)``.
    zs: one array per site, shaped like its output: the gradient with
      respect to it is the site's output gradient ``d``.
    originals: the params leaves the layers of residual sites read (their
      other reads take ``flat_args``' copy, whose gradient is then the
      residual alone); None reads ``flat_args`` everywhere.

  Returns:
    ``(outputs, captures)``: the function's flat outputs, and per site the
    list of its operands other than the parameter (the layer inputs ``x``).
  """
  index = {s.path: k for k, s in enumerate(plan.sites)}
  calls = {s.path[:j] for s in plan.sites for j in range(1, len(s.path))}

  def go(jaxpr, consts, invals, path, zs):
    """``(outputs, {site: captures})`` of ``jaxpr``, nested calls in;
    ``zs``: ``{site: z}`` for the sites inside."""
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, invals))
    captures = {}

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    for i, eqn in enumerate(jaxpr.eqns):
      here = path + (i,)
      ins = [read(v) for v in eqn.invars]
      if here in index and originals is not None:
        site = plan.sites[index[here]]
        if site.residual:
          ins[site.param_pos] = site.operand_of(originals[site.leaf])
      if here in calls:  # a call with a site inside: step in
        outs, inner = _step_in(eqn, ins, here, zs)
        captures.update(inner)
      else:
        outs = _bind(eqn, ins)
      if here in index:
        k = index[here]
        pos = plan.sites[k].param_pos
        captures[k] = [x for j, x in enumerate(ins) if j != pos]
        outs = [outs[0] + zs[k].astype(outs[0].dtype)]
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars], captures

  def _step_in(eqn, ins, here, zs):
    if eqn.primitive.name == "scan":
      n = len(here)
      inside = {k: z for k, z in zs.items() if plan.sites[k].path[:n] == here}
      body = lambda jaxpr, consts, ins, zs: go(jaxpr, consts, ins, here, zs)
      return scan.run(eqn, ins, inside, body)
    jaxpr, consts = _inner(eqn)
    fn = lambda ins: go(jaxpr, consts, ins, here, zs)
    if eqn.primitive.name in _REMAT:  # recomputed in the backward pass
      params = eqn.params
      fn = jax.checkpoint(
        fn, prevent_cse=params["prevent_cse"], policy=params["policy"]
      )
    return fn(ins)

  closed = plan.jaxpr
  outs, captures = go(
    closed.jaxpr, closed.consts, list(flat_args), (), dict(enumerate(zs))
  )
  return outs, [captures[k] for k in range(len(plan.sites))]


def _taint(jaxpr, tainted: Sequence[bool]) -> list[bool]:
  """Which outputs of ``jaxpr`` may depend on its tainted inputs.

  Forward, conservative: an equation's outputs are tainted when any input
  is, except that calls are followed (a jitted block's parameter path stays
  clean when only its data path is tainted).
  """
  dirty = {v for v, t in zip(jaxpr.invars, tainted) if t}
  for eqn in jaxpr.eqns:
    ins = [isinstance(v, jcore.Var) and v in dirty for v in eqn.invars]
    if not any(ins):
      continue
    inner = _inner(eqn)
    outs = _taint(inner[0], ins) if inner else [True] * len(eqn.outvars)
    dirty.update(v for v, t in zip(eqn.outvars, outs) if t)
  return [isinstance(v, jcore.Var) and v in dirty for v in jaxpr.outvars]


def data_dependent(fn, args, tainted: Sequence[bool]) -> list[bool]:
  """Which outputs of ``fn(*args)`` may depend on its tainted inputs.

  Args:
    fn: a function of flat arrays (a residual's gradient, say).
    args: its arguments (arrays or ``jax.ShapeDtypeStruct``).
    tainted: per argument, whether it varies between microbatches.

  Returns:
    Per flat output, False where the output is provably the same for every
    value of the tainted arguments (an L2 term's gradient).
  """
  closed = jax.make_jaxpr(fn)(*args)
  return _taint(closed.jaxpr, tainted)
