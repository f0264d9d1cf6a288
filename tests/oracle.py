"""Independent float64 NumPy oracles for the aggregators.

They work on the flattened microgradients directly (no Gram matrix), so they
check the library's Gram -> rule -> combine route from the outside.
"""

import numpy as np


def flatten(grads_tree_leaves):
  """``[N, ...]`` leaves -> ``[N, P]`` float64 matrix (whole-pytree vectors)."""
  return np.concatenate(
      [np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
       for x in grads_tree_leaves], axis=1)


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


def make_microgradients(rng, n, shapes, agreement, flip_prob=0.3):
  """Microgradients around a shared signal; some point the other way.

  Args:
    rng: a NumPy Generator.
    n: the number of microgradients.
    shapes: parameter shapes (one leaf each).
    agreement: in [0, 1]; the weight of the shared signal against noise.
    flip_prob: chance that a microgradient's signal is negated (a conflicting
      one, like a microbatch with noisy labels).

  Returns:
    A list of float32 arrays ``[n, *shape]``.
  """
  leaves = []
  signs = np.where(rng.random(n) < flip_prob, -1.0, 1.0)
  for shape in shapes:
    signal = rng.normal(size=shape)
    noise = rng.normal(size=(n,) + tuple(shape))
    scale = rng.uniform(0.5, 2.0, size=(n,) + (1,) * len(shape))
    x = scale * (agreement * signs.reshape((n,) + (1,) * len(shape)) * signal
                 + (1 - agreement) * noise)
    leaves.append(x.astype(np.float32))
  return leaves


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
