"""Ghost microgradients: GAF's Gram matrix and weighted sum from layers.

- ``trace.py``: the only reader of jaxpr equations (with ``scan.py``, its
  part for ``lax.scan``); finds the layer that reads each parameter, and
  re-runs the loss capturing its inputs and output gradients.
- ``layers.py``: one class per layer kind (dense, convolution, opaque; the
  embedding lookup in ``embedding.py``; a layer inside ``lax.scan`` in
  ``scanned.py``), its Gram matrix and weighted sum from those captures.
- ``numerics.py``: the ghost Gram matrix in float range and to the stacked
  route's precision (per-microbatch scaling, centring, exact rows).
- ``leaves.py``: one object per params leaf (ghost, materialize, direct or
  unused), chosen once, that forms its Gram matrix and weighted sum.
- ``producer.py``: :class:`GhostMicrogradients` (a placement for ``gaf``)
  and :func:`ghost_microgradients`.
- ``view.py``: :meth:`GhostMicrogradients.tree`, the params' tree of
  placeholders that code indexing the gradients (Flax's update paths) gets,
  and that ``gaf`` resolves back to the ghost.
- ``filtered.py``: :func:`ghost_filtered_grads`, the filter inside the
  gradient function.
"""

from optax_gaf._ghost.filtered import ghost_filtered_grads
from optax_gaf._ghost.producer import GhostMicrogradients
from optax_gaf._ghost.producer import NotArraysError
from optax_gaf._ghost.producer import ghost_microgradients

__all__ = (
  "GhostMicrogradients",
  "NotArraysError",
  "ghost_filtered_grads",
  "ghost_microgradients",
)
