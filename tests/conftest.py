import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")


@pytest.fixture
def x64():
    """Run the test body with 64-bit JAX (restored afterwards)."""
    import jax
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)
