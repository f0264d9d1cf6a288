"""Independent float64 NumPy oracles for the aggregators.

They work on the flattened microgradients directly (no Gram matrix), so they
check the library's Gram -> rule -> combine route from the outside.
"""

import numpy as np


def flatten(grads_tree_leaves):
  """``[N, ...]`` leaves -> ``[N, P]`` float64 matrix (whole-pytree vectors)."""
  return np.concatenate(
    [
      np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
      for x in grads_tree_leaves
    ],
    axis=1,
  )


def cos_dist(a, b):
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  if na == 0 or nb == 0:
    return 1.0
  return 1.0 - float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def usable(flat):
  return np.array([np.all(np.isfinite(g)) and np.any(g != 0) for g in flat])


def sequential(flat, tau):
  """The paper's Algorithm 1 against the running mean of accepted ones.

  Returns:
    (update [P] or None on a no-agreement step, accepted [N] bool,
    distances [N] with NaN for unusable microgradients).
  """
  n = flat.shape[0]
  ok = usable(flat)
  accepted = np.zeros(n, bool)
  dist = np.full(n, np.nan)
  members = []
  for i in range(n):
    if not ok[i]:
      continue
    if not members:
      members.append(i)
      accepted[i] = True
      dist[i] = 0.0
      continue
    mean = np.mean(flat[members], axis=0)
    dist[i] = cos_dist(flat[i], mean)
    if dist[i] <= tau:
      members.append(i)
      accepted[i] = True
  if len(members) < 2:
    return None, accepted, dist
  return np.mean(flat[members], axis=0), accepted, dist


def pairwise(flat, tau):
  """The authors' ``step_GAF``: on agreement ``G <- (G + g_i) / 2``."""
  n = flat.shape[0]
  ok = usable(flat)
  accepted = np.zeros(n, bool)
  dist = np.full(n, np.nan)
  current = None
  agreed = 0
  for i in range(n):
    if not ok[i]:
      continue
    if current is None:
      current = flat[i].copy()
      accepted[i] = True
      dist[i] = 0.0
      continue
    dist[i] = cos_dist(flat[i], current)
    if dist[i] <= tau:
      current = (current + flat[i]) / 2
      accepted[i] = True
      agreed += 1
  if agreed == 0:
    return None, accepted, dist
  return current, accepted, dist


def is_ambiguous(dist, tau, margin=1e-4):
  """True when a decision sits within ``margin`` of the threshold."""
  d = np.asarray(dist)
  d = d[np.isfinite(d)]
  return bool(np.any(np.abs(d - tau) < margin))


def softmax_xent_linear_grads(x, y, kernel, bias):
  """Gradients of mean softmax cross-entropy of ``x @ kernel + bias``.

  Args:
    x: ``[m, d]`` inputs; y: ``[m]`` int labels; kernel ``[d, c]``; bias
      ``[c]``.

  Returns:
    ``(d_kernel [d, c], d_bias [c])`` in float64.
  """
  x = np.asarray(x, np.float64)
  logits = x @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
  logits -= logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(axis=1, keepdims=True)
  p[np.arange(len(y)), np.asarray(y)] -= 1.0
  return x.T @ p / len(y), p.mean(axis=0)


# --- Rules beyond the paper (issue 6): medoid, soft, adaptive tau, and_mask,
# adacons. Same conventions: float64, flattened microgradients.


def pairwise_distances(flat):
  """``[N, N]`` cosine distances, NaN on rows/columns of unusable ones."""
  n = flat.shape[0]
  ok = usable(flat)
  d = np.full((n, n), np.nan)
  for i in range(n):
    for j in range(n):
      if ok[i] and ok[j]:
        d[i, j] = cos_dist(flat[i], flat[j])
  return d


def medoid_anchor(flat, tau):
  """(anchor index or None, neighbour indices, distances to the anchor)."""
  n = flat.shape[0]
  ok = usable(flat)
  d = pairwise_distances(flat)
  best, best_count = None, -1
  for i in range(n):
    if not ok[i]:
      continue
    count = sum(1 for j in range(n) if j != i and ok[j] and d[i, j] <= tau)
    if count > best_count:  # strict: ties keep the lowest index
      best, best_count = i, count
  if best is None:
    return None, [], np.full(n, np.nan)
  neighbours = [
    j for j in range(n) if j != best and ok[j] and d[best, j] <= tau
  ]
  to_anchor = d[best].copy()
  to_anchor[best] = 0.0
  return best, neighbours, to_anchor


def medoid(flat, tau):
  """The order-invariant rule: the anchor with most neighbours within tau."""
  n = flat.shape[0]
  anchor, neighbours, dist = medoid_anchor(flat, tau)
  accepted = np.zeros(n, bool)
  if anchor is None:
    return None, accepted, dist
  accepted[anchor] = True
  if not neighbours:
    return None, accepted, dist
  accepted[neighbours] = True
  return flat[accepted].mean(axis=0), accepted, dist


def soft(flat, tau, temperature):
  """Sigmoid weights on the distances to the medoid anchor.

  Returns (update or None, accepted, distances, normalised weights).
  """
  n = flat.shape[0]
  ok = usable(flat)
  anchor, _, dist = medoid_anchor(flat, tau)
  w = np.zeros(n)
  for i in range(n):
    if ok[i]:
      w[i] = 1.0 / (1.0 + np.exp(-(tau - dist[i]) / temperature))
  accepted = np.zeros(n, bool)
  if anchor is None:
    return None, accepted, dist, np.zeros(n)
  if w.sum() - w[anchor] < 0.5:
    accepted[anchor] = True
    return None, accepted, dist, np.zeros(n)
  accepted = ok & (dist <= tau)
  w = w / w.sum()
  return np.tensordot(w, np.where(ok[:, None], flat, 0.0), 1), accepted, dist, w


def adaptive_tau(recorded, tau, k, history, min_count):
  """min(tau, mean + k std) of the last ``history`` recorded distances."""
  last = np.asarray(recorded[-history:], np.float64)
  if len(last) < min_count:
    return tau
  return min(tau, last.mean() + k * last.std())


def and_mask(leaves, threshold, scale_grad_inverse_sparsity=False):
  """The authors' ``get_grads(method='and_mask')``, per leaf, in float64.

  Unusable microgradients (whole-pytree non-finite or zero) are dropped first.
  Returns the list of updated leaves.
  """
  ok = usable(flatten(leaves))
  out = []
  for x in leaves:
    g = np.asarray(x, np.float64)[ok]
    mask = np.abs(np.mean(np.sign(g), axis=0)) >= threshold
    y = mask * g.mean(axis=0)
    if scale_grad_inverse_sparsity:
      y = y / (1e-10 + mask.mean())
    out.append(y)
  return out


def adacons(flat, sorted_momentum=None, momentum=0.0, rescale=True):
  """AdaCons with the sorted-coefficient momentum put back by rank.

  Returns (update or None, coefficients [N], new sorted momentum [N]).
  """
  ok = usable(flat)
  n_ok = max(ok.sum(), 1)
  total = np.where(ok[:, None], flat, 0.0).sum(axis=0)
  raw = np.zeros(flat.shape[0])
  for i in np.flatnonzero(ok):
    raw[i] = flat[i] @ total / np.linalg.norm(flat[i]) / n_ok
  order = np.argsort(raw, kind="stable")
  m = raw[order]
  if sorted_momentum is not None:
    m = momentum * np.asarray(sorted_momentum, np.float64) + (1 - momentum) * m
  alpha = np.zeros_like(raw)
  alpha[order] = m
  alpha[~ok] = 0.0
  if not ok.any() or alpha.sum() <= 0:
    return None, np.zeros_like(alpha), m
  alpha = alpha / alpha.sum()
  update = sum(
    alpha[i] * flat[i] / np.linalg.norm(flat[i]) for i in np.flatnonzero(ok)
  )
  if rescale:
    mean = total / n_ok
    update = update * np.linalg.norm(mean) / np.linalg.norm(update)
  return update, alpha, m


def gradient_diversity(flat):
  """sum_i ||g_i||^2 / ||sum_i g_i||^2 over the usable microgradients."""
  g = flat[usable(flat)]
  return float(np.sum(g * g) / np.sum(g.sum(axis=0) ** 2))


def near_mean(flat, tau):
  """The custom rule of ``optax_gaf/rules.py``'s docstring: every usable
  microgradient within ``tau`` of the usable ones' mean; ready with >= 2.

  Returns (update or None, accepted [N], distances [N], NaN where unusable).
  """
  ok = usable(flat)
  mean = flat[ok].mean(axis=0) if ok.any() else np.zeros(flat.shape[1])
  dist = np.full(flat.shape[0], np.nan)
  for i in np.flatnonzero(ok):
    dist[i] = cos_dist(flat[i], mean)
  accepted = ok & (np.nan_to_num(dist, nan=np.inf) <= tau)
  if accepted.sum() < 2:
    return None, accepted, dist
  return flat[accepted].mean(axis=0), accepted, dist


def auto_tau(stats, z, min_count, warmup_tau, floor):
  """AutoTau's threshold from ``(sq EMA, count EMA, seen)``, in float64."""
  sq, count, seen = (float(x) for x in stats)
  if seen < min_count:
    return warmup_tau
  sigma = np.sqrt(sq / count) if count > 0 else 0.0
  return min(max(1.0 - z * sigma, floor), 2.0)


def record_chance(stats, dist, decay):
  """AutoTau's statistics after a step whose rule distances are ``dist``."""
  sims = 1.0 - np.asarray(dist, np.float64)
  neg = sims[np.isfinite(sims) & (sims < 0)]
  sq, count, seen = (float(x) for x in stats)
  return (
    decay * sq + (1 - decay) * np.sum(neg**2),
    decay * count + (1 - decay) * len(neg),
    seen + len(neg),
  )
