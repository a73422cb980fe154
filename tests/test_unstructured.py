"""Unstructured and N:M masks, the progressive schedule, masked training (OBA_SPEC.md §6).

Oracles: the importance formula and the N:M selection written out in numpy; counts and orderings checked
entry by entry; "exactly zero" checked with `==`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nets
import oba_jax
from oba_jax.unstructured import global_masks, importance_of, keep_fractions

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(16, 6)), jnp.float32)
Y = jnp.asarray(RNG.integers(0, 3, 16))
PARAMS = nets.mlp_params((6, 8, 8, 3))
RESULT = oba_jax.score(nets.mlp_apply, PARAMS, [(X, Y)])


def _flat(tree):
    return dict(zip(oba_jax.leaf_paths(tree), jax.tree_util.tree_leaves(tree)))


def _numpy_importance(s, w, count):
    a = np.abs(np.asarray(s, np.float64)) / count
    return a / (a.max() + 1e-6) + np.abs(np.asarray(w, np.float64))


def test_importance_is_the_normalised_score_plus_magnitude():
    u = importance_of(RESULT, PARAMS)
    s, w = _flat(RESULT.sum), _flat(PARAMS)
    assert sorted(u) == sorted(s)          # every weight and bias of the three Dense layers
    for path, got in u.items():
        np.testing.assert_allclose(np.asarray(got), _numpy_importance(s[path], w[path], RESULT.count), rtol=1e-6)


def test_baselines_mask_in_their_standard_form_and_oba_u_is_an_option():
    """Global |w| for magnitude and global |θ·g| for taylor (the landed main put every method through OBA's
    per-leaf normalised u + |w|, which is neither); form="oba" gives any method OBA's u."""
    w = _flat(PARAMS)
    grads = _flat(jax.grad(lambda p: oba_jax.softmax_cross_entropy(nets.mlp_apply(p, X), Y))(PARAMS))
    for method, expected in (("magnitude", {k: np.abs(np.asarray(v, np.float64)) for k, v in w.items()}),
                             ("taylor", {k: np.abs(np.asarray(w[k] * grads[k], np.float64)) for k in w})):
        result = oba_jax.score(nets.mlp_apply, PARAMS, [(X, Y)] if method == "taylor" else None, method)
        graph = oba_jax.connectivity(nets.mlp_apply, PARAMS, X)
        masks = _flat(oba_jax.unstructured_masks(result, PARAMS, keep_ratio=0.3, graph=graph))
        values = np.concatenate([expected[k].ravel() for k in sorted(expected)])
        threshold = np.sort(values)[::-1][int(round(0.3 * values.size)) - 1]
        for k in expected:     # kept iff at or above the global 30% threshold (no ties in random floats)
            np.testing.assert_array_equal(np.asarray(masks[k]), expected[k] >= threshold * (1 - 1e-6), err_msg=method)
        u = importance_of(result, PARAMS, graph=graph, form="oba")
        s = _flat(result.sum)
        for k in u:
            np.testing.assert_allclose(np.asarray(u[k]), _numpy_importance(s[k], w[k], result.count), rtol=1e-6)
    with pytest.raises(ValueError, match="form='u'"):
        importance_of(RESULT, PARAMS, form="u")


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.5, 1.0])
def test_one_global_threshold_keeps_the_exact_count(keep):
    masks = oba_jax.unstructured_masks(RESULT, PARAMS, keep_ratio=keep)
    u = importance_of(RESULT, PARAMS)
    kept = np.concatenate([np.asarray(u[p])[np.asarray(m)] for p, m in _flat(masks).items()])
    pruned = np.concatenate([np.asarray(u[p])[~np.asarray(m)] for p, m in _flat(masks).items()])
    n = kept.size + pruned.size
    assert kept.size == max(1, round(keep * n))
    if pruned.size:
        assert kept.min() >= pruned.max()   # one threshold over all layers
    assert all(np.asarray(m).dtype == bool for m in jax.tree_util.tree_leaves(masks))


def test_ties_go_to_the_lower_position_and_other_leaves_stay_dense():
    u = {"a": jnp.ones(4), "b": jnp.ones(4)}
    masks = global_masks(u, 0.5)
    assert np.asarray(masks["a"]).all() and not np.asarray(masks["b"]).any()
    model = nets.SmallVGG(nnx.Rngs(0))
    x = jnp.asarray(RNG.normal(size=(4, 12, 12, 3)), jnp.float32)
    y = jnp.asarray(RNG.integers(0, 5, 4))
    params = nnx.state(model, nnx.Param)
    result = oba_jax.score_model(model, [(x, y)])
    masks = _flat(oba_jax.unstructured_masks(result, params, keep_ratio=0.2, exclude=("c2",)))
    for path in ("bn1/scale", "bn1/bias", "bn3/scale", "c2/kernel", "c2/bias"):   # norms and the excluded layer
        assert np.asarray(masks[path]).all(), path
    scored = ["c1/kernel", "c3/kernel", "fc/kernel", "fc/bias"]
    n = sum(masks[p].size for p in scored)
    assert sum(int(masks[p].sum()) for p in scored) == round(0.2 * n)


def _numpy_n_m(u, n, m):
    """Oracle for a (..., I, O) leaf grouped along I: keep the n largest of every m (ties: lower index)."""
    moved = np.moveaxis(u, -2, -1)                    # (..., O, I)
    groups = moved.reshape(-1, m)
    keep = np.zeros_like(groups, bool)
    for row, g in enumerate(groups):
        keep[row, np.argsort(-g, kind="stable")[:n]] = True
    return np.moveaxis(keep.reshape(moved.shape), -1, -2)


def test_n_m_keeps_exactly_n_of_every_m_along_the_input_axis():
    model = nets.SmallVGG(nnx.Rngs(1))
    x = jnp.asarray(RNG.normal(size=(4, 12, 12, 3)), jnp.float32)
    y = jnp.asarray(RNG.integers(0, 5, 4))
    params = nnx.state(model, nnx.Param)
    conv_result = oba_jax.score_model(model, [(x, y)])
    # c2 reads 4 channels, c1 3 and c3 / fc 6: only c2 takes a 2:4 pattern
    cases = [(conv_result, params, ("c1", "c3", "fc"), ["c2/kernel"]),
             (RESULT, PARAMS, ("l0",), ["l1/kernel", "l2/kernel"])]      # Dense (8, 8), (8, 3)
    for result, p, exclude, leaves in cases:
        masks = _flat(oba_jax.unstructured_masks(result, p, keep_ratio=None, n_m=(2, 4), exclude=exclude))
        u = importance_of(result, p, exclude=exclude)
        for path in leaves:
            m = np.asarray(masks[path])
            counts = np.moveaxis(m, -2, -1).reshape(-1, 4).sum(-1)
            assert (counts == 2).all(), path
            np.testing.assert_array_equal(m, _numpy_n_m(np.asarray(u[path]), 2, 4))
        for path, m in masks.items():
            if path not in leaves:      # biases and excluded layers stay dense
                assert np.asarray(m).all(), path


def test_bad_inputs_give_clear_errors():
    for bad in (0, -0.1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match=r"keep_ratio must be a number in \(0, 1\]"):
            oba_jax.unstructured_masks(RESULT, PARAMS, keep_ratio=bad)
    with pytest.raises(ValueError, match="not a multiple of 4"):      # the first layer reads 6 inputs
        oba_jax.unstructured_masks(RESULT, PARAMS, keep_ratio=None, n_m=(2, 4))
    with pytest.raises(ValueError, match=r"n_m must be a pair"):
        oba_jax.unstructured_masks(RESULT, PARAMS, keep_ratio=None, n_m=(5, 4))
    with pytest.raises(ValueError, match="pass keep_ratio=None"):
        oba_jax.unstructured_masks(RESULT, PARAMS, keep_ratio=0.3, n_m=(1, 2))
    other = nets.mlp_params((6, 9, 8, 3))
    with pytest.raises(ValueError, match="not of this model"):
        oba_jax.unstructured_masks(RESULT, other)
    with pytest.raises(ValueError, match="match no leaf"):
        oba_jax.unstructured_masks(RESULT, PARAMS, exclude=("l7",))
    magnitude = oba_jax.score(nets.mlp_apply, PARAMS, None, "magnitude")
    with pytest.raises(ValueError, match="carries no connectivity map"):
        oba_jax.unstructured_masks(magnitude, PARAMS)
    masks = oba_jax.unstructured_masks(RESULT, PARAMS)
    wrong = {k: v for k, v in masks.items() if k != "l2"}
    with pytest.raises(ValueError, match="do not have the structure of params"):
        oba_jax.masked_optimizer(optax.sgd(0.1), wrong).init(PARAMS)
    with pytest.raises(ValueError, match="has shape"):
        oba_jax.apply_masks(other, masks)
    with pytest.raises(ValueError, match="masks are bool"):
        oba_jax.apply_masks(PARAMS, jax.tree_util.tree_map(lambda m: m.astype(jnp.float32), masks))


def test_data_free_masks_with_a_connectivity_map_are_magnitude_pruning():
    graph = oba_jax.connectivity(nets.mlp_apply, PARAMS, X)
    magnitude = oba_jax.score(nets.mlp_apply, PARAMS, None, "magnitude")
    masks = _flat(oba_jax.unstructured_masks(magnitude, PARAMS, keep_ratio=0.25, graph=graph))
    w = _flat(PARAMS)
    # |w| / max|w| + |w| is monotone in |w| within a leaf: each leaf keeps its largest weights
    for path, m in masks.items():
        a, m = np.abs(np.asarray(w[path])).ravel(), np.asarray(m).ravel()
        if m.any() and (~m).any():
            assert a[m].min() >= a[~m].max(), path


def _loss(params):
    return oba_jax.softmax_cross_entropy(nets.mlp_apply(params, X), Y)


def test_masked_optimizer_keeps_pruned_weights_exactly_zero():
    masks = oba_jax.unstructured_masks(RESULT, PARAMS, keep_ratio=0.3)
    # weight decay and momentum inside, and params NOT masked first: pruned entries are 0 after one step
    tx = oba_jax.masked_optimizer(optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9)), masks)
    params, state = PARAMS, tx.init(PARAMS)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(4):
        params, state = step(params, state)
    for (path, p), m, p0 in zip(_flat(params).items(), jax.tree_util.tree_leaves(masks), jax.tree_util.tree_leaves(PARAMS)):
        p, m = np.asarray(p), np.asarray(m)
        assert (p[~m] == 0).all(), path
        if m.any():
            assert (p[m] != np.asarray(p0)[m]).any(), path   # kept weights train
    assert _loss(params) < _loss(oba_jax.apply_masks(PARAMS, masks))


def test_jaxpruner_style_updater_drives_a_plain_optax_loop():
    masks = oba_jax.unstructured_masks(RESULT, PARAMS, keep_ratio=0.4)
    updater = oba_jax.MaskUpdater(masks)
    params, returned = updater.instant_sparsify(PARAMS)
    assert returned is masks
    tx = updater.wrap_optax(optax.adam(1e-2))
    state = tx.init(params)
    start = float(_loss(params))
    for _ in range(5):
        params = updater.pre_forward_update(params, state)
        grads = jax.grad(_loss)(params)
        updates, state = tx.update(grads, state, params)
        params = updater.post_gradient_update(optax.apply_updates(params, updates), state)
    assert float(_loss(params)) < start
    for p, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(masks)):
        assert (np.asarray(p)[~np.asarray(m)] == 0).all()


def test_progressive_schedule_nested_masks_exact_ratios_one_compiled_scorer():
    assert keep_fractions(0.1, 49)[-1] == pytest.approx(0.1)
    np.testing.assert_allclose(keep_fractions(0.1, 49)[:2], [0.1 ** (1 / 49), 0.1 ** (2 / 49)])
    compiled = oba_jax.scorer(nets.mlp_apply, PARAMS, X)
    stacked = (jnp.stack([X, X[::-1]]), jnp.stack([Y, Y[::-1]]))
    calls = []

    def score_fn(params):
        calls.append(params)
        return compiled(params, stacked)

    compiles = []

    def listener(name, secs, **kw):
        if name.endswith("backend_compile_duration"):
            compiles.append(kw.get("fun_name", ""))
    jax.monitoring.register_event_duration_secs_listener(listener)
    steps = []
    try:
        schedule = oba_jax.progressive_masks(score_fn, PARAMS, 0.2, graph=RESULT.graph, steps=6,
                                             report_ratios=(0.9, 0.5, 0.2), on_step=steps.append)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(calls) == 6 and len(steps) == 6
    assert compiles.count("jit(stacked)") == 1     # the scorer's program compiled once for all six steps
    n = sum(int(np.size(m)) for m in jax.tree_util.tree_leaves(schedule.masks))
    for k, record in enumerate(steps):
        assert record["keep_ratio"] == pytest.approx(0.2 ** ((k + 1) / 6), abs=1 / n)
        assert record["scored_batches"] == 2 * (k + 1)      # scores accumulate over steps
    for params in calls[1:]:   # every step after the first scores the masked model
        assert any((np.asarray(p) == 0).any() for p in jax.tree_util.tree_leaves(params))
    for r, masks in schedule.reported.items():
        assert sum(int(np.sum(m)) for m in jax.tree_util.tree_leaves(masks)) == round(r * n)
    m09, m05, m02 = (jax.tree_util.tree_leaves(schedule.reported[r]) for r in (0.9, 0.5, 0.2))
    for a, b, c in zip(m09, m05, m02):   # nested: pruned once, pruned for good
        assert not (np.asarray(b) & ~np.asarray(a)).any() and not (np.asarray(c) & ~np.asarray(b)).any()
    assert all(np.array_equal(a, b) for a, b in zip(m02, jax.tree_util.tree_leaves(schedule.masks)))
