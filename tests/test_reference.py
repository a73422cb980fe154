"""oba-jax against the authors' implementation (../shared/reference; see its README for what is trustworthy)."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

import torchlike as T
from conftest import REFERENCE_DIR
from oba_jax import channel_scores, score

pytestmark = pytest.mark.skipif(not os.path.isdir(REFERENCE_DIR), reason="../shared/reference is not beside the repo")


def _load(name):
    d = np.load(os.path.join(REFERENCE_DIR, f"{name}.npz"))
    params = T.load_params(d)
    params = {m: {k: v for k, v in kv.items() if k not in ("running_mean", "running_var")} for m, kv in params.items()}
    return d, params, d["input"].astype(np.float64), d["labels"]


def _rel(got, ref):
    return np.abs(np.asarray(got) - ref).max() / max(np.abs(ref).max(), 1e-30)


def test_mlp_upward_exact_and_first_downward(x64):
    d, p, x, y = _load("mlp")
    assert np.allclose(T.mlp(p, x), d["logits64"], rtol=0, atol=1e-12)
    r = score(T.mlp, p, [(x, y)], dtype=jnp.float64, parts=True)
    up, down = r.by_path("upward"), r.by_path("downward")
    scale = max(np.abs(d[k]).max() for k in d.files if k.startswith("su64/"))
    for m in ("0", "2", "4"):
        for w in ("weight", "bias"):
            assert np.abs(up[f"{m}/{w}"] - d[f"su64/{m}/{w}"]).max() <= 1e-10 * scale, (m, w)
    # Layer `2` is the only non-root layer whose authors' downward part is correct (README).
    assert _rel(down["2/weight"], d["sd64/2/weight"]) < 1e-10
    _masks_match_the_fixture(d, p, r.graph)


def test_resnet20_bn_train_total_upward_and_channel_sums(x64):
    d, p, x, y = _load("resnet20tiny_cifar")
    assert np.allclose(T.resnet20(p, x), d["logits64"], atol=1e-10)
    r = score(T.resnet20, p, [(x, y)], dtype=jnp.float64, parts=True)
    up, total = r.by_path("upward"), r.by_path("sum")
    # The default construction (no parts: one reverse pass over a written-out tangent) agrees.
    plain_result = score(T.resnet20, p, [(x, y)], dtype=jnp.float64)
    plain = plain_result.by_path("sum")
    for k in total:
        assert _rel(plain[k], total[k]) < 1e-9, k
    convs = [k[len("su64/"):] for k in d.files if k.startswith("su64/") and not k.startswith("su64/fc")]
    assert len(convs) == 21
    global_max = max(np.abs(d[f"s64/{c}"]).max() for c in convs)
    for c in convs:
        assert _rel(up[c], d[f"su64/{c}"]) < 1e-10, c
        # After train-mode BN the correct downward part is ≈ 0, so the authors' total ≈ ours.
        assert np.abs(total[c] - d[f"s64/{c}"]).max() < 1e-5 * global_max, c
    channels = channel_scores(r)
    for c in convs:
        module = c.split("/")[0]
        ours = channels[c]
        scale = max(np.abs(d[f"gi/{module}"]).max(), np.abs(d[f"go/{module}"]).max())
        assert np.abs(ours.in_ - np.asarray(d[f"gi/{module}"], np.float64)).max() < 2e-2 * scale, module
        # output sums of conv+BN(train) are ≈ 0 on both sides (scale invariance)
        assert np.abs(ours.out).max() < 1e-3 * np.abs(ours.in_).max(), module
        assert np.abs(ours.out - d[f"go/{module}"]).max() < 1e-3 * scale, module
    _masks_match_the_fixture(d, p, r.graph)
    _our_masks_flip_only_near_the_threshold(d, p, plain_result)


def test_vit_upward_matches_when_attention_projections_are_held_fixed(x64):
    """The authors' code never perturbs nn.MultiheadAttention projections (defect 3): hold them fixed too."""
    d, p, x, y = _load("vit_small")
    assert np.allclose(T.vit(p, x), d["logits64"], atol=1e-10)
    attention = [m for m in p if "self_attention" in m]
    r = score(T.vit, p, [(x, y)], dtype=jnp.float64, parts=True, exclude=attention)
    up = r.by_path("upward")
    compared = 0
    for key in d.files:
        if key.startswith("su64/") and not key.startswith("su64/heads"):
            assert _rel(up[key[5:]], d[key]) < 1e-10, key
            compared += 1
    assert compared == 10
    plain = score(T.vit, p, [(x, y)], dtype=jnp.float64, exclude=attention).by_path("sum")
    for k, v in r.by_path("sum").items():
        assert _rel(plain[k], v) < 1e-9, k
    assert len(r.graph.parallel) == 4      # QKᵀ and AV in both layers, from one fused in_proj
    _masks_match_the_fixture(d, p, r.graph)



def _fixture_tree(d, params, prefix):
    """The fixture's `prefix/<module>/<param>` arrays in the structure of `params` (zeros where absent)."""
    flat = {}
    for module, kv in params.items():
        for name, value in kv.items():
            key = f"{prefix}/{module}/{name}"
            flat[(module, name)] = np.asarray(d[key]) if key in d.files else np.zeros_like(value)
    return {m: {k: flat[(m, k)] for k in kv} for m, kv in params.items()}


def _masks_match_the_fixture(d, p, graph):
    """Unstructured masks (OBA_SPEC.md §6) from the authors' own scores reproduce theirs."""
    from oba_jax import ScoreResult
    from oba_jax.unstructured import global_masks, importance_of
    keys = [k[len("u/"):] for k in d.files if k.startswith("u/")]
    theirs = ScoreResult(sum=_fixture_tree(d, p, "s"), count=int(d["count"]), method="oba", graph=graph)
    u = importance_of(theirs, p)
    for k in keys:      # the importance formula, from their float32 scores, in float64 as theirs
        np.testing.assert_allclose(np.asarray(u[k]), d[f"u/{k}"], rtol=1e-12, atol=0)
    fixture_u = {k: d[f"u/{k}"] for k in keys}
    n = sum(v.size for v in fixture_u.values())
    kept = sum(int(d[f"m/{k}"].sum()) for k in keys)
    assert kept == int(sum((v > d["m_thresh"]).sum() for v in fixture_u.values()))   # the strict threshold rule
    exact = global_masks(fixture_u, kept / n)
    assert all(np.array_equal(exact[k], d[f"m/{k}"]) for k in keys)
    # at the nominal 0.5 the authors keep one entry fewer than round(n / 2) (strict '>' at the n/2-th value)
    assert sum(int((global_masks(fixture_u, 0.5)[k] != d[f"m/{k}"]).sum()) for k in keys) <= 1


def _our_masks_flip_only_near_the_threshold(d, p, result):
    from oba_jax.unstructured import global_masks, importance_of
    keys = [k[len("u/"):] for k in d.files if k.startswith("u/")]
    u = importance_of(result, p)
    kept = sum(int(d[f"m/{k}"].sum()) for k in keys)
    ours = global_masks({k: u[k] for k in keys}, kept / sum(d[f"m/{k}"].size for k in keys))
    thr = float(d["m_thresh"])
    convs = [k for k in keys if not k.startswith("fc/")]
    flips = sum(int((ours[k] != d[f"m/{k}"]).sum()) for k in convs)
    band = max(float(np.abs(np.asarray(u[k])[np.asarray(ours[k]) != d[f"m/{k}"]] - thr).max(initial=0)) for k in convs)
    # measured: 32 of 270,266 conv weights, all within 1.3e-3·threshold (their float32 scores vs our float64)
    assert flips <= 40 and band < 2e-3 * thr, (flips, band / thr)
    # The classifier's score is only its downward part, which the authors' code gets wrong (README defect
    # 3: 1.1e-6 against our 6.4e-7); normalised by its own max, its ranking differs: 56 of 640 flip.
    assert int((ours["fc/weight"] != d["m/fc/weight"]).sum()) < 640 // 4
