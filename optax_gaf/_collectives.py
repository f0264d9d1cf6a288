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
"""

from typing import Any, Hashable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from optax_gaf import _statistics

AxisName = Hashable | tuple[Hashable, ...]

COLLECTIVES = ("all_to_all", "all_gather")


def axis_size(axis_name: AxisName) -> int:
  """``lax.axis_size``, with an error that says what to do when unbound."""
  try:
    return lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
        f"gaf(axis_name={axis_name!r}): the axis name is not bound here. Call"
        " the optimizer's update inside jax.shard_map over a mesh with that"
        " axis, or inside jax.pmap(..., axis_name=...); on a single device"
        " (or under plain jax.jit) leave axis_name=None."
    ) from e


def _chunk(x: jax.Array, axis_name: AxisName, num_devices: int) -> jax.Array:
  """``[n_local, ...]`` on each device -> ``[N, C]``: chunk d of every one."""
  n_local = x.shape[0]
  flat = x.reshape(n_local, -1)
  size = flat.shape[1]
  c = max(-(-size // num_devices), 1)
  # Zero padding changes no inner product and no weighted sum.
  flat = jnp.pad(flat, ((0, 0), (0, c * num_devices - size)))
  y = lax.all_to_all(flat.reshape(n_local, num_devices, c), axis_name,
                     split_axis=1, concat_axis=0, tiled=True)
  return y.reshape(num_devices * n_local, c)


def _unchunk(part: jax.Array, like: jax.Array, axis_name: AxisName) -> jax.Array:
  """This device's combined chunk ``[C]`` -> the full, replicated update."""
  full = lax.all_gather(part, axis_name, to="invarying", tiled=True)
  return full[:like[0].size].reshape(like.shape[1:])


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
    return [lax.all_gather(x, self.axis_name, to="invarying", tiled=True)
            for x in leaves]

  def gram(self, leaves, per_leaf=False):
    return _statistics.gram(self._gather(leaves), per_leaf)

  def combine(self, leaves, weights, usable):
    return _statistics.weighted_sum(self._gather(leaves), weights, usable)


def make_placement(
    axis_name: AxisName | None = None, collective: str = "all_to_all"
) -> Any:
  """Returns where stages 1 and 3 of an aggregator run.

  Every aggregator in this package calls the three methods of the returned
  placement and nothing else device-specific:

  * ``num_microgradients(n_local)``: the global N;
  * ``gram(leaves, per_leaf=False)``: the replicated ``[N, N]`` (or
    ``[L, N, N]``) float32 Gram matrix of all N microgradients;
  * ``combine(leaves, weights, usable)``: the replicated per-leaf weighted
    sums, ``weights`` ``[N]`` or ``[L, N]``.

  Here ``leaves`` are this device's microgradient leaves ``[n_local, ...]``.

  Args:
    axis_name: None for one device (or plain ``jax.jit``); otherwise the mesh
      axis name, or tuple of names, the microgradients are spread over, as
      bound by ``jax.shard_map`` or ``jax.pmap``.
    collective: ``"all_to_all"`` (about one all-reduce of traffic) or
      ``"all_gather"`` (the simple reference, ``D - 1`` times the local
      gradients). Ignored when ``axis_name`` is None.

  Returns:
    A placement object with the three methods above.

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
  if axis_name is None:
    return _statistics.LocalPlacement()
  try:
    hash(axis_name)
  except TypeError as e:
    raise TypeError(
        f"axis_name must be a mesh axis name or a tuple of names; got"
        f" {axis_name!r}."
    ) from e
  if collective == "all_to_all":
    return AllToAllPlacement(axis_name)
  return AllGatherPlacement(axis_name)
