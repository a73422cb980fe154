"""Issue 19's closing table: per model family, in float64, what oba-jax does with it end to end.

    python bench/families.py [--families vgg,hf_bert] [--out bench/results/families.md]

Columns, for each family's `apply_fn(params, inputs) -> logits (..., classes)`:
  scores      OBA scores (float64, finite), the leaves scored, and — where the family is piecewise linear in
              its layers (ReLU, max-pool, eval-mode BatchNorm) and small enough — the largest error against
              the independent dense oracle `θ ⊙ (H − G)θ` (tests/oracles.py; H the loss Hessian, G Gauss–Newton)
  groups      channel groups found (prunable / all) and their kinds
  shrink==mask  `shrink_program` with half of every prunable group's channels kept (the residual stream
              aside): largest relative difference from the masked model, on the traced batch and on
              another batch size; then the same with the residual stream pruned too (the documented
              LayerNorm exception shows here)
  own code    the smaller arrays of `shrink_params` in the model's own apply function: runs or the error
  MACs        `GroupGraph.macs(kept) == count_macs(shrunk program)`
  export      `jax.export` of the shrunk program with a symbolic batch, deserialised and run in a fresh
              process (no oba_jax, no model code) on 5 examples: largest relative difference from the mask

Third-party families are Hugging Face transformers' Flax models (randomly initialised from tiny configs,
no download); they run when `transformers` 4.x with Flax is importable (e.g. `PYTHONPATH=/path/to/site`)
and are listed as skipped otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.flatten_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))   # the hand-written test models and the dense oracle

import oba_jax  # noqa: E402
from oba_jax.graph import find_groups  # noqa: E402
from oba_jax.program import trace_program  # noqa: E402

ORACLE_MAX_PARAMS = 8000     # the dense Hessian is (n, n) float64


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    source: str
    apply: Callable[[Any, Any], jax.Array]
    params: Any
    inputs: Callable[[int], Any]      # batch size -> inputs
    labels: Callable[[int], Any]      # batch size -> integer labels of the logits' leading shape
    piecewise_linear: bool = False


def _f64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.result_type(a), jnp.floating)
                                  else a, tree)


def _rng_inputs(shape, seed=1):
    return lambda b: jnp.asarray(np.random.default_rng(seed + b).normal(size=(b, *shape)))


def _class_labels(classes, seed=2):
    return lambda b: jnp.asarray(np.random.default_rng(seed + b).integers(0, classes, b))


def _token_ids(vocab, tokens, seed=3):
    return lambda b: jnp.asarray(np.random.default_rng(seed + b).integers(0, vocab, (b, tokens)), jnp.int32)


# ---------------------------------------------------------------------------------------------
# Families


def _zoo(name: str, piecewise_linear: bool, **kwargs) -> Callable[[], Family]:
    def make():
        import models
        from flax import nnx
        spec = models.make_spec(name, **kwargs)
        model = models.build_model(spec, rngs=nnx.Rngs(0))
        apply, state = oba_jax.model_apply(model, "eval")
        return Family(f"zoo {name}", "oba-jax zoo (nnx, eval mode)", apply, _f64(state),
                      _rng_inputs(models.input_shape(spec)), _class_labels(spec.num_classes), piecewise_linear)
    return make


def _linen() -> Family:
    from nets import LinenNet
    net = LinenNet()
    params = _f64(net.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1)))["params"])
    return Family("linen CNN + attention", "flax.linen layers (Conv, max_pool, LayerNorm, MultiHeadDotProductAttention)",
                  lambda p, x: net.apply({"params": p}, x), params, _rng_inputs((8, 8, 1)), _class_labels(3))


def _decoder() -> Family:
    from nets import causal_lm_apply, causal_lm_params
    return Family("decoder GQA/RoPE/SwiGLU/RMSNorm", "plain function (tests/nets.py)", causal_lm_apply,
                  causal_lm_params(head_dim=4), _token_ids(7, 5), lambda b: _token_ids(7, 5, seed=9)(b))


def _width_scaled() -> Family:
    from nets import width_scaled_attention, width_scaled_attention_params
    params, _ = width_scaled_attention_params()
    return Family("attention, scale from width", "plain function (tests/nets.py)", width_scaled_attention,
                  _f64(params), _rng_inputs((6, 5)), _class_labels(3))


def _hf(kind: str) -> Callable[[], Family]:
    def make():
        import transformers as t
        f64 = dict(dtype=jnp.float64, seed=0)
        if kind == "bert":
            cfg = t.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=24, num_labels=3, max_position_embeddings=16)
            m = t.FlaxBertForSequenceClassification(cfg, **f64)
            return Family("HF BERT (seq. classification)", f"transformers {t.__version__} FlaxBert",
                          lambda p, ids: m(ids, params=p).logits, _f64(m.params), _token_ids(30, 6), _class_labels(3))
        if kind == "gpt2":
            cfg = t.GPT2Config(vocab_size=30, n_embd=16, n_layer=2, n_head=2, n_positions=16)
            m = t.FlaxGPT2LMHeadModel(cfg, **f64)
            return Family("HF GPT-2 (causal LM)", f"transformers {t.__version__} FlaxGPT2",
                          lambda p, ids: m(ids, params=p).logits, _f64(m.params), _token_ids(30, 6),
                          _token_ids(30, 6, seed=11))
        if kind == "llama":
            cfg = t.LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
            m = t.FlaxLlamaForCausalLM(cfg, **f64)
            return Family("HF Llama (GQA, causal LM)", f"transformers {t.__version__} FlaxLlama",
                          lambda p, ids: m(ids, params=p).logits, _f64(m.params), _token_ids(30, 6),
                          _token_ids(30, 6, seed=11))
        if kind == "vit":
            cfg = t.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=24, num_labels=3)
            m = t.FlaxViTForImageClassification(cfg, **f64)
            return Family("HF ViT", f"transformers {t.__version__} FlaxViT",
                          lambda p, x: m(jnp.transpose(x, (0, 3, 1, 2)), params=p).logits, _f64(m.params),
                          _rng_inputs((16, 16, 3)), _class_labels(3))
        if kind == "resnet":
            cfg = t.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                 layer_type="basic", num_labels=3)
            m = t.FlaxResNetForImageClassification(cfg, **f64)
            return Family("HF ResNet (eval-mode BN)", f"transformers {t.__version__} FlaxResNet",
                          lambda p, x: m(jnp.transpose(x, (0, 3, 1, 2)), params=p, train=False).logits,
                          _f64(m.params), _rng_inputs((16, 16, 3)), _class_labels(3), piecewise_linear=True)
        raise ValueError(kind)
    return make


FAMILIES: dict[str, Callable[[], Family]] = {
    "mlp": _zoo("mlp", True, hidden=(9, 7)),
    "vgg": _zoo("vgg", True, cfg=(8, "M", 16, 12), image_size=16),
    "resnet_cifar": _zoo("resnet_cifar", True, stage_widths=(4, 6, 8), blocks_per_stage=(1, 1, 1),
                         block_widths=((4,), (6,), (8,)), image_size=8),
    "resnet50": _zoo("resnet50", True, image_size=32, num_classes=10, stem_width=8, stage_widths=(16, 16, 24, 32),
                     blocks_per_stage=(1, 1, 2, 1),
                     block_widths=(((4, 6),), ((8, 4),), ((8, 8), (6, 6)), ((8, 8),))),
    "vit": _zoo("vit", False, config_name="vit_tiny_test"),
    "linen": _linen,
    "decoder": _decoder,
    "width_scaled": _width_scaled,
    "hf_bert": _hf("bert"), "hf_gpt2": _hf("gpt2"), "hf_llama": _hf("llama"), "hf_vit": _hf("vit"),
    "hf_resnet": _hf("resnet"),
}


# ---------------------------------------------------------------------------------------------
# Checks


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _scores(fam: Family, x, y) -> str:
    r = oba_jax.score(fam.apply, fam.params, [(x, y)], dtype=jnp.float64)   # raises on NaN/inf
    paths = oba_jax.leaf_paths(fam.params)
    floats = [p for p, a in zip(paths, jax.tree_util.tree_leaves(fam.params))
              if jnp.issubdtype(jnp.result_type(a), jnp.floating)]
    scored = [p for p in floats if p not in r.graph.unscored]
    text = f"finite, {len(scored)}/{len(floats)} leaves"
    n = sum(np.size(a) for a in jax.tree_util.tree_leaves(fam.params))
    if fam.piecewise_linear and n <= ORACLE_MAX_PARAMS:
        from oracles import h_minus_g
        got = np.asarray(jax.flatten_util.ravel_pytree(r.sum)[0])
        text += f"; vs θ⊙(H−G)θ {_rel(got, h_minus_g(fam.apply, fam.params, x, y, scored)):.1e}"
    elif fam.piecewise_linear:
        text += f"; oracle skipped ({n} params)"
    return text


def _export_round_trip(small_apply, small, x_spec_shape, dtype, x5, expected) -> str:
    batch = jax.export.symbolic_shape("b")[0]
    spec = jax.ShapeDtypeStruct((batch, *x_spec_shape), dtype)
    leaves, treedef = jax.tree_util.tree_flatten(small)
    # over the list of leaves: a pytree of nnx.Variable nodes has no registered serialisation
    exported = jax.export.export(jax.jit(lambda ls, x: small_apply(jax.tree_util.tree_unflatten(treedef, ls), x)))(
        [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves], spec)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "model.stablehlo"), "wb") as f:
            f.write(exported.serialize())
        np.savez(os.path.join(tmp, "inputs.npz"), n=len(leaves), x=np.asarray(x5),
                 **{f"p{i}": np.asarray(a) for i, a in enumerate(leaves)})
        from nets import EXPORTED_RUN
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run([sys.executable, "-c", EXPORTED_RUN, "inputs.npz", "model.stablehlo", "out.npy"],
                       check=True, cwd=tmp, timeout=600, env=env)
        return f"{_rel(np.load(os.path.join(tmp, 'out.npy')), expected):.1e}"


def _half(groups, rng) -> dict[str, np.ndarray]:
    return {g.name: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False)) for g in groups if g.prunable}


def run_family(fam: Family) -> dict[str, str]:
    x, x5, y = fam.inputs(2), fam.inputs(5), fam.labels(2)
    row = {"family": fam.name, "source": fam.source}
    row["scores"] = _scores(fam, x, y)
    graph = find_groups(trace_program(fam.apply, fam.params, x))
    groups = graph.groups
    prunable = [g for g in groups if g.prunable]
    kinds = sorted({g.kind for g in prunable})
    row["groups"] = f"{len(prunable)}/{len(groups)} ({', '.join(kinds)})"
    rng = np.random.default_rng(0)
    kept = _half([g for g in prunable if g.kind != "embed"], rng)
    small_apply, small = oba_jax.shrink_program(fam.apply, fam.params, x, groups, kept)
    masked = oba_jax.mask_params(fam.params, groups, kept)
    jitted = jax.jit(small_apply)
    diffs = [_rel(jitted(small, xi), fam.apply(masked, xi)) for xi in (x, x5)]
    stream = _half([g for g in prunable if g.kind == "embed"], rng)
    if stream:
        with_stream = {**kept, **stream}
        s_apply, s_small = oba_jax.shrink_program(fam.apply, fam.params, x, groups, with_stream)
        stream_diff = f"{_rel(s_apply(s_small, x), fam.apply(oba_jax.mask_params(fam.params, groups, with_stream), x)):.1e}"
    else:
        stream_diff = "no stream group"
    row["shrink==mask"] = f"{max(diffs):.1e}; with the stream {stream_diff}"
    try:
        own = fam.apply(oba_jax.shrink_params(fam.params, groups, kept), x)
        row["own code"] = f"runs, differs by {_rel(own, fam.apply(masked, x)):.1e}"
    except Exception as e:  # the point of this column: which error the model's own code raises
        row["own code"] = f"fails: {type(e).__name__}"
    macs, counted = graph.macs(kept), oba_jax.count_macs(small_apply, small, x)
    row["MACs"] = f"{'equal' if macs == counted else f'DIFFER {macs} vs {counted}'} ({counted / graph.macs():.2f}× dense)"
    dtype = jnp.result_type(x)
    row["export"] = _export_round_trip(small_apply, small, x.shape[1:], dtype, x5, fam.apply(masked, x5))
    return row


COLUMNS = ("family", "source", "scores", "groups", "shrink==mask", "own code", "MACs", "export")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    names = [n for n in args.families.split(",") if n]
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name in names:
        start = time.perf_counter()
        try:
            fam = FAMILIES[name]()
        except ImportError as e:
            print(f"{name}: skipped ({e})", file=sys.stderr)
            continue
        row = run_family(fam)
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        lines.append("| " + " | ".join(row[c] for c in COLUMNS) + " |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
