"""The released PyTorch OBA and oba-jax timed side by side, in one process, in alternating rounds.

    pip install -e '.[compare]'                   # torch (CPU wheel is enough) and what the authors' code imports
    git clone https://github.com/NEU-REAL/OBA /path/to/OBA
    python bench/authors_speed.py --authors-dir /path/to/OBA [--models vgg19,resnet32] [--repeats 3]

For each model (VGG19 at batch 64, the wide ResNet-32 64/128/256 at batch 128; random CIFAR-sized inputs,
BatchNorm in train mode as both scorers use it) four rows are timed, each once per round, rounds repeated:

  torch fwd+bwd  the authors' model (their `get_network`): cross-entropy forward and `loss.backward()`
  authors OBA    one scoring batch exactly as their `WrappedPruner` runs it for importance_type="OBA":
                 forward, `OBAPruner.obtain_importance(loss)` (their θ·g and Hessian terms), `loss.backward()`,
                 and the hook buffers deleted
  jax grad       `jax.jit(jax.grad(cross-entropy))` of the zoo's model of the same architecture
  oba-jax OBA    `score(..., "oba")`'s compiled per-batch function (as `bench/score_speed.py` times it)

Printed: each row's median seconds, and as medians of per-round ratios: authors OBA / oba-jax OBA, torch
fwd+bwd / jax grad, and each library's OBA over its own gradient. Only ratios from one such run compare the
two implementations: never divide figures taken at different times or on different machines.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/ (score_speed)

import jax  # noqa: E402

import score_speed  # noqa: E402

# model name -> (the authors' get_network arguments, our score_speed model, batch)
MODELS = {"vgg19": (("vgg", 19), "vgg19", 64), "resnet32": (("resnet", 32), "resnet32", 128)}


def _import_authors(authors_dir: str):
    """The authors' `torch_pruning` fork and model constructor, imported from their checkout."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit("torch is not installed: pip install -e '.[compare]' (the CPU wheel is enough)") from None
    if not os.path.isfile(os.path.join(authors_dir, "torch_pruning", "pruner", "algorithms", "oba_pruner.py")):
        raise SystemExit(f"--authors-dir {authors_dir!r} is not a checkout of https://github.com/NEU-REAL/OBA "
                         "(no torch_pruning/pruner/algorithms/oba_pruner.py)")
    sys.path.insert(0, os.path.abspath(authors_dir))
    try:
        import torch_pruning as tp
        from torch_pruning.pruner.kfac_utils.network_utils import get_network
    except ImportError as e:
        raise SystemExit(f"the authors' code needs a module that is not installed: {e}; "
                         "pip install -e '.[compare]'") from None
    return tp, get_network


def authors_rows(tp, get_network, network: tuple[str, int], batch: int) -> dict[str, Callable[[], None]]:
    """`{row: fn}`: one call of fn is one timed run (their forward+backward, their OBA scoring batch)."""
    import torch
    torch.manual_seed(0)
    model = get_network(network=network[0], depth=network[1], dataset="cifar10")
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 10]
    imp = tp.oba_importance.HessianImportance(normalizer="max", multivariable=True)
    # the arguments of their WrappedPruner for importance_type="OBA" with train_prune.py's defaults
    # example inputs of the scoring batch size, as train_prune.py passes them (their graph records shapes)
    pruner = tp.pruner.OBAPruner(model, x, global_pruning=True, importance=imp, iterative_steps=1,
                                 pruning_ratio=0.5, pruning_ratio_dict={}, max_pruning_ratio=0.95,
                                 ignored_layers=ignored, unwrapped_parameters=[], delta=0.0, upward_delta=1.0,
                                 downward_delta=1.0, parallel_delta=1.0, self_unit_weight=1.0, other_unit_weight=1.0)
    pruner.register_hooks()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    cross_entropy = torch.nn.CrossEntropyLoss()
    model.train()

    def clear_buffers():
        for module in model.modules():
            for name in ("X", "Y", "grad_input", "grad_output"):
                if hasattr(module, name):
                    delattr(module, name)

    def forward_backward():
        optimizer.zero_grad()
        cross_entropy(model(x), y).backward()
        clear_buffers()

    def oba_batch():
        loss = cross_entropy(model(x), y)
        optimizer.zero_grad()
        pruner.obtain_importance(loss)
        loss.backward()
        clear_buffers()

    return {"torch fwd+bwd": forward_backward, "authors OBA": oba_batch}


def _time(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(name: str, tp, get_network, repeats: int) -> dict[str, list[float]]:
    network, ours, batch = MODELS[name]
    make_spec = score_speed.MODELS[ours][0]
    compiled = score_speed.compile_rows(make_spec, batch, ("grad", "oba"))
    rows: dict[str, Callable[[], None]] = authors_rows(tp, get_network, network, batch)
    rows["jax grad"] = lambda: score_speed.timed(compiled["grad"])
    rows["oba-jax OBA"] = lambda: score_speed.timed(compiled["oba"])
    for fn in list(rows.values())[:2]:
        fn()   # warm-up of the torch rows (the jax rows ran once when compiled)
    times: dict[str, list[float]] = {row: [] for row in rows}
    for k in range(repeats):
        for row, fn in rows.items():
            times[row].append(_time(fn))
        print(f"  [{name} b{batch}] round {k + 1}/{repeats}: "
              + ", ".join(f"{row} {times[row][-1]:.2f} s" for row in rows), file=sys.stderr, flush=True)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def report(name: str, batch: int, times: dict[str, list[float]]) -> list[str]:
    med = {row: statistics.median(t) for row, t in times.items()}
    return [f"| {name}, {batch} | {med['torch fwd+bwd']:.2f} | {med['authors OBA']:.2f} | {med['jax grad']:.2f} | "
            f"{med['oba-jax OBA']:.2f} | **{ratio(times, 'authors OBA', 'oba-jax OBA'):.1f}×** | "
            f"{ratio(times, 'torch fwd+bwd', 'jax grad'):.2f} | {ratio(times, 'authors OBA', 'torch fwd+bwd'):.1f} | "
            f"{ratio(times, 'oba-jax OBA', 'jax grad'):.2f} |"]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--authors-dir", required=True, help="a checkout of https://github.com/NEU-REAL/OBA")
    ap.add_argument("--models", default="vgg19,resnet32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names or args.repeats < 1:
        ap.error(f"--models: choose from {sorted(MODELS)} (got {args.models!r}); --repeats must be >= 1")
    tp, get_network = _import_authors(args.authors_dir)
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    lines = [f"{platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} "
             f"threads), jax {jax.__version__} ({jax.devices()[0].platform}); {args.repeats} alternating rounds", "",
             "| model, batch | torch fwd+bwd s | authors OBA s | jax grad s | oba-jax OBA s | authors OBA / oba-jax OBA "
             "| torch fwd+bwd / jax grad | authors OBA / their fwd+bwd | oba-jax OBA / jax grad |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        lines += report(name, MODELS[name][2], bench(name, tp, get_network, args.repeats))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
