"""Where stages 1 and 3 run: placements bound to their microgradients.

A placement answers the Gram matrix and the weighted sum for N microgradients
wherever they live: on this device, spread over ``jax.shard_map``/``jax.pmap``
devices, or sharded over a mesh under plain ``jax.jit``. The rule (stage 2)
never knows which. :func:`resolve_placement` picks and binds one; a producer
that is its own placement (:class:`optax_gaf.GhostMicrogradients`) satisfies
:class:`PlacedMicrogradients` and goes straight into :func:`optax_gaf.gaf`.
"""

from optax_gaf._collectives import AllGatherPlacement
from optax_gaf._collectives import AllToAllPlacement
from optax_gaf._mesh import MeshPlacement
from optax_gaf._placement import LocalPlacement
from optax_gaf._placement import PlacedMicrogradients
from optax_gaf._placement import Placement
from optax_gaf._placement import resolve_placement

__all__ = (
  "AllGatherPlacement",
  "AllToAllPlacement",
  "LocalPlacement",
  "MeshPlacement",
  "PlacedMicrogradients",
  "Placement",
  "resolve_placement",
)
