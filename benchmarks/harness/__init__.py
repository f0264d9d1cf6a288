"""The experiment harness of the benchmarks: data, models, training loop.

* ``datasets``: digits (offline), CIFAR-100 / CIFAR-N through TFDS, the one
  symmetric label-noise function, class-balanced microbatch indices.
* ``models``: one NNX definition per model (``MLP``, ``SmallCNN``,
  ``ResNet18``).
* ``training``: the jitted ``lax.scan`` loop over ``nnx.Optimizer`` and
  ``METHODS`` (name -> aggregator).
* ``flax_guide``: the two programs of ``examples/flax_guide/`` as pure,
  scannable runs (``python -m benchmarks.default_tau``).

The full noisy-label CLI built on it is ``python -m benchmarks.noisy_labels``
(from the repository root). The programs in ``examples/`` do not use it: each
of them is self-contained.
"""
