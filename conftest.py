# Root conftest: doctests in optax_gaf/ and notebooks share the test setup.
from tests.conftest import *  # noqa: F401,F403
