"""Where stages 1 and 3 run: one device, or many.

A :class:`Placement` knows where the microgradients live. It gives the rule
the global, replicated ``[N, N]`` Gram matrix, and turns the rule's weights
into the update. Every aggregator resolves one placement per ``update`` with
:func:`resolve_placement` and calls nothing else device-specific, so every rule
runs unchanged everywhere:

* :class:`LocalPlacement`: all N microgradients on this device.
* :class:`AllToAllPlacement` (``jax.shard_map``/``jax.pmap``, the default):
  about the bytes of one ring all-reduce, the cost of ``pmean``:

  1. flatten every leaf to ``[n_local, S]`` and zero-pad S to a multiple of D;
  2. ``all_to_all``: device d now holds chunk d of all N microgradients;
  3. Gram matrix of the chunks, ``psum`` (N x N scalars);
  4. the rule, on every device;
  5. the weighted sum of the chunks;
  6. ``all_gather`` of the combined chunks.

  With FSDP-sharded params (each device holds 1/D of a leaf along one axis),
  step 1 keeps the leaf's shape, step 2 splits that axis, and step 5 already
  gives this device's shard of the update: no step 6, the bytes of a
  reduce-scatter.
* :class:`AllGatherPlacement`: gathers every microgradient onto every device,
  ``(D - 1) x`` the local gradient bytes: the simple reference.
* :class:`MeshPlacement` (plain ``jax.jit`` over global ``[N, ...]`` leaves
  sharded over a mesh): sharding constraints that make XLA take the
  all-to-all plan, with the updates sharded like the params.

:func:`resolve_placement` moves the leaves once; ``gram``, the rare rescaled
``gram`` and ``combine`` all start from those moved leaves, so each leaf
crosses the network once per update.
"""

import math
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple
from typing import Protocol

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from optax_gaf import _checks
from optax_gaf import _gram

AxisName = Hashable | tuple[Hashable, ...]

COLLECTIVES = ("all_to_all", "all_gather")


class Placement(Protocol):
  """Stages 1 and 3 for microgradients that live somewhere.

  ``leaves`` are the microgradient leaves as the caller holds them: this
  device's ``[n_local, ...]`` inside ``jax.shard_map``/``jax.pmap``, or the
  global ``[N, ...]`` arrays under plain ``jax.jit`` and on one device.
  """

  def num_microgradients(self, n_local: int) -> int:
    """The global N, from the leading size of the leaves held here."""

  def gram(
    self, leaves: Sequence[jax.Array], per_leaf: bool = False, factors=None
  ) -> jax.Array:
    """The replicated ``[N, N]`` (or ``[L, N, N]``) Gram matrix.

    With ``factors`` (global ``[N]`` or ``[L, N]``), that of ``f_i g_i``.
    """

  def max_abs(self, leaves: Sequence[jax.Array]) -> jax.Array:
    """The replicated ``[L, N]`` largest ``|entry|`` per leaf and microgradient.

    Only called on the rare step whose Gram diagonal leaves the safe range.
    """

  def combine(
    self, leaves: Sequence[jax.Array], weights: jax.Array, usable: jax.Array
  ) -> list[jax.Array]:
    """Per leaf ``sum_i w_i g_i``, weights ``[N]``/``[L, N]``.

    Laid out like the params given to :func:`resolve_placement`: replicated
    without them, or where they are; sharded where they are.
    """


class LocalPlacement(NamedTuple):
  """All N microgradients live on this device: an einsum and a tensordot."""

  def num_microgradients(self, n_local: int) -> int:
    return n_local

  def gram(self, leaves, per_leaf=False, factors=None):
    return _gram.gram(leaves, per_leaf, factors)

  def max_abs(self, leaves):
    return _gram.max_abs(leaves)

  def combine(self, leaves, weights, usable):
    return _gram.weighted_sum(leaves, weights, usable)


def _names(axis_name: AxisName) -> tuple[Hashable, ...]:
  return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _at(per_leaf: Sequence[Any], i: int, default: Any = None) -> Any:
  return per_leaf[i] if i < len(per_leaf) else default


def _is_bound(axis_name: AxisName) -> bool:
  """Whether ``axis_name`` is a manual axis here (shard_map or pmap)."""
  try:
    lax.axis_size(axis_name)
  except NameError:
    return False
  return True


def _check_device_axis(axis_name: AxisName) -> None:
  """Raises unless every bound name is a device axis, not a ``jax.vmap`` one.

  ``shard_map`` and ``pmap`` axes are the Manual axes of the context mesh.
  """
  manual = jax.sharding.get_abstract_mesh().manual_axes
  vmapped = [a for a in _names(axis_name) if a not in manual]
  if vmapped:
    raise ValueError(
      f"axis_name={axis_name!r}: {vmapped} is a jax.vmap axis, not a device"
      " axis; the placements' collectives need jax.shard_map or jax.pmap."
      " Under jax.vmap, stack the microgradients on their leading axis"
      " (e.g. with optax_gaf.microbatch_grads) and leave axis_name=None."
    )


def _unbound_error(axis_name: AxisName) -> ValueError:
  return ValueError(
    f"gaf(axis_name={axis_name!r}): the axis name is not bound here. Call"
    " the optimizer's update inside jax.shard_map over a mesh with that"
    " axis, or inside jax.pmap(..., axis_name=...); under plain jax.jit,"
    " enter jax.set_mesh(mesh) with a mesh that has that axis; on a single"
    " device leave axis_name=None."
  )


def _pad_flat(x: jax.Array, num_chunks: int) -> jax.Array:
  """``[n, ...]`` -> ``[n, num_chunks * C]``; zeros change no product or sum."""
  flat = x.reshape(x.shape[0], -1)
  c = max(-(-flat.shape[1] // num_chunks), 1)
  return jnp.pad(flat, ((0, 0), (0, c * num_chunks - flat.shape[1])))


def _chunk(x: jax.Array, axis_name: AxisName, num_devices: int) -> jax.Array:
  """``[n_local, ...]`` on each device -> ``[N, C]``: chunk d of every one."""
  n_local = x.shape[0]
  flat = _pad_flat(x, num_devices)
  y = lax.all_to_all(
    flat.reshape(n_local, num_devices, -1),
    axis_name,
    split_axis=1,
    concat_axis=0,
    tiled=True,
  )
  return y.reshape(num_devices * n_local, -1)


def _gathered_max_abs(leaves, axis_name: AxisName) -> jax.Array:
  """Each device's own microgradients' ``[L, n_local]`` maxima -> ``[L, N]``."""
  local = _gram.max_abs(leaves)
  return lax.all_gather(local, axis_name, axis=1, tiled=True, to="invarying")


class _Moved(NamedTuple):
  """The leaves :func:`resolve_placement` got, and the same leaves moved.

  XLA's common-subexpression elimination merged the moves that ``gram`` and
  ``combine`` each started from under ``shard_map``, but not always under
  plain ``jit`` (``[N, 300, 7]`` was moved twice), and never into the
  rescaled ``gram``'s ``lax.cond`` branch; reusing one move fixes all three.
  """

  leaves: tuple = ()
  moved: tuple = ()

  def get(self, leaves, move):
    """``leaves`` moved: held ones reused, the others by ``move(idx, xs)``."""
    out = [
      self.moved[i] if _at(self.leaves, i) is x else None
      for i, x in enumerate(leaves)
    ]
    todo = [i for i, m in enumerate(out) if m is None]
    if todo:
      for i, m in zip(todo, move(todo, [leaves[i] for i in todo])):
        out[i] = m
    return out


class AllToAllPlacement(NamedTuple):
  """Each device works on chunk ``axis_index`` of all N microgradients.

  Attributes:
    axis_name: the mesh axis name (or tuple of names) the microgradients are
      spread over, as in ``jax.lax.psum``.
    layouts: per leaf, None (flat chunks; ``combine`` gathers the whole
      update) or the parameter axis this device holds 1/D of (FSDP:
      ``combine`` returns this device's shard). Missing entries are None.
    held: the leaves moved once by :func:`resolve_placement`.
  """

  axis_name: AxisName
  layouts: tuple[int | None, ...] = ()
  held: _Moved = _Moved()

  def num_microgradients(self, n_local: int) -> int:
    return lax.axis_size(self.axis_name) * n_local

  def _move(self, indices, leaves):
    d = lax.axis_size(self.axis_name)
    out = []
    for i, x in zip(indices, leaves):
      k = _at(self.layouts, i)
      if k is None:
        out.append(_chunk(x, self.axis_name, d))
      else:  # split the sharded axis: chunk d is device d's shard
        out.append(lax.all_to_all(x, self.axis_name, 1 + k, 0, tiled=True))
    return out

  def hold(self, leaves) -> "AllToAllPlacement":
    """This placement with ``leaves`` moved once, for every later stage."""
    moved = self._move(range(len(leaves)), leaves)
    return self._replace(held=_Moved(tuple(leaves), tuple(moved)))

  def gram(self, leaves, per_leaf=False, factors=None):
    moved = self.held.get(leaves, self._move)
    return lax.psum(_gram.gram(moved, per_leaf, factors), self.axis_name)

  def max_abs(self, leaves):
    return _gathered_max_abs(leaves, self.axis_name)

  def combine(self, leaves, weights, usable):
    moved = self.held.get(leaves, self._move)
    parts = _gram.weighted_sum(moved, weights, usable)
    out = []
    for i, (part, x) in enumerate(zip(parts, leaves)):
      if _at(self.layouts, i) is not None:
        out.append(part)  # this device's shard, shaped like its params
        continue
      full = lax.all_gather(part, self.axis_name, to="invarying", tiled=True)
      out.append(full[: x[0].size].reshape(x.shape[1:]))
    return out


class AllGatherPlacement(NamedTuple):
  """Every device gathers all N microgradients and works as on one device.

  Attributes:
    axis_name: the mesh axis name (or tuple of names).
    held: the leaves gathered once by :func:`resolve_placement`.
  """

  axis_name: AxisName
  held: _Moved = _Moved()

  def num_microgradients(self, n_local: int) -> int:
    return lax.axis_size(self.axis_name) * n_local

  def _gather(self, indices, leaves):
    del indices
    return [
      lax.all_gather(x, self.axis_name, to="invarying", tiled=True)
      for x in leaves
    ]

  def hold(self, leaves) -> "AllGatherPlacement":
    """This placement with ``leaves`` gathered once, for every later stage."""
    gathered = self._gather(None, leaves)
    return self._replace(held=_Moved(tuple(leaves), tuple(gathered)))

  def gram(self, leaves, per_leaf=False, factors=None):
    gathered = self.held.get(leaves, self._gather)
    return _gram.gram(gathered, per_leaf, factors)

  def max_abs(self, leaves):
    return _gathered_max_abs(leaves, self.axis_name)

  def combine(self, leaves, weights, usable):
    gathered = self.held.get(leaves, self._gather)
    return _gram.weighted_sum(gathered, weights, usable)


class MeshPlacement(NamedTuple):
  """Plain ``jax.jit``: global ``[N, ...]`` leaves, sharding constraints.

  The constraints move each leaf from "microbatch axis sharded" to
  "parameter axis sharded" (XLA emits one all-to-all), so the Gram matrix is
  a partial product plus an N x N all-reduce and the weighted sum comes out
  sharded. A leaf whose param is sharded along axis k over ``axes`` (FSDP)
  is split along k, and its update keeps that sharding; any other leaf is
  flattened and padded, and its update is laid out like its param (one
  all-gather when replicated).

  Attributes:
    mesh: the (abstract) mesh.
    axes: the mesh axes the microbatch axis is sharded over.
    specs: per leaf, the params' ``PartitionSpec`` entries, which the update
      takes; missing entries are replicated.
    held: the leaves moved once by :func:`resolve_placement`.
  """

  mesh: Any
  axes: tuple[Hashable, ...]
  specs: tuple[tuple[Any, ...], ...] = ()
  held: _Moved = _Moved()

  def num_microgradients(self, n_local: int) -> int:
    return n_local  # the leaves are already global

  def _constrain(self, x, *spec):
    # Inside auto_axes the context mesh has the axes Auto; self.mesh may not.
    mesh = jax.sharding.get_abstract_mesh()
    mesh = self.mesh if mesh.empty else mesh
    return lax.with_sharding_constraint(
      x, jax.sharding.NamedSharding(mesh, P(*spec))
    )

  def _auto(self, fn, out_sharding):
    """Explicit axes: run ``fn`` with them Auto, so constraints apply.

    All of them: the params' specs may name axes besides ``axes``.
    """
    explicit = tuple(
      a
      for a, t in zip(self.mesh.axis_names, self.mesh.axis_types)
      if t == jax.sharding.AxisType.Explicit
    )
    if not explicit:
      return fn
    fn = jax.sharding.auto_axes(fn, axes=explicit, out_sharding=out_sharding)
    if not jax.sharding.get_abstract_mesh().empty:
      return fn

    def in_mesh(*args):  # explicit shardings but no jax.set_mesh
      with jax.sharding.use_abstract_mesh(self.mesh):
        return fn(*args)

    return in_mesh

  def _spec(self, i, x):
    """The update's spec: the param's, one entry per parameter axis."""
    spec = tuple(_at(self.specs, i, ()))
    return spec + (None,) * (x.ndim - 1 - len(spec))

  def _layout(self, i, x):
    """The parameter axis sharded over ``axes``, or None (flat chunks)."""
    d = math.prod(self.mesh.shape[a] for a in self.axes)
    for k, entry in enumerate(self._spec(i, x)):
      if entry is not None and _names(entry) == self.axes:
        return k if x.shape[1 + k] % d == 0 else None
    return None

  def _chunk_spec(self, i, x):
    if self._layout(i, x) is None:
      return (None, self.axes)
    return (None, *self._spec(i, x))

  def _move(self, indices, leaves):
    d = math.prod(self.mesh.shape[a] for a in self.axes)

    def fn(leaves):
      return [
        self._constrain(
          x if self._layout(i, x) is not None else _pad_flat(x, d),
          *self._chunk_spec(i, x),
        )
        for i, x in zip(indices, leaves)
      ]

    specs = [P(*self._chunk_spec(i, x)) for i, x in zip(indices, leaves)]
    return self._auto(fn, specs)(list(leaves))

  def hold(self, leaves) -> "MeshPlacement":
    """This placement with ``leaves`` moved once, for every later stage."""
    moved = self._move(range(len(leaves)), leaves)
    return self._replace(held=_Moved(tuple(leaves), tuple(moved)))

  def gram(self, leaves, per_leaf=False, factors=None):
    # shard_map: per device, the partial Gram matrix of its pieces; one psum
    # per set of mesh axes the pieces are split over (one set, the data
    # axes, unless params are sharded over other axes too). Constraints
    # alone would all-reduce one [N, N] per leaf.
    specs = [self._chunk_spec(i, x) for i, x in enumerate(leaves)]
    groups = {}
    for i, spec in enumerate(specs):
      axes = tuple(a for e in spec if e is not None for a in _names(e))
      groups.setdefault(axes, []).append(i)

    def fn(moved, factors):
      grams = {}
      for axes, idx in groups.items():
        f = factors
        if f is not None and f.ndim == 2:
          f = f[jnp.asarray(idx)]
        partial = _gram.gram([moved[i] for i in idx], per_leaf, f)
        grams.update(zip(idx, lax.psum(partial, axes)) if per_leaf else
                     {idx[0]: lax.psum(partial, axes)})  # fmt: skip
      if per_leaf:
        return jnp.stack([grams[i] for i in range(len(moved))])
      return sum(grams.values())

    context = jax.sharding.get_abstract_mesh()
    fn = jax.shard_map(
      fn,
      mesh=self.mesh if context.empty else context,
      in_specs=([P(*spec) for spec in specs], P()),
      out_specs=P(),
    )
    return fn(self.held.get(leaves, self._move), factors)

  def max_abs(self, leaves):
    def fn(leaves):
      return self._constrain(_gram.max_abs(leaves))

    return self._auto(fn, P())(leaves)

  def combine(self, leaves, weights, usable):
    shapes = [x.shape for x in leaves]
    layouts = [self._layout(i, x) for i, x in enumerate(leaves)]
    specs = [self._spec(i, x) for i, x in enumerate(leaves)]

    def fn(moved, weights, usable):
      parts = _gram.weighted_sum(moved, weights, usable)
      out = []
      for p, shape, k, spec in zip(parts, shapes, layouts, specs):
        if k is None:  # sharded flat chunks; replicated: one all-gather
          p = self._constrain(p, self.axes)
          p = p if any(spec) else self._constrain(p)
          p = p[: math.prod(shape[1:])].reshape(shape[1:])
        out.append(self._constrain(p, *spec))
      return out

    moved = self.held.get(leaves, self._move)
    out_sharding = [P(*spec) for spec in specs]
    return self._auto(fn, out_sharding)(moved, weights, usable)


def _explicit_batch_sharding(leaves: Sequence[jax.Array]):
  """(mesh, axes) when leading axes are sharded over Explicit mesh axes.

  Leaves whose leading axis is not sharded are moved like the others.

  Raises:
    ValueError: if leaves shard their leading axis over different axes.
  """
  found = set()
  for x in leaves:
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec and spec[0] is not None:
      found.add((sharding.mesh, _names(spec[0])))
  if len(found) > 1:
    raise ValueError(
      "The microgradient leaves shard their microbatch axis over different"
      f" mesh axes: {sorted(str(axes) for _, axes in found)}. Shard them all"
      " alike."
    )
  return found.pop() if found else None


def _param_specs(params) -> tuple[tuple[Any, ...], ...]:
  """Per param leaf, the ``PartitionSpec`` entries its type carries.

  Under ``jax.jit`` only Explicit mesh axes are in the types; params sharded
  over Auto axes read as replicated.
  """
  if params is None:
    return ()
  specs = []
  for p in params:
    try:
      sharding = getattr(jax.typeof(p), "sharding", None)
    except TypeError:
      sharding = None
    spec = getattr(sharding, "spec", None)
    specs.append(tuple(spec) if spec is not None else ())
  return tuple(specs)


def _local_layouts(leaves, params, axis_name) -> tuple[int | None, ...]:
  """Inside shard_map: per leaf, the axis this device holds 1/D of, or None.

  Raises:
    ValueError: unless every local param is shaped like its leaf's trailing
      shape, or D times smaller along one axis.
  """
  if params is None:
    return ()
  d = lax.axis_size(axis_name)
  layouts = []
  for i, (x, p) in enumerate(zip(leaves, params, strict=True)):
    grad, local = tuple(x.shape[1:]), tuple(jnp.shape(p))
    diff = [k for k, (g, w) in enumerate(zip(grad, local)) if g != w]
    if len(grad) == len(local) and not diff:
      layouts.append(None)
    elif (
      len(grad) == len(local)
      and len(diff) == 1
      and (grad[diff[0]] == d * local[diff[0]])
    ):
      layouts.append(diff[0])
    else:
      raise ValueError(
        f"Microgradient leaf {i} is {tuple(x.shape)} but this device's"
        f" param is {local}: each leaf must be [n_local, *param.shape] with"
        f" the param whole, or sharded over {axis_name!r} ({d} times smaller"
        " along one axis)."
      )
  return tuple(layouts)


def param_leaves(treedef, params: Any, sharded: bool = False):
  """The params' leaves for :func:`resolve_placement`, or None.

  Args:
    treedef: the microgradients' tree structure.
    params: the params passed to ``update``, or None.
    sharded: whether they may be this device's shards (``sharded_params``);
      then they are required, and their tree is checked here.

  Raises:
    ValueError: if ``sharded`` and the params are missing or another tree.
  """
  if params is None:
    if sharded:
      raise ValueError(
        "gaf(sharded_params=True) lays each device's update out like its"
        " shard of the params: pass them, update(grads, state, params)."
      )
    return None
  if sharded and jax.tree.structure(params) != treedef:
    raise ValueError(
      "The microgradients and params have different tree structures:"
      f" {treedef} vs {jax.tree.structure(params)}."
    )
  return jax.tree.leaves(params)


def check_placement(
  axis_name: Any, collective: str, sharded_params: bool = False
) -> None:
  """Checks the placement arguments of a factory (``gaf``, ``and_mask``...)."""
  _checks.choice(collective, "collective", COLLECTIVES)
  _checks.axis_name(axis_name)
  if not isinstance(sharded_params, bool):
    raise TypeError(f"sharded_params must be a bool; got {sharded_params!r}.")
  if sharded_params and (axis_name is None or collective != "all_to_all"):
    raise ValueError(
      "sharded_params=True needs axis_name (the mesh axis the params and the"
      " microgradients are sharded over) and collective='all_to_all'."
    )


def resolve_placement(
  leaves: Sequence[jax.Array],
  axis_name: AxisName | None = None,
  collective: str = "all_to_all",
  params: Sequence[Any] | None = None,
) -> Placement:
  """Returns where stages 1 and 3 run for these leaves, in this trace.

  * ``axis_name`` bound by ``jax.shard_map``/``jax.pmap``: the collectives
    (``"all_to_all"``: about one all-reduce of traffic, one reduce-scatter
    for FSDP-sharded params; ``"all_gather"``: the simple reference, ``D -
    1`` times the local gradients);
  * ``axis_name`` an axis of the ``jax.set_mesh`` mesh (plain ``jax.jit``):
    :class:`MeshPlacement` (``"all_gather"`` leaves the plan to XLA);
  * ``axis_name`` None: :class:`MeshPlacement` when the leaves' leading axis
    is sharded over Explicit mesh axes, else :class:`LocalPlacement`.

  Args:
    leaves: the microgradient leaves, each ``[n, ...]``.
    axis_name: None, or the mesh axis name (or tuple of names) the
      microgradients are spread over.
    collective: ``"all_to_all"`` or ``"all_gather"``.
    params: None, or the params' leaves (as held here), which ``combine``
      lays its results out like: under ``jax.jit`` their shardings (Explicit
      mesh axes); inside ``jax.shard_map``/``jax.pmap`` with
      ``"all_to_all"``, where a local param is D times smaller than the
      microgradients along one axis, this device's shard.

  Returns:
    A :class:`Placement`, with ``leaves`` already moved where it moves them.

  Raises:
    ValueError: if ``axis_name`` is neither bound nor an axis of the context
      mesh, with what to do; if ``params`` do not fit the leaves.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_gaf
    >>> g = jnp.arange(8.0).reshape(4, 2)  # 2 devices x 2 microgradients
    >>> def gram(x):
    ...   return optax_gaf.resolve_placement([x], "i").gram([x])
    >>> grams = jax.pmap(gram, axis_name="i", devices=jax.devices()[:2])(
    ...     g.reshape(2, 2, 2))
    >>> bool((grams[0] == g @ g.T).all() & (grams[1] == grams[0]).all())
    True
  """
  check_placement(axis_name, collective)
  if axis_name is None:
    found = _explicit_batch_sharding(leaves)
    if found is None:
      return LocalPlacement()
    return MeshPlacement(*found, _param_specs(params)).hold(leaves)
  if _is_bound(axis_name):
    _check_device_axis(axis_name)
    if collective == "all_gather":
      return AllGatherPlacement(axis_name).hold(leaves)
    layouts = _local_layouts(leaves, params, axis_name)
    return AllToAllPlacement(axis_name, layouts).hold(leaves)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not all(a in mesh.axis_names for a in _names(axis_name)):
    raise _unbound_error(axis_name)
  if collective == "all_gather":
    return LocalPlacement()
  specs = _param_specs(params)
  return MeshPlacement(mesh, _names(axis_name), specs).hold(leaves)


def statistics(
  placement: Placement, leaves: Sequence[jax.Array], per_leaf: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Stage 1 as every aggregator runs it, safe from under- and overflow.

  When a squared norm on the Gram diagonal leaves the safe range (or is zero
  or non-finite), the Gram matrix is taken again of rescaled microgradients
  ``f_i g_i`` (:func:`optax_gaf._gram.rescale_factors`): one more pass over
  them, on that rare step only. A common factor changes no rule's weights,
  which apply to the original ``g_i``.

  Returns:
    ``(gram, usable, factors)``: the sanitized Gram matrix of ``f_i g_i``,
    the mask of usable microgradients and ``f`` (ones on the common step),
    shaped like ``usable``.
  """
  gram = placement.gram(leaves, per_leaf)

  def plain(gram):
    return gram, jnp.ones(gram.shape[:-1], gram.dtype)

  def rescaled(gram):
    scales = placement.max_abs(leaves)  # [L, N]
    if not per_leaf:
      scales = jnp.max(scales, axis=0)  # NaN and inf propagate
    f = _gram.rescale_factors(scales).astype(gram.dtype)
    return placement.gram(leaves, per_leaf, f), f

  safe = _gram.in_safe_range(jnp.diagonal(gram, axis1=-2, axis2=-1))
  gram, factors = lax.cond(safe, plain, rescaled, gram)
  gram, usable = _gram.sanitized(gram)
  return gram, usable, factors
