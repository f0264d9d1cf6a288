"""Test setup: 8 simulated CPU devices, set before JAX picks a backend."""

import os

import hypothesis
import jax

jax.config.update("jax_num_cpu_devices", 8)

# CI explores the same examples on every run: a red CI names a change, not
# a new draw. Locally hypothesis keeps searching.
hypothesis.settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
  hypothesis.settings.load_profile("ci")
