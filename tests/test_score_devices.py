"""Scores with 4 forced CPU devices (batches sharded across them) equal scores with 1 device."""
import os
import subprocess
import sys

import numpy as np

SCRIPT = r"""
import sys, numpy as np, jax, jax.numpy as jnp
from flax import nnx
sys.path.insert(0, "tests")
import oba_jax
from nets import ResidualBNNet
model = ResidualBNNet(nnx.Rngs(0))
key = jax.random.PRNGKey(0)
xs = jax.random.normal(key, (3, 8, 8, 8, 3))
ys = jax.random.randint(jax.random.fold_in(key, 1), (3, 8), 0, 5)
stacked = oba_jax.score_model(model, (xs, ys))
listed = oba_jax.score_model(model, [(xs[i], ys[i]) for i in range(3)])
np.savez(sys.argv[1], devices=len(jax.devices()),
         **{"stacked/" + k: v for k, v in stacked.by_path().items()},
         **{"listed/" + k: v for k, v in listed.by_path().items()})
"""


def _run(tmp_path, devices: int) -> dict:
    out = tmp_path / f"scores{devices}.npz"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], check=True, cwd=root, env=env, timeout=300)
    return dict(np.load(out))


def test_four_devices_equal_one(tmp_path):
    one, four = _run(tmp_path, 1), _run(tmp_path, 4)
    assert int(one["devices"]) == 1 and int(four["devices"]) == 4
    keys = [k for k in one if k != "devices"]
    assert keys and set(keys) == set(four) - {"devices"}
    scale = max(np.abs(one[k]).max() for k in keys)
    for k in keys:
        np.testing.assert_allclose(four[k], one[k], rtol=0, atol=1e-5 * scale, err_msg=k)
