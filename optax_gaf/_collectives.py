"""Placements inside ``jax.shard_map``/``jax.pmap``: all-to-all and all-gather.

:class:`AllToAllPlacement` (the default) moves about the bytes of one ring
all-reduce, the cost of ``pmean``:

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

:class:`AllGatherPlacement` gathers every microgradient onto every device,
``(D - 1) x`` the local gradient bytes: the simple reference.

Both move the leaves once, when bound; the Gram matrix, the rare rescaled
one and the combine all start from that move, so each leaf crosses the
network once per update.
"""

from collections.abc import Hashable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from optax_gaf import _combine
from optax_gaf import _gram

AxisName = Hashable | tuple[Hashable, ...]


def names(axis_name: AxisName) -> tuple[Hashable, ...]:
  """``axis_name`` as a tuple of mesh axis names."""
  return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def pad_flat(x: jax.Array, num_chunks: int) -> jax.Array:
  """``[n, ...]`` -> ``[n, num_chunks * C]``; zeros change no product or sum."""
  flat = x.reshape(x.shape[0], -1)
  c = max(-(-flat.shape[1] // num_chunks), 1)
  return jnp.pad(flat, ((0, 0), (0, c * num_chunks - flat.shape[1])))


def _chunk(x: jax.Array, axis_name: AxisName, num_devices: int) -> jax.Array:
  """``[n_local, ...]`` on each device -> ``[N, C]``: chunk d of every one."""
  n_local = x.shape[0]
  flat = pad_flat(x, num_devices)
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
    leaves: this device's ``[n_local, ...]`` microgradient leaves.
    layouts: per leaf, None (flat chunks; ``combine`` gathers the whole
      update) or the parameter axis this device holds 1/D of (FSDP:
      ``combine`` returns this device's shard).
    moved: the leaves after the all-to-all, ``[N, ...]`` chunks.
  """

  axis_name: AxisName
  leaves: Sequence[jax.Array]
  layouts: tuple[int | None, ...]
  moved: Sequence[jax.Array]

  @classmethod
  def bind(cls, axis_name, leaves, layouts=None) -> "AllToAllPlacement":
    """The placement with ``leaves`` moved once, for every later stage."""
    layouts = tuple(layouts or (None,) * len(leaves))
    placement = cls(axis_name, tuple(leaves), layouts, ())
    return placement._replace(moved=placement._move(leaves))

  @property
  def num_microgradients(self) -> int:
    return lax.axis_size(self.axis_name) * self.leaves[0].shape[0]

  def _move(self, leaves):
    d = lax.axis_size(self.axis_name)
    out = []
    for x, k in zip(leaves, self.layouts, strict=True):
      if k is None:
        out.append(_chunk(x, self.axis_name, d))
      else:  # split the sharded axis: chunk d is device d's shard
        out.append(lax.all_to_all(x, self.axis_name, 1 + k, 0, tiled=True))
    return out

  def gram(self, per_leaf=False, factors=None):
    partial = _gram.gram(self.moved, per_leaf, factors)
    return lax.psum(partial, self.axis_name)

  def max_abs(self):
    return _gathered_max_abs(self.leaves, self.axis_name)

  def combine(self, weights, usable, leaves=None):
    moved = self.moved if leaves is None else self._move(leaves)
    parts = _combine.weighted_sum(moved, weights, usable)
    out = []
    for part, x, k in zip(parts, self.leaves, self.layouts):
      if k is not None:
        out.append(part)  # this device's shard, shaped like its params
        continue
      full = lax.all_gather(part, self.axis_name, to="invarying", tiled=True)
      out.append(full[: x[0].size].reshape(x.shape[1:]))
    return out


class AllGatherPlacement(NamedTuple):
  """Every device gathers all N microgradients and works as on one device.

  Attributes:
    axis_name: the mesh axis name (or tuple of names).
    leaves: this device's ``[n_local, ...]`` microgradient leaves.
    moved: the gathered ``[N, ...]`` leaves.
  """

  axis_name: AxisName
  leaves: Sequence[jax.Array]
  moved: Sequence[jax.Array]

  @classmethod
  def bind(cls, axis_name, leaves) -> "AllGatherPlacement":
    """The placement with ``leaves`` gathered once, for every later stage."""
    placement = cls(axis_name, tuple(leaves), ())
    return placement._replace(moved=placement._gather(leaves))

  @property
  def num_microgradients(self) -> int:
    return lax.axis_size(self.axis_name) * self.leaves[0].shape[0]

  def _gather(self, leaves):
    return [
      lax.all_gather(x, self.axis_name, to="invarying", tiled=True)
      for x in leaves
    ]

  def gram(self, per_leaf=False, factors=None):
    return _gram.gram(self.moved, per_leaf, factors)

  def max_abs(self):
    return _gathered_max_abs(self.leaves, self.axis_name)

  def combine(self, weights, usable, leaves=None):
    moved = self.moved if leaves is None else self._gather(leaves)
    return _combine.weighted_sum(moved, weights, usable)


def local_layouts(leaves, params, axis_name) -> tuple[int | None, ...]:
  """Inside shard_map: per leaf, the axis this device holds 1/D of, or None.

  Raises:
    ValueError: unless every local param is shaped like its leaf's trailing
      shape, or D times smaller along one axis.
  """
  if params is None:
    return (None,) * len(leaves)
  d = lax.axis_size(axis_name)
  return tuple(
    _layout(i, x, p, d, axis_name)
    for i, (x, p) in enumerate(zip(leaves, params, strict=True))
  )


def _layout(i: int, x: Any, p: Any, d: int, axis_name) -> int | None:
  grad, local = tuple(x.shape[1:]), tuple(jnp.shape(p))
  diff = [k for k, (g, w) in enumerate(zip(grad, local)) if g != w]
  if len(grad) == len(local) and not diff:
    return None
  if (
    len(grad) == len(local)
    and len(diff) == 1
    and (grad[diff[0]] == d * local[diff[0]])
  ):
    return diff[0]
  raise ValueError(
    f"Microgradient leaf {i} is {tuple(x.shape)} but this device's"
    f" param is {local}: each leaf must be [n_local, *param.shape] with"
    f" the param whole, or sharded over {axis_name!r} ({d} times smaller"
    " along one axis)."
  )
