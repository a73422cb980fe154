"""Fingerprints of the programs `oba_jax.score` compiles, to show that a refactor left them unchanged.

For each case (a small model, a method and options) the script calls the public `oba_jax.score` /
`oba_jax.score_model` with XLA dumping every module it compiles, takes the largest module compiled
during that call (the score program; the rest are small op-by-op helpers), removes what depends on
where the code lives rather than on what it computes (`metadata={...}` and the debug-info tables:
source files, lines and Python function names; the module's name), and prints a SHA-256 of the rest, one line per case.
Run it on two checkouts and `diff` the outputs:

    PYTHONPATH=/path/to/old python bench/hlo_fingerprints.py > old.txt
    PYTHONPATH=.            python bench/hlo_fingerprints.py > new.txt
    diff old.txt new.txt

The dumped module is XLA's HLO *before* optimisation, i.e. exactly the program JAX lowered.
`--keep DIR` keeps the stripped texts (`<case>.hlo`) for a textual diff of a case that differs.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile

DUMP = tempfile.mkdtemp(prefix="oba_hlo_")
# Must be set before jax initialises its backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text"
                           " --xla_dump_hlo_pass_re=^$").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import models  # noqa: E402
import oba_jax  # noqa: E402

_METADATA = re.compile(r",? ?metadata=\{[^{}]*\}")
_MODULE = re.compile(r"^HloModule [^ ,]+", re.M)
# The debug-info tables after the module header: source files, functions, locations, stack frames.
_DEBUG_INFO = re.compile(r"^FileNames$.*?(?=^(?:%|ENTRY))", re.M | re.S)


def _modules() -> set[str]:
    return {f for f in os.listdir(DUMP) if f.endswith(".before_optimizations.txt")}


def _stripped(path: str) -> str:
    text = open(os.path.join(DUMP, path)).read()
    return _MODULE.sub("HloModule m", _METADATA.sub("", _DEBUG_INFO.sub("", text)))


def _dense(rng, a, b):
    return {"kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
            "bias": jnp.asarray(0.1 * rng.normal(size=b), jnp.float32)}


def _mlp():
    rng = np.random.default_rng(0)
    params = {f"l{i}": _dense(rng, a, b) for i, (a, b) in enumerate(zip((6, 5, 4), (5, 4, 3)))}

    def apply(p, x):
        for i in range(3):
            x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
            x = jax.nn.relu(x) if i < 2 else x
        return x
    return apply, params, (6,), 3


def _gated():
    rng = np.random.default_rng(1)
    params = {"gate": _dense(rng, 6, 7), "up": _dense(rng, 6, 7), "down": _dense(rng, 7, 3)}

    def apply(p, x):
        h = jax.nn.silu(x @ p["gate"]["kernel"] + p["gate"]["bias"]) * (x @ p["up"]["kernel"] + p["up"]["bias"])
        return h @ p["down"]["kernel"] + p["down"]["bias"]
    return apply, params, (6,), 3


class _Attention(nnx.Module):
    def __init__(self, rngs, d=8, heads=2):
        self.heads = heads
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.q, self.k, self.v, self.out = (nnx.Linear(d, d, rngs=rngs) for _ in range(4))
        self.head = nnx.Linear(d, 3, rngs=rngs)

    def __call__(self, x):
        b, n, d = x.shape
        a = self.ln(x)
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads)
        q, k, v = split(self.q(a)), split(self.k(a)), split(self.v(a))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, n, d)
        return self.head((x + self.out(o)).mean(axis=1))


class _ResidualBN(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn0 = nnx.BatchNorm(8, rngs=rngs)
        self.a = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn_a = nnx.BatchNorm(8, rngs=rngs)
        self.fc = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn0(self.stem(x)))
        h = nnx.relu(h + self.bn_a(self.a(h)))
        return self.fc(h.mean(axis=(1, 2)))


class _SmallVGG(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs)
        self.c2 = nnx.Conv(4, 6, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(6, 5, rngs=rngs)

    def __call__(self, x):
        h = nnx.max_pool(nnx.relu(self.bn1(self.c1(x))), (2, 2), (2, 2))
        return self.fc(nnx.relu(self.c2(h)).mean(axis=(1, 2)))


def _batches(shape, classes, n=2, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.normal(size=(n, batch, *shape)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, classes, size=(n, batch)), jnp.int32)
    return xs, ys


def cases():
    """`(name, thunk)`: each thunk makes one score call."""
    out = []
    for label, make in (("mlp", _mlp), ("gated", _gated)):
        apply, params, shape, classes = make()
        xs, ys = _batches(shape, classes)
        for method, opts in (("oba", {}), ("oba", {"parts": True}), ("oba", {"first_order": True}),
                             ("fastoba", {}), ("taylor", {})):
            tag = "".join(f"-{k}" for k in opts)
            out.append((f"{label}-{method}{tag}-stacked",
                        lambda a=apply, p=params, m=method, o=opts, b=(xs, ys): oba_jax.score(a, p, b, m, **o)))
        out.append((f"{label}-oba-listed", lambda a=apply, p=params, b=[(xs[0], ys[0]), (xs[1], ys[1])]:
                    oba_jax.score(a, p, b)))
    out.append(("mlp-oba-exclude", lambda: oba_jax.score(_mlp()[0], _mlp()[1], _batches((6,), 3),
                                                         exclude=["l1"])))
    nnx_models = (("attention", lambda: _Attention(nnx.Rngs(2)), (5, 8), 3),
                  ("residual-bn", lambda: _ResidualBN(nnx.Rngs(0)), (8, 8, 3), 5),
                  ("small-vgg", lambda: _SmallVGG(nnx.Rngs(4)), (8, 8, 3), 5),
                  ("resnet8", lambda: models.build_model(models.make_spec("resnet_cifar", depth=8), rngs=nnx.Rngs(0)),
                   (32, 32, 3), 10),
                  ("vit-tiny", lambda: models.build_model(models.make_spec("vit", config_name="vit_tiny_test"),
                                                          rngs=nnx.Rngs(0)), (32, 32, 3), 10))
    for label, build, shape, classes in nnx_models:
        batches = _batches(shape, classes)
        for method, opts in (("oba", {}), ("oba", {"parts": True}), ("fastoba", {}), ("taylor", {}),
                             ("oba", {"bn_mode": "eval"})):
            tag = "".join(f"-{k}={v}" for k, v in opts.items())
            out.append((f"{label}-{method}{tag}",
                        lambda b=build, m=method, o=opts, bt=batches: oba_jax.score_model(b(), bt, m, **o)))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", default=None, help="directory for the stripped HLO text of every case")
    ap.add_argument("--only", default=None, help="comma-separated case names")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    with jax.default_matmul_precision("highest"):
        for name, thunk in cases():
            if only is not None and name not in only:
                continue
            before = _modules()
            thunk()
            new = sorted(_modules() - before, key=lambda f: os.path.getsize(os.path.join(DUMP, f)))
            if not new:
                print(f"{name}: nothing compiled", flush=True)
                continue
            text = _stripped(new[-1])
            if args.keep:
                with open(os.path.join(args.keep, f"{name}.hlo"), "w") as f:
                    f.write(text)
            print(f"{name}: {hashlib.sha256(text.encode()).hexdigest()[:16]} ({text.count(chr(10))} lines)",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
