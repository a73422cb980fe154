"""Scores that compile once: `oba_jax.score` reuses its programs, `oba_jax.scorer` never re-traces, and
parameter values are arguments of the compiled programs (never constants baked into them)."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oba_jax
from nets import ResidualBNNet, mlp_apply, mlp_params


@contextlib.contextmanager
def count_compiles():
    """Counts XLA compilations (JAX reports each one as a `backend_compile_duration` event)."""
    events = []
    listener = lambda name, secs, **kw: events.append(name) if name.endswith("backend_compile_duration") else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _batches(seed, n=2, b=4, d=6, classes=3):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(n, b, d)), jnp.float32),
            jnp.asarray(rng.integers(0, classes, (n, b)), jnp.int32))


def _counting(apply_fn):
    traces = []

    def counted(p, x):
        traces.append(1)   # runs once per trace, never when a compiled program runs
        return apply_fn(p, x)
    return counted, traces


@pytest.mark.parametrize("method", ["oba", "taylor", "fastoba", "magnitude"])
@pytest.mark.parametrize("stacked", [True, False])
def test_second_score_call_compiles_and_traces_nothing(method, stacked):
    apply_fn, traces = _counting(mlp_apply)
    params = mlp_params()
    xs, ys = _batches(0)
    batches = (xs, ys) if stacked else [(xs[0], ys[0]), (xs[1], ys[1])]
    first = oba_jax.score(apply_fn, params, batches, method)
    n_traces = len(traces)
    with count_compiles() as compiles:
        second = oba_jax.score(apply_fn, params, batches, method)
    assert compiles == [] and len(traces) == n_traces
    for a, b in zip(jax.tree_util.tree_leaves(first.sum), jax.tree_util.tree_leaves(second.sum)):
        np.testing.assert_array_equal(a, b)


def test_scorer_in_a_loop_with_new_values_compiles_once():
    apply_fn, traces = _counting(mlp_apply)
    xs, ys = _batches(1)
    sc = oba_jax.scorer(apply_fn, mlp_params(seed=0), xs[0], method="oba")
    results = []
    with count_compiles() as compiles:
        for seed in range(4):
            results.append(sc(mlp_params(seed=seed), (xs, ys)))
            if seed == 0:
                first_call = len(compiles)
    assert first_call > 0 and len(compiles) == first_call
    assert len(traces) == 1   # apply_fn is traced once, for the analysis
    # Values are arguments: each result equals a fresh, uncached score of those parameters.
    for seed, r in enumerate(results):
        fresh = oba_jax.score(lambda p, x: mlp_apply(p, x), mlp_params(seed=seed), (xs, ys))
        for a, b in zip(jax.tree_util.tree_leaves(r.sum), jax.tree_util.tree_leaves(fresh.sum)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(results[0].sum["l0"]["kernel"], results[1].sum["l0"]["kernel"])


def test_score_model_twice_reuses_the_programs():
    model = ResidualBNNet(nnx.Rngs(0))
    rng = np.random.default_rng(2)
    batches = (jnp.asarray(rng.normal(size=(2, 4, 8, 8, 3)), jnp.float32),
               jnp.asarray(rng.integers(0, 5, (2, 4)), jnp.int32))
    oba_jax.score_model(model, batches)
    with count_compiles() as compiles:
        oba_jax.score_model(model, batches)
    assert compiles == []


def test_another_batch_shape_gets_its_own_program():
    xs, ys = _batches(3)
    sc = oba_jax.scorer(mlp_apply, mlp_params(), xs[0])
    small = sc(mlp_params(), (xs[:, :2], ys[:, :2]))
    ref = oba_jax.score(mlp_apply, mlp_params(), (xs[:, :2], ys[:, :2]))
    np.testing.assert_allclose(small.sum["l1"]["kernel"], ref.sum["l1"]["kernel"], rtol=1e-6)


def test_scorer_bad_inputs():
    xs, ys = _batches(4)
    sc = oba_jax.scorer(mlp_apply, mlp_params(), xs[0])
    with pytest.raises(ValueError, match="another structure"):
        sc({"l0": mlp_params()["l0"]}, (xs, ys))
    with pytest.raises(ValueError, match=r"'l0/bias' has shape \(2,\)"):
        sc(mlp_params((6, 2, 4, 3)), (xs, ys))
    with pytest.raises(ValueError, match="leading axes must agree"):
        sc(mlp_params(), (xs, ys[:1]))
    with pytest.raises(ValueError, match="empty batch"):
        sc(mlp_params(), [(xs[0][:0], ys[0][:0])])
    with pytest.raises(TypeError, match="batch 1 is a"):
        sc(mlp_params(), [(xs[0], ys[0]), xs[1]])
    with pytest.raises(ValueError, match="takes no option 'parts' \\(an option of oba\\)"):
        oba_jax.score(mlp_apply, mlp_params(), (xs, ys), "taylor", parts=True)
    with pytest.raises(ValueError, match="needs example_inputs"):
        oba_jax.scorer(mlp_apply, mlp_params(), method="oba")
    with pytest.raises(FloatingPointError, match="l0/kernel"):
        bad = mlp_params()
        bad["l0"]["kernel"] = bad["l0"]["kernel"].at[0, 0].set(jnp.inf)
        oba_jax.score(mlp_apply, bad, None, "magnitude")
