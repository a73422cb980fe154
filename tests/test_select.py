"""Channel selection and the step schedule to a target ops ratio."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from oba_jax.structured import model_group_graph
from oba_jax.structured.select import Selection, prune_to_ops, select_channels, step_ratios


@pytest.fixture(scope="module")
def vgg_graph():
    spec = models.make_spec("vgg", cfg=(16, "M", 32, 32, "M", 64), image_size=16)
    model = nnx.eval_shape(lambda: models.build_model(spec, rngs=nnx.Rngs(0)))
    return model_group_graph(model, jnp.ones((1, 16, 16, 3)))


def _fixed_scores(graph, seed=0):
    rng = np.random.default_rng(seed)
    return {g.name: rng.random(g.size) for g in graph.groups}


def test_global_selection_prunes_the_lowest_scores_first(vgg_graph):
    scores = _fixed_scores(vgg_graph)
    chosen = Selection().selectable(vgg_graph.groups)
    plan = select_channels(vgg_graph.groups, scores, {}, 0.5, Selection())
    total = sum(g.size for g in chosen)
    assert sum(len(v) for v in plan.values()) == total // 2
    normalised = np.concatenate([scores[g.name] for g in chosen])
    kept_scores = np.concatenate([scores[g.name][plan[g.name]] for g in chosen])
    removed = np.setdiff1d(normalised, kept_scores)
    assert removed.max() <= kept_scores.min()     # one global threshold
    assert all(np.all(np.diff(v) > 0) for v in plan.values())


def test_floors_round_to_and_local_selection(vgg_graph):
    scores = _fixed_scores(vgg_graph, 1)
    plan = select_channels(vgg_graph.groups, scores, {}, 0.99, Selection(max_pruning_ratio=0.9))
    sizes = {g.name: g.size for g in vgg_graph.groups}
    assert all(len(v) == int(np.ceil(sizes[k] * 0.1)) for k, v in plan.items())
    plan = select_channels(vgg_graph.groups, scores, {}, 0.4, Selection(round_to=8))
    assert all(len(v) % 8 == 0 for v in plan.values())
    local = select_channels(vgg_graph.groups, scores, {}, 0.5, Selection(global_pruning=False))
    assert all(len(v) == sizes[k] // 2 for k, v in local.items())
    # channels already removed stay removed
    again = select_channels(vgg_graph.groups, scores, local, 0.6, Selection(global_pruning=False))
    assert all(set(again[k]) <= set(local[k]) for k in local)


def test_schedule_lands_within_a_hundredth_below_the_target(vgg_graph):
    calls = []

    def score_fn(plan):
        calls.append({k: len(v) for k, v in plan.items()})
        return _fixed_scores(vgg_graph, len(calls))

    plan, history = prune_to_ops(vgg_graph, score_fn, 0.5, final_ratio=1 - 0.9 * 0.5, steps=50)
    achieved = vgg_graph.macs(plan) / vgg_graph.macs()
    assert 0.49 <= achieved <= 0.5 and history[-1]["refined"] and history[-1]["ops_ratio"] == achieved
    assert len(calls) == len(history) < 50
    widths = [sum(c.values()) for c in calls]
    assert widths == sorted(widths, reverse=True)   # each step starts from the previous plan


def test_unreachable_target_and_bad_options_are_clear_errors(vgg_graph):
    scores = lambda plan: _fixed_scores(vgg_graph)
    with pytest.raises(ValueError, match="out of reach"):
        prune_to_ops(vgg_graph, scores, 0.001, final_ratio=0.5, steps=3, selection=Selection(max_pruning_ratio=0.5))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="target ops ratio"):
            prune_to_ops(vgg_graph, scores, bad, final_ratio=0.5)
    with pytest.raises(ValueError, match="kinds"):
        Selection(kinds=("neurons",))
    with pytest.raises(ValueError, match="nothing to prune"):
        Selection(kinds=("heads",)).selectable(vgg_graph.groups)
    assert np.allclose(step_ratios(0.55, 2), [1 - 0.45 ** 0.5, 0.55])
