"""The Flax guide's two programs as pure, scannable training runs.

``examples/flax_guide/`` holds two programs (the NNX tutorial: CNN with
BatchNorm and Dropout, adamw; the Linen example: CNN, SGD with momentum),
each unchanged and converted to GAF. Here they are rebuilt as pure
functions so that a study can train many of them at once: a
``jax.lax.scan`` over steps, ``jax.vmap``-ped over seeds.

What is kept from the programs: the data (their ``load_digits``: 1300
training images with ``label_noise`` of the labels moved to another class,
497 clean test images, shuffled by ``seed``), the batches (a NumPy generator
seeded by ``seed`` drawing 32 indices without replacement each step), the
models and their initialisation (seed 0, as in the programs), the optimizers
and learning rates, N = 4 microbatches, and the converted step
(``optax_gaf.flax.nnx_microgradients`` / ``optax_gaf.microbatch_grads``, then
``optax_gaf.process(identity, aggregator, optimizer)``). "Averaging" is the
unchanged program: one gradient of the whole batch (for the NNX tutorial
that also means BatchNorm statistics over 32 examples, not 8).

What differs: the convolutions are computed as patches times a matrix
(:func:`patch_conv`), the same numbers up to rounding, because XLA:CPU runs
convolutions inside a loop, and vmapped ones, through a slow path
(jax-ml/jax#12868); and evaluation is in one batch of all 497 test images,
as the programs do.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_gaf
import optax_gaf.flax

GUIDE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "flax_guide"
BATCH_SIZE = 32
NUM_MICROBATCHES = 4


def load_program(name: str):
  """The module ``examples/flax_guide/<name>.py``."""
  spec = importlib.util.spec_from_file_location(name, GUIDE / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def patch_conv(x, kernel, bias):
  """A 3x3 ``SAME`` convolution (stride 1, NHWC/HWIO) as a matrix product."""
  patches = jax.lax.conv_general_dilated_patches(
    x,
    kernel.shape[:2],
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  # Patch features are ordered (channel, row, column).
  k = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(-1, kernel.shape[-1])
  return patches @ k + bias


class Data(NamedTuple):
  """One seed's data, as arrays."""

  train_x: Any
  train_y: Any
  test_x: Any
  test_y: Any
  corrupted: Any  # bool [1300]: training labels moved to another class


def load_data(label_noise: float, seed: int) -> Data:
  """The programs' ``load_digits(label_noise, seed)``, and what it corrupted."""
  program = load_program("linen_mnist")
  clean = program.load_digits(0.0, seed)
  noisy = program.load_digits(label_noise, seed)
  return Data(*noisy, corrupted=noisy[1] != clean[1])


def batch_indices(seed: int, steps: int, n_train: int = 1300) -> np.ndarray:
  """``[steps, 32]``: the programs' ``rng.choice`` draws, seeded by ``seed``."""
  rng = np.random.default_rng(seed)
  return np.stack(
    [rng.choice(n_train, BATCH_SIZE, replace=False) for _ in range(steps)]
  ).astype(np.int32)


class Program(NamedTuple):
  """Pure functions of one run; ``vmap`` them over runs.

  ``init() -> state``; ``run(state, data, idx [S, 32]) -> (state, trace)``
  with ``trace`` a dict of ``[S]`` arrays; ``evaluate(state, data) ->
  (test accuracy, memorisation, test loss)``.
  """

  init: Callable[[], Any]
  run: Callable[..., Any]
  evaluate: Callable[..., Any]


def _trace(opt_state):
  """Per step: acceptance rate, ready and the threshold (NaN: averaging)."""
  try:
    s = optax_gaf.stats(opt_state)
  except ValueError:  # the unchanged program keeps no GAF state
    nan = jnp.float32(jnp.nan)
    return {
      "acceptance": nan,
      "ready": jnp.bool_(True),
      "tau": nan,
      "distance": jnp.full([NUM_MICROBATCHES], nan),
    }
  return {
    "acceptance": s["acceptance_rate"],
    "ready": s["ready"],
    "tau": s["tau"],
    "distance": s.get("cosine_distance", jnp.full([NUM_MICROBATCHES], jnp.nan)),
  }


def _scores(test_logits, train_logits, data):
  """Test accuracy, memorisation (of the corrupted labels), test loss."""
  test = jnp.mean(jnp.argmax(test_logits, -1) == data.test_y)
  fit = (jnp.argmax(train_logits, -1) == data.train_y) & data.corrupted
  memorised = jnp.sum(fit) / jnp.maximum(jnp.sum(data.corrupted), 1)
  loss = optax.softmax_cross_entropy_with_integer_labels(
    test_logits, data.test_y
  ).mean()
  return test, memorised, loss


def nnx_tutorial(aggregator) -> Program:
  """The NNX tutorial; ``aggregator`` None: the unchanged program."""
  program = load_program("nnx_tutorial")

  class CNN(program.CNN):
    def __call__(self, x):
      c1, c2 = self.conv1, self.conv2
      x = patch_conv(x, c1.kernel[...], c1.bias[...])
      x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(x))))
      x = patch_conv(x, c2.kernel[...], c2.bias[...])
      x = self.avg_pool(nnx.relu(self.batch_norm2(x)))
      x = x.reshape(x.shape[0], -1)
      x = nnx.relu(self.dropout2(self.linear1(x)))
      return self.linear2(x)

  learning_rate, momentum = 0.005, 0.9
  inner = optax.adamw(learning_rate, momentum)
  tx = (
    inner
    if aggregator is None
    else optax_gaf.process(optax.identity(), aggregator, inner)
  )
  model = CNN(rngs=nnx.Rngs(0))
  graphdef, state0 = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
  loss_fn = program.loss_fn

  def init():
    return state0

  def step(data, state, i):
    model, optimizer = nnx.merge(graphdef, state)
    model.train()
    batch = {"image": data.train_x[i], "label": data.train_y[i]}
    if aggregator is None:
      grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    else:
      grad_fn = optax_gaf.flax.nnx_microgradients(
        loss_fn, NUM_MICROBATCHES, has_aux=True
      )
    _, grads = grad_fn(model, batch)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), _trace(
      nnx.as_pure(optimizer.opt_state)
    )

  def run(state, data, idx):
    return jax.lax.scan(lambda s, i: step(data, s, i), state, idx)

  def evaluate(state, data):
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return _scores(model(data.test_x), model(data.train_x), data)

  return Program(init, run, evaluate)


def linen_mnist(aggregator) -> Program:
  """The Linen example; ``aggregator`` None: the unchanged program."""
  program = load_program("linen_mnist")
  cnn = program.CNN()
  params0 = cnn.init(jax.random.key(0), jnp.ones([1, 8, 8, 1]))["params"]
  learning_rate, momentum = 0.1, 0.9
  inner = optax.sgd(learning_rate, momentum)
  tx = (
    inner
    if aggregator is None
    else optax_gaf.process(optax.identity(), aggregator, inner)
  )

  def apply(params, x):
    """``cnn.apply`` with the convolutions as :func:`patch_conv`."""
    for conv in ("Conv_0", "Conv_1"):
      x = patch_conv(x, params[conv]["kernel"], params[conv]["bias"])
      x = jax.nn.relu(x)
      n, h, w, c = x.shape
      x = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    x = x.reshape((x.shape[0], -1))
    x = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return x @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]

  def loss_fn(params, batch):
    images, labels = batch
    logits = apply(params, images)
    one_hot = jax.nn.one_hot(labels, 10)
    return jnp.mean(optax.softmax_cross_entropy(logits=logits, labels=one_hot))

  def init():
    return params0, tx.init(params0)

  def step(data, state, i):
    params, opt_state = state
    batch = (data.train_x[i], data.train_y[i])
    if aggregator is None:
      grads = jax.grad(loss_fn)(params, batch)
    else:
      grads = optax_gaf.microbatch_grads(loss_fn, NUM_MICROBATCHES)(
        params, batch
      )[1]
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), _trace(opt_state)

  def run(state, data, idx):
    return jax.lax.scan(lambda s, i: step(data, s, i), state, idx)

  def evaluate(state, data):
    test, train = apply(state[0], data.test_x), apply(state[0], data.train_x)
    return _scores(test, train, data)

  return Program(init, run, evaluate)


PROGRAMS = {"nnx": nnx_tutorial, "linen": linen_mnist}
