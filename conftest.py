# Root conftest: doctests in optax_gaf/ and notebooks share the test setup.
import os

from tests.conftest import *  # noqa: F401,F403

# Notebooks (run by nbmake in their own kernels) read this to use small
# settings; the committed outputs come from full runs.
os.environ.setdefault("OPTAX_GAF_FAST", "1")
