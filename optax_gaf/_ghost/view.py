"""Ghost microgradients in the params' tree, for code that indexes gradients.

Flax's update paths look into the gradients before the optimizer sees them:
``TrainState.apply_gradients`` asks ``"_overwrite_with_gradient" in grads``,
``nnx.Optimizer.update`` takes ``nnx.state(grads, wrt)``.
:meth:`GhostMicrogradients.tree` is the params' tree with a
:class:`GhostLeaf` in place of each leaf; ``gaf`` takes that tree, or any
part of it in any order, as the ghost restricted to those leaves. The
placeholders are no arrays: a transform that computes with them fails with
:class:`NotArraysError`, as on the ghost itself.
"""

from collections.abc import Mapping

import jax

from optax_gaf._ghost import producer


def _refuse(self, *args, **kwargs):
  del args, kwargs
  raise producer.NotArraysError(
    f"{producer._NOT_ARRAYS} (A GhostLeaf stands for leaf {self.index} of a"
    " GhostMicrogradients in its params' tree.)"
  )


class GhostLeaf:
  """Stands for one leaf's N microgradients of a :class:`GhostMicrogradients`.

  Attributes:
    ghost: the :class:`GhostMicrogradients` it belongs to.
    index: its leaf's position in ``jax.tree.leaves(params)``.
  """

  __slots__ = ("ghost", "index")

  def __init__(self, ghost, index: int):
    self.ghost, self.index = ghost, index

  def __repr__(self):
    aval = self.ghost.virtual_leaves[self.index]
    return f"GhostLeaf({self.index}, {aval.shape}, {aval.dtype})"

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    _refuse(self)


for _name in [
  "jax_array",
  "add",
  "radd",
  "sub",
  "rsub",
  "mul",
  "rmul",
  "truediv",
  "rtruediv",
  "pow",
  "rpow",
  "matmul",
  "rmatmul",
  "neg",
  "abs",
  "array",
  "lt",
  "le",
  "gt",
  "ge",
]:
  setattr(GhostLeaf, f"__{_name}__", _refuse)


def tree(ghost):
  """The params' tree of ``ghost`` with a :class:`GhostLeaf` per leaf."""
  n = len(ghost.virtual_leaves)
  return ghost.treedef.unflatten([GhostLeaf(ghost, i) for i in range(n)])


def contains(ghost, key) -> bool:
  """``key in ghost``: whether the params are a mapping with that key."""
  params = tree(ghost)
  return isinstance(params, Mapping) and key in params


def placed(grads):
  """``(ghost restricted to the leaves, treedef)`` of a tree of placeholders.

  ``None`` when ``grads`` holds no :class:`GhostLeaf`.
  """
  leaves, treedef = jax.tree.flatten(grads)
  marks = [isinstance(x, GhostLeaf) for x in leaves]
  if not any(marks):
    return None
  if not all(marks):
    raise TypeError(
      "gaf got a tree that mixes GhostLeaf placeholders with other leaves;"
      " pass the GhostMicrogradients (or a part of its tree()) alone."
    )
  ghost = leaves[0].ghost
  if any(x.ghost is not ghost for x in leaves):
    raise ValueError("gaf got GhostLeaf placeholders of two ghosts.")
  index = [x.index for x in leaves]
  if len(set(index)) < len(index):
    raise ValueError("gaf got the same GhostLeaf twice.")
  sub = type(ghost)(
    [ghost._per_leaf[i] for i in index],
    ghost.num_microbatches,
    treedef,
    [ghost._avals[i] for i in index],
  )
  return sub, treedef
