import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

REFERENCE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")

# The CLI tests start ~30 Python processes that compile the same small programs again and again; a
# persistent compilation cache shared by those subprocesses halves each one (10.6 s -> 4.6 s for a tiny
# train.py run). jax is imported first, so that this process (and the tests that count compilations in it)
# keeps its own behaviour: JAX reads these variables when it is imported.
import jax  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                                   "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture
def x64():
    """Run the test body with 64-bit JAX (restored afterwards)."""
    import jax
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


@pytest.fixture(scope="session")
def fake_imagenet(tmp_path_factory) -> str:
    """A data_dir holding a tiny `imagenet2012` in TFDS' real prepared format (JPEGs of varying sizes, 10 classes,
    as the committed pretrained fixtures have; `fake_tfds.imagenet_like`)."""
    import fake_tfds
    root = tmp_path_factory.mktemp("fake_imagenet")
    fake_tfds.imagenet_like(str(root))
    return str(root)


@pytest.fixture(scope="session")
def streamed_fashion(tmp_path_factory):
    """`(data_dir, arrays)`: a prepared TFDS `fashion_mnist` of 64 + 10 PNGs of 8x8x1, and its arrays in file
    order as TFDS' own reader gives them (`fake_tfds.fixed_size`)."""
    import fake_tfds
    root = tmp_path_factory.mktemp("streamed_fashion")
    _, arrays = fake_tfds.fixed_size(str(root), num_train=64, num_test=10)
    return str(root), arrays
