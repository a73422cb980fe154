"""The fast CPU convolution computes the same function as `lax.conv_general_dilated`.

Value, gradient in both operands, forward-over-reverse HVPs, the dense Hessian and (for the plain
forward) forward-mode tangents are compared in float64 against the native convolution; the OBA
scores of a small conv net must not depend on which one is used.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from oba_jax import fastconv
from oba_jax.fastconv import conv_general_dilated_fast, use_fast_conv



@pytest.fixture(autouse=True)
def _float64(x64):
    """Every test here compares in float64; the fixture restores the global flag afterwards so other
    test files in the same worker keep float32 defaults."""
    yield

NHWC = ("NHWC", "HWIO", "NHWC")
# (kernel, stride, padding, image (h, w), in, out, rhs dilation)
CASES = [
    (1, 2, "SAME", (7, 6), 3, 4, 1),
    (3, 1, "SAME", (7, 5), 3, 4, 1),
    (3, 2, "SAME", (8, 7), 2, 3, 1),
    (3, 2, ((1, 0), (0, 2)), (9, 6), 2, 3, 1),
    (3, 1, "VALID", (6, 9), 2, 2, 2),
    (7, 2, ((3, 3), (2, 1)), (15, 13), 2, 3, 1),
    # Outputs smaller than the kernel: the forward itself runs as matmuls.
    (3, 1, "SAME", (2, 2), 3, 4, 1),
    (3, 1, "SAME", (1, 3), 2, 3, 1),
    (3, 2, "SAME", (3, 4), 2, 2, 1),
]


def _loss(conv, kw):
    """A loss with curvature in the conv's output, so HVPs mix the conv's own (bilinear) second
    derivative with the chain-rule terms."""
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w, **kw)))


def _max_err(a, b):
    return max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _all_derivatives(loss):
    """Value, gradient and two HVPs (both operands moving / only the kernel), in one jit."""
    @jax.jit
    def run(x, w, tx, tw):
        grad = jax.grad(loss, (0, 1))
        hvps = [jax.jvp(grad, (x, w), t)[1] for t in [(tx, tw), (jnp.zeros_like(x), tw)]]
        return loss(x, w), grad(x, w), hvps
    return run


@pytest.mark.parametrize("k,stride,padding,hw,cin,cout,dil", CASES)
def test_value_grad_hvp_match_native(k, stride, padding, hw, cin, cout, dil):
    rng = np.random.default_rng(k * 100 + stride)
    x = jnp.asarray(rng.normal(size=(2, *hw, cin)))
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) / k)
    tx, tw = jnp.asarray(rng.normal(size=x.shape)), jnp.asarray(rng.normal(size=w.shape))
    kw = dict(window_strides=(stride, stride), padding=padding, rhs_dilation=(dil, dil), dimension_numbers=NHWC)

    np.testing.assert_allclose(conv_general_dilated_fast(x, w, **kw), lax.conv_general_dilated(x, w, **kw),
                               rtol=1e-12, atol=1e-12)
    fast = _all_derivatives(_loss(conv_general_dilated_fast, kw))(x, w, tx, tw)
    native = _all_derivatives(_loss(lax.conv_general_dilated, kw))(x, w, tx, tw)
    for a, b in zip(fast, native):  # value, gradient, HVPs
        scale = 1 + _max_err(b, jax.tree_util.tree_map(jnp.zeros_like, b))
        assert _max_err(a, b) < 1e-10 * scale


def test_small_outputs_take_the_matmul_forward():
    for hw, expected in [((2, 2), True), ((1, 5), True), ((3, 3), False), ((32, 32), False)]:
        assert fastconv.takes_matmul_forward((1, *hw, 2), (3, 3, 2, 3), (1, 1), "SAME",
                                             dimension_numbers=NHWC) is expected, hw


def test_forward_mode():
    """`conv_general_dilated_forward` has native tangents; the custom-VJP fast conv refuses `jax.jvp`
    (documented), but `jax.hessian` (forward over reverse) and reverse over reverse equal the native ones."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 5, 4, 3)))
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 2)))
    tx, tw = jnp.asarray(rng.normal(size=x.shape)), jnp.asarray(rng.normal(size=w.shape))
    for hw in [(5, 4), (2, 2)]:
        xi, txi = x[:, :hw[0], :hw[1]], tx[:, :hw[0], :hw[1]]
        kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
        f = lambda conv: (lambda a, b: jnp.sin(conv(a, b, **kw)))
        a = jax.jvp(f(fastconv.conv_general_dilated_forward), (xi, w), (txi, tw))
        b = jax.jvp(f(lax.conv_general_dilated), (xi, w), (txi, tw))
        assert _max_err(a, b) < 1e-10
        h = lambda conv: jax.hessian(lambda b: jnp.sum(f(conv)(xi, b)))(w)
        assert _max_err(h(conv_general_dilated_fast), h(lax.conv_general_dilated)) < 1e-10
        rr = lambda conv: jax.jacrev(jax.grad(lambda b: jnp.sum(f(conv)(xi, b))))(w)  # reverse over reverse
        assert _max_err(rr(conv_general_dilated_fast), h(lax.conv_general_dilated)) < 1e-10
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda b: conv_general_dilated_fast(x, b, (1, 1), "SAME", dimension_numbers=NHWC), (w,), (tw,))


def test_mixed_precision_operands():
    """`preferred_element_type` (float32 operands, float64 result) keeps dtypes and gradients."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC, preferred_element_type=jnp.float64)
    loss = lambda conv: (lambda a, b: jnp.sum(jnp.tanh(conv(a, b, **kw))))
    ga = jax.grad(loss(conv_general_dilated_fast), (0, 1))(x, w)
    gb = jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
    assert [g.dtype for g in ga] == [jnp.float32, jnp.float32]
    assert _max_err(ga, gb) < 1e-5


def test_kernel_only_grad_and_jit():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 6, 5, 4)))
    w = jnp.asarray(rng.normal(size=(3, 3, 4, 2)))
    kw = dict(window_strides=(2, 1), padding="SAME", dimension_numbers=NHWC)
    f = lambda conv: jax.jit(jax.grad(lambda w: jnp.sum(conv(x, w, **kw) ** 3)))
    np.testing.assert_allclose(f(conv_general_dilated_fast)(w), f(lax.conv_general_dilated)(w), rtol=1e-10, atol=1e-10)


def test_other_layouts_and_fallbacks():
    rng = np.random.default_rng(1)
    # NCHW / OIHW layout goes through the fast path with transposes.
    x = jnp.asarray(rng.normal(size=(2, 3, 7, 6)))
    w = jnp.asarray(rng.normal(size=(4, 3, 3, 3)))
    kw = dict(window_strides=(2, 2), padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    loss = lambda conv: (lambda x, w: jnp.sum(jnp.sin(conv(x, w, **kw))))
    for order in ["value", "hvp"]:
        if order == "value":
            a, b = loss(conv_general_dilated_fast)(x, w), loss(lax.conv_general_dilated)(x, w)
        else:
            a, b = (jax.jvp(jax.grad(loss(c), (0, 1)), (x, w), (x, w))[1]
                    for c in (conv_general_dilated_fast, lax.conv_general_dilated))
        assert _max_err(a, b) < 1e-9
    # Grouped convolutions and input dilation fall back to the native conv (same result).
    xg = jnp.asarray(rng.normal(size=(2, 6, 6, 4)))
    wg = jnp.asarray(rng.normal(size=(3, 3, 2, 4)))
    kwg = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC, feature_group_count=2)
    assert not fastconv.is_supported(xg.shape, wg.shape, feature_group_count=2)
    np.testing.assert_array_equal(conv_general_dilated_fast(xg, wg, **kwg), lax.conv_general_dilated(xg, wg, **kwg))
    assert not fastconv.is_supported(xg.shape, wg.shape, lhs_dilation=(2, 2))


def test_cpu_compiler_options():
    opts = fastconv.cpu_compiler_options()
    if jax.default_backend() == "cpu":
        # Accepted by XLA and it changes the buffer assignment of an HVP (fewer live temporaries).
        x = jnp.ones((8, 16, 16, 8))
        w = jnp.ones((3, 3, 8, 8)) * 0.01
        conv = lambda a, b: conv_general_dilated_fast(a, b, (1, 1), "SAME", dimension_numbers=NHWC)

        def hvp(ws):
            def f(ws):
                h = x
                for b in ws:
                    h = jnp.tanh(conv(h, b))
                return jnp.sum(h ** 2)
            return jax.jvp(jax.grad(f), (ws,), (ws,))[1]

        temp = lambda o: jax.jit(hvp, compiler_options=o).lower([w] * 4).compile().memory_analysis().temp_size_in_bytes
        assert temp(opts) < temp(None)
    else:
        assert opts is None


def test_use_fast_conv_env(monkeypatch):
    monkeypatch.setenv("OBA_JAX_FAST_CONV", "0")
    assert use_fast_conv() is False
    monkeypatch.setenv("OBA_JAX_FAST_CONV", "1")
    assert use_fast_conv() is True
    monkeypatch.delenv("OBA_JAX_FAST_CONV")
    assert use_fast_conv() is (jax.default_backend() == "cpu")


def test_oba_scores_do_not_depend_on_the_conv(monkeypatch):
    from flax import nnx

    from oba_jax import score

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.c1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.c2 = nnx.Conv(4, 5, (3, 3), strides=(2, 2), rngs=rngs)
            self.fc = nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn(self.c1(x)))
            x = nnx.relu(self.c2(x))
            return self.fc(x.mean(axis=(1, 2)))

    model = Net(nnx.Rngs(0))
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    apply = lambda p, x: nnx.merge(graphdef, p["params"], p["rest"])(x)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(4, 6, 6, 3)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 1])
    for method in ("oba", "fastoba", "taylor"):
        results = {}
        for flag in ("0", "1"):
            monkeypatch.setenv("OBA_JAX_FAST_CONV", flag)
            r = score(apply, {"params": params, "rest": rest}, [(x, y)], method,
                      **({"parts": True} if method == "oba" else {}),
                      dtype=jnp.float64)
            results[flag] = [r.sum, *(r.parts or {}).values()]
        scale = 1 + _max_err(results["0"], jax.tree_util.tree_map(jnp.zeros_like, results["0"]))
        assert _max_err(results["0"], results["1"]) < 1e-10 * scale, method


def test_baseline_replay_with_fast_conv_is_the_program():
    from oba_jax.program import trace_program
    from oba_jax.scores.baselines import replay
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 3)))
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)))
    f = lambda w, x: jnp.tanh(jax.jit(lambda a, b: lax.conv_general_dilated(a, b, (2, 2), "SAME",
                                                                           dimension_numbers=NHWC))(x, w))
    program = trace_program(f, w, x)
    assert use_fast_conv()
    a = jax.jvp(jax.grad(lambda w: jnp.sum(replay(program, [w], [x]) ** 2)), (w,), (w,))
    b = jax.jvp(jax.grad(lambda w: jnp.sum(f(w, x) ** 2)), (w,), (w,))
    assert _max_err(a, b) < 1e-10
