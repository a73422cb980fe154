"""`score` and `scorer`: per-parameter importance with programs that compile once.

A `Scorer` is built for one apply function, one parameter structure (shapes, dtypes), a method and its
options. It traces and analyses the program once per batch shape and keeps its jitted functions, so
calling it again with new parameter *values* (they are arguments of the compiled programs, never
constants) runs the compiled programs without tracing: the form a pruning schedule or a research
loop uses. `score` is a scorer looked up in a small cache (by apply function identity, structure,
shapes, method and options) and called once.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oba_jax import fastconv
from oba_jax.graph import Analysis, Connectivity, analyse
from oba_jax.losses import softmax_cross_entropy
from oba_jax.paths import leaf_paths
from oba_jax.program import Program, check_param_leaves, trace_program
from oba_jax.scores.baselines import data_free_scores
from oba_jax.scores.importance import Method, MethodContext, get_method
from oba_jax.sharding import scoring_sharding

__all__ = ["ScoreResult", "Scorer", "score", "scorer"]

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
CACHE_SIZE = 16


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
    """A pair `(inputs, labels)` or triple `(inputs, labels, weights)` stacked along a leading batch-count
    axis (labels of ndim ≥ 2), as opposed to an iterable of batches (whose items are tuples, not arrays)."""
    return (isinstance(batches, tuple) and len(batches) in (2, 3)
            and hasattr(batches[1], "ndim") and batches[1].ndim >= 2)


def _first_batch(batches: Any) -> tuple[Any, Any]:
    """`(inputs of one batch, all batches)`; iterables are re-chained after the peek."""
    if _is_stacked(batches):
        xs, ys = batches[0], batches[1]
        if ys.shape[0] == 0:
            raise ValueError("no batches to score: the stacked labels have a leading axis of size 0")
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs), batches
    if batches is None:
        raise ValueError("this method needs data: pass batches of (inputs, labels)")
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("no batches to score: the batch iterable is empty") from None
    _check_batch(first, 0)
    return _abstract(first[0]), itertools.chain([first], it)


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


def _check_batch(batch: Any, i: int) -> None:
    if not (isinstance(batch, (tuple, list)) and len(batch) in (2, 3)):
        raise TypeError(f"each batch must be a pair (inputs, labels) or a triple (inputs, labels, weights); "
                        f"batch {i} is a {type(batch).__name__}"
                        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def _targets(labels: Any, weights: Any, num_classes: int, where: str, stacked: bool = False) -> tuple:
    """The loss's arguments after the logits (a batch's *targets*, which methods pass through to the loss
    unopened), checked: `(labels,)` or `(labels, weights)`. Labels are
    integer classes in `[0, classes)` wherever their weight is positive; weights are finite, ≥ 0, of the
    labels' shape, with a positive sum in every batch."""
    arr = np.asarray(labels)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels must be integer class indices, got dtype {arr.dtype} ({where})")
    if weights is None:
        used = arr
    else:
        w = np.asarray(weights)
        if w.shape != arr.shape:
            raise ValueError(f"weights must have the labels' shape {arr.shape}; got {w.shape} ({where})")
        if not (np.issubdtype(w.dtype, np.number) or w.dtype == bool) or np.iscomplexobj(w):
            raise TypeError(f"weights must be real numbers (e.g. a 0/1 padding mask), got dtype {w.dtype} ({where})")
        if not np.all(np.isfinite(w)) or (w.size and w.min() < 0):
            raise ValueError(f"weights must be finite and ≥ 0; got values from {w.min()} to {w.max()} ({where})")
        totals = w.reshape(w.shape[0], -1).sum(axis=1) if stacked else np.asarray([w.sum()])
        if np.any(totals <= 0):
            which = f"batch {int(np.argmin(totals))} of the stack" if stacked else "the batch"
            raise ValueError(f"weights sum to 0 in {which}: it has no label to score ({where})")
        used = arr[w > 0]
    if used.size and (used.min() < 0 or used.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (the model has {num_classes} outputs)"
                         + ("" if weights is None else " wherever their weight is positive")
                         + f"; got values from {used.min()} to {used.max()} ({where})")
    if weights is None:
        return (jnp.asarray(labels),)
    w = jnp.asarray(weights)
    return jnp.asarray(labels), (w if jnp.issubdtype(w.dtype, jnp.floating) else w.astype(jnp.float32))


def _check_output(out_shape: tuple[int, ...], labels_shape: tuple[int, ...], where: str) -> None:
    """Logits `(..., classes)` for integer labels of the leading shape `(...)`: `(batch, classes)` for a
    classifier, `(batch, tokens, vocab)` for a language model (the loss is the mean over every label)."""
    if len(labels_shape) < 1 or tuple(out_shape[:-1]) != tuple(labels_shape):
        shown = ", ".join(str(d) for d in labels_shape) if labels_shape else "batch"
        raise ValueError(f"apply_fn must return logits of shape (..., classes) = ({shown}, C): the labels' shape "
                         f"and the classes; it returned shape {out_shape} for labels of shape {labels_shape} ({where})")
    if labels_shape[0] == 0:
        raise ValueError(f"empty batch: labels of shape {labels_shape} ({where})")


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(np.shape(a)), str(jnp.result_type(a))) for a in leaves)


# ---------------------------------------------------------------------------------------------
# The compiled programs of one batch shape


@dataclasses.dataclass(frozen=True)
class _Programs:
    program: Program
    analysis: Analysis | None
    scored: tuple[int, ...]
    batch_fn: Callable           # (flat params, flat inputs, targets) -> {part: [scores]}, inputs cast
    stacked: Callable            # (flat, xs, ys) -> sums over stacked batches, one lax.scan
    first: Callable              # (flat, x, y) -> sums of one batch
    add: Callable                # (acc, flat, x, y) -> acc + sums of one batch (acc donated)



def _cast_inputs(batch_fn: Callable, cast: Callable) -> Callable:
    def fn(flat, x, y):
        return batch_fn([cast(a) for a in flat], [cast(a) for a in x], y)
    return fn


def _compile(fn: Callable) -> tuple[Callable, Callable, Callable]:
    """The jitted accumulations over batches (on CPU with XLA's memory-optimising scheduler)."""
    options = fastconv.cpu_compiler_options()

    @functools.partial(jax.jit, compiler_options=options)
    def stacked(flat, xs_flat, ys):
        def body(acc, batch):
            x, y = batch
            out = fn(flat, x, y)
            return jax.tree_util.tree_map(jnp.add, acc, out), None
        x0 = [a[0] for a in xs_flat]
        y0 = jax.tree_util.tree_map(lambda a: a[0], ys)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(fn, flat, x0, y0))
        acc, _ = jax.lax.scan(body, zeros, (xs_flat, ys))
        return acc

    first = jax.jit(lambda flat, x, y: fn(flat, x, y), compiler_options=options)
    add = jax.jit(lambda acc, flat, x, y: jax.tree_util.tree_map(jnp.add, acc, fn(flat, x, y)),
                  donate_argnums=0, compiler_options=options)
    return stacked, first, add


def _caster(dtype: Any) -> Callable[[Any], Any]:
    if dtype is None:
        return lambda x: x
    return lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x


# ---------------------------------------------------------------------------------------------
# Scorer


class Scorer:
    """`scorer(params, batches) -> ScoreResult`, compiled once per batch shape (see the module docstring).

    `batches`: a pair `(inputs, labels)` stacked along a leading batch-count axis (labels of shape
    `(num_batches, batch, ...)`; summed with `lax.scan` inside one program) or any iterable of
    `(inputs, labels)` (one compiled step per batch); either may carry label weights as a third member
    (see `score`). Data-free methods take `batches=None`.
    """

    def __init__(self, apply_fn: Callable[[Any, Any], jax.Array], params: Any, example_inputs: Any,
                 method: str = "oba", *, loss: LossFn | None = None, precision: str = "highest",
                 dtype: Any = None, **options: Any):
        self.method: Method = get_method(method)
        self.options = self.method.resolve(options)
        if dtype is not None and jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError("dtype=float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) "
                             "before creating arrays")
        leaves = check_param_leaves(params)
        self.apply_fn = apply_fn
        self.loss = loss or softmax_cross_entropy
        self.precision = precision
        self.dtype = dtype
        self._cast = _caster(dtype)
        self._treedef = jax.tree_util.tree_structure(params)
        self.paths = leaf_paths(params)
        self._avals = tuple(jax.ShapeDtypeStruct(np.shape(x), self._dtype_of(x)) for x in leaves)
        self.float_idx = tuple(i for i, a in enumerate(self._avals) if jnp.issubdtype(a.dtype, jnp.inexact))
        self._programs: dict[tuple, _Programs] = {}
        self._finish_fns: dict[tuple[int, ...], Callable] = {}
        self._data_free: Callable | None = None
        self.graph: Connectivity | None = None
        if self.method.needs_data:   # trace and analyse now: errors in the model surface here
            analysis = self._programs_for(_abstract(example_inputs)).analysis
            self.graph = None if analysis is None else analysis.graph

    def _dtype_of(self, x: Any) -> Any:
        dtype = jnp.result_type(x)
        return jnp.dtype(self.dtype) if self.dtype is not None and jnp.issubdtype(dtype, jnp.inexact) else dtype

    # -- building ----------------------------------------------------------------------------
    def _programs_for(self, inputs: Any) -> _Programs:
        # The conv implementation is chosen while tracing (`OBA_JAX_FAST_CONV` may change between calls).
        key = (_signature(inputs), fastconv.use_fast_conv())
        if key not in self._programs:
            self._programs[key] = self._build(inputs)
        return self._programs[key]

    def _build(self, inputs: Any) -> _Programs:
        cast_inputs = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, self._dtype_of(a)), inputs)
        params = jax.tree_util.tree_unflatten(self._treedef, list(self._avals))
        with jax.default_matmul_precision(self.precision):
            program = trace_program(self.apply_fn, params, cast_inputs)
            analysis = analyse(program, self.options["exclude"]) if self.method.needs_analysis else None
        loss = self.loss
        ctx = MethodContext(program=program, analysis=analysis, float_idx=self.float_idx,
                            loss=lambda logits, targets: loss(logits, *targets), options=self.options)
        batch_fn = _cast_inputs(self.method.build(ctx), self._cast)
        return _Programs(program, analysis, self.method.scored(ctx), batch_fn, *_compile(batch_fn))

    def _finish(self, scored: tuple[int, ...]) -> Callable:
        """Jitted: the summed scores of the scored leaves → full lists (zeros elsewhere) + finiteness."""
        if scored not in self._finish_fns:
            avals = self._avals

            def finish(sums):
                full, finite = {}, {}
                for name, part in sums.items():
                    out = [jnp.zeros(a.shape, a.dtype) for a in avals]
                    for i, s in zip(scored, part):
                        out[i] = s
                    full[name] = out
                    finite[name] = jnp.stack([jnp.all(jnp.isfinite(s)) for s in part]) if part else jnp.ones(0, bool)
                return full, finite
            self._finish_fns[scored] = jax.jit(finish)
        return self._finish_fns[scored]

    # -- calling -----------------------------------------------------------------------------
    def _check_params(self, params: Any) -> list[Any]:
        leaves = check_param_leaves(params)
        treedef = jax.tree_util.tree_structure(params)
        if treedef != self._treedef:
            raise ValueError(f"params have another structure than the scorer was built for: "
                             f"{len(leaves)} leaves {list(leaf_paths(params))[:4]}… against {len(self.paths)} leaves "
                             f"{list(self.paths)[:4]}…; build a new scorer for this model")
        for path, x, a in zip(self.paths, leaves, self._avals):
            if tuple(np.shape(x)) != a.shape or self._dtype_of(x) != a.dtype:
                raise ValueError(f"parameter {path!r} has shape {tuple(np.shape(x))} and dtype {jnp.result_type(x)}; "
                                 f"the scorer was built for {a.shape} {a.dtype}: build a new scorer for this model")
        return leaves

    def __call__(self, params: Any, batches: Any = None) -> ScoreResult:
        leaves = self._check_params(params)
        with jax.default_matmul_precision(self.precision):
            if not self.method.needs_data:
                sums, count, scored, graph = self._data_free_sums(leaves), 1, self.float_idx, None
            elif _is_stacked(batches):
                sums, count, scored, graph = self._stacked(leaves, batches)
            else:
                sums, count, scored, graph = self._iterated(leaves, batches)
            full, finite = self._finish(scored)(sums)
        finite = jax.device_get(finite)
        for name, flags in finite.items():
            bad = [self.paths[i] for i, ok in zip(scored, flags) if not ok]
            if bad:
                raise FloatingPointError(f"non-finite {name} scores (NaN or inf) in {bad}: check the parameters and "
                                         "inputs for NaN/inf, or score in float64 (dtype=jnp.float64)")
        trees = {name: jax.tree_util.tree_unflatten(self._treedef, part) for name, part in full.items()}
        parts = {k: v for k, v in trees.items() if k != "total"} or None
        return ScoreResult(sum=trees["total"], count=count, method=self.method.name, parts=parts, graph=graph)

    def _data_free_sums(self, leaves: list[Any]) -> dict[str, list]:
        if self._data_free is None:
            name, seed, idx, cast = self.method.name, self.options.get("seed", 0), self.float_idx, self._cast
            self._data_free = jax.jit(lambda flat: {"total": [
                data_free_scores(name, [cast(a) for a in flat], idx, seed)[i] for i in idx]})
        return self._data_free(leaves)

    def _stacked(self, leaves: list[Any], batches: tuple[Any, ...]):
        xs, ys, ws = (*batches, None)[:3]
        if ys.shape[0] == 0:
            raise ValueError("no batches to score: the stacked labels have a leading axis of size 0")
        counts = {np.shape(a)[0] for a in jax.tree_util.tree_leaves(xs)}
        if counts != {ys.shape[0]}:
            raise ValueError(f"stacked batches: the inputs hold {sorted(counts)} batches but the labels "
                             f"{ys.shape[0]} (leading axes must agree)")
        programs = self._programs_for(jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), xs))
        num_classes = programs.program.out_shape[-1]
        _check_output(programs.program.out_shape, tuple(ys.shape[1:]), "every stacked batch")
        targets = _targets(ys, ws, num_classes, "stacked batches", stacked=True)
        xs_flat = jax.tree_util.tree_leaves(xs)
        sharding = scoring_sharding(int(ys.shape[1]), stacked=True)
        if sharding is not None:
            xs_flat = [jax.device_put(a, sharding) for a in xs_flat]
            targets = jax.device_put(targets, sharding)
        graph = programs.analysis.graph if programs.analysis is not None else None
        return programs.stacked(leaves, xs_flat, targets), int(ys.shape[0]), programs.scored, graph

    def _iterated(self, leaves: list[Any], batches: Iterable[tuple[Any, Any]]):
        if batches is None:
            raise ValueError(f"method {self.method.name!r} needs data: pass batches of (inputs, labels)")
        acc, count, programs, first = None, 0, None, None
        for i, batch in enumerate(batches):
            _check_batch(batch, i)
            x, y, w = (*batch, None)[:3]
            shapes = [tuple(np.shape(a)) for a in jax.tree_util.tree_leaves(x)]
            try:
                programs = self._programs_for(_abstract(x))
            except (TypeError, ValueError) as e:
                if first is None:
                    raise
                raise ValueError(f"batch {i}: inputs of shape {shapes} do not go through the model (batch 0 had "
                                 f"{first}): {type(e).__name__}: {str(e).splitlines()[0]}") from None
            first = shapes if first is None else first
            _check_output(programs.program.out_shape, tuple(np.shape(y)), f"batch {i}")
            targets = _targets(y, w, programs.program.out_shape[-1], f"batch {i}")
            xf = jax.tree_util.tree_leaves(x)
            sharding = scoring_sharding(int(np.shape(y)[0]), stacked=False)
            if sharding is not None:
                xf = [jax.device_put(a, sharding) for a in xf]
                targets = jax.device_put(targets, sharding)
            acc = programs.first(leaves, xf, targets) if acc is None else programs.add(acc, leaves, xf, targets)
            count += 1
        if acc is None:
            raise ValueError("no batches to score: the batch iterable is empty")
        graph = programs.analysis.graph if programs.analysis is not None else None
        return acc, count, programs.scored, graph

    def per_batch(self, example_inputs: Any) -> Callable:
        """The jitted per-batch function `(flat params, flat inputs, (labels,)) -> {part: [scores]}` exactly as
        this scorer runs it inside its accumulation (for benchmarks: `.lower(...)`, cost analysis)."""
        return jax.jit(self._programs_for(_abstract(example_inputs)).batch_fn,
                       compiler_options=fastconv.cpu_compiler_options())


def scorer(apply_fn: Callable[[Any, Any], jax.Array], params: Any, example_inputs: Any = None,
           method: str = "oba", **options: Any) -> Scorer:
    """A `Scorer` for `apply_fn(params, inputs) -> logits (..., classes)`: call it with `(params, batches)`.

    `example_inputs` (one batch of inputs, arrays or `jax.ShapeDtypeStruct`s) fixes the shapes the
    program is traced and analysed for first; other batch shapes get their own compiled programs.
    Options: `loss`, `precision`, `dtype` and the method's own (see `oba_jax.IMPORTANCE`).
    """
    if example_inputs is None and get_method(method).needs_data:
        raise ValueError(f"method {method!r} needs example_inputs (one batch of inputs) to trace the model")
    return Scorer(apply_fn, params, example_inputs, method, **options)


_CACHE: collections.OrderedDict[tuple, Scorer] = collections.OrderedDict()


def score(apply_fn: Callable[[Any, Any], jax.Array], params: Any, batches: Any, method: str = "oba", *,
          loss: LossFn | None = None, precision: str = "highest", dtype: Any = None, **options: Any) -> ScoreResult:
    """Per-parameter importance of `params` for `apply_fn(params, inputs) -> logits (..., classes)`.

    `batches`: an iterable of `(inputs, labels)` or a pair `(inputs, labels)` stacked along a leading
    batch-count axis (labels of shape `(num_batches, batch, ...)`). Labels are integer classes of the
    logits' leading shape: `(batch,)` for a classifier, `(batch, tokens)` for a language model; the default
    loss is the mean cross-entropy over all of them. A third member, `weights` of the labels' shape (≥ 0,
    e.g. a 0/1 padding mask), makes it the weighted mean `Σ w·nll / Σ w`; labels of weight 0 are never
    read (padding may be -100). A custom `loss` is called as `loss(logits, labels)` or
    `loss(logits, labels, weights)`. Scores are summed over batches inside jit;
    with several devices each batch is sharded across them. `dtype=jnp.float64` scores in double
    precision (needs `jax_enable_x64`). Method options (OBA: `parts`, `first_order`, the deltas,
    `exclude`; random: `seed`) are checked against the method.

    A second call with the same `apply_fn` (the same function object), parameter structure and shapes,
    batch shapes, method and options reuses the compiled programs (a cache of the last 16 scorers): as
    with `jax.jit`, an `apply_fn` must not close over values that change between calls.
    """
    entry = get_method(method)
    resolved = entry.resolve(options)
    leaves = check_param_leaves(params)
    example, batches = _first_batch(batches) if entry.needs_data else (None, None)
    key = (apply_fn, jax.tree_util.tree_structure(params),
           tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves),
           None if example is None else _signature(example), method, loss, precision,
           None if dtype is None else jnp.dtype(dtype).name, tuple(sorted(resolved.items())))
    found = _CACHE.pop(key, None)
    if found is None:
        found = Scorer(apply_fn, params, example, method, loss=loss, precision=precision, dtype=dtype, **options)
    _CACHE[key] = found
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return found(params, batches)
