"""Models that nobody here wrote, for ``benchmarks/outside_models.py``.

Each module follows one public example (repository, file and commit named
at its top) layer for layer, with the loss and optimizer its authors train
it with (an L2 term included), written out here rather than copied, and
reduced only in size (width, depth, image or sequence length) so that it
runs on a CPU. Where a package ships the model itself (``hk.nets``), the
package's class is used as it is.

Every module has ``case(dtype) -> Case``: the model computing in
``dtype`` (float64 for the decision check).
"""

from typing import Any
from typing import NamedTuple


class Case(NamedTuple):
  """One outside model.

  Attributes:
    name: the row name.
    source: repository, file and commit the module follows.
    kind: ``"stateful"``: ``loss(params, model_state, batch, rng) -> (loss,
      new_model_state)``, the Linen (and Haiku) contract of
      ``optax_gaf.flax.linen_microgradients``; ``"nnx"``: ``loss(model,
      batch)`` of an NNX module, ``nnx_microgradients``'s; ``"pure"``:
      ``loss(params, batch)``, ``microbatch_grads``'s.
    init: ``init(key, batch_size) -> (params or model, model_state,
      batch)``, in the case's dtype.
    loss: the loss of one (micro)batch, as above.
    optimizer: ``optimizer() -> optax.GradientTransformation``, the authors'
      (schedules replaced by their peak learning rate).
  """

  name: str
  source: str
  kind: str
  init: Any
  loss: Any
  optimizer: Any
