"""The placement under plain ``jax.jit``: global leaves sharded over a mesh.

Sharding constraints move each leaf from "microbatch axis sharded" to
"parameter axis sharded" (XLA emits one all-to-all), so the Gram matrix is a
partial product plus an N x N all-reduce and the weighted sum comes out
sharded: the all-to-all plan of ``_collectives.py``, taken by XLA.
"""

import math
from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from optax_gaf import _combine
from optax_gaf import _gram
from optax_gaf._collectives import names
from optax_gaf._collectives import pad_flat


class MeshPlacement(NamedTuple):
  """Plain ``jax.jit``: global ``[N, ...]`` leaves, sharding constraints.

  A leaf whose param is sharded along axis k over ``axes`` (FSDP) is split
  along k, and its update keeps that sharding; any other leaf is flattened
  and padded, and its update is laid out like its param (one all-gather
  when replicated).

  Attributes:
    mesh: the (abstract) mesh.
    axes: the mesh axes the microbatch axis is sharded over.
    specs: per leaf, the params' ``PartitionSpec`` entries, which the update
      takes; missing entries are replicated.
    leaves: the global ``[N, ...]`` microgradient leaves.
    moved: the leaves after the move, sharded over a parameter axis.
  """

  mesh: Any
  axes: tuple[Hashable, ...]
  specs: tuple[tuple[Any, ...], ...]
  leaves: Sequence[jax.Array]
  moved: Sequence[jax.Array]

  @classmethod
  def bind(cls, mesh, axes, specs, leaves) -> "MeshPlacement":
    """The placement with ``leaves`` moved once, for every later stage."""
    placement = cls(mesh, tuple(axes), tuple(specs), tuple(leaves), ())
    return placement._replace(moved=placement._move(leaves))

  @property
  def num_microgradients(self) -> int:
    return self.leaves[0].shape[0]  # the leaves are already global

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
    spec = tuple(self.specs[i]) if i < len(self.specs) else ()
    return spec + (None,) * (x.ndim - 1 - len(spec))

  def _layout(self, i, x):
    """The parameter axis sharded over ``axes``, or None (flat chunks)."""
    d = math.prod(self.mesh.shape[a] for a in self.axes)
    for k, entry in enumerate(self._spec(i, x)):
      if entry is not None and names(entry) == self.axes:
        return k if x.shape[1 + k] % d == 0 else None
    return None

  def _chunk_spec(self, i, x):
    if self._layout(i, x) is None:
      return (None, self.axes)
    return (None, *self._spec(i, x))

  def _move(self, leaves):
    d = math.prod(self.mesh.shape[a] for a in self.axes)

    def fn(leaves):
      return [
        self._constrain(
          x if self._layout(i, x) is not None else pad_flat(x, d),
          *self._chunk_spec(i, x),
        )
        for i, x in enumerate(leaves)
      ]

    specs = [P(*self._chunk_spec(i, x)) for i, x in enumerate(leaves)]
    return self._auto(fn, specs)(list(leaves))

  def gram(self, per_leaf=False, factors=None):
    # shard_map: per device, the partial Gram matrix of its pieces; one psum
    # per set of mesh axes the pieces are split over (one set, the data
    # axes, unless params are sharded over other axes too). Constraints
    # alone would all-reduce one [N, N] per leaf.
    specs = [self._chunk_spec(i, x) for i, x in enumerate(self.leaves)]
    groups = {}
    for i, spec in enumerate(specs):
      axes = tuple(a for e in spec if e is not None for a in names(e))
      groups.setdefault(axes, []).append(i)

    def fn(moved, factors):
      grams = []
      for axes, idx in groups.items():
        f = factors
        if f is not None and f.ndim == 2:
          f = f[jnp.asarray(idx)]
        partial = _gram.gram([moved[i] for i in idx], per_leaf, f)
        grams.append((idx, lax.psum(partial, axes)))
      if not per_leaf:
        return sum(g for _, g in grams)
      by_leaf = {i: g for idx, gs in grams for i, g in zip(idx, gs)}
      return jnp.stack([by_leaf[i] for i in range(len(moved))])

    context = jax.sharding.get_abstract_mesh()
    fn = jax.shard_map(
      fn,
      mesh=self.mesh if context.empty else context,
      in_specs=([P(*spec) for spec in specs], P()),
      out_specs=P(),
    )
    return fn(list(self.moved), factors)

  def max_abs(self):
    def fn(leaves):
      return self._constrain(_gram.max_abs(leaves))

    return self._auto(fn, P())(list(self.leaves))

  def combine(self, weights, usable, leaves=None):
    shapes = [x.shape for x in self.leaves]
    layouts = [self._layout(i, x) for i, x in enumerate(self.leaves)]
    specs = [self._spec(i, x) for i, x in enumerate(self.leaves)]

    def fn(moved, weights, usable):
      parts = _combine.weighted_sum(moved, weights, usable)
      out = []
      for p, shape, k, spec in zip(parts, shapes, layouts, specs):
        if k is None:  # sharded flat chunks; replicated: one all-gather
          p = self._constrain(p, self.axes)
          p = p if any(spec) else self._constrain(p)
          p = p[: math.prod(shape[1:])].reshape(shape[1:])
        out.append(self._constrain(p, *spec))
      return out

    moved = self.moved if leaves is None else self._move(leaves)
    out_sharding = [P(*spec) for spec in specs]
    return self._auto(fn, out_sharding)(list(moved), weights, usable)


def explicit_batch_sharding(leaves: Sequence[jax.Array]):
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
      found.add((sharding.mesh, names(spec[0])))
  if len(found) > 1:
    raise ValueError(
      "The microgradient leaves shard their microbatch axis over different"
      f" mesh axes: {sorted(str(axes) for _, axes in found)}. Shard them all"
      " alike."
    )
  return found.pop() if found else None


def param_specs(params) -> tuple[tuple[Any, ...], ...]:
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
