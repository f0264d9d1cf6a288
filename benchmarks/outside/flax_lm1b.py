"""Flax's lm1b decoder-only transformer LM (Linen, dropout), with its loss.

Follows google/flax, examples/lm1b/models.py (``TransformerLM``,
``Decoder``, ``EncoderDecoder1DBlock``, ``MlpBlock``, ``AddPositionEmbs``
with the sinusoidal table) and examples/lm1b/train.py (``train_step``: the
cross-entropy weighted by ``inputs > 0``, divided by the weights' sum;
``optax.adamw(lr, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.1)``), at
commit 18f8f311c275d57f46d95e41b15aa97b454754c0.

Reduced in size only: vocabulary 128 (30000), embedding and qkv width 32
(512), MLP 64 (2048), 4 heads (8), 2 layers (6), sequences of 16 tokens
(128). Training paths only: the decoding cache, packed-example segments
and the logical-partitioning annotations (sharding metadata) are left out.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from benchmarks.outside import Case

SOURCE = (
  "google/flax examples/lm1b/models.py, train.py @ 18f8f311c275d57f46d95e41b"
  "15aa97b454754c0"
)
LENGTH = 16


@struct.dataclass
class TransformerConfig:
  vocab_size: int
  output_vocab_size: int
  dtype: Any = jnp.float32
  emb_dim: int = 512
  num_heads: int = 8
  num_layers: int = 6
  qkv_dim: int = 512
  mlp_dim: int = 2048
  max_len: int = 2048
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  deterministic: bool = False
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.normal(stddev=1e-6)


def shift_right(x, axis=1):
  """Pads one zero at the start of ``axis`` and drops the last entry."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, 0)
  padded = jnp.pad(x, pad, constant_values=x.dtype.type(0))
  return jax.lax.dynamic_slice_in_dim(padded, 0, padded.shape[axis] - 1, axis)


def sinusoidal_table(max_len, d_feature, min_scale=1.0, max_scale=10000.0):
  """The fixed ``[1, max_len, d_feature]`` sine/cosine position table."""
  pe = np.zeros((max_len, d_feature), np.float32)
  position = np.arange(0, max_len)[:, np.newaxis]
  scale = -np.log(max_scale / min_scale) / (d_feature // 2 - 1)
  div = min_scale * np.exp(np.arange(0, d_feature // 2) * scale)
  pe[:, : d_feature // 2] = np.sin(position * div)
  pe[:, d_feature // 2 : 2 * (d_feature // 2)] = np.cos(position * div)
  return jnp.asarray(pe[np.newaxis])


class MlpBlock(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs):
    c = self.config
    x = nn.Dense(
      c.mlp_dim, dtype=c.dtype, kernel_init=c.kernel_init, bias_init=c.bias_init
    )(inputs)
    x = nn.Dropout(c.dropout_rate)(nn.relu(x), deterministic=c.deterministic)
    out = nn.Dense(
      inputs.shape[-1],
      dtype=c.dtype,
      kernel_init=c.kernel_init,
      bias_init=c.bias_init,
    )(x)
    return nn.Dropout(c.dropout_rate)(out, deterministic=c.deterministic)


class EncoderDecoder1DBlock(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs, decoder_mask=None):
    c = self.config
    x = nn.LayerNorm(dtype=c.dtype)(inputs)
    x = nn.MultiHeadDotProductAttention(
      num_heads=c.num_heads,
      dtype=c.dtype,
      qkv_features=c.qkv_dim,
      kernel_init=c.kernel_init,
      bias_init=c.bias_init,
      use_bias=False,
      broadcast_dropout=False,
      dropout_rate=c.attention_dropout_rate,
      deterministic=c.deterministic,
    )(x, mask=decoder_mask)
    x = nn.Dropout(c.dropout_rate)(x, deterministic=c.deterministic) + inputs
    z = MlpBlock(config=c)(nn.LayerNorm(dtype=c.dtype)(x))
    return x + z


class Decoder(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs, decoder_mask=None):
    c = self.config
    embed = nn.Embed(
      c.output_vocab_size,
      c.emb_dim,
      embedding_init=nn.initializers.normal(stddev=1.0),
    )
    y = embed(shift_right(inputs.astype("int32")))
    y = y + sinusoidal_table(c.max_len, y.shape[-1])[:, : y.shape[1]]
    y = nn.Dropout(c.dropout_rate)(y, deterministic=c.deterministic)
    y = y.astype(c.dtype)
    for layer in range(c.num_layers):
      y = EncoderDecoder1DBlock(c, name=f"encoderdecoderblock_{layer}")(
        y, decoder_mask=decoder_mask
      )
    y = nn.LayerNorm(dtype=c.dtype, name="encoderdecoder_norm")(y)
    return nn.Dense(
      c.output_vocab_size,
      dtype=c.dtype,
      kernel_init=c.kernel_init,
      bias_init=c.bias_init,
      name="logitdense",
    )(y)


class TransformerLM(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs):
    c = self.config
    mask = nn.combine_masks(
      nn.make_attention_mask(inputs > 0, inputs > 0, dtype=c.dtype),
      nn.make_causal_mask(inputs, dtype=c.dtype),
    )
    logits = Decoder(c, name="decoder")(inputs, decoder_mask=mask)
    return logits.astype(c.dtype)


def weighted_cross_entropy(logits, targets, weights):
  """train.py's cross-entropy (no label smoothing): ``(sum, sum weights)``."""
  one_hot = jax.nn.one_hot(targets, logits.shape[-1])
  loss = -jnp.sum(one_hot * nn.log_softmax(logits), axis=-1)
  return (loss * weights).sum(), weights.sum()


def case(dtype=jnp.float32) -> Case:
  config = TransformerConfig(
    vocab_size=128,
    output_vocab_size=128,
    dtype=dtype,
    emb_dim=32,
    num_heads=4,
    num_layers=2,
    qkv_dim=32,
    mlp_dim=64,
    max_len=LENGTH,
  )
  model = TransformerLM(config)

  def init(key, batch_size):
    k1, k2 = jax.random.split(key)
    inputs = jax.random.randint(k1, (batch_size, LENGTH), 1, 128)
    inputs = inputs.at[:, -3:].set(0)  # padding, as lm1b's batches have
    params = model.init(k2, inputs[:1])["params"]
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    return params, {}, {"inputs": inputs}

  def loss(params, model_state, batch, rng):
    inputs = batch["inputs"]
    weights = jnp.where(inputs > 0, 1, 0).astype(dtype)
    logits = model.apply({"params": params}, inputs, rngs={"dropout": rng})
    total, weight_sum = weighted_cross_entropy(logits, inputs, weights)
    return total / weight_sum, model_state

  return Case(
    name="Flax lm1b transformer",
    source=SOURCE,
    kind="stateful",
    init=init,
    loss=loss,
    optimizer=lambda: optax.adamw(
      1e-3, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.1
    ),
  )
