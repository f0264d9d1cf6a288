"""optax_gaf: Gradient Agreement Filtering for Optax.

GAF (Chaubard, Eddy and Kochenderfer, 2024) compares microbatch gradients by
cosine distance and averages only those that agree. Each aggregator here is
built from three stages: the Gram matrix of microgradient inner products, a
rule that turns it into weights, and the weighted sum.
"""

import warnings

from optax_gaf import placement
from optax_gaf import rules
from optax_gaf._adacons import AdaConsState
from optax_gaf._adacons import adacons
from optax_gaf._and_mask import AndMaskState
from optax_gaf._and_mask import and_mask
from optax_gaf._gaf import gaf
from optax_gaf._ghost import GhostMicrogradients
from optax_gaf._ghost import ghost_filtered_grads
from optax_gaf._ghost import ghost_microgradients
from optax_gaf._microbatching import microbatch_grads
from optax_gaf._microbatching import split_microbatches
from optax_gaf._per_microgradient import per_microgradient
from optax_gaf._process import process
from optax_gaf._state import GAFState
from optax_gaf._stats import stats
from optax_gaf._streaming import FilteredGradients
from optax_gaf._streaming import gaf_accumulator
from optax_gaf._streaming import record_filtered
from optax_gaf._streaming import streaming_filtered_grads
from optax_gaf._threshold import AdaptiveTau
from optax_gaf._threshold import AutoTau
from optax_gaf._threshold import WarmupAutoTau
from optax_gaf.rules import RuleOutput

__version__ = "0.1.0"

__all__ = (
  "AdaConsState",
  "AdaptiveTau",
  "AutoTau",
  "WarmupAutoTau",
  "AndMaskState",
  "FilteredGradients",
  "GAFState",
  "GhostMicrogradients",
  "RuleOutput",
  "adacons",
  "and_mask",
  "gaf",
  "gaf_accumulator",
  "ghost_filtered_grads",
  "ghost_microgradients",
  "microbatch_grads",
  "per_microgradient",
  "placement",
  "process",
  "record_filtered",
  "rules",
  "split_microbatches",
  "stats",
  "streaming_filtered_grads",
)


# Renamed public names: the old ones still work, with a DeprecationWarning.
_DEPRECATED = {
  "Placement": (placement.Placement, "optax_gaf.placement.Placement"),
  "resolve_placement": (
    placement.resolve_placement,
    "optax_gaf.placement.resolve_placement",
  ),
  "streamed": (record_filtered, "optax_gaf.record_filtered"),
  "streaming_grads": (
    streaming_filtered_grads,
    "optax_gaf.streaming_filtered_grads",
  ),
  "ghost_grads": (ghost_filtered_grads, "optax_gaf.ghost_filtered_grads"),
}


def __getattr__(name):
  if name in _DEPRECATED:
    value, new = _DEPRECATED[name]
    warnings.warn(
      f"optax_gaf.{name} is deprecated; use {new}.",
      DeprecationWarning,
      stacklevel=2,
    )
    return value
  raise AttributeError(f"module 'optax_gaf' has no attribute {name!r}")
