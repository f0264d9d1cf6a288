"""optax_gaf: Gradient Agreement Filtering for Optax.

GAF (Chaubard, Eddy and Kochenderfer, 2024) compares microbatch gradients by
cosine distance and averages only those that agree. Each aggregator here is
built from three stages: the Gram matrix of microgradient inner products, a
rule that turns it into weights, and the weighted sum.
"""

from optax_gaf._adacons import AdaConsState
from optax_gaf._adacons import adacons
from optax_gaf._aggregator import GAFState
from optax_gaf._aggregator import gaf
from optax_gaf._aggregator import stats
from optax_gaf._collectives import make_placement
from optax_gaf._microbatching import microbatch_grads
from optax_gaf._microbatching import split_microbatches
from optax_gaf._rules import AdaptiveTau
from optax_gaf._rules import RuleOutput
from optax_gaf._sign import AndMaskState
from optax_gaf._sign import and_mask
from optax_gaf._streaming import FilteredGradients
from optax_gaf._streaming import gaf_accumulator
from optax_gaf._streaming import streaming_grads

__version__ = "0.1.0"

__all__ = (
  "AdaConsState",
  "AdaptiveTau",
  "AndMaskState",
  "FilteredGradients",
  "GAFState",
  "RuleOutput",
  "adacons",
  "and_mask",
  "gaf",
  "gaf_accumulator",
  "make_placement",
  "microbatch_grads",
  "split_microbatches",
  "stats",
  "streaming_grads",
)
