"""Scores with 4 forced CPU devices (batches sharded across them) equal scores with 1 device; a model with
sharding constraints on a real 4-device mesh has the layers, biases, groups and scores of the unconstrained one."""
import os
import subprocess
import sys

import numpy as np
import pytest

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

# issue 19 item 2: sharding constraints (on an activation, on a weight) are identity-like everywhere
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("d",))
by_batch, replicated = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
k = jax.random.split(key, 3)
p = {"l0": {"kernel": jax.random.normal(k[0], (6, 5)), "bias": jax.random.normal(k[1], (5,))},
     "l1": {"kernel": jax.random.normal(k[2], (5, 3)), "bias": jnp.zeros(3)}}
def plain(p, x):
    return jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"]) @ p["l1"]["kernel"] + p["l1"]["bias"]
def on_activation(p, x):
    y = jax.lax.with_sharding_constraint(x @ p["l0"]["kernel"], by_batch)
    return jax.nn.relu(y + p["l0"]["bias"]) @ p["l1"]["kernel"] + p["l1"]["bias"]
def on_weight(p, x):
    w = jax.lax.with_sharding_constraint(p["l0"]["kernel"], replicated)
    return jax.nn.relu(x @ w + p["l0"]["bias"]) @ p["l1"]["kernel"] + p["l1"]["bias"]
x = jax.random.normal(jax.random.fold_in(key, 2), (8, 6))
y = jnp.arange(8) % 3
def described(f):
    c = oba_jax.connectivity(f, p, x)
    groups = oba_jax.channel_groups(f, p, x)
    return (repr([(l.name, l.weight, l.bias, l.in_axes, l.out_axes) for l in c.layers]), repr(c.unscored),
            repr(dict(c.upstream)), repr([(g.name, g.size, g.prunable, sorted((m.path, m.axis) for m in g.members))
                                          for g in groups]))
constrained = {}
for f in (plain, on_activation, on_weight) if len(jax.devices()) > 1 else ():   # the mesh run only
    assert "sharding_constraint" in str(jax.make_jaxpr(f)(p, x)) or f is plain
    constrained["described/" + f.__name__] = np.array(described(f))
    for name, v in oba_jax.score(f, p, [(x, y)]).by_path().items():
        constrained[f"constrained/{f.__name__}/{name}"] = v
np.savez(sys.argv[1], devices=len(jax.devices()), **constrained,
         **{"stacked/" + k: v for k, v in stacked.by_path().items()},
         **{"listed/" + k: v for k, v in listed.by_path().items()})
"""


def _run(tmp_path, devices: int) -> dict:
    out = tmp_path / f"scores{devices}.npz"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], check=True, cwd=root, env=env, timeout=300)
    return dict(np.load(out))


@pytest.fixture(scope="module")
def one_and_four(tmp_path_factory):
    """The script's results with 1 and with 4 forced CPU devices (two interpreters, shared by the tests)."""
    tmp_path = tmp_path_factory.mktemp("devices")
    return _run(tmp_path, 1), _run(tmp_path, 4)


def test_four_devices_equal_one(one_and_four):
    one, four = one_and_four
    assert int(one["devices"]) == 1 and int(four["devices"]) == 4
    batches = lambda run: {k for k in run if k.startswith(("stacked/", "listed/"))}  # noqa: E731
    keys = sorted(batches(one))
    assert keys and set(keys) == batches(four)
    scale = max(np.abs(one[k]).max() for k in keys)
    for k in keys:
        np.testing.assert_allclose(four[k], one[k], rtol=0, atol=1e-5 * scale, err_msg=k)


def test_sharding_constraints_on_a_4_device_mesh_change_no_layer_group_or_score(one_and_four):
    """Issue 19 item 2: a constrained activation keeps its bias (it was 'an offset, not the bias of a layer'),
    a constrained weight is a layer (it was refused as 'not a linear view')."""
    four = one_and_four[1]
    assert int(four["devices"]) == 4
    plain = four["described/plain"]
    assert "'l0/bias'" in str(plain[0]) and str(plain[1]) == "()"
    for variant in ("on_activation", "on_weight"):
        assert list(four[f"described/{variant}"]) == list(plain), variant
        for leaf in ("l0/kernel", "l0/bias", "l1/kernel", "l1/bias"):
            np.testing.assert_array_equal(four[f"constrained/{variant}/{leaf}"], four[f"constrained/plain/{leaf}"])
