"""Examples for optax_gaf: noisy-label training with Flax NNX and TFDS."""
