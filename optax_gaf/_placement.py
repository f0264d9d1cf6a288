"""Where stages 1 and 3 run: the :class:`Placement` protocol, one device, and
:func:`resolve_placement`.

A placement knows where the microgradients live. It is bound to them when it
is resolved, gives the rule the global, replicated ``[N, N]`` Gram matrix,
and turns the rule's weights into the update. Every aggregator resolves one
placement per ``update`` and calls nothing else device-specific, so every rule
runs unchanged everywhere:

* :class:`LocalPlacement`: all N microgradients on this device.
* ``_collectives.py``: ``jax.shard_map``/``jax.pmap``, all-to-all (a
  ``pmean``'s bytes; FSDP shards: a reduce-scatter's) or all-gather.
* ``_mesh.py``: plain ``jax.jit`` over global ``[N, ...]`` leaves sharded
  over a mesh.

A producer that is its own placement (ghost microgradients) also carries the
params' tree: :class:`PlacedMicrogradients`, which ``gaf`` takes as input.
"""

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple
from typing import Protocol
from typing import runtime_checkable

import jax
from jax import lax

from optax_gaf import _checks
from optax_gaf import _collectives
from optax_gaf import _combine
from optax_gaf import _gram
from optax_gaf import _mesh
from optax_gaf._collectives import AxisName
from optax_gaf._collectives import names

COLLECTIVES = ("all_to_all", "all_gather")


@runtime_checkable
class Placement(Protocol):
  """Stages 1 and 3 for N microgradients, bound to them where they live.

  Attributes:
    leaves: the microgradient leaves as the caller holds them: this device's
      ``[n_local, ...]`` inside ``jax.shard_map``/``jax.pmap``, the global
      ``[N, ...]`` arrays under plain ``jax.jit`` and on one device
      (``jax.ShapeDtypeStruct`` for a producer that holds no such arrays).
  """

  leaves: Sequence[Any]

  @property
  def num_microgradients(self) -> int:
    """The global N."""

  def gram(self, per_leaf: bool = False, factors=None) -> jax.Array:
    """The replicated ``[N, N]`` (or ``[L, N, N]``) Gram matrix.

    With ``factors`` (global ``[N]`` or ``[L, N]``), that of ``f_i g_i``.
    """

  def max_abs(self) -> jax.Array:
    """The replicated ``[L, N]`` largest ``|entry|`` per leaf and microgradient.

    Only called on the rare step whose Gram diagonal leaves the safe range.
    """

  def combine(
    self, weights: jax.Array, usable: jax.Array, leaves=None
  ) -> list[jax.Array]:
    """Per leaf ``sum_i w_i g_i``, weights ``[N]``/``[L, N]``.

    Laid out like the params given to :func:`resolve_placement`: replicated
    without them, or where they are; sharded where they are. ``leaves``
    (shaped and placed like the bound ones, e.g. their signs) are combined
    instead of the bound leaves.
    """


@runtime_checkable
class PlacedMicrogradients(Placement, Protocol):
  """Microgradients that are their own placement: ``gaf`` takes them as input.

  Attributes:
    treedef: the params' tree structure, which the update takes.
  """

  treedef: Any


class LocalPlacement(NamedTuple):
  """All N microgradients live on this device: an einsum and a tensordot.

  Attributes:
    leaves: the ``[N, ...]`` microgradient leaves.
  """

  leaves: Sequence[jax.Array]

  @property
  def num_microgradients(self) -> int:
    return self.leaves[0].shape[0]

  def gram(self, per_leaf=False, factors=None):
    return _gram.gram(self.leaves, per_leaf, factors)

  def max_abs(self):
    return _gram.max_abs(self.leaves)

  def combine(self, weights, usable, leaves=None):
    leaves = self.leaves if leaves is None else leaves
    return _combine.weighted_sum(leaves, weights, usable)


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
  vmapped = [a for a in names(axis_name) if a not in manual]
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
  """Returns where stages 1 and 3 run for these leaves, bound to them.

  * ``axis_name`` bound by ``jax.shard_map``/``jax.pmap``: the collectives
    (``"all_to_all"``: about one all-reduce of traffic, one reduce-scatter
    for FSDP-sharded params; ``"all_gather"``: the simple reference, ``D -
    1`` times the local gradients);
  * ``axis_name`` an axis of the ``jax.set_mesh`` mesh (plain ``jax.jit``):
    a mesh placement (``"all_gather"`` leaves the plan to XLA);
  * ``axis_name`` None: a mesh placement when the leaves' leading axis is
    sharded over Explicit mesh axes, else :class:`LocalPlacement`.

  The leaves are moved once, here; every later stage starts from that move.

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
    A :class:`Placement` bound to ``leaves``.

  Raises:
    ValueError: if ``axis_name`` is neither bound nor an axis of the context
      mesh, with what to do; if ``params`` do not fit the leaves.

  Examples:
    >>> import jax, jax.numpy as jnp, optax_gaf
    >>> g = jnp.arange(8.0).reshape(4, 2)  # 2 devices x 2 microgradients
    >>> def gram(x):
    ...   return optax_gaf.placement.resolve_placement([x], "i").gram()
    >>> grams = jax.pmap(gram, axis_name="i", devices=jax.devices()[:2])(
    ...     g.reshape(2, 2, 2))
    >>> bool((grams[0] == g @ g.T).all() & (grams[1] == grams[0]).all())
    True
  """
  check_placement(axis_name, collective)
  leaves = tuple(leaves)
  if axis_name is None:
    found = _mesh.explicit_batch_sharding(leaves)
    if found is None:
      return LocalPlacement(leaves)
    return _mesh.MeshPlacement.bind(*found, _mesh.param_specs(params), leaves)
  if _is_bound(axis_name):
    _check_device_axis(axis_name)
    if collective == "all_gather":
      return _collectives.AllGatherPlacement.bind(axis_name, leaves)
    layouts = _collectives.local_layouts(leaves, params, axis_name)
    return _collectives.AllToAllPlacement.bind(axis_name, leaves, layouts)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not all(a in mesh.axis_names for a in names(axis_name)):
    raise _unbound_error(axis_name)
  if collective == "all_gather":
    return LocalPlacement(leaves)
  specs = _mesh.param_specs(params)
  return _mesh.MeshPlacement.bind(mesh, names(axis_name), specs, leaves)
