"""Time per batch of the importance scores against a plain gradient of the loss, in one process.

For each model: the jitted per-batch function of every row is compiled and run once (warm-up,
compile time excluded); then `--repeats` rounds each time every row once with `block_until_ready`.
Reported: each row's median time, and its ratios to the plain gradient `jax.grad(loss)`, to the
fast-conv gradient and to `fastoba` as the median over rounds of the per-round ratio. Timing rows in
rounds rather than one after the other keeps a slow spell of a shared machine (±10–15% here) from
landing on one row only.

Rows:
  grad          jax.grad of the cross-entropy through the model (native XLA convolutions)
  grad+fastconv the same with every nnx.Conv using `oba_jax.fastconv` (what a CPU gradient could cost)
  taylor        `score(..., "taylor")`'s per-batch function (θ ⊙ ∂L/∂θ, the traced program replayed)
  fastoba       `score(..., "fastoba")`'s per-batch function (θ ⊙ Hθ, full HVP)
  oba           `score(..., "oba")`'s per-batch function
  oba-nativeconv the same with OBA_JAX_FAST_CONV=0 (XLA's own convolutions)
  api-oba       one whole `oba_jax.score(apply, params, [(x, y)], method="oba")` call, after a first call
                with the same shapes (the public API with its checks and its compiled-program cache)
  api-taylor    the same with method="taylor"

Models: the zoo's wide ResNet-32, VGG19, the CIFAR ViT (default), wide ResNet-20, and `user-resnet`,
a pure-JAX ResNet (32/64/128, 2 basic blocks per stage, dicts of arrays) written as a user would.

The score rows run as `score` runs them: on CPU with the fast conv (unless OBA_JAX_FAST_CONV=0) and
compiled with `fastconv.cpu_compiler_options()`; the grad rows are a plain `jax.jit(jax.grad(...))`.

Work: `GFLOP` and `GB moved` are XLA's cost analysis of the compiled function (`cost_analysis()`:
"flops" and "bytes accessed"), a count that does not depend on how busy the machine is.

Memory: `temp MB` is XLA's buffer assignment for the compiled function (`memory_analysis()`:
temporaries, excluding arguments/outputs); `RSS+ MB` is the growth of the process's peak resident
set (`resource.getrusage` ru_maxrss) while compiling that row and running it once (0 when an
earlier row already reached a higher peak).

    python bench/score_speed.py                      # ResNet-32, VGG19 and the ViT, 3 rounds
    python bench/score_speed.py --models resnet20 --rows fastoba,oba --repeats 10   # OBA vs fastoba
    python bench/score_speed.py --models resnet32 --batch 32 --repeats 5
    python bench/score_speed.py --models user-resnet --rows grad,api-oba,api-taylor --repeats 10
    python bench/score_speed.py --quick               # tiny smoke run (used by tests)
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import models  # noqa: E402
import oba_jax  # noqa: E402
from oba_jax import fastconv, nnx_model  # noqa: E402

def user_resnet(widths=(32, 64, 128), blocks=2, classes=10, seed=0):
    """`(apply_fn, params)` of a CIFAR ResNet written the way a user writes one in pure JAX: a dict of
    arrays, `lax.conv_general_dilated`, BatchNorm with batch statistics inline, basic blocks with a 1×1
    projection shortcut where the width or stride changes, global average pooling, one dense layer."""
    rng = np.random.default_rng(seed)
    conv_w = lambda k, i, o: jnp.asarray(rng.normal(size=(k, k, i, o)) * np.sqrt(2 / (k * k * o)), jnp.float32)
    bn = lambda c: {"scale": jnp.ones(c, jnp.float32), "bias": jnp.zeros(c, jnp.float32)}
    params = {"stem": {"w": conv_w(3, 3, widths[0]), "bn": bn(widths[0])}}
    c_in = widths[0]
    for s, c in enumerate(widths):
        for b in range(blocks):
            stride = 2 if s > 0 and b == 0 else 1
            block = {"conv1": conv_w(3, c_in, c), "bn1": bn(c), "conv2": conv_w(3, c, c), "bn2": bn(c)}
            if stride != 1 or c_in != c:
                block.update(proj=conv_w(1, c_in, c), bn_proj=bn(c))
            params[f"stage{s}/block{b}"] = block
            c_in = c
    params["fc"] = {"w": jnp.asarray(rng.normal(size=(c_in, classes)) / np.sqrt(c_in), jnp.float32),
                    "b": jnp.zeros(classes, jnp.float32)}

    def conv(x, w, stride=1):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def batch_norm(x, p):
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

    def apply_fn(p, x):
        h = jax.nn.relu(batch_norm(conv(x, p["stem"]["w"]), p["stem"]["bn"]))
        for s in range(len(widths)):
            for b in range(blocks):
                q, stride = p[f"stage{s}/block{b}"], 2 if s > 0 and b == 0 else 1
                out = jax.nn.relu(batch_norm(conv(h, q["conv1"], stride), q["bn1"]))
                out = batch_norm(conv(out, q["conv2"]), q["bn2"])
                short = batch_norm(conv(h, q["proj"], stride), q["bn_proj"]) if "proj" in q else h
                h = jax.nn.relu(out + short)
        return h.mean(axis=(1, 2)) @ p["fc"]["w"] + p["fc"]["b"]

    return apply_fn, params


MODELS = {
    "resnet32": (lambda: models.make_spec("resnet_cifar", depth=32, width_multiplier=4), 128),
    "vgg19": (lambda: models.make_spec("vgg", cfg_name="vgg19"), 64),
    "vit": (lambda: models.make_spec("vit", config_name="vit_small_cifar"), 64),
    # Not in the default set: a shorter model for many-round OBA-vs-fastoba comparisons.
    "resnet20": (lambda: models.make_spec("resnet_cifar", depth=20, width_multiplier=4), 32),
    # Not a zoo model: the pure-JAX ResNet of `user_resnet` (the "API call" rows were specified on it).
    "user-resnet": (None, 64),
}
DEFAULT_MODELS = ("resnet32", "vgg19", "vit")
QUICK = {
    "resnet8": (lambda: models.make_spec("resnet_cifar", depth=8, width_multiplier=1), 4),
}
ROWS = ("grad", "grad+fastconv", "taylor", "fastoba", "oba", "oba-nativeconv", "api-oba", "api-taylor")


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _split(spec, fast_conv_modules: bool = False, bn_mode: str = "train"):
    model = models.build_model(spec, rngs=nnx.Rngs(0))
    if fast_conv_modules:
        for _, m in nnx.iter_modules(model):
            if isinstance(m, nnx.Conv):
                m.conv_general_dilated = fastconv.conv_general_dilated_fast
    model.train() if bn_mode == "train" else model.eval()
    graphdef, state = nnx_model.split(model)
    return (lambda s, x: nnx_model.merge(graphdef, s)(x)), state


def _grad_fn(apply):
    def f(p, x, y):
        return jax.grad(lambda q: oba_jax.softmax_cross_entropy(apply(q, x), y))(p)
    return jax.jit(f)


def _score_fn(method: str, apply, params, x, fast_conv: bool):
    """The jitted per-batch function `score(apply, params, ..., method)` scans over batches."""
    os.environ["OBA_JAX_FAST_CONV"] = "1" if fast_conv else "0"  # read while tracing
    fn = oba_jax.scorer(apply, params, x, method).per_batch(x)
    return fn, jax.tree_util.tree_leaves(params)


def _cost(compiled) -> tuple[float, float]:
    """XLA's count of the compiled function's floating-point operations (G) and bytes accessed (GB)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # cost analysis is not available on every backend
        return float("nan"), float("nan")
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    cost = cost or {}
    return cost.get("flops", float("nan")) / 1e9, cost.get("bytes accessed", float("nan")) / 1e9


def _compile(fn, args, warmup: bool) -> dict:
    """The compiled function, its XLA cost, XLA's temporaries (MB) and the growth of peak RSS (MB)
    while compiling it and running it once."""
    rss0 = _max_rss_mb()
    compiled = fn.lower(*args).compile()
    try:
        temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # memory_analysis is not available on every backend
        temp_mb = float("nan")
    gflop, gbytes = _cost(compiled)
    if warmup:  # compile time is already excluded (ahead-of-time compile above)
        jax.block_until_ready(compiled(*args))
    return dict(fn=compiled, args=args, gflop=gflop, gbytes=gbytes, temp_mb=temp_mb,
                rss_mb=max(_max_rss_mb() - rss0, 0.0))


def _api_call(method: str, apply, params, x, y) -> dict:
    """A whole public `oba_jax.score` call (first call untimed: it traces and compiles)."""
    call = lambda: oba_jax.score(apply, params, [(x, y)], method=method).sum
    rss0 = _max_rss_mb()
    jax.block_until_ready(call())
    nan = float("nan")
    return dict(fn=lambda: call(), args=(), gflop=nan, gbytes=nan, temp_mb=nan, rss_mb=max(_max_rss_mb() - rss0, 0.0))


def _timed(compiled, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t0


def compile_rows(make_spec, batch: int, rows, warmup: bool = True, bn_mode: str = "train") -> dict[str, dict]:
    """Every row's function, compiled ahead of time on one random batch of `batch` inputs: `{row: {"fn", "args",
    "gflop", "gbytes", "temp_mb", "rss_mb"}}`; time a row with `timed(entry)` (also `bench/authors_speed.py`)."""
    spec = make_spec() if make_spec is not None else None
    h, w, c = models.input_shape(spec) if spec is not None else (32, 32, 3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, h, w, c)), jnp.float32)
    apply, params = _split(spec, bn_mode=bn_mode) if spec is not None else user_resnet()
    y = jnp.asarray(rng.integers(0, apply(params, x[:1]).shape[-1], size=batch), jnp.int32)
    compiled = {}
    saved = os.environ.get("OBA_JAX_FAST_CONV")
    try:
        with jax.default_matmul_precision("highest"):
            for row in rows:
                if row.startswith("api-"):
                    continue   # after the environment is restored: the API call reads it on every call
                if row in ("grad", "grad+fastconv"):
                    if spec is None and row == "grad+fastconv":
                        raise SystemExit("grad+fastconv needs a zoo model (its nnx.Conv modules take the fast conv)")
                    a, p = _split(spec, fast_conv_modules=row == "grad+fastconv", bn_mode=bn_mode) if spec else (apply, params)
                    fn, args = _grad_fn(a), (p, x, y)
                else:
                    method = "oba" if row.startswith("oba") else row
                    fn, leaves = _score_fn(method, apply, params, x, fast_conv=row != "oba-nativeconv")
                    args = (leaves, [x], (y,))   # targets: (labels,)
                compiled[row] = _compile(fn, args, warmup)
    finally:
        if saved is None:
            os.environ.pop("OBA_JAX_FAST_CONV", None)
        else:
            os.environ["OBA_JAX_FAST_CONV"] = saved
    with jax.default_matmul_precision("highest"):
        for row in rows:
            if row.startswith("api-"):
                compiled[row] = _api_call(row[len("api-"):], apply, params, x, y)
    return compiled


def timed(entry: dict) -> float:
    """Seconds of one run of a `compile_rows` entry."""
    return _timed(entry["fn"], entry["args"])


def bench_model(name: str, make_spec, batch: int, repeats: int, rows, warmup: bool = True,
                bn_mode: str = "train") -> list[dict]:
    """Every row compiled first, then timed in `repeats` rounds of one run per row, so that a slow
    spell of the machine falls on every row alike (rows are compared round by round)."""
    compiled = compile_rows(make_spec, batch, rows, warmup, bn_mode)
    times: dict[str, list[float]] = {row: [] for row in rows}
    for k in range(repeats):
        for row in rows:
            times[row].append(timed(compiled[row]))
        print(f"  [{name} b{batch}] round {k + 1}/{repeats}: "
              + ", ".join(f"{row} {times[row][-1]:.3f} s" for row in rows), file=sys.stderr, flush=True)
    return [dict(model=name, batch=batch, row=row, seconds=statistics.median(times[row]), times=times[row],
                 **{k: compiled[row][k] for k in ("gflop", "gbytes", "temp_mb", "rss_mb")}) for row in rows]


def _round_ratio(a: dict, b: dict) -> float:
    """Median over rounds of a's time / b's time in the same round."""
    return statistics.median(ta / tb for ta, tb in zip(a["times"], b["times"]))


def _fmt(value: float, spec: str) -> str:
    return "–" if value != value else format(value, spec)   # NaN: not measured for this row


def print_table(results: list[dict]) -> None:
    print("| model, batch | method | s / batch | × grad | × grad+fastconv | × fastoba (per round) | GFLOP | GB moved "
          "| temp MB | RSS+ MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by_model: dict[tuple, dict] = {}
    for r in results:
        by_model.setdefault((r["model"], r["batch"]), {})[r["row"]] = r
    for (name, batch), rows in by_model.items():
        g, gf, fo = rows.get("grad"), rows.get("grad+fastconv"), rows.get("fastoba")
        for row, r in rows.items():
            ratios = [f"{_round_ratio(r, base):.2f}" if base else "–" for base in (g, gf, fo)]
            cols = [_fmt(r["gflop"], ".1f"), _fmt(r["gbytes"], ".1f"), _fmt(r["temp_mb"], ".0f")]
            print(f"| {name}, {batch} | {row} | {r['seconds']:.3f} | {' | '.join(ratios)} | {' | '.join(cols)} | "
                  f"{r['rss_mb']:.0f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help=f"comma-separated subset of {sorted(MODELS)}")
    ap.add_argument("--batch", type=int, default=None, help="batch size for every model (default: per model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed run after the ahead-of-time compile (saves time on big models)")
    ap.add_argument("--bn-mode", choices=("train", "eval"), default="train",
                    help="BatchNorm batch statistics (train) or running averages (eval)")
    ap.add_argument("--quick", action="store_true", help="tiny models, batch 4, 1 repeat (smoke test)")
    args = ap.parse_args(argv)

    table = QUICK if args.quick else MODELS
    names = args.models.split(",") if args.models else list(QUICK if args.quick else DEFAULT_MODELS)
    repeats = 1 if args.quick else args.repeats
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS] + [n for n in names if n not in table]
    if bad:
        ap.error(f"unknown rows/models: {bad}")
    print(f"# jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPU cores, "
          f"{platform.processor() or platform.machine()}; median of {repeats} rounds"
          f"{'' if args.no_warmup else ' after one warm-up run'} (compile excluded); "
          f"float32, matmul precision 'highest', BatchNorm in {args.bn_mode} mode")
    results = []
    for n in names:
        make_spec, default_batch = table[n]
        results += bench_model(n, make_spec, args.batch or default_batch, repeats, rows, not args.no_warmup,
                               args.bn_mode)
    print_table(results)


if __name__ == "__main__":
    main()
