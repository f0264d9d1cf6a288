"""Equinox's vision transformer example (per-example dropout keys).

Follows patrick-kidger/equinox docs/examples/vision_transformer.ipynb
(``PatchEmbedding``, ``AttentionBlock``, ``VisionTransformer``;
``compute_grads``: the mean softmax cross-entropy of ``jax.vmap(model)``
over images and one key per image; ``optax.adamw(1e-4, b1=0.9,
b2=0.999)``), at commit 9336d820b2ef66b360fc6cb3611b3da5cefbb14d.

Reduced in size only: embedding 32 (512), hidden 64 (256), 4 heads (8), 2
layers (6), 16x16x3 images in 4x4 patches (32x32x3). The notebook's
``einops.rearrange`` of the patches is written as the equivalent reshape
and transpose (einops is no dependency here).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from benchmarks.outside import Case

SOURCE = (
  "patrick-kidger/equinox docs/examples/vision_transformer.ipynb @ 9336d820"
  "b2ef66b360fc6cb3611b3da5cefbb14d"
)
CHANNELS, SIZE, PATCH, NUM_CLASSES = 3, 16, 4, 10


class PatchEmbedding(eqx.Module):
  linear: eqx.nn.Linear
  patch_size: int

  def __init__(self, input_channels, output_shape, patch_size, key):
    self.patch_size = patch_size
    self.linear = eqx.nn.Linear(
      patch_size**2 * input_channels, output_shape, key=key
    )

  def __call__(self, x):
    # "c (h ph) (w pw) -> (h w) (c ph pw)"
    c, hh, ww = x.shape
    p = self.patch_size
    x = x.reshape(c, hh // p, p, ww // p, p).transpose(1, 3, 0, 2, 4)
    x = x.reshape((hh // p) * (ww // p), c * p * p)
    return jax.vmap(self.linear)(x)


class AttentionBlock(eqx.Module):
  layer_norm1: eqx.nn.LayerNorm
  layer_norm2: eqx.nn.LayerNorm
  attention: eqx.nn.MultiheadAttention
  linear1: eqx.nn.Linear
  linear2: eqx.nn.Linear
  dropout1: eqx.nn.Dropout
  dropout2: eqx.nn.Dropout

  def __init__(self, input_shape, hidden_dim, num_heads, dropout_rate, key):
    key1, key2, key3 = jr.split(key, 3)
    self.layer_norm1 = eqx.nn.LayerNorm(input_shape)
    self.layer_norm2 = eqx.nn.LayerNorm(input_shape)
    self.attention = eqx.nn.MultiheadAttention(num_heads, input_shape, key=key1)
    self.linear1 = eqx.nn.Linear(input_shape, hidden_dim, key=key2)
    self.linear2 = eqx.nn.Linear(hidden_dim, input_shape, key=key3)
    self.dropout1 = eqx.nn.Dropout(dropout_rate)
    self.dropout2 = eqx.nn.Dropout(dropout_rate)

  def __call__(self, x, enable_dropout, key):
    input_x = jax.vmap(self.layer_norm1)(x)
    x = x + self.attention(input_x, input_x, input_x)
    input_x = jax.vmap(self.layer_norm2)(x)
    input_x = jax.nn.gelu(jax.vmap(self.linear1)(input_x))
    key1, key2 = jr.split(key, num=2)
    input_x = self.dropout1(input_x, inference=not enable_dropout, key=key1)
    input_x = jax.vmap(self.linear2)(input_x)
    input_x = self.dropout2(input_x, inference=not enable_dropout, key=key2)
    return x + input_x


class VisionTransformer(eqx.Module):
  patch_embedding: PatchEmbedding
  positional_embedding: jax.Array
  cls_token: jax.Array
  attention_blocks: list[AttentionBlock]
  dropout: eqx.nn.Dropout
  mlp: eqx.nn.Sequential
  num_layers: int

  def __init__(
    self, embedding_dim, hidden_dim, num_heads, num_layers, dropout_rate,
    patch_size, num_patches, num_classes, key,
  ):  # fmt: skip
    key1, key2, key3, key4, key5 = jr.split(key, 5)
    self.patch_embedding = PatchEmbedding(
      CHANNELS, embedding_dim, patch_size, key1
    )
    self.positional_embedding = jr.normal(
      key2, (num_patches + 1, embedding_dim)
    )
    self.cls_token = jr.normal(key3, (1, embedding_dim))
    self.num_layers = num_layers
    self.attention_blocks = [
      AttentionBlock(embedding_dim, hidden_dim, num_heads, dropout_rate, key4)
      for _ in range(self.num_layers)
    ]
    self.dropout = eqx.nn.Dropout(dropout_rate)
    self.mlp = eqx.nn.Sequential(
      [
        eqx.nn.LayerNorm(embedding_dim),
        eqx.nn.Linear(embedding_dim, num_classes, key=key5),
      ]
    )

  def __call__(self, x, enable_dropout, key):
    x = self.patch_embedding(x)
    x = jnp.concatenate((self.cls_token, x), axis=0)
    x += self.positional_embedding[: x.shape[0]]
    dropout_key, *attention_keys = jr.split(key, num=self.num_layers + 1)
    x = self.dropout(x, inference=not enable_dropout, key=dropout_key)
    for block, attention_key in zip(self.attention_blocks, attention_keys):
      x = block(x, enable_dropout, key=attention_key)
    return self.mlp(x[0])


def _model(key, dtype):
  model = VisionTransformer(
    embedding_dim=32, hidden_dim=64, num_heads=4, num_layers=2,
    dropout_rate=0.1, patch_size=PATCH, num_patches=(SIZE // PATCH) ** 2,
    num_classes=NUM_CLASSES, key=key,
  )  # fmt: skip
  model = jax.tree.map(
    lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model
  )
  return eqx.partition(model, eqx.is_inexact_array)


def case(dtype=jnp.float32) -> Case:
  _, static = _model(jr.key(0), dtype)  # the same for every key

  def init(key, batch_size):
    k1, k2, k3, k4 = jr.split(key, 4)
    params, _ = _model(k1, dtype)
    batch = {
      "images": jr.normal(k2, (batch_size, CHANNELS, SIZE, SIZE), dtype),
      "labels": jr.randint(k3, (batch_size,), 0, NUM_CLASSES),
      "key": jr.split(k4, batch_size),  # one key per image, as the notebook
    }
    return params, None, batch

  def loss(params, batch):
    model = eqx.combine(params, static)
    logits = jax.vmap(model, in_axes=(0, None, 0))(
      batch["images"], True, batch["key"]
    )
    return jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    )

  return Case(
    name="Equinox ViT",
    source=SOURCE,
    kind="pure",
    init=init,
    loss=loss,
    optimizer=lambda: optax.adamw(1e-4, b1=0.9, b2=0.999),
  )
