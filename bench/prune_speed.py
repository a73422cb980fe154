"""The one-shot schedule compiles its score program once: compilations and time of a 50-step schedule.

The schedule (`oba_jax.structured.select.prune_to_ops`) scores a *masked* model of fixed shapes at every
step (`mask_model` + `score_model`), so the score program is traced and compiled on the first step only.
This script runs the 50 steps of the schedule on a zoo model with random data and reports:

* compilations of the score program during the schedule (JAX's `backend_compile_duration` events whose
  module is the scorer's accumulation), target 1; and all compilations (small helpers included);
* the time of the schedule against 50 × one compiled score call, and against 50 × one score call that
  traces and compiles (what every step cost when `oba_jax.score` re-compiled on every call).

    python bench/prune_speed.py                         # VGG-BN cfg 16-M-32-M-128 (the demo model), b64 × 4
    python bench/prune_speed.py --model resnet20 --batches 2
"""
from __future__ import annotations

import argparse
import os
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
from oba_jax.structured import group_scores, mask_model, model_group_graph  # noqa: E402
from oba_jax.structured.select import Selection, prune_to_ops  # noqa: E402

MODELS = {
    "demo": lambda: models.make_spec("vgg", cfg=(16, "M", 32, "M", 128), in_channels=1, image_size=28),
    "resnet20": lambda: models.make_spec("resnet_cifar", depth=20),
    "vgg11": lambda: models.make_spec("vgg", cfg_name="vgg11"),
}


class Compiles:
    def __init__(self):
        self.events: list[str] = []

    def __call__(self, name, secs, **kw):
        if name.endswith("backend_compile_duration"):
            self.events.append(kw.get("fun_name", ""))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--method", default="oba", choices=oba_jax.METHODS)
    args = ap.parse_args(argv)

    spec = MODELS[args.model]()
    model = models.build_model(spec, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    shape = models.input_shape(spec)
    batches = (jnp.asarray(rng.normal(size=(args.batches, args.batch, *shape)), jnp.float32),
               jnp.asarray(rng.integers(0, spec.num_classes, (args.batches, args.batch)), jnp.int32))
    graph = model_group_graph(model, batches[0][0][:1])
    selection = Selection()
    chosen = selection.selectable(graph.groups)
    step_times: list[float] = []

    def score_fn(plan):
        t0 = time.perf_counter()
        result = oba_jax.score_model(mask_model(model, graph.groups, plan), batches, args.method)
        scores = group_scores(result, chosen)
        step_times.append(time.perf_counter() - t0)
        return scores

    compiles = Compiles()
    jax.monitoring.register_event_duration_secs_listener(compiles)
    t0 = time.perf_counter()
    # A target the schedule cannot reach before its last step: every step runs, then the final search.
    with jax.default_matmul_precision("highest"):
        try:
            prune_to_ops(graph, score_fn, 0.02, final_ratio=0.3, steps=args.steps, selection=selection)
        except ValueError:
            pass   # "out of reach" after the last step: expected here
    schedule = time.perf_counter() - t0
    jax.monitoring.unregister_event_duration_listener(compiles)
    score_compiles = sum(name == "jit(stacked)" for name in compiles.events)   # the scorer's accumulation

    # one compiled score call, and one that traces and compiles (a new apply function every time)
    masked = mask_model(model, graph.groups, {})
    with jax.default_matmul_precision("highest"):
        compiled = []
        for _ in range(5):
            t = time.perf_counter()
            jax.block_until_ready(oba_jax.score_model(masked, batches, args.method).sum)
            compiled.append(time.perf_counter() - t)
        apply_fn, state = oba_jax.model_apply(masked)
        fresh = []
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(oba_jax.score(lambda s, x: apply_fn(s, x), state, batches, args.method).sum)
            fresh.append(time.perf_counter() - t)
    n = len(step_times)
    per_call, per_fresh = statistics.median(compiled), statistics.median(fresh)
    print(f"# jax {jax.__version__}, {jax.default_backend()}, model {args.model}, {args.batches} × batch {args.batch}, "
          f"method {args.method}")
    print("| quantity | value |")
    print("|---|---|")
    print(f"| schedule steps scored | {n} |")
    print(f"| compilations of the score program during the schedule | {score_compiles} |")
    print(f"| all compilations during the schedule (helpers included) | {len(compiles.events)} |")
    print(f"| schedule wall time | {schedule:.2f} s |")
    print(f"| {n} × one compiled score call | {n * per_call:.2f} s ({per_call:.3f} s each) |")
    print(f"| {n} × one score call that traces and compiles | {n * per_fresh:.2f} s ({per_fresh:.3f} s each) |")
    print(f"| schedule / {n} compiled calls | {schedule / (n * per_call):.2f} |")
    print(f"| schedule / {n} compiling calls | {schedule / (n * per_fresh):.3f} |")


if __name__ == "__main__":
    main()
