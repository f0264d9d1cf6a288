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

  ``gram`` and ``combine`` start from the same ``all_to_all`` of the same
  leaves; XLA's common-subexpression elimination merges the two.
* :class:`AllGatherPlacement`: gathers every microgradient onto every device,
  ``(D - 1) x`` the local gradient bytes: the simple reference.
* :class:`MeshPlacement` (plain ``jax.jit`` over global ``[N, ...]`` leaves
  sharded over a mesh): sharding constraints that make XLA take the
  all-to-all plan instead of gathering all ``N x P`` onto every device.
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
    """The replicated per-leaf ``sum_i w_i g_i``, weights ``[N]``/``[L, N]``."""


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


def _is_bound(axis_name: AxisName) -> bool:
  """Whether ``axis_name`` is a manual axis here (shard_map or pmap)."""
  try:
    lax.axis_size(axis_name)
  except NameError:
    return False
  return True


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


class AllToAllPlacement(NamedTuple):
  """Each device works on chunk ``axis_index`` of all N microgradients.

  Attributes:
    axis_name: the mesh axis name (or tuple of names) the microgradients are
      spread over, as in ``jax.lax.psum``.
  """

  axis_name: AxisName

  def num_microgradients(self, n_local: int) -> int:
    return lax.axis_size(self.axis_name) * n_local

  def _chunks(self, leaves):
    d = lax.axis_size(self.axis_name)
    return [_chunk(x, self.axis_name, d) for x in leaves]

  def gram(self, leaves, per_leaf=False, factors=None):
    partial = _gram.gram(self._chunks(leaves), per_leaf, factors)
    return lax.psum(partial, self.axis_name)

  def max_abs(self, leaves):
    return _gathered_max_abs(leaves, self.axis_name)

  def combine(self, leaves, weights, usable):
    parts = _gram.weighted_sum(self._chunks(leaves), weights, usable)
    out = []
    for part, x in zip(parts, leaves):
      full = lax.all_gather(part, self.axis_name, to="invarying", tiled=True)
      out.append(full[: x[0].size].reshape(x.shape[1:]))
    return out


class AllGatherPlacement(NamedTuple):
  """Every device gathers all N microgradients and works as on one device.

  Attributes:
    axis_name: the mesh axis name (or tuple of names).
  """

  axis_name: AxisName

  def num_microgradients(self, n_local: int) -> int:
    return lax.axis_size(self.axis_name) * n_local

  def _gather(self, leaves):
    return [
      lax.all_gather(x, self.axis_name, to="invarying", tiled=True)
      for x in leaves
    ]

  def gram(self, leaves, per_leaf=False, factors=None):
    return _gram.gram(self._gather(leaves), per_leaf, factors)

  def max_abs(self, leaves):
    return _gathered_max_abs(leaves, self.axis_name)

  def combine(self, leaves, weights, usable):
    return _gram.weighted_sum(self._gather(leaves), weights, usable)


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
    return [self._constrain(_pad_flat(x, d), None, self.axes) for x in leaves]

  def gram(self, leaves, per_leaf=False, factors=None):
    def fn(leaves, factors):
      g = _gram.gram(self._chunks(leaves), per_leaf, factors)
      return self._constrain(g)

    return self._auto(fn, P())(leaves, factors)

  def max_abs(self, leaves):
    def fn(leaves):
      return self._constrain(_gram.max_abs(leaves))

    return self._auto(fn, P())(leaves)

  def combine(self, leaves, weights, usable):
    def fn(leaves, weights, usable):
      parts = _gram.weighted_sum(self._chunks(leaves), weights, usable)
      # Sharded until here; then one all-gather per leaf.
      parts = [self._constrain(self._constrain(p, self.axes)) for p in parts]
      return [
        p[: x[0].size].reshape(x.shape[1:]) for p, x in zip(parts, leaves)
      ]

    return self._auto(fn, [P()] * len(leaves))(leaves, weights, usable)


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


def check_placement(axis_name: Any, collective: str) -> None:
  """Checks the placement arguments of a factory (``gaf``, ``and_mask``...)."""
  _checks.choice(collective, "collective", COLLECTIVES)
  _checks.axis_name(axis_name)


def resolve_placement(
  leaves: Sequence[jax.Array],
  axis_name: AxisName | None = None,
  collective: str = "all_to_all",
) -> Placement:
  """Returns where stages 1 and 3 run for these leaves, in this trace.

  * ``axis_name`` bound by ``jax.shard_map``/``jax.pmap``: the collectives
    (``"all_to_all"``: about one all-reduce of traffic; ``"all_gather"``: the
    simple reference, ``D - 1`` times the local gradients);
  * ``axis_name`` an axis of the ``jax.set_mesh`` mesh (plain ``jax.jit``):
    :class:`MeshPlacement` (``"all_gather"`` leaves the plan to XLA);
  * ``axis_name`` None: :class:`MeshPlacement` when the leaves' leading axis
    is sharded over Explicit mesh axes, else :class:`LocalPlacement`.

  Args:
    leaves: the microgradient leaves, each ``[n, ...]``.
    axis_name: None, or the mesh axis name (or tuple of names) the
      microgradients are spread over.
    collective: ``"all_to_all"`` or ``"all_gather"``.

  Returns:
    A :class:`Placement`.

  Raises:
    ValueError: if ``axis_name`` is neither bound nor an axis of the context
      mesh, with what to do.

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
    return LocalPlacement() if found is None else MeshPlacement(*found)
  if _is_bound(axis_name):
    if collective == "all_to_all":
      return AllToAllPlacement(axis_name)
    return AllGatherPlacement(axis_name)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not all(a in mesh.axis_names for a in _names(axis_name)):
    raise _unbound_error(axis_name)
  if collective == "all_gather":
    return LocalPlacement()
  return MeshPlacement(mesh, _names(axis_name))


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
