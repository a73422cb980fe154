"""Layers found by dataflow: one test per construct, each scored in float64 against a dense-Hessian oracle.

Every network here has only ReLU nonlinearities and bilinear products, so OBA's H̃ is the Hessian of
the loss minus its Gauss–Newton term (OBA_SPEC.md §2, "special case"): the oracle builds both
with `jax.hessian` / `jax.jacobian` on the flat parameter vector and takes `v ⊙ (H − G)v` with v = θ on
the leaves the test expects to be scored (zero elsewhere). Both constructions of the score (the
default written-out tangent and `parts=True`'s forward-over-reverse HVPs) are checked
(oracle: `tests/oracles.py`).
"""
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import oba_jax
from oba_jax import score
from oracles import h_minus_g

relu = jax.nn.relu


def _rng_params(seed, **shapes):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[-2] if len(s) > 1 else 4)) for k, s in shapes.items()}


def _data(seed, shape, classes):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape)), jnp.asarray(rng.integers(0, classes, shape[0]), jnp.int32)


def check_scores(apply, params, x, y, scored, tol=1e-8):
    """Both constructions against the oracle; returns the connectivity map."""
    ref = h_minus_g(apply, params, x, y, scored)
    assert np.abs(ref).max() > 0
    for parts in (False, True):
        r = score(apply, params, [(x, y)], dtype=jnp.float64, parts=parts)
        got = np.asarray(jax.flatten_util.ravel_pytree(r.sum)[0])
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < tol, (parts, err)
    assert set(r.graph.scored_leaves) == set(scored)
    return r.graph


def test_indexed_stacked_leaf_is_one_layer_per_index(x64):
    params = _rng_params(0, w=(2, 5, 5), head=(5, 3))

    def apply(p, x):
        h = relu(x @ p["w"][0])
        h = relu(h @ p["w"][1])
        return h @ p["head"]

    x, y = _data(1, (6, 5), 3)
    g = check_scores(apply, params, x, y, {"w", "head"})
    assert [l.name for l in g.layers] == ["w[0]", "w[1]", "head"]
    assert g.layer("w[1]").index == (1, (0, 5, 1), (0, 5, 1)) and g.layer("w[1]").in_axes == (1,)
    assert g.upstream["w[1]"] == ("w[0]",) and g.upstream["head"] == ("w[0]", "w[1]")
    ch = oba_jax.channel_scores(score(apply, params, [(x, y)], dtype=jnp.float64))
    assert ch["w[0]"].outputs.shape == (5,) and ch["w[1]"].inputs.shape == (5,)


@pytest.mark.parametrize("how", ["mul", "where"])
def test_masked_weight_is_the_leafs_layer(x64, how):
    params = _rng_params(2, w=(4, 6), b=(6,), head=(6, 3))
    mask = np.random.default_rng(3).random((4, 6)) > 0.4

    def apply(p, x):
        w = p["w"] * mask if how == "mul" else jnp.where(mask, p["w"], 0.0)
        return relu(x @ w + p["b"]) @ p["head"]

    x, y = _data(4, (7, 4), 3)
    g = check_scores(apply, params, x, y, {"w", "b", "head"})
    assert g.layer("w").bias == "b"
    r = score(apply, params, [(x, y)], dtype=jnp.float64)
    assert np.all(np.asarray(r.sum["w"])[~mask] == 0)


def test_fused_kernel_sliced_into_two_layers_with_sliced_biases(x64):
    params = _rng_params(5, w=(4, 8), b=(8,), head=(8, 3))

    def apply(p, x):
        left = relu(x @ p["w"][:, :3] + p["b"][:3])
        right = relu(x @ p["w"][:, 3:] + p["b"][3:])
        return jnp.concatenate([left, right], axis=-1) @ p["head"]

    x, y = _data(6, (5, 4), 3)
    g = check_scores(apply, params, x, y, {"w", "b", "head"})
    assert [l.name for l in g.layers] == ["w[:, 0:3]", "w[:, 3:8]", "head"]
    assert [l.bias for l in g.layers[:2]] == ["b", "b"]
    assert g.layer("w[:, 3:8]").bias_index == ((3, 8, 1),)
    ch = oba_jax.channel_scores(score(apply, params, [(x, y)], dtype=jnp.float64))
    assert ch["w[:, 0:3]"].outputs.shape == (3,) and ch["w[:, 3:8]"].outputs.shape == (5,)


def test_flipped_and_transposed_kernels(x64):
    rng = np.random.default_rng(7)
    params = {"k": jnp.asarray(0.3 * rng.normal(size=(3, 3, 2, 4))), "w": jnp.asarray(rng.normal(size=(2, 4)) / 2),
              "head": jnp.asarray(rng.normal(size=(4, 3)) / 2)}

    def apply(p, x):
        h = relu(lax.conv_transpose(x, p["k"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    transpose_kernel=True))
        h = relu(h.mean(axis=(1, 2)) @ jnp.flip(p["w"], axis=0))
        return h @ p["head"]

    x, y = _data(8, (3, 4, 4, 4), 3)   # transpose_kernel: k (3, 3, 2, 4) maps 4 input channels to 2
    g = check_scores(apply, params, x, y, {"k", "w", "head"})
    assert [l.kind for l in g.layers] == ["conv", "dense", "dense"]
    # the transposed kernel's input channels are the leaf's last axis
    assert g.layer("k").in_axes == (3,) and g.layer("k").out_axes == (2,)


def test_bias_after_a_reshape(x64):
    params = _rng_params(9, w=(4, 6), b=(2, 3), head=(6, 3))

    def apply(p, x):
        h = (x @ p["w"]).reshape(x.shape[0], 2, 3) + p["b"]
        return relu(h.reshape(x.shape[0], 6)) @ p["head"]

    x, y = _data(10, (5, 4), 3)
    g = check_scores(apply, params, x, y, {"w", "b", "head"})
    assert g.layer("w").bias == "b"


def test_bias_after_a_sum_of_two_products(x64):
    params = _rng_params(11, w0=(4, 5), w1=(4, 3), w2=(5, 3), b=(3,), head=(3, 3))

    def apply(p, x):
        h = relu(x @ p["w0"])
        out = relu(x @ p["w1"] + h @ p["w2"] + p["b"])
        return out @ p["head"]

    x, y = _data(12, (6, 4), 3)
    g = check_scores(apply, params, x, y, {"w0", "w1", "w2", "b", "head"})
    assert g.layer("w1").bias == "b" and g.layer("w2").bias is None


def test_convolution_of_two_activations_is_a_parallel_product(x64):
    params = _rng_params(13, wa=(5, 32), wk=(5, 54), head=(3, 3))

    def apply(p, x):   # a "dynamic convolution": the kernel is computed from the input
        image = (x @ p["wa"]).reshape(1, 4, 4, 2)
        kernel = (x @ p["wk"]).reshape(3, 3, 2, 3)
        out = lax.conv_general_dilated(image, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return out.mean(axis=(1, 2)) @ p["head"]

    x, y = _data(14, (1, 5), 3)
    g = check_scores(apply, params, x, y, {"wa", "wk", "head"})
    assert [(p.primitive, p.operands) for p in g.parallel] == [("conv_general_dilated", (("wa",), ("wk",)))]


# ---------------------------------------------------------------------------------------------
# Control flow


def _scan_mlp(inner=lambda f: f, stack_inside=False, outer_scan=False):
    """An MLP whose hidden layers run in `lax.scan` over a stacked leaf."""
    def apply(p, x):
        stack = jnp.stack([p["w0"], p["w1"]]) if stack_inside else p["stack"]

        def body(h, w):
            return inner(lambda h, w: relu(h @ w))(h, w), None

        if outer_scan:
            def outer(h, ws):
                return lax.scan(body, h, ws)[0], None
            h = lax.scan(outer, x, stack.reshape(1, *stack.shape))[0]
        else:
            h = lax.scan(body, x, stack)[0]
        return h @ p["head"]
    return apply


@pytest.mark.parametrize("case", ["plain", "checkpoint", "jit", "nested", "stacked_in_apply", "fori_loop"])
def test_scan_over_stacked_layers_is_unrolled(x64, case):
    rng = np.random.default_rng(15)
    w = lambda: jnp.asarray(rng.normal(size=(4, 4)) / 2)
    if case == "stacked_in_apply":
        params = {"w0": w(), "w1": w(), "head": w()[:, :3]}
        apply = _scan_mlp(stack_inside=True)
        scored, names = {"w0", "w1", "head"}, ["w0", "w1", "head"]
    else:
        params = {"stack": jnp.stack([w(), w()]), "head": w()[:, :3]}
        scored, names = {"stack", "head"}, ["stack[0]", "stack[1]", "head"]
        if case == "fori_loop":
            def apply(p, x):
                h = lax.fori_loop(0, 2, lambda i, h: relu(h @ p["stack"][i]), x)
                return h @ p["head"]
            names = None   # the loop index is a traced value: the stacked leaf is read by `dynamic_slice`
        else:
            inner = {"plain": lambda f: f, "checkpoint": jax.checkpoint, "jit": jax.jit, "nested": lambda f: f}[case]
            apply = _scan_mlp(inner=inner, outer_scan=case == "nested")
    x, y = _data(16, (5, 4), 3)
    g = check_scores(apply, params, x, y, scored)
    if names is not None:
        assert [l.name for l in g.layers] == names
    assert len(g.layers) == 3


def test_weight_shared_across_scan_iterations_is_one_layer(x64):
    params = _rng_params(17, w=(4, 4), head=(4, 3))

    def apply(p, x):
        h = lax.scan(lambda h, _: (relu(h @ p["w"]), None), x, None, length=3)[0]
        return h @ p["head"]

    x, y = _data(18, (5, 4), 3)
    g = check_scores(apply, params, x, y, {"w", "head"})
    assert [l.name for l in g.layers] == ["w", "head"] and g.upstream["w"] == ("w",)


def test_cond_with_a_literal_predicate_takes_its_branch(x64):
    params = _rng_params(19, a=(4, 4), b=(4, 4), head=(4, 3))

    def apply(p, x):
        h = lax.cond(True, lambda h: relu(h @ p["a"]), lambda h: relu(h @ p["b"]), x)
        return h @ p["head"]

    x, y = _data(20, (5, 4), 3)
    g = check_scores(apply, params, x, y, {"a", "head"})
    assert g.unscored_reasons["b"].startswith("does not reach the logits")


@pytest.mark.parametrize("case", ["cond", "switch", "while", "scan_of_cond", "cond_of_scan", "jit_in_while"])
def test_layers_in_data_dependent_control_flow_are_a_clear_error(case):
    params = {"w": jnp.ones((4, 4)), "head": jnp.ones((4, 3))}
    layer = lambda h: relu(h @ params_ref["w"])
    params_ref = {}

    def apply(p, x):
        params_ref.update(p)
        if case == "cond":
            h = lax.cond(x.sum() > 0, layer, lambda h: h, x)
        elif case == "switch":
            h = lax.switch((x.sum() > 0).astype(jnp.int32), [layer, lambda h: -h], x)
        elif case == "while":
            h = lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, layer(c[1])), (0, x))[1]
        elif case == "scan_of_cond":
            h = lax.scan(lambda h, _: (lax.cond(h.sum() > 0, layer, lambda h: h, h), None), x, None, length=2)[0]
        elif case == "cond_of_scan":
            h = lax.cond(x.sum() > 0, lambda h: lax.scan(lambda c, _: (layer(c), None), h, None, length=2)[0],
                         lambda h: h, x)
        else:
            h = lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jax.jit(layer)(c[1])), (0, x))[1]
        return h @ p["head"]

    construct = "lax.while_loop" if "while" in case else "lax.cond / lax.switch"
    with pytest.raises(NotImplementedError, match=construct.replace(".", r"\.").replace("/", "/")):
        oba_jax.connectivity(apply, params, jnp.ones((2, 4)))


# ---------------------------------------------------------------------------------------------
# What is not a layer, and why


def test_unscored_leaves_say_why():
    rng = np.random.default_rng(21)
    n = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    params = {"embed": n(10, 4), "pos": n(3, 4), "gain": n(4), "w": n(4, 4), "b": n(4), "head": n(4, 5),
              "unused": n(2), "steps": jnp.zeros((), jnp.int32), "cls": n(1, 4)}

    def apply(p, tokens):
        h = jnp.take(p["embed"], tokens, axis=0) + p["pos"]              # (B, 3, 4)
        h = jnp.concatenate([jnp.broadcast_to(p["cls"], (h.shape[0], 1, 4)), h], axis=1)
        h = relu(h @ p["w"] + p["b"]) * p["gain"]
        return h.mean(axis=1) @ p["head"]

    g = oba_jax.connectivity(apply, params, jnp.zeros((2, 3), jnp.int32))
    reasons = g.unscored_reasons
    assert set(g.unscored) == {"embed", "pos", "gain", "unused", "steps", "cls"}
    assert "embedding table" in reasons["embed"]
    assert "added to activations" in reasons["pos"]
    assert "scales activations" in reasons["gain"]
    assert "concatenated with activations" in reasons["cls"]
    assert "does not reach the logits" in reasons["unused"]
    assert reasons["steps"] == "not a float array"
    assert "embed: an embedding table" in g.summary()


@pytest.mark.parametrize("case", ["weight_norm", "product_of_leaves", "concatenated_leaves"])
def test_a_weight_that_is_not_a_view_of_one_leaf_is_a_clear_error(case):
    params = {"v": jnp.ones((4, 3)), "g": jnp.ones((3,)), "u": jnp.ones((4, 2)), "t": jnp.ones((2, 3))}

    def apply(p, x):
        if case == "weight_norm":
            w = p["v"] / jnp.linalg.norm(p["v"], axis=0) * p["g"]
        elif case == "product_of_leaves":
            w = p["u"] @ p["t"]
        else:
            w = jnp.concatenate([p["v"][:, :1], p["u"]], axis=1)
        return x @ w

    match = "concatenates parameter leaves" if case == "concatenated_leaves" else "not a linear view of one parameter leaf"
    with pytest.raises(ValueError, match=match):
        oba_jax.connectivity(apply, params, jnp.ones((2, 4)))
