"""Per-parameter importance scores: OBA (one Hessian-vector product of the surrogate) and baselines.

`score(apply_fn, params, batches, method)` returns a `ScoreResult` whose `sum` has the structure of
`params` and holds the scores summed over batches (`count` of them). Methods:

* ``oba``: `θ ⊙ H̃θ` with H̃ OBA's Hessian (OBA_SPEC.md §2), v = θ on layer weights and biases only;
* ``fastoba``: `θ ⊙ Hθ` with the full Hessian of the loss over all parameters (not OBA);
* ``taylor``: `θ ⊙ ∂L/∂θ`;  ``magnitude``: `|θ|`;  ``random``: seeded uniform numbers.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from oba_jax import fastconv
from oba_jax.graph import Connectivity, _build, _check_param_leaves, analyse, leaf_paths, trace_program
from oba_jax.surrogate import evaluate, evaluate_with_tangent

__all__ = ["METHODS", "ScoreResult", "score", "softmax_cross_entropy"]

METHODS = ("oba", "fastoba", "taylor", "magnitude", "random")
_DATA_FREE = ("magnitude", "random")
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Batch-mean cross-entropy of integer labels (the loss the authors score with)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """Scores summed over `count` batches; `parts` (OBA only) are upward/downward/parallel sums."""

    sum: Any
    count: int
    method: str
    parts: dict[str, Any] | None = None
    graph: Connectivity | None = None

    def mean(self) -> Any:
        """Scores averaged over batches."""
        return jax.tree_util.tree_map(lambda s: s / self.count, self.sum)

    def by_path(self, which: str = "sum") -> dict[str, np.ndarray]:
        """`{leaf path: scores}` of `sum`, `mean` or one of the parts."""
        tree = self.mean() if which == "mean" else self.sum if which == "sum" else self.parts[which]
        return dict(zip(leaf_paths(tree), (np.asarray(x) for x in jax.tree_util.tree_leaves(tree))))


# ---------------------------------------------------------------------------------------------
# Batches


def _is_stacked(batches: Any) -> bool:
    return (isinstance(batches, tuple) and len(batches) == 2
            and hasattr(batches[1], "ndim") and batches[1].ndim == 2)


def _check_labels(labels: Any, num_classes: int) -> None:
    arr = np.asarray(labels)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels must be integer class indices, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (the model has {num_classes} outputs); "
                         f"got values from {arr.min()} to {arr.max()}")


def _mesh_sharding(batch_size: int, stacked: bool) -> NamedSharding | None:
    devices = jax.devices()
    if len(devices) == 1 or batch_size % len(devices):
        return None
    mesh = Mesh(np.asarray(devices), ("data",))
    return NamedSharding(mesh, PartitionSpec(None, "data") if stacked else PartitionSpec("data"))


# ---------------------------------------------------------------------------------------------
# Per-batch scores (pure functions of flat leaves)


@dataclasses.dataclass(frozen=True)
class _Setup:
    analysis: Any
    theta_idx: tuple[int, ...]
    float_idx: tuple[int, ...]
    loss: LossFn
    parts: bool
    first_order: bool
    deltas: tuple[float, float, float]


def _replace(flat: Sequence[Any], idx: Sequence[int], new: Sequence[Any]) -> list[Any]:
    full = list(flat)
    for i, x in zip(idx, new):
        full[i] = x
    return full


def _surrogate_loss(setup: _Setup, flat: Sequence[Any], x: Sequence[Any], labels: jax.Array,
                    theta: Sequence[Any], **evaluate_kwargs: Any) -> jax.Array:
    """`Σ sg(∂ℓ/∂z)·z̃(θ)`: the loss linearised at the logits of the surrogate network."""
    z = evaluate(setup.analysis, _replace(flat, setup.theta_idx, theta), x, **evaluate_kwargs)
    gz = jax.grad(setup.loss)(jax.lax.stop_gradient(z), labels)
    return jnp.sum(jax.lax.stop_gradient(gz) * z)


def _oba_total(setup: _Setup, flat: Sequence[Any], x: Sequence[Any], labels: jax.Array) -> dict[str, list]:
    """`θ ⊙ H̃θ` as the gradient of `⟨∇L̃(θ), sg(θ)⟩`, the tangent written out (reverse over forward)."""
    theta = [flat[i] for i in setup.theta_idx]

    def objectives(th, chain=False):
        """`⟨∇L̃, sg(θ)⟩` and the linearised loss `Σ sg(∂ℓ/∂z)·z` (whose gradient is g)."""
        z, tz = evaluate_with_tangent(setup.analysis, _replace(flat, setup.theta_idx, th), x, setup.theta_idx,
                                      chain=chain)
        gz = jax.lax.stop_gradient(jax.grad(setup.loss)(jax.lax.stop_gradient(z), labels))
        return jnp.sum(gz * tz), jnp.sum(gz * z)

    if not setup.first_order:
        # g is not needed: on a chain network the logits may lose their gradient (`oba_jax.chain`).
        hv = jax.grad(lambda th: objectives(th, chain=True)[0])(theta)
        return {"total": [t * h for t, h in zip(theta, hv)]}
    (directional, loss_lin), pullback = jax.vjp(objectives, theta)
    (hv,) = pullback((jnp.ones_like(directional), jnp.zeros_like(loss_lin)))
    (g,) = pullback((jnp.zeros_like(directional), jnp.ones_like(loss_lin)))
    # Removing θ_i is the step δθ_i = −θ_i: the first-order change of the loss is −θ_i·g_i.
    return {"total": [t * h - t * gi for t, h, gi in zip(theta, hv, g)]}


def _oba_batch(setup: _Setup, flat: Sequence[Any], x: Sequence[Any], labels: jax.Array) -> dict[str, list]:
    if not setup.parts and setup.deltas == (1.0, 1.0, 1.0):
        return _oba_total(setup, flat, x, labels)
    theta = [flat[i] for i in setup.theta_idx]
    grad_fn = jax.grad(lambda th: _surrogate_loss(setup, flat, x, labels, th))
    g, hv = jax.jvp(grad_fn, (theta,), (theta,))
    total = [t * h for t, h in zip(theta, hv)]
    out: dict[str, list] = {}
    has_parallel = bool(setup.analysis.parallel)
    if setup.parts or setup.deltas != (1.0, 1.0, 1.0):
        if has_parallel:
            series_grad = jax.grad(lambda th: _surrogate_loss(setup, flat, x, labels, th, linearise_parallel=True))
            _, hv_s = jax.jvp(series_grad, (theta,), (theta,))
            series = [t * h for t, h in zip(theta, hv_s)]
        else:
            series = total
        down = _downward(setup, flat, x, labels, theta)
        up = [s - d for s, d in zip(series, down)]
        par = [a - s for a, s in zip(total, series)]
        du, dd, dp = (d * d for d in setup.deltas)
        out.update(upward=[du * u for u in up], downward=[dd * d for d in down], parallel=[dp * p for p in par])
        total = [u + d + p for u, d, p in zip(out["upward"], out["downward"], out["parallel"])]
    if setup.first_order:
        # Removing θ_i is the step δθ_i = −θ_i: the first-order change of the loss is −θ_i·g_i.
        total = [s - t * gi for s, t, gi in zip(total, theta, g)]
    out["total"] = total
    return out


def _downward(setup: _Setup, flat: Sequence[Any], x: Sequence[Any], labels: jax.Array,
              theta: Sequence[Any]) -> list[Any]:
    """`W_l ⊙ (T_lᵀ g_l)`: the forward tangent T of each layer's input contracted with its output gradient."""
    analysis = setup.analysis

    def layer_inputs(th):
        rec: dict[str, list] = {}
        evaluate(analysis, _replace(flat, setup.theta_idx, th), x, record_inputs=rec, forward_mode=True)
        return rec

    _, tangents = jax.jvp(layer_inputs, (list(theta),), (list(theta),))
    weight_paths = {f["weight_index"]: path for path, f in analysis.layers.items()}
    probes = {path: jnp.zeros_like(flat[i]) for i, path in weight_paths.items()}

    def probed_loss(p):
        return _surrogate_loss(setup, flat, x, labels, theta, probes=p, probe_tangents=tangents)

    kernels = jax.grad(probed_loss)(probes)
    return [t * kernels[weight_paths[i]] if i in weight_paths else jnp.zeros_like(t)
            for i, t in zip(setup.theta_idx, theta)]


def _baseline_batch(method: str, setup: _Setup, loss_fn: Callable, flat: Sequence[Any],
                    x: Sequence[Any], labels: jax.Array) -> dict[str, list]:
    params = [flat[i] for i in setup.float_idx]
    f = lambda p: loss_fn(_replace(flat, setup.float_idx, p), x, labels)
    if method == "taylor":
        g = jax.grad(f)(params)
        return {"total": [p * gi for p, gi in zip(params, g)]}
    _, hv = jax.jvp(jax.grad(f), (params,), (params,))
    return {"total": [p * h for p, h in zip(params, hv)]}


# ---------------------------------------------------------------------------------------------
# Public entry point


def score(apply_fn: Callable[[Any, Any], jax.Array], params: Any, batches: Any, method: str = "oba", *,
          parts: bool = False, first_order: bool = False, loss: LossFn | None = None,
          upward_delta: float = 1.0, downward_delta: float = 1.0, parallel_delta: float = 1.0,
          precision: str = "highest", dtype: Any = None, seed: int = 0,
          exclude: Sequence[str] = ()) -> ScoreResult:
    """Per-parameter importance of `params` for `apply_fn(params, inputs) -> logits (batch, classes)`.

    `batches`: an iterable of `(inputs, labels)` or a pair `(inputs, labels)` stacked along a leading
    batch-count axis (labels of shape `(num_batches, batch)`). Scores are summed over batches inside jit;
    with several devices each batch is sharded across them. `parts=True` (OBA) also returns the upward,
    downward and parallel parts, each scaled by its delta squared. `first_order` adds the Taylor-correct
    first-order term `−θ·g`. `dtype=jnp.float64` scores in double precision (needs `jax_enable_x64`).
    `exclude` (OBA): leaf paths or prefixes of layer parameters to hold fixed (neither perturbed nor scored).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if dtype is not None:
        if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError("dtype=float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) "
                             "before creating arrays")
    leaves = _check_param_leaves(params)
    paths = leaf_paths(params)
    treedef = jax.tree_util.tree_structure(params)
    cast = _caster(dtype)
    leaves = [cast(x) for x in leaves]
    float_idx = tuple(i for i, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.inexact))

    if method in _DATA_FREE:
        total = _data_free(method, leaves, float_idx, seed)
        return ScoreResult(sum=jax.tree_util.tree_unflatten(treedef, total), count=1, method=method)

    stacked = _is_stacked(batches)
    (first_x, first_y), all_batches = _first_batch(batches, stacked)
    first_x = jax.tree_util.tree_map(cast, first_x)
    loss = loss or softmax_cross_entropy

    with jax.default_matmul_precision(precision):
        program = trace_program(apply_fn, jax.tree_util.tree_unflatten(treedef, leaves), first_x)
        _check_output(program.out_shape, first_y)
        analysis = analyse(program, paths, exclude) if method == "oba" else None
        graph = _build(analysis) if analysis is not None else None
        theta_idx = tuple(sorted(analysis.theta)) if analysis is not None else float_idx
        setup = _Setup(analysis=analysis, theta_idx=theta_idx, float_idx=float_idx, loss=loss,
                       parts=parts and method == "oba", first_order=first_order,
                       deltas=(float(upward_delta), float(downward_delta), float(parallel_delta)))
        batch_fn = _batch_function(method, setup, program)
        num_classes = program.out_shape[-1]
        sums, count = _accumulate(batch_fn, leaves, batches if stacked else all_batches, stacked,
                                  num_classes, cast)

    idx = setup.theta_idx
    trees = {}
    for name, part in sums.items():
        full = [jnp.zeros_like(x) for x in leaves]
        for i, s in zip(idx, part):
            full[i] = s
        _check_finite(name, [paths[i] for i in idx], part)
        trees[name] = jax.tree_util.tree_unflatten(treedef, full)
    part_trees = {k: v for k, v in trees.items() if k != "total"} or None
    return ScoreResult(sum=trees["total"], count=count, method=method, parts=part_trees, graph=graph)


def _caster(dtype: Any) -> Callable[[Any], jax.Array]:
    def cast(x):
        x = jnp.asarray(x)
        if dtype is not None and jnp.issubdtype(x.dtype, jnp.inexact):
            return x.astype(dtype)
        return x
    return cast


def _data_free(method: str, leaves: list[jax.Array], float_idx: tuple[int, ...], seed: int) -> list[jax.Array]:
    out = [jnp.zeros_like(x) for x in leaves]
    keys = jax.random.split(jax.random.PRNGKey(seed), max(len(leaves), 1))
    for i in float_idx:
        x = leaves[i]
        out[i] = jnp.abs(x) if method == "magnitude" else jax.random.uniform(keys[i], x.shape, x.dtype)
    return out


def _first_batch(batches: Any, stacked: bool) -> tuple[tuple[Any, Any], Iterable[tuple[Any, Any]]]:
    """The first batch (to trace the program with) and an iterable over all batches."""
    if stacked:
        xs, ys = batches
        if ys.shape[0] == 0:
            raise ValueError("no batches to score: the stacked labels have a leading axis of size 0")
        return (jax.tree_util.tree_map(lambda a: a[0], xs), ys[0]), ()
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("no batches to score: the batch iterable is empty") from None
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise TypeError("each batch must be a pair (inputs, labels)")
    return tuple(first), itertools.chain([first], it)


def _check_output(out_shape: tuple[int, ...], labels: Any) -> None:
    labels = np.asarray(labels)
    if len(out_shape) != 2 or labels.ndim != 1 or out_shape[0] != labels.shape[0]:
        raise ValueError(f"apply_fn must return logits of shape (batch, classes) = ({labels.shape[0] if labels.ndim else '?'}, C); "
                         f"it returned shape {out_shape} for labels of shape {labels.shape}")


def _check_finite(part: str, paths: Sequence[str], values: Sequence[jax.Array]) -> None:
    bad = [p for p, v in zip(paths, values) if not bool(jnp.all(jnp.isfinite(v)))]
    if bad:
        raise FloatingPointError(f"non-finite {part} scores (NaN or inf) in {bad}: check the parameters and "
                                 "inputs for NaN/inf, or score in float64 (dtype=jnp.float64)")


def _batch_function(method: str, setup: _Setup, program: Any) -> Callable:
    if method == "oba":
        return lambda flat, x, y: _oba_batch(setup, flat, x, y)

    # The traced program replayed as it is: baselines differentiate the real network (on CPU with
    # the fast conv, the same function with faster kernel gradients, as OBA's surrogate uses).
    replay = fastconv.eval_jaxpr if fastconv.use_fast_conv() else jax.core.eval_jaxpr

    def loss_fn(flat, x, y):
        logits = replay(program.closed.jaxpr, program.closed.consts, *flat, *x)[0]
        return setup.loss(logits, y)
    return lambda flat, x, y: _baseline_batch(method, setup, loss_fn, flat, x, y)


def _accumulate(batch_fn: Callable, leaves: list[jax.Array], batches: Any, stacked: bool,
                num_classes: int, cast: Callable) -> tuple[dict[str, list], int]:
    """Sum per-batch scores inside jit: `lax.scan` over stacked batches, a jitted add otherwise."""
    def flat_x(x):
        return [cast(a) for a in jax.tree_util.tree_leaves(x)]

    options = fastconv.cpu_compiler_options()

    if stacked:
        xs, ys = batches
        _check_labels(ys, num_classes)
        xs_flat = flat_x(xs)
        sharding = _mesh_sharding(int(ys.shape[1]), stacked=True)
        if sharding is not None:
            xs_flat = [jax.device_put(a, sharding) for a in xs_flat]
            ys = jax.device_put(jnp.asarray(ys), sharding)

        @functools.partial(jax.jit, compiler_options=options)
        def run(flat, xs_flat, ys):
            def body(acc, batch):
                x, y = batch
                out = batch_fn(flat, x, y)
                return jax.tree_util.tree_map(jnp.add, acc, out), None
            x0 = [a[0] for a in xs_flat]
            zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(batch_fn, flat, x0, ys[0]))
            acc, _ = jax.lax.scan(body, zeros, (xs_flat, jnp.asarray(ys)))
            return acc
        return run(leaves, xs_flat, ys), int(ys.shape[0])

    step_first = jax.jit(lambda flat, x, y: batch_fn(flat, x, y), compiler_options=options)
    step_add = jax.jit(lambda acc, flat, x, y: jax.tree_util.tree_map(jnp.add, acc, batch_fn(flat, x, y)),
                       donate_argnums=0, compiler_options=options)
    acc, count = None, 0
    for x, y in batches:
        _check_labels(y, num_classes)
        xf = flat_x(x)
        y = jnp.asarray(y)
        sharding = _mesh_sharding(int(y.shape[0]), stacked=False)
        if sharding is not None:
            xf = [jax.device_put(a, sharding) for a in xf]
            y = jax.device_put(y, sharding)
        acc = step_first(leaves, xf, y) if acc is None else step_add(acc, leaves, xf, y)
        count += 1
    return acc, count
