"""Parameters read inside ``lax.scan``: the scan part of ``trace.py``.

With ``trace.py`` the only module that reads jaxpr equations. A leaf that
enters a scan as a constant or as ``xs`` (Flax's ``nn.scan``/``nnx.scan``
over stacked layers) is followed into the scan's body: its chain gains a
:class:`ScanEntry`, and a layer that alone reads it there is a site whose
layer is :class:`~optax_gaf._ghost.scanned.Scanned`. :func:`run` re-runs
such a scan with each site's zero perturbation as more ``xs`` and its
captures as more ``ys``. A leaf in the carry, or in a scan within a scan,
stays direct.
"""

import dataclasses
from typing import Any

import jax
from jax.extend import core as jcore

# lax.scan's parameters that its equation and jax.lax.scan share.
_SCAN_KW = ("length", "reverse", "unroll", "_split_transpose")


@dataclasses.dataclass(frozen=True)
class ScanEntry:
  """A step of a chain: the leaf enters a scan's body.

  Attributes:
    length: the scan's iterations.
    stacked: whether as ``xs`` (a slice per iteration: the rest of the
      chain applies to each slice), else as a constant (unchanged).
  """

  length: int
  stacked: bool


def _read(jaxpr) -> set:
  """The variables that ``jaxpr``'s equations or outputs read."""
  ins = [v for e in jaxpr.eqns for v in e.invars]
  return {v for v in [*ins, *jaxpr.outvars] if isinstance(v, jcore.Var)}


def walk(eqn, src: list, path: tuple, uses: dict, outer, walk_body) -> None:
  """Follows the leaves that enter a scan as constants or ``xs`` into its
  body.

  A leaf in the carry, in a scan within a scan, or passed through the body
  to its carry or to ``ys`` read after the scan is read outside any layer
  (``nnx.remat`` passes its module's parameters out, to no reader).

  Args:
    eqn: the scan equation.
    src: per operand, ``(leaf, chain)`` or None, as in ``trace._walk``.
    path: the scan equation's path.
    uses: ``trace._walk``'s readers per leaf, added to.
    outer: the jaxpr that holds ``eqn``.
    walk_body: ``trace._walk``, run on the body.
  """
  body = eqn.params["jaxpr"].jaxpr
  consts, carry = eqn.params["num_consts"], eqn.params["num_carry"]
  inner = {}
  for k, (v, o) in enumerate(zip(body.invars, src)):
    if not o:
      continue
    leaf, chain = o
    nested = any(isinstance(c, ScanEntry) for c in chain)
    if consts <= k < consts + carry or nested:
      uses[leaf].append(None)
    else:
      entry = ScanEntry(eqn.params["length"], stacked=k >= consts + carry)
      inner[v] = (leaf, chain + (entry,))
  walk_body(body, inner, path, uses)
  read = _read(outer)
  for j, v in enumerate(body.outvars):
    passed = isinstance(v, jcore.Var) and v in inner
    if passed and (j < carry or eqn.outvars[j] in read):
      uses[inner[v][0]].append(None)


def run(eqn, ins: list, zs: dict, body) -> tuple[list, dict]:
  """A scan equation with sites in its body, as ``jax.lax.scan``.

  Args:
    eqn: the scan equation.
    ins: its operands (constants, carry, ``xs``).
    zs: ``{site: z [L, *output]}`` of the sites in the body, fed as more
      ``xs`` (one slice per iteration).
    body: ``body(jaxpr, consts, ins, {site: z}) -> (outputs, {site:
      captures})``, one iteration of the body.

  Returns:
    ``(outputs, {site: captures})``, each capture stacked ``[L, ...]`` as
    the scan's ``ys`` are (in its iteration order, also reversed).
  """
  p = eqn.params
  closed: Any = p["jaxpr"]
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts, carry = ins[:n_consts], ins[n_consts : n_consts + n_carry]
  xs, sites = ins[n_consts + n_carry :], list(zs)

  def step(carry, x):
    xs_l, zs_l = x
    outs, caps = body(
      closed.jaxpr,
      list(closed.consts),
      [*consts, *carry, *xs_l],
      dict(zip(sites, zs_l)),
    )
    return outs[:n_carry], (outs[n_carry:], [caps[k] for k in sites])

  kw = {k: p[k] for k in _SCAN_KW if k in p}
  carry, (ys, caps) = jax.lax.scan(step, carry, (xs, list(zs.values())), **kw)
  return [*carry, *ys], dict(zip(sites, caps))
