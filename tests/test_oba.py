"""OBA scores against independent dense-Hessian oracles (float64), plus baselines, options and errors."""
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oba_jax
from oba_jax import score, softmax_cross_entropy
from nets import causal_lm_apply, causal_lm_params, gated_apply, gated_params, mlp_apply, mlp_params
from oracles import h_minus_g

sg = jax.lax.stop_gradient


def _data(seed, shape, classes, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape).astype(dtype)), jnp.asarray(rng.integers(0, classes, shape[0]))


def _flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def _token_ce(logits, y, w):
    """Σ w·nll / Σ w written out with one-hot labels (independent of `oba_jax.losses`)."""
    nll = -jnp.sum(jax.nn.one_hot(y, logits.shape[-1]) * jax.nn.log_softmax(logits), -1)
    return jnp.sum(w * nll) / jnp.sum(w)


def _weighted_oracle(surrogate_logits, params, x, y, mask, weights_list):
    """θ ⊙ H̃θ with H̃ the dense Hessian of `Σ sg(∂ℓ/∂z)·z̃` for a hand-linearised network, for each weights
    array (one compilation): ℓ is the token loss `Σ w·nll / Σ w` (None: `softmax_cross_entropy`)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    v = flat if mask is None else flat * mask

    @jax.jit
    def oracle(flat, w):
        loss = (lambda z: softmax_cross_entropy(z, y)) if w is None else (lambda z: _token_ce(z, y, w))
        gz = jax.grad(loss)(surrogate_logits(unravel(flat), x))
        H = jax.hessian(lambda f: jnp.sum(gz * surrogate_logits(unravel(f), x)))(flat)
        return v * (H @ v)
    return [np.asarray(oracle(flat, w)) for w in weights_list]


def _linearised_oracle(surrogate_logits, params, x, y, mask=None):
    return _weighted_oracle(surrogate_logits, params, x, y, mask, [None])[0]


def _lin(fn, u):
    """First-order linearisation of an elementwise/any op at the current point."""
    u0 = sg(u)
    p, t = jax.jvp(fn, (u0,), (u - u0,))
    return sg(p) + t


def _assert_rel(got, ref, tol):
    err = np.abs(np.asarray(got) - ref).max() / np.abs(ref).max()
    assert err < tol, err


def test_relu_mlp_equals_h_minus_gauss_newton(x64):
    params = mlp_params((6, 5, 4, 3))
    x, y = _data(0, (7, 6), 3)
    r = score(mlp_apply, params, [(x, y)], dtype=jnp.float64)
    _assert_rel(_flat(r.sum), h_minus_g(mlp_apply, params, x, y), 1e-8)


def test_relu_cnn_without_bn_equals_h_minus_gauss_newton(x64):
    rng = np.random.default_rng(1)
    n = lambda scale, *shape: jnp.asarray(scale * rng.normal(size=shape))
    params = {"c1": {"kernel": n(0.4, 3, 3, 2, 4), "bias": n(0.1, 4)},
              "c2": {"kernel": n(0.3, 3, 3, 4, 5), "bias": n(0.1, 5)},
              "fc": {"kernel": n(0.3, 5, 3), "bias": n(0.1, 3)}}

    def cnn(p, x):
        conv = lambda h, w: jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(conv(x, p["c1"]["kernel"]) + p["c1"]["bias"])
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        h = jax.nn.relu(conv(h, p["c2"]["kernel"]) + p["c2"]["bias"])
        return h.mean(axis=(1, 2)) @ p["fc"]["kernel"] + p["fc"]["bias"]

    x, y = _data(2, (4, 6, 6, 2), 3)
    r = score(cnn, params, [(x, y)], dtype=jnp.float64)
    _assert_rel(_flat(r.sum), h_minus_g(cnn, params, x, y), 1e-8)


def test_gelu_mlp_matches_linearised_dense_hessian(x64):
    params = mlp_params((5, 6, 4, 3), seed=3)
    x, y = _data(4, (6, 5), 3)
    gelu = lambda u: jax.nn.gelu(u, approximate=False)
    apply = lambda p, x: mlp_apply(p, x, act=gelu)
    surrogate = lambda p, x: mlp_apply(p, x, act=lambda u: _lin(gelu, u))
    r = score(apply, params, [(x, y)], dtype=jnp.float64)
    _assert_rel(_flat(r.sum), _linearised_oracle(surrogate, params, x, y), 1e-8)
    # and it is not the full Hessian: fastoba differs
    full = score(apply, params, [(x, y)], method="fastoba", dtype=jnp.float64)
    assert np.abs(_flat(full.sum) - _flat(r.sum)).max() > 1e-3 * np.abs(_flat(r.sum)).max()


def _attention_params(seed=5, d=4, classes=3):
    rng = np.random.default_rng(seed)
    dense = lambda a, b: {"kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a)), "bias": jnp.asarray(0.1 * rng.normal(size=b))}
    return {"q": dense(d, d), "k": dense(d, d), "v": dense(d, d), "out": dense(d, d), "head": dense(d, classes),
            "ln": {"scale": jnp.asarray(1 + 0.1 * rng.normal(size=d)), "offset": jnp.full((d,), 0.05)}}


def _attention(p, x, lin=lambda f, u: f(u)):
    def ln(h):
        def norm(h):
            m = h.mean(-1, keepdims=True)
            return (h - m) * jax.lax.rsqrt(((h - m) ** 2).mean(-1, keepdims=True) + 1e-6)
        return lin(norm, h) * p["ln"]["scale"] + p["ln"]["offset"]
    dense = lambda h, n: h @ p[n]["kernel"] + p[n]["bias"]
    a = ln(x)
    q, k, v = dense(a, "q"), dense(a, "k"), dense(a, "v")
    s = q @ jnp.swapaxes(k, -1, -2) / 2.0
    att = lin(lambda s: jax.nn.softmax(s, axis=-1), s)
    h = x + dense(att @ v, "out")
    return dense(lin(lambda u: jax.nn.gelu(u, approximate=False), h).mean(axis=1), "head")


def test_attention_block_matches_linearised_dense_hessian(x64):
    params = _attention_params()
    x, y = _data(6, (3, 5, 4), 3)
    r = score(_attention, params, [(x, y)], dtype=jnp.float64, parts=True)
    flat_paths = oba_jax.leaf_paths(params)
    mask = np.concatenate([np.full(np.size(l), 0.0 if p.startswith("ln/") else 1.0)
                           for p, l in zip(flat_paths, jax.tree_util.tree_leaves(params))])
    oracle = _linearised_oracle(lambda p, x: _attention(p, x, lin=_lin), params, x, y, mask)
    _assert_rel(_flat(r.sum), oracle, 1e-8)
    assert len(r.graph.parallel) == 2
    par = _flat(r.parts["parallel"])
    assert np.abs(par).max() > 1e-3 * np.abs(oracle).max()        # attention products matter
    _assert_rel(_flat(r.parts["upward"]) + _flat(r.parts["downward"]) + par, oracle, 1e-8)
    # Without parts the score takes the other construction (reverse over a written-out tangent).
    _assert_rel(_flat(score(_attention, params, [(x, y)], dtype=jnp.float64).sum), oracle, 1e-8)


def test_causal_lm_token_logits_match_linearised_dense_hessian(x64):
    """Issue 19 item 4: logits (batch, tokens, vocab), labels (batch, tokens), the mean token cross-entropy;
    RoPE, GQA (2 query heads per key/value head), SwiGLU, RMSNorm. Embedding and norm scales are not layers."""
    params = causal_lm_params(head_dim=4)
    rng = np.random.default_rng(7)
    ids, labels = (jnp.asarray(rng.integers(0, 7, (3, 5))) for _ in range(2))
    unscored = {"embed", "norm1/scale", "norm2/scale", "norm_f/scale"}
    mask = np.concatenate([np.full(np.size(l), 0.0 if p in unscored else 1.0)
                           for p, l in zip(oba_jax.leaf_paths(params), jax.tree_util.tree_leaves(params))])
    weights = jnp.asarray((rng.random((3, 5)) < 0.6).astype(np.float64)).at[:, 0].set(1.0)
    oracle, weighted = _weighted_oracle(lambda p, x: causal_lm_apply(p, x, lin=_lin), params, ids, labels, mask,
                                        [jnp.ones((3, 5)), weights])
    for parts in (False, True):
        r = score(causal_lm_apply, params, [(ids, labels)], dtype=jnp.float64, parts=parts)
        _assert_rel(_flat(r.sum), oracle, 1e-8)
    assert set(r.graph.unscored) == unscored and len(r.graph.parallel) == 3   # q·k, att·v, gate ⊙ up
    stacked = score(causal_lm_apply, params, (ids[None], labels[None]), dtype=jnp.float64)   # (1, batch, tokens)
    _assert_rel(_flat(stacked.sum), oracle, 1e-8)
    with pytest.raises(ValueError, match=r"\(\.\.\., classes\) = \(3, C\)"):
        score(causal_lm_apply, params, [(ids, labels[:, 0])])

    # Padding: weights (a 0/1 mask) make the loss Σ w·nll / Σ w; padded labels (-100) are never read.
    padded = jnp.where(weights > 0, labels, -100)
    assert 0 < int(jnp.sum(weights == 0)) < 15
    assert np.abs(weighted - oracle).max() > 1e-3 * np.abs(oracle).max()   # the padding matters
    _assert_rel(_flat(score(causal_lm_apply, params, [(ids, padded, weights)], dtype=jnp.float64).sum), weighted, 1e-8)
    _assert_rel(_flat(score(causal_lm_apply, params, (ids[None], padded[None], weights[None]),
                            dtype=jnp.float64).sum), weighted, 1e-8)
    with pytest.raises(ValueError, match=r"lie in \[0, 7\).*wherever their weight is positive"):
        score(causal_lm_apply, params, [(ids, padded, jnp.ones((3, 5)))])   # a -100 label of weight 1
    with pytest.raises(ValueError, match="weights sum to 0"):
        score(causal_lm_apply, params, [(ids, labels, jnp.zeros((3, 5)))])
    with pytest.raises(ValueError, match="weights must have the labels' shape"):
        score(causal_lm_apply, params, [(ids, labels, jnp.ones(3))])


def test_written_out_tangent_is_the_networks_directional_derivative(x64):
    """The surrogate shares the network's value and first derivative, so the tangent the default
    construction writes out must equal `jax.jvp` of the real network in the direction θ (layers only)."""
    from oba_jax.graph import analyse
    from oba_jax.paths import leaf_paths
    from oba_jax.program import trace_program
    from oba_jax.scores.tangent import evaluate_with_tangent
    params = _attention_params(seed=11)
    x, _ = _data(12, (3, 5, 4), 3)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = leaf_paths(params)
    analysis = analyse(trace_program(_attention, params, x))
    theta = tuple(sorted(analysis.theta))
    assert {paths[i] for i in theta} == {p for p in paths if not p.startswith("ln/")}
    z, tz = evaluate_with_tangent(analysis, leaves, [x], theta)
    direction = [l if i in theta else jnp.zeros_like(l) for i, l in enumerate(leaves)]
    z_ref, tz_ref = jax.jvp(lambda p: _attention(p, x), (params,), (jax.tree_util.tree_unflatten(treedef, direction),))
    np.testing.assert_allclose(z, z_ref, rtol=1e-12, atol=1e-12)
    _assert_rel(tz, np.asarray(tz_ref), 1e-12)


@pytest.mark.parametrize("missing", [None, "t_a", "t_b"])
@pytest.mark.parametrize("zero_c", [False, True])
def test_dense_pair_backward_is_the_products_vjp(x64, missing, zero_c):
    """The written-out backward of a dense layer's (value, tangent) pair against `jax.vjp` of the plain
    products, with a tangent absent (zero) and with a symbolically zero cotangent of the value."""
    from oba_jax.scores.tangent import dense_pair
    rng = np.random.default_rng(21)
    a, t_a = rng.normal(size=(2, 2, 3, 4))
    b, t_b = rng.normal(size=(2, 4, 5))
    c, g = rng.normal(size=(2, 2, 3, 5))
    eqn = jax.make_jaxpr(lambda a, b: a @ b)(a, b).jaxpr.eqns[0]
    present = {"t_a": missing != "t_a", "t_b": missing != "t_b"}

    def plain(a, b, t_a, t_b):
        t = (t_a @ b if present["t_a"] else 0) + (a @ t_b if present["t_b"] else 0)
        return a @ b, t

    def written(a, b, t_a, t_b):
        y, t_y = dense_pair(eqn, a, b, t_a if present["t_a"] else None, t_b if present["t_b"] else None)
        return y[0], t_y[0]

    for f in (plain, written):
        out = f(a, b, t_a, t_b)
        np.testing.assert_allclose(out[0], a @ b, rtol=1e-13)
    pick = (lambda f: lambda *p: f(*p)[1]) if zero_c else (lambda f: f)
    cts = g if zero_c else (c, g)
    ref = jax.vjp(pick(plain), a, b, t_a, t_b)[1](cts)
    got = jax.vjp(pick(written), a, b, t_a, t_b)[1](cts)
    for name, r, v in zip(("a", "b", "t_a", "t_b"), ref, got):
        np.testing.assert_allclose(v, r, rtol=1e-12, atol=1e-12, err_msg=name)


def test_gated_mlp_parallel_part_matches_dense_hessian(x64):
    params = gated_params(seed=7)
    x, y = _data(8, (5, 6), 3)
    silu_lin = lambda u: _lin(jax.nn.silu, u)
    surrogate = lambda p, x: (silu_lin(x @ p["gate"]["kernel"] + p["gate"]["bias"])
                              * (x @ p["up"]["kernel"] + p["up"]["bias"])) @ p["down"]["kernel"] + p["down"]["bias"]
    r = score(gated_apply, params, [(x, y)], dtype=jnp.float64, parts=True)
    oracle = _linearised_oracle(surrogate, params, x, y)
    _assert_rel(_flat(r.sum), oracle, 1e-8)
    _assert_rel(_flat(score(gated_apply, params, [(x, y)], dtype=jnp.float64).sum), oracle, 1e-8)
    assert np.abs(_flat(r.parts["parallel"])).max() > 0


def test_parts_properties_and_deltas(x64):
    params = mlp_params((6, 5, 4, 3))
    x, y = _data(0, (7, 6), 3)
    r = score(mlp_apply, params, [(x, y)], dtype=jnp.float64, parts=True)
    up, down, total = r.by_path("upward"), r.by_path("downward"), r.by_path("sum")
    scale = max(np.abs(v).max() for v in total.values())
    assert np.abs(up["l2/kernel"]).max() < 1e-12 * scale and np.abs(up["l2/bias"]).max() < 1e-12 * scale
    assert np.abs(down["l0/kernel"]).max() == 0 and np.abs(down["l1/bias"]).max() == 0
    assert np.abs(down["l1/kernel"]).max() > 1e-3 * scale
    for path in total:
        np.testing.assert_allclose(up[path] + down[path] + r.by_path("parallel")[path], total[path], atol=1e-12 * scale)
    w = score(mlp_apply, params, [(x, y)], dtype=jnp.float64, upward_delta=2.0, downward_delta=0.5)
    for path, s in w.by_path("sum").items():
        np.testing.assert_allclose(s, 4 * up[path] + 0.25 * down[path], atol=1e-12 * scale)


def test_first_order_has_the_removal_sign(x64):
    params = mlp_params()
    x, y = _data(0, (7, 6), 3)
    base = score(mlp_apply, params, [(x, y)], dtype=jnp.float64)
    fo = score(mlp_apply, params, [(x, y)], dtype=jnp.float64, first_order=True)
    taylor = score(mlp_apply, params, [(x, y)], method="taylor", dtype=jnp.float64)
    np.testing.assert_allclose(_flat(fo.sum) - _flat(base.sum), -_flat(taylor.sum), atol=1e-12)


def test_conv_bn_train_scale_invariance_and_running_stats_untouched():
    class ConvBN(nnx.Module):
        def __init__(self, rngs):
            self.c1 = nnx.Conv(3, 6, (3, 3), use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(6, rngs=rngs)
            self.c2 = nnx.Conv(6, 4, (3, 3), use_bias=False, rngs=rngs)
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.bn(self.c1(x)))
            return self.fc(nnx.relu(self.c2(h)).mean(axis=(1, 2)))

    model = ConvBN(nnx.Rngs(0))
    x, y = _data(9, (8, 6, 6, 3), 3, dtype=np.float32)
    stats_before = [np.array(a) for a in jax.tree_util.tree_leaves(nnx.state(model, nnx.BatchStat))]
    r = oba_jax.score_model(model, [(x, y)], parts=True)
    ch = oba_jax.channel_scores(r)
    assert np.abs(ch["c1"].out).max() < 1e-3 * np.abs(ch["c1"].in_).max() + 1e-3 * np.abs(ch["c2"].in_).max()
    assert np.abs(ch["c2"].in_).max() > 0
    down = r.by_path("downward")
    assert np.abs(down["c2/kernel"]).max() < 1e-3 * np.abs(r.by_path("sum")["c2/kernel"]).max()
    stats_after = [np.array(a) for a in jax.tree_util.tree_leaves(nnx.state(model, nnx.BatchStat))]
    assert all(np.array_equal(a, b) for a, b in zip(stats_before, stats_after))
    # eval mode scores differently (running statistics instead of batch statistics)
    r_eval = oba_jax.score_model(model, [(x, y)], bn_mode="eval")
    assert not np.allclose(_flat(r_eval.sum), _flat(r.sum))


def test_baselines(x64):
    params = mlp_params()
    x, y = _data(0, (7, 6), 3)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    loss = lambda f: softmax_cross_entropy(mlp_apply(unravel(f), x), y)
    fast = score(mlp_apply, params, [(x, y)], method="fastoba", dtype=jnp.float64)
    np.testing.assert_allclose(_flat(fast.sum), flat * (jax.jit(jax.hessian(loss))(flat) @ flat), rtol=1e-9, atol=1e-12)
    taylor = score(mlp_apply, params, [(x, y)], method="taylor", dtype=jnp.float64)
    np.testing.assert_allclose(_flat(taylor.sum), flat * jax.jit(jax.grad(loss))(flat), rtol=1e-9, atol=1e-14)
    mag = score(mlp_apply, params, None, method="magnitude")
    np.testing.assert_array_equal(_flat(mag.sum), np.abs(np.asarray(flat)))
    r1, r2, r3 = (score(mlp_apply, params, None, method="random", seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(_flat(r1.sum), _flat(r2.sum))
    assert not np.array_equal(_flat(r1.sum), _flat(r3.sum))


def test_stacked_and_iterable_batches_sum_the_same(x64):
    params = mlp_params()
    xs, ys = _data(0, (3 * 4, 6), 3)
    xs, ys = xs.reshape(3, 4, 6), ys.reshape(3, 4)
    stacked = score(mlp_apply, params, (xs, ys), dtype=jnp.float64)
    listed = score(mlp_apply, params, [(xs[i], ys[i]) for i in range(3)], dtype=jnp.float64)
    single = [score(mlp_apply, params, [(xs[i], ys[i])], dtype=jnp.float64) for i in range(3)]
    assert stacked.count == listed.count == 3
    np.testing.assert_allclose(_flat(stacked.sum), _flat(listed.sum), atol=1e-13)
    np.testing.assert_allclose(_flat(stacked.sum), sum(_flat(s.sum) for s in single), atol=1e-13)
    np.testing.assert_allclose(_flat(stacked.mean()), _flat(stacked.sum) / 3)


def test_bad_inputs():
    params = mlp_params()
    x, y = jnp.ones((4, 6)), jnp.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        score(mlp_apply, params, [(x, jnp.array([0, 1, 5, 0]))])
    with pytest.raises(ValueError, match="logits of shape"):
        score(lambda p, x: mlp_apply(p, x)[:, :, None], params, [(x, y)])
    with pytest.raises(ValueError, match="logits of shape"):
        score(mlp_apply, params, [(x, y[:3])])
    bad = jax.tree_util.tree_map(lambda a: a, params)
    bad["l1"]["kernel"] = bad["l1"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(FloatingPointError, match="l1/kernel"):
        score(mlp_apply, bad, [(x, y)])
    with pytest.raises(ValueError, match="unknown method"):
        score(mlp_apply, params, [(x, y)], method="obd")
    with pytest.raises(ValueError, match="empty"):
        score(mlp_apply, params, [])
    with pytest.raises(TypeError, match="integer"):
        score(mlp_apply, params, [(x, y.astype(jnp.float32))])
    with pytest.raises(ValueError, match="exclude names no parameter"):
        score(mlp_apply, params, [(x, y)], exclude=["nope"])
    if not jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match="jax_enable_x64"):
            score(mlp_apply, params, [(x, y)], dtype=jnp.float64)


@pytest.mark.parametrize("family, spec", [("vgg", dict(cfg=(8, "M", 16), in_channels=1, image_size=8, num_classes=3)),
                                          ("resnet_cifar", dict(stage_widths=(4, 6), blocks_per_stage=(1, 1),
                                                                block_widths=((4,), (6,)), image_size=8, num_classes=3))])
def test_fastoba_is_theta_hessian_theta_over_the_parameters_only(family, spec):
    """fastoba = θ ⊙ Hθ with θ the nnx.Param leaves, in both BN modes, against `jax.jvp(jax.grad(loss))` of the
    model in float64, evaluated eagerly. The landed main put the BatchNorm running statistics into θ: eval mode
    was off by 22% of the largest score. With the BN affine away from (1, 0), as after training, XLA's fused
    second derivative of a reshape + `max` pool was 43% (train) / 15% (eval) off on this VGG: the zoo's pool
    now gathers the tangent at the argmax (`models.layers.max_pool`)."""
    from models import build_model, make_spec
    from oba_jax.scores.nnx import model_apply
    with jax.enable_x64(True):
        model = build_model(make_spec(family, **spec), rngs=nnx.Rngs(0))
        affine = nnx.state(model, nnx.Param)
        keys = iter(jax.random.split(jax.random.key(3), 64))
        nnx.update(model, jax.tree_util.tree_map_with_path(
            lambda path, a: a + 0.5 * jax.random.normal(next(keys), a.shape)
            if jax.tree_util.keystr(path).count("bn") else a, affine))
        x = jax.random.normal(jax.random.key(1), (6, 8, 8, spec.get("in_channels", 3)), jnp.float64)
        y = jnp.array([0, 1, 2, 0, 1, 2])
        for bn in ("train", "eval"):
            apply_fn, state = model_apply(model, bn)
            state = jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
            loss = lambda p: softmax_cross_entropy(apply_fn(state._replace(params=p), x), y)
            hvp = lambda p: jax.jvp(jax.grad(loss), (p,), (p,))[1]
            # eager where XLA:CPU's fused jvp(grad) of BN + reshape-max pool is wrong (VGG); the ResNet has no
            # max-pool, and its oracle jitted costs one compile instead of ~25 s of op-by-op dispatch in CI
            hv = (hvp if family == "vgg" else jax.jit(hvp))(state.params)
            expected = jax.tree.map(jnp.multiply, state.params, hv)
            got = oba_jax.score_model(model, [(x, y)], "fastoba", bn_mode=bn, dtype=jnp.float64).sum
            scale = max(float(jnp.max(jnp.abs(e))) for e in jax.tree.leaves(expected))
            for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
                np.testing.assert_allclose(g, e, rtol=0, atol=1e-8 * scale, err_msg=bn)


def _bn(h):
    """Train-mode BatchNorm without affine and with eps = 0: exactly invariant to scaling its input."""
    return (h - h.mean(0)) * jax.lax.rsqrt(h.var(0))


def test_oba_is_k_times_taylor_on_a_bn_chain_and_counts_paths_on_a_residual_net():
    """README "When OBA is a multiple of Taylor": with no upstream tangent (train-mode BN after every layer
    kills it: BN(c·u) = BN(u)), (H̃θ)_a = Σ over downstream layers b of the part of g_a carried through b.
    A chain: k·θ·g, k = the layers downstream (3, 2, 1, 0). A residual sum whose paths hold 3 and 1 layers:
    θ·(3·g_block + 1·g_skip), not a multiple of θ·g."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(0), 6)
        sizes = (6, 8, 7, 5, 3)
        params = {f"l{i}": jax.random.normal(keys[i], (sizes[i], sizes[i + 1])) / np.sqrt(sizes[i]) for i in range(4)}
        x, y = jax.random.normal(keys[4], (16, 6)), jax.random.randint(keys[5], (16,), 0, 3)
        skip = jax.random.normal(keys[5], (8, 5))

        def chain(p, x):
            for i in range(3):
                x = jax.nn.relu(_bn(x @ p[f"l{i}"]))
            return x @ p["l3"]

        def residual(p, x, stop_block=False, stop_skip=False):
            h = jax.nn.relu(_bn(x @ p["l0"]))
            into_block = jax.lax.stop_gradient(h) if stop_block else h
            into_skip = jax.lax.stop_gradient(h) if stop_skip else h
            r = jax.nn.relu(_bn(into_block @ p["l1"]))
            return jax.nn.relu(_bn(r @ p["l2"]) + into_skip @ skip) @ p["l3"]

        def taylor(fn):
            g = jax.grad(lambda p: softmax_cross_entropy(fn(p, x), y))(params)
            return {k: params[k] * g[k] for k in params}

        oba = score(chain, params, [(x, y)], "oba", dtype=jnp.float64).sum
        tay = taylor(chain)
        scale = max(float(jnp.max(jnp.abs(v))) for v in tay.values())
        for k, layers_downstream in (("l0", 3), ("l1", 2), ("l2", 1), ("l3", 0)):
            np.testing.assert_allclose(oba[k], layers_downstream * tay[k], rtol=0, atol=1e-12 * scale, err_msg=k)

        oba = score(residual, params, [(x, y)], "oba", dtype=jnp.float64).sum
        tay = taylor(residual)
        block = taylor(lambda p, x: residual(p, x, stop_skip=True))["l0"]   # θ·g through the block (l1, l2, l3)
        through_skip = taylor(lambda p, x: residual(p, x, stop_block=True))["l0"]  # through the skip (l3 only)
        np.testing.assert_allclose(block + through_skip, tay["l0"], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(oba["l0"], 3 * block + through_skip, rtol=0, atol=1e-12 * scale)
        ratio = np.asarray(oba["l0"] / tay["l0"])
        assert ratio.max() - ratio.min() > 1, "the residual sum makes OBA no multiple of Taylor"
        for k, layers_downstream in (("l1", 2), ("l2", 1)):
            np.testing.assert_allclose(oba[k], layers_downstream * tay[k], rtol=0, atol=1e-12 * scale, err_msg=k)
