"""Float64 NumPy forward and backward passes of small models.

Per-microbatch gradients computed by hand, independent of JAX, to check the
ghost route's Gram matrix and update from the outside.
"""

import numpy as np


def _softmax_xent_grad(logits, y):
  """``d mean_i xent(logits_i, y_i) / d logits``."""
  z = logits - logits.max(axis=1, keepdims=True)
  p = np.exp(z)
  p /= p.sum(axis=1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  return p / len(y)


def mlp_grads(params, x, y):
  """Gradients of ``mean xent(tanh(x W1 + b1) W2 + b2, y)``, flattened.

  Args:
    params: dict with ``w1 [d, h]``, ``b1 [h]``, ``w2 [h, c]``, ``b2 [c]``.
    x: ``[m, d]`` one microbatch; y: ``[m]`` int labels.

  Returns:
    ``[P]`` float64, the leaves in ``jax.tree.leaves`` order (b1, b2, w1, w2).
  """
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x = np.asarray(x, np.float64)
  h = np.tanh(x @ p["w1"] + p["b1"])
  d_out = _softmax_xent_grad(h @ p["w2"] + p["b2"], np.asarray(y))
  d_h = (d_out @ p["w2"].T) * (1 - h**2)
  grads = {
    "b1": d_h.sum(0),
    "b2": d_out.sum(0),
    "w1": x.T @ d_h,
    "w2": h.T @ d_out,
  }
  return np.concatenate([grads[k].ravel() for k in sorted(grads)])


def embedding_bag_grads(table, head, ids, y):
  """Gradients of ``mean xent(mean_t table[ids_t] @ head, y)``, flattened.

  Args:
    table: ``[V, e]``; head: ``[e, c]``; ids: ``[m, T]`` ints; y: ``[m]``.

  Returns:
    ``[V*e + e*c]`` float64: the table's gradient, then the head's.
  """
  table, head = np.asarray(table, np.float64), np.asarray(head, np.float64)
  ids = np.asarray(ids)
  h = table[ids].mean(axis=1)
  d_out = _softmax_xent_grad(h @ head, np.asarray(y))
  d_h = d_out @ head.T
  d_table = np.zeros_like(table)
  for i in range(ids.shape[0]):
    for t in range(ids.shape[1]):
      d_table[ids[i, t]] += d_h[i] / ids.shape[1]
  return np.concatenate([d_table.ravel(), (h.T @ d_out).ravel()])
