"""Stages 1 and 3 across devices: one GAF decision over every device's microgradients.

Inside ``jax.shard_map`` or ``jax.pmap`` each device holds ``n_local``
microgradients; GAF decides over all ``N = D * n_local`` of them, in
device-major order (``axis_index``, then the local index). A placement here
has the same three methods as :class:`optax_gaf._statistics.LocalPlacement`,
so every rule runs unchanged: it sees the global ``[N, N]`` Gram matrix, which
is replicated, and therefore decides identically on every device.

``"all_to_all"`` (the default) moves about as many bytes as one ring
all-reduce of the gradient, the cost of plain ``pmean``:

1. flatten every leaf to ``[n_local, S]`` and zero-pad S to a multiple of D;
2. ``all_to_all``: device d now holds chunk d of all N microgradients;
3. Gram matrix of the chunks, ``psum`` (N x N scalars);
4. the rule, on every device;
5. the weighted sum of the chunks;
6. ``all_gather`` of the combined chunks.

``"all_gather"`` gathers every microgradient onto every device and then works
as on one device: simple, but ``(D - 1) x`` the local gradient bytes per device.

``gram`` and ``combine`` both start from the same ``all_to_all`` (or
``all_gather``) of the same leaves; XLA's common-subexpression elimination
merges the two into one collective (``tests/test_collectives.py`` checks the
compiled HLO).

Under plain ``jax.jit`` the leaves are global ``[N, ...]`` arrays whose leading
axis may be sharded over a mesh. Left alone, XLA gathers all ``N x P`` onto
every device (``benchmarks/results/collectives.md``); :class:`MeshPlacement`
instead constrains the shardings so that XLA takes the all-to-all plan above.
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

from optax_gaf import _statistics

AxisName = Hashable | tuple[Hashable, ...]

COLLECTIVES = ("all_to_all", "all_gather")


def _names(axis_name: AxisName) -> tuple[Hashable, ...]:
  return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _is_bound(axis_name: AxisName) -> bool:
  """Whether ``axis_name`` is a manual axis here (shard_map or pmap)."""
  try:
    lax.axis_size(axis_name)
  except NameError:
    return False
  return True


def axis_size(axis_name: AxisName) -> int:
  """``lax.axis_size``, with an error that says what to do when unbound."""
  if not _is_bound(axis_name):
    raise ValueError(
      f"gaf(axis_name={axis_name!r}): the axis name is not bound here. Call"
      " the optimizer's update inside jax.shard_map over a mesh with that"
      " axis, or inside jax.pmap(..., axis_name=...); under plain jax.jit,"
      " enter jax.set_mesh(mesh) with a mesh that has that axis; on a single"
      " device leave axis_name=None."
    )
  return lax.axis_size(axis_name)


def _chunk(x: jax.Array, axis_name: AxisName, num_devices: int) -> jax.Array:
  """``[n_local, ...]`` on each device -> ``[N, C]``: chunk d of every one."""
  n_local = x.shape[0]
  flat = x.reshape(n_local, -1)
  size = flat.shape[1]
  c = max(-(-size // num_devices), 1)
  # Zero padding changes no inner product and no weighted sum.
  flat = jnp.pad(flat, ((0, 0), (0, c * num_devices - size)))
  y = lax.all_to_all(
    flat.reshape(n_local, num_devices, c),
    axis_name,
    split_axis=1,
    concat_axis=0,
    tiled=True,
  )
  return y.reshape(num_devices * n_local, c)


def _unchunk(
  part: jax.Array, like: jax.Array, axis_name: AxisName
) -> jax.Array:
  """This device's combined chunk ``[C]`` -> the full, replicated update."""
  full = lax.all_gather(part, axis_name, to="invarying", tiled=True)
  return full[: like[0].size].reshape(like.shape[1:])


class AllToAllPlacement(NamedTuple):
  """Each device works on chunk ``axis_index`` of all N microgradients.

  Attributes:
    axis_name: the mesh axis name (or tuple of names) the microgradients are
      spread over, as in ``jax.lax.psum``.
  """

  axis_name: AxisName

  def num_microgradients(self, n_local: int) -> int:
    return axis_size(self.axis_name) * n_local

  def _chunks(self, leaves: Sequence[jax.Array]) -> list[jax.Array]:
    d = axis_size(self.axis_name)
    return [_chunk(x, self.axis_name, d) for x in leaves]

  def gram(self, leaves, per_leaf=False):
    partial = _statistics.gram(self._chunks(leaves), per_leaf)
    return lax.psum(partial, self.axis_name)

  def combine(self, leaves, weights, usable):
    parts = _statistics.weighted_sum(self._chunks(leaves), weights, usable)
    return [_unchunk(p, x, self.axis_name) for p, x in zip(parts, leaves)]


class AllGatherPlacement(NamedTuple):
  """Every device gathers all N microgradients and works as on one device.

  Attributes:
    axis_name: the mesh axis name (or tuple of names).
  """

  axis_name: AxisName

  def num_microgradients(self, n_local: int) -> int:
    return axis_size(self.axis_name) * n_local

  def _gather(self, leaves):
    return [
      lax.all_gather(x, self.axis_name, to="invarying", tiled=True)
      for x in leaves
    ]

  def gram(self, leaves, per_leaf=False):
    return _statistics.gram(self._gather(leaves), per_leaf)

  def combine(self, leaves, weights, usable):
    return _statistics.weighted_sum(self._gather(leaves), weights, usable)


def _context_mesh(axes: tuple[Hashable, ...]):
  """The abstract mesh of ``jax.set_mesh`` if it has all of ``axes``."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and all(a in mesh.axis_names for a in axes):
    return mesh
  return None


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


class MeshPlacement(NamedTuple):
  """Plain ``jax.jit``: global ``[N, ...]`` leaves, sharding constraints.

  The constraints move each leaf from "microbatch axis sharded" to "flattened
  parameter axis sharded" (XLA emits an all-to-all), so the Gram matrix is a
  partial product plus an N x N all-reduce, and the weighted sum is sharded
  until one all-gather of the result.

  Attributes:
    mesh: the (abstract) mesh.
    axes: the mesh axes the microbatch axis is sharded over.
  """

  mesh: Any
  axes: tuple[Hashable, ...]

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
    """Explicit axes: run ``fn`` with them Auto, so constraints apply."""
    explicit = jax.sharding.AxisType.Explicit
    types = dict(zip(self.mesh.axis_names, self.mesh.axis_types))
    if not any(types[a] == explicit for a in self.axes):
      return fn
    fn = jax.sharding.auto_axes(fn, axes=self.axes, out_sharding=out_sharding)
    if not jax.sharding.get_abstract_mesh().empty:
      return fn

    def in_mesh(*args):  # explicit shardings but no jax.set_mesh
      with jax.sharding.use_abstract_mesh(self.mesh):
        return fn(*args)

    return in_mesh

  def _chunks(self, leaves):
    d = math.prod(self.mesh.shape[a] for a in self.axes)
    out = []
    for x in leaves:
      flat = x.reshape(x.shape[0], -1)
      c = max(-(-flat.shape[1] // d), 1)
      flat = jnp.pad(flat, ((0, 0), (0, c * d - flat.shape[1])))
      out.append(self._constrain(flat, None, self.axes))
    return out

  def gram(self, leaves, per_leaf=False):
    def fn(leaves):
      g = _statistics.gram(self._chunks(leaves), per_leaf)
      return self._constrain(g)

    return self._auto(fn, P())(leaves)

  def combine(self, leaves, weights, usable):
    def fn(leaves, weights, usable):
      parts = _statistics.weighted_sum(self._chunks(leaves), weights, usable)
      # Sharded until here; then one all-gather per leaf.
      parts = [self._constrain(self._constrain(p, self.axes)) for p in parts]
      return [
        p[: x[0].size].reshape(x.shape[1:]) for p, x in zip(parts, leaves)
      ]

    return self._auto(fn, [P()] * len(leaves))(leaves, weights, usable)


class Placement(NamedTuple):
  """Picks where stages 1 and 3 run, from where ``update`` is traced.

  Attributes:
    axis_name: the axis name (or tuple of names) given to :func:`gaf`, or None.
    collective: ``"all_to_all"`` or ``"all_gather"``.
  """

  axis_name: AxisName | None
  collective: str = "all_to_all"

  def resolve(self, leaves: Sequence[jax.Array] = ()) -> Any:
    """The placement for this trace.

    * ``axis_name`` bound by ``shard_map``/``pmap``: the collectives;
    * ``axis_name`` an axis of the ``jax.set_mesh`` mesh (plain jit):
      :class:`MeshPlacement` (``"all_gather"`` leaves it to XLA);
    * ``axis_name`` None: :class:`MeshPlacement` when the leaves' leading
      axis is sharded over Explicit mesh axes, else one device.
    """
    if self.axis_name is None:
      found = _explicit_batch_sharding(leaves) if leaves else None
      if found is None:
        return _statistics.LocalPlacement()
      return MeshPlacement(*found)
    if _is_bound(self.axis_name):
      if self.collective == "all_to_all":
        return AllToAllPlacement(self.axis_name)
      return AllGatherPlacement(self.axis_name)
    mesh = _context_mesh(_names(self.axis_name))
    if mesh is None:
      axis_size(self.axis_name)  # raises the error that says what to do
    if self.collective == "all_gather":
      return _statistics.LocalPlacement()
    return MeshPlacement(mesh, _names(self.axis_name))

  def num_microgradients(self, n_local: int) -> int:
    return self.resolve().num_microgradients(n_local)

  def gram(self, leaves, per_leaf=False):
    return self.resolve(leaves).gram(leaves, per_leaf)

  def combine(self, leaves, weights, usable):
    return self.resolve(leaves).combine(leaves, weights, usable)


def make_placement(
  axis_name: AxisName | None = None, collective: str = "all_to_all"
) -> Placement:
  """Returns where stages 1 and 3 of an aggregator run.

  Every aggregator in this package calls the three methods of the returned
  placement and nothing else device-specific:

  * ``num_microgradients(n_local)``: the global N;
  * ``gram(leaves, per_leaf=False)``: the replicated ``[N, N]`` (or
    ``[L, N, N]``) float32 Gram matrix of all N microgradients;
  * ``combine(leaves, weights, usable)``: the replicated per-leaf weighted
    sums, ``weights`` ``[N]`` or ``[L, N]``.

  Inside ``jax.shard_map``/``jax.pmap``, ``leaves`` are this device's
  microgradient leaves ``[n_local, ...]``; under plain ``jax.jit`` they are the
  global ``[N, ...]`` arrays, whose leading axis may be sharded over the mesh.

  Args:
    axis_name: None for one device, or for plain ``jax.jit`` with leaves
      sharded over Explicit mesh axes (found from their types). Otherwise the
      mesh axis name, or tuple of names, the microgradients are spread over:
      bound by ``jax.shard_map`` or ``jax.pmap``, or an axis of the mesh
      entered with ``jax.set_mesh`` (plain ``jax.jit``).
    collective: ``"all_to_all"`` (about one all-reduce of traffic) or
      ``"all_gather"`` (the simple reference, ``D - 1`` times the local
      gradients). Ignored when ``axis_name`` is None.

  Returns:
    A :class:`Placement` with the three methods above; which collectives it
    uses is decided when ``update`` is traced.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from optax_gaf import make_placement
    >>> g = jnp.arange(8.0).reshape(4, 2)  # 2 devices x 2 microgradients
    >>> place = make_placement("i")
    >>> gram = jax.pmap(lambda x: place.gram([x]), axis_name="i",
    ...                 devices=jax.devices()[:2])(g.reshape(2, 2, 2))
    >>> bool((gram[0] == g @ g.T).all() & (gram[1] == gram[0]).all())
    True
  """
  if collective not in COLLECTIVES:
    raise ValueError(
      f"Unknown collective {collective!r}; choose one of {COLLECTIVES}."
    )
  if axis_name is not None:
    try:
      hash(axis_name)
    except TypeError as e:
      raise TypeError(
        f"axis_name must be a mesh axis name or a tuple of names; got"
        f" {axis_name!r}."
      ) from e
  return Placement(axis_name, collective)
