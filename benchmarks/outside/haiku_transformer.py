"""Haiku's transformer language model (dropout via ``hk.next_rng_key``).

Follows google-deepmind/dm-haiku examples/transformer/model.py
(``Transformer``, ``LanguageModel``) and examples/transformer/train.py
(``loss_fn``: the negative log-likelihood averaged over non-padding tokens;
``optimiser``: ``clip_by_global_norm(1)`` then ``adam(3e-4, b1=0.9,
b2=0.99)``), at commit f4d858a5cbb29140855d68f81f5fd625e078a5ae.

Reduced in size only: 2 layers (6), 4 heads (8), model width 64 (128), key
size 16 (32), sequences of 32 tokens (64); vocabulary 128 and dropout 0.1 as
in the example.
"""

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.outside import Case

SOURCE = (
  "google-deepmind/dm-haiku examples/transformer/model.py, train.py @ f4d858"
  "a5cbb29140855d68f81f5fd625e078a5ae"
)
VOCAB_SIZE, PAD_TOKEN, LENGTH = 128, 0, 32


def _layer_norm(x):
  return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)


@dataclasses.dataclass
class Transformer(hk.Module):
  num_heads: int
  num_layers: int
  attn_size: int
  dropout_rate: float
  widening_factor: int = 4
  name: str | None = None

  def __call__(self, embeddings, mask):
    initializer = hk.initializers.VarianceScaling(2 / self.num_layers)
    _, seq_len, model_size = embeddings.shape
    mask = mask[:, None, None, :]
    mask = mask * np.tril(np.ones((1, 1, seq_len, seq_len)))
    h = embeddings
    for _ in range(self.num_layers):
      attn_block = hk.MultiHeadAttention(
        num_heads=self.num_heads,
        key_size=self.attn_size,
        model_size=model_size,
        w_init=initializer,
      )
      h_norm = _layer_norm(h)
      h_attn = attn_block(h_norm, h_norm, h_norm, mask=mask)
      h = h + hk.dropout(hk.next_rng_key(), self.dropout_rate, h_attn)
      dense_block = hk.Sequential(
        [
          hk.Linear(self.widening_factor * model_size, w_init=initializer),
          jax.nn.gelu,
          hk.Linear(model_size, w_init=initializer),
        ]
      )
      h_dense = dense_block(_layer_norm(h))
      h = h + hk.dropout(hk.next_rng_key(), self.dropout_rate, h_dense)
    return _layer_norm(h)


@dataclasses.dataclass
class LanguageModel(hk.Module):
  transformer: Transformer
  model_size: int
  vocab_size: int
  pad_token: int
  name: str | None = None

  def __call__(self, tokens):
    input_mask = tokens != self.pad_token
    _, seq_len = tokens.shape
    embed_init = hk.initializers.TruncatedNormal(stddev=0.02)
    token_embeddings = hk.Embed(
      self.vocab_size, embed_dim=self.model_size, w_init=embed_init
    )(tokens)
    positional_embeddings = hk.get_parameter(
      "positional_embeddings", [seq_len, self.model_size], init=embed_init
    )
    embeddings = self.transformer(
      token_embeddings + positional_embeddings, input_mask
    )
    return hk.Linear(self.vocab_size)(embeddings)


def _make_loss(dtype):
  @hk.transform
  def loss_fn(data):
    lm = LanguageModel(
      model_size=64,
      vocab_size=VOCAB_SIZE,
      pad_token=PAD_TOKEN,
      transformer=Transformer(
        num_heads=4, num_layers=2, attn_size=16, dropout_rate=0.1
      ),
    )
    logits = lm(data["inputs"])
    log_probs = jax.nn.log_softmax(logits)
    onehot_targets = jax.nn.one_hot(data["targets"], VOCAB_SIZE)
    log_likelihood = jnp.sum(onehot_targets * log_probs, axis=-1)
    mask = jnp.not_equal(data["inputs"], PAD_TOKEN).astype(dtype)
    return -jnp.sum(log_likelihood * mask) / jnp.sum(mask)

  return loss_fn


def case(dtype=jnp.float32) -> Case:
  loss_fn = _make_loss(dtype)

  def init(key, batch_size):
    k1, k2 = jax.random.split(key)
    tokens = jax.random.randint(k1, (batch_size, LENGTH + 1), 1, VOCAB_SIZE)
    tokens = tokens.at[:, -4:].set(PAD_TOKEN)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = loss_fn.init(k2, batch)
    return jax.tree.map(lambda x: x.astype(dtype), params), {}, batch

  def loss(params, model_state, batch, rng):
    return loss_fn.apply(params, rng, batch), model_state

  return Case(
    name="Haiku transformer LM",
    source=SOURCE,
    kind="stateful",
    init=init,
    loss=loss,
    optimizer=lambda: optax.chain(
      optax.clip_by_global_norm(1), optax.adam(3e-4, b1=0.9, b2=0.99)
    ),
  )
