"""MACs counted on the program against XLA's cost analysis and hand counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
import oba_jax
from oba_jax.graph import find_layers, mac_count
from oba_jax.program import trace_program

NHWC = ("NHWC", "HWIO", "NHWC")


def _xla_flops(f, *args):
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def _valid_taps(n, k, pad):
    """Kernel taps that fall inside the input, summed over output positions (stride 1)."""
    return sum(sum(0 <= o - pad + t < n for t in range(k)) for o in range(n + 2 * pad - k + 1))


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_convolution_macs_against_xla(padding):
    w, x = jnp.ones((3, 3, 4, 6)), jnp.ones((2, 8, 8, 4))
    f = lambda w, x: jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)
    macs = oba_jax.count_macs(f, w, x)
    out = 6 if padding == "VALID" else 8
    assert macs == 2 * out * out * 9 * 4 * 6          # positions × taps × in × out, padding included
    # XLA counts 2 flops per MAC and skips the taps that read padding.
    pad = 0 if padding == "VALID" else 1
    assert _xla_flops(f, w, x) == 2 * 2 * _valid_taps(8, 3, pad) ** 2 * 4 * 6


def test_dense_macs_against_xla_and_elementwise_work():
    w, x = jnp.ones((5, 7)), jnp.ones((3, 5))
    assert 2 * oba_jax.count_macs(lambda w, x: x @ w, w, x) == _xla_flops(lambda w, x: x @ w, w, x) == 2 * 3 * 5 * 7
    # XLA also counts elementwise work (here a ReLU on the 3 × 7 outputs); MACs do not.
    relu = lambda w, x: jax.nn.relu(x @ w)
    assert _xla_flops(relu, w, x) == 2 * 3 * 5 * 7 + 3 * 7 and oba_jax.count_macs(relu, w, x) == 3 * 5 * 7


def test_vit_attention_counted_both_ways():
    spec = models.make_spec("vit", config_name="vit_tiny_test")
    model = nnx.eval_shape(lambda: models.build_model(spec, rngs=nnx.Rngs(0)))
    apply, state = oba_jax.model_apply(model)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    program = trace_program(apply, state, x)
    mc = mac_count(program, find_layers(program))
    n, d, heads, layers, mlp = 17, 64, 4, 2, 128      # tokens (16 patches + class), width, heads, depth, MLP
    # QKᵀ and AV: each batch × heads × n × n × head_dim
    assert mc.attention == layers * 2 * 2 * heads * n * n * (d // heads)
    per_layer = 4 * n * d * d + 2 * n * d * mlp           # q, k, v, out projections; the MLP
    patch = 16 * (8 * 8 * 3) * d
    assert mc.layers == 2 * (layers * per_layer + patch) + 2 * d * 10    # + the head on the class token
    assert oba_jax.count_macs(apply, state, x, attention=False) == mc.layers
    assert sum(mc.by_layer.values()) == mc.layers


def test_zoo_totals():
    for spec, expected in ((models.make_spec("vgg", cfg_name="vgg19"), 398_136_320),
                           (models.make_spec("resnet50"), 4_089_184_256)):
        model = nnx.eval_shape(lambda: models.build_model(spec, rngs=nnx.Rngs(0)))
        apply, state = oba_jax.model_apply(model)
        x = jax.ShapeDtypeStruct((1, *models.input_shape(spec)), jnp.float32)
        assert oba_jax.count_macs(apply, state, x) == expected
    assert oba_jax.count_params(state.params) == 25_557_032


def test_products_of_parameters_are_not_per_example_work():
    p = {"a": jnp.ones((4, 3)), "b": jnp.ones((3, 4))}
    f = lambda p, x: x @ (p["a"] @ p["b"])    # (the analysis of layers would refuse this weight; MACs do not care)
    assert oba_jax.count_macs(f, p, jnp.ones((2, 4))) == 2 * 4 * 4
    assert np.isclose(oba_jax.count_params(p), 24)


def test_product_axes_and_macs_of_a_dot_and_a_conv_by_hand():
    """The one description of how a layer product moves axes (`program/primitives.py`), which the layer
    search, the channel groups, the MAC counter and the program shrink read."""
    from oba_jax.program.primitives import product_axes, product_macs
    dot = jax.make_jaxpr(lambda x, w: jnp.einsum("btd,dhe->bthe", x, w))(jnp.ones((2, 3, 4)), jnp.ones((4, 5, 6)))
    (eqn,) = [e for e in dot.jaxpr.eqns if e.primitive.name == "dot_general"]
    pa = product_axes(eqn)
    assert pa.contracted == ((2,), (0,)) and pa.batch == ((), ()) and pa.free == ((0, 1), (1, 2))
    assert pa.out_free == ((0, 1), (2, 3)) and product_macs(eqn) == 2 * 3 * 5 * 6 * 4
    conv = jax.make_jaxpr(lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))(jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 7)))
    (eqn,) = conv.jaxpr.eqns
    pa = product_axes(eqn)
    assert pa.contracted == ((3,), (2,)) and pa.free == ((0,), (3,)) and pa.out_free == ((0,), (3,))
    assert pa.spatial == ((1, 2), (0, 1), (1, 2)) and product_macs(eqn) == 2 * 8 * 8 * 7 * 3 * 3 * 3
