"""Pass 1 of the analysis: which equations are parameter layers, found by dataflow.

Every value of the program gets one abstract fact (a rule set on `oba_jax.program.run`):

* `Const`   — depends on neither the parameters nor the inputs (kept with a way to compute it);
* `View`    — a *linear view* of one parameter leaf: the leaf moved, sliced, indexed, flipped, cast,
  reshaped, broadcast or multiplied by a constant (a mask), so its entries are entries of the leaf;
* `Stacked` — views of leaves stacked / concatenated (`jnp.stack` of per-layer weights): slicing or
  indexing one segment gives that segment's view back;
* `Mixed`   — derived from parameters only, but not a view of one leaf (`exp(W)`, `A @ B`, `W1 + W2`);
* `Act`     — depends on the inputs; it remembers which layer outputs it still carries channel by
  channel (through reshapes, transposes, casts and adds), so that a view added to it later is found
  as that layer's bias (`x @ W + b`, `(x @ W).reshape(...) + b`, `h + x @ W1 + y @ W2 + b`).

A *parameter layer* is a `dot_general` / `conv_general_dilated` of an `Act` and a `View`: its weights
are exactly the entries of the leaf the view reads (`Layer.index` says which, when not all of them).
A layer operand that is `Stacked` or `Mixed` is a clear error (nothing dropped silently); every other
parameter leaf is recorded with the reason it is not scored. A `lax.scan` whose body holds layers is
unrolled (per-iteration slices of a stacked leaf are per-iteration layers); a layer inside
`lax.while_loop`, a data-dependent `lax.cond` / `lax.switch` or any other construct with a body is a
clear error naming the construct.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from types import MappingProxyType
from typing import Any, Mapping, Union

import numpy as np
from jax import lax

from oba_jax.program import Equation, EqnKey, Program, bind, call_kind, open_jaxpr, run, sub_programs
from oba_jax.program.primitives import (IDENTITY_LIKE, LAYER_PRODUCTS, SHAPE_OPS, UNARY_VIEWS, is_float, moved_axes,
                                       product_axes, reshape_groups)

__all__ = ["Layer", "LayerUse", "FoundLayers", "find_layers"]

# Per leaf axis: a fixed index, or the (start, stop, step) range read.
Region = tuple[Union[int, tuple[int, int, int]], ...]
Step = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Layer:
    """A Conv/Dense parameter layer: `Y = W ⊛ X (+ b)`.

    `in_axes` / `out_axes` are axes of the weight leaf that read input channels / make output
    channels (None when the weight reaches the product through a reshape that cannot be mapped).
    `index` is the part of the leaf the layer reads when it is not all of it (one slice of a stacked
    or fused leaf): per leaf axis a fixed index or a `(start, stop, step)` range; `bias_index` the same
    for the bias leaf.
    """

    name: str
    weight: str
    bias: str | None
    kind: str                        # "dense" | "conv"
    in_axes: tuple[int, ...] | None
    out_axes: tuple[int, ...] | None
    feature_group_count: int = 1
    index: Region | None = None
    bias_index: Region | None = None


@dataclasses.dataclass(frozen=True)
class LayerUse:
    """One product equation of a layer: which operand is the weight and how it is read from the leaf
    (`steps` re-apply that view to another array of the leaf's shape; None if it cannot be)."""

    layer: str
    weight_leaf: int
    weight_position: int
    steps: tuple[Step, ...] | None


@dataclasses.dataclass(frozen=True)
class FoundLayers:
    """The result of pass 1."""

    layers: tuple[Layer, ...]
    weight_leaves: Mapping[str, int]             # layer name -> leaf index of its weight
    bias_leaves: Mapping[str, int]               # layer name -> leaf index of its bias
    uses: Mapping[EqnKey, LayerUse]              # layer product equations
    bias_adds: Mapping[EqnKey, str]              # bias add equation -> layer name
    view_eqns: frozenset[EqnKey]                 # equations whose output is a view of a parameter leaf
    unrolled: frozenset[EqnKey]                  # scans unrolled because their bodies hold layers
    unscored: Mapping[int, str]                  # leaf index -> why it is not a layer weight or bias


# ---------------------------------------------------------------------------------------------
# Abstract values


@dataclasses.dataclass(frozen=True, eq=False)
class Const:
    compute: Callable[[], Any] | None            # None: known to be constant, value not recomputable


@dataclasses.dataclass(frozen=True, eq=False)
class View:
    leaf: int
    shape: tuple[int, ...]
    axes: tuple[int, ...] | None                 # per view axis: the leaf axis it runs along, -1 none
    region: Region | None                        # which leaf entries are read; None: not known
    steps: tuple[Step, ...] | None
    flipped: frozenset[int] = frozenset()        # leaf axes read in reverse (`rev`)


@dataclasses.dataclass(frozen=True, eq=False)
class Stacked:
    axis: int
    segments: tuple[tuple[int, int, View], ...]  # [start, stop) along `axis`
    leaves: frozenset[int]
    new_axis: bool                               # jnp.stack (each segment one entry of a new axis)


@dataclasses.dataclass(frozen=True, eq=False)
class Mixed:
    leaves: frozenset[int]
    how: str


@dataclasses.dataclass(frozen=True, eq=False)
class Act:
    carriers: tuple[tuple[Any, tuple[int, ...]], ...] = ()   # (layer key, channel axes of this value)
    touched: frozenset[int] = frozenset()                    # leaves that entered it (not as layer weights)


Value = Union[Const, View, Stacked, Mixed, Act]
_ACT = Act()


def _params_of(v: Value) -> frozenset[int]:
    if isinstance(v, View):
        return frozenset({v.leaf})
    if isinstance(v, (Stacked, Mixed)):
        return v.leaves
    return frozenset()


def _full_region(shape: Sequence[int]) -> Region:
    return tuple((0, int(n), 1) for n in shape)


def _eqn_step(eqn: Equation, pos: int, others: Sequence[Value]) -> Step | None:
    """Re-applies a one-view-operand equation: `bind(eqn, [x at pos, constants elsewhere])`."""
    computes = [None if i == pos else v.compute for i, v in enumerate(others)]
    if any(c is None for i, c in enumerate(computes) if i != pos):
        return None

    def step(x):
        return bind(eqn, [x if i == pos else c() for i, c in enumerate(computes)])[0]
    return step


def _then(view: View, step: Step | None) -> tuple[Step, ...] | None:
    return None if view.steps is None or step is None else view.steps + (step,)


# ---------------------------------------------------------------------------------------------
# Views through one equation


def _region_after_slice(view: View, starts, limits, strides) -> tuple[tuple[int, ...] | None, Region | None]:
    """Axes and region of `view[starts:limits:strides]`."""
    if view.axes is None or view.region is None:
        return view.axes, None
    region = list(view.region)
    for a, (s, e, st) in enumerate(zip(starts, limits, strides or (1,) * len(starts))):
        leaf_axis = view.axes[a]
        if leaf_axis < 0 or (s, e, st or 1) == (0, view.shape[a], 1):
            continue
        r = region[leaf_axis]
        if isinstance(r, int) or leaf_axis in view.flipped:
            return view.axes, None
        r0, _, rs = r
        region[leaf_axis] = (r0 + s * rs, r0 + (e - 1) * rs + 1 if e > s else r0 + s * rs, rs * st)
    return view.axes, tuple(region)


def _drop_axes(view: View, dropped: Sequence[int]) -> tuple[tuple[int, ...] | None, Region | None]:
    """Axes and region after removing size-1 view axes `dropped` (their leaf positions become fixed)."""
    if view.axes is None:
        return None, view.region
    region = None if view.region is None else list(view.region)
    for a in dropped:
        leaf_axis = view.axes[a]
        if leaf_axis >= 0 and region is not None:
            r = region[leaf_axis]
            region[leaf_axis] = r if isinstance(r, int) else r[0]
    axes = tuple(x for a, x in enumerate(view.axes) if a not in set(dropped))
    return axes, None if region is None else tuple(region)


def _reshaped_axes(view: View, in_shape, out_shape) -> tuple[tuple[int, ...] | None, Region | None]:
    """A reshape keeps a readable axis map when none of its matching axis groups (`reshape_groups`) splits
    or merges real axes: it only inserts or removes size-1 axes."""
    if view.axes is None:
        return None, view.region
    new = [-1] * len(out_shape)
    for gi, go in reshape_groups(in_shape, out_shape):
        real_in = [a for a in gi if in_shape[a] != 1]
        real_out = [d for d in go if out_shape[d] != 1]
        if len(real_in) > 1 or len(real_out) > 1:
            return None, view.region
        if real_in:
            new[real_out[0]] = view.axes[real_in[0]]
    _, region = _drop_axes(view, [a for a, s in enumerate(in_shape) if s == 1])
    return tuple(new), region


def _unary_view(eqn: Equation, view: View) -> View:
    name = eqn.primitive.name
    out_shape = tuple(eqn.outvars[0].aval.shape)
    in_shape = tuple(eqn.invars[0].aval.shape)
    axes, region = view.axes, view.region
    if name in ("transpose", "broadcast_in_dim"):
        axes = None if axes is None else tuple(-1 if a is None else axes[a] for a in moved_axes(eqn))
    elif name == "slice":
        axes, region = _region_after_slice(view, eqn.params["start_indices"], eqn.params["limit_indices"],
                                           eqn.params["strides"])
    elif name in SHAPE_OPS:
        axes, region = _reshaped_axes(view, in_shape, out_shape)
    flipped = view.flipped
    if name == "rev":
        flipped = flipped ^ ({axes[d] for d in eqn.params["dimensions"] if axes[d] >= 0} if axes else set())
    # IDENTITY_LIKE (casts, copies, sharding annotations): same entries, same axes
    return View(view.leaf, out_shape, axes, region, _then(view, _eqn_step(eqn, 0, [view])), frozenset(flipped))


def _index_view(view: View, i: int) -> View:
    """`view[i]` along the leading axis (an unrolled scan's slice of a scanned-over leaf)."""
    axes, region = _region_after_slice(view, (i,) + (0,) * (len(view.shape) - 1),
                                       (i + 1,) + view.shape[1:], None)
    shrunk = View(view.leaf, (1,) + view.shape[1:], axes, region, view.steps, view.flipped)
    axes, region = _drop_axes(shrunk, [0])
    step = lambda x, i=i: lax.index_in_dim(x, i, 0, keepdims=False)
    return View(view.leaf, view.shape[1:], axes, region, _then(view, step), view.flipped)


def _index_stacked(stacked: Stacked, i: int) -> View | None:
    """`stacked[i]` along axis 0 when that lies in one segment."""
    if stacked.axis != 0:
        return None
    for s0, s1, view in stacked.segments:
        if s0 <= i < s1:
            return view if stacked.new_axis else _index_view(view, i - s0)
    return None


def _segment(stacked: Stacked, start: int, stop: int) -> View | None:
    """The view of the one segment `[start, stop)` along the stacking axis lies in, cut to that range."""
    for s0, s1, view in stacked.segments:
        if s0 <= start and stop <= s1:
            if stacked.new_axis:   # a jnp.stack segment: one entry along the new axis
                step = lambda x, a=stacked.axis: lax.expand_dims(x, (a,))
                shape = view.shape[:stacked.axis] + (1,) + view.shape[stacked.axis:]
                axes = None if view.axes is None else view.axes[:stacked.axis] + (-1,) + view.axes[stacked.axis:]
                return View(view.leaf, shape, axes, view.region, _then(view, step), view.flipped)
            if (start, stop) == (s0, s1):
                return view
            a = stacked.axis
            step = lambda x, a=a, lo=start - s0, hi=stop - s0: lax.slice_in_dim(x, lo, hi, axis=a)
            starts = [0] * len(view.shape)
            limits = list(view.shape)
            starts[a], limits[a] = start - s0, stop - s0
            axes, region = _region_after_slice(view, starts, limits, None)
            shape = view.shape[:a] + (stop - start,) + view.shape[a + 1:]
            return View(view.leaf, shape, axes, region, _then(view, step), view.flipped)
    return None


# ---------------------------------------------------------------------------------------------
# Layers inside control flow: a quick taint walk


@dataclasses.dataclass(frozen=True)
class _Taint:
    param: bool = False
    act: bool = False

    def __or__(self, other: "_Taint") -> "_Taint":
        return _Taint(self.param or other.param, self.act or other.act)


class _LayerSearch:
    """Whether a body holds a layer product: a dot/conv of an activation and a parameter-only value.
    Loops are iterated until the carried facts stop changing."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def constant(self, value: Any) -> _Taint:
        return _Taint()

    def enter(self, eqn: Equation, key: EqnKey, ins: list[_Taint]) -> bool:
        return call_kind(eqn) in ("call", "cond")

    def index(self, value: _Taint, i: int) -> _Taint:
        return value

    def stack(self, values: list[_Taint]) -> _Taint:
        return functools.reduce(lambda a, b: a | b, values, _Taint())

    def equation(self, eqn: Equation, key: EqnKey, ins: list[_Taint]) -> list[_Taint]:
        name = eqn.primitive.name
        joined = self.stack(ins)
        if name in LAYER_PRODUCTS and len(ins) == 2:
            a, b = ins
            if (a.act and b.param and not b.act) or (b.act and a.param and not a.act):
                self.found.append(name)
        elif name == "scan":
            p = eqn.params
            nc, nk = p["num_consts"], p["num_carry"]
            return self._loop(open_jaxpr(p["jaxpr"]), ins[:nc], ins[nc:nc + nk], ins[nc + nk:], key, len(eqn.outvars))
        elif name == "while":
            p = eqn.params
            cc, bc = p["cond_nconsts"], p["body_nconsts"]
            carry = ins[cc + bc:]
            cj, cconsts = open_jaxpr(p["cond_jaxpr"])
            outs = self._loop(open_jaxpr(p["body_jaxpr"]), ins[cc:cc + bc], carry, [], key, len(carry))
            run(cj, [self.constant(c) for c in cconsts], [*ins[:cc], *outs], self, key)
            return outs
        elif sub_programs(eqn):
            for jaxpr, consts in sub_programs(eqn):
                args = ins[len(ins) - len(jaxpr.invars):] if len(jaxpr.invars) <= len(ins) else [joined] * len(jaxpr.invars)
                outs = run(jaxpr, [self.constant(c) for c in consts], args, self, key)
                joined = joined | self.stack(outs)
        return [joined] * len(eqn.outvars)

    def _loop(self, body, consts, carry, xs, key, n_out) -> list[_Taint]:
        jaxpr, body_consts = body
        for _ in range(len(carry) + 2):
            outs = run(jaxpr, [self.constant(c) for c in body_consts], [*consts, *carry, *xs], self, key)
            new = [c | o for c, o in zip(carry, outs)]
            if new == list(carry):
                break
            carry = new
        return [*carry, *outs[len(carry):]][:n_out]


def _taint(v: Value) -> _Taint:
    if isinstance(v, Act):
        return _Taint(act=True)
    return _Taint(param=bool(_params_of(v)))


# ---------------------------------------------------------------------------------------------
# The pass


_CONTROL_NAMES = {"while": "lax.while_loop", "cond": "lax.cond / lax.switch"}


class _FindLayers:
    """Rules of pass 1; collects layers, biases and reasons into mutable tables, frozen at the end."""

    def __init__(self, program: Program):
        self.program = program
        self.layers: dict[tuple[int, Any], dict[str, Any]] = {}   # (leaf, region) -> fields
        self.uses: dict[EqnKey, tuple[tuple[int, Any], int, tuple[Step, ...] | None]] = {}
        self.bias_adds: dict[EqnKey, tuple[int, Any]] = {}
        self.view_eqns: set[EqnKey] = set()
        self.unrolled: set[EqnKey] = set()
        self.reasons: dict[int, str] = {}

    # -- interpreter hooks ------------------------------------------------------------------
    def constant(self, value: Any) -> Value:
        return Const(lambda value=value: value)

    def enter(self, eqn: Equation, key: EqnKey, ins: list[Value]) -> bool:
        if call_kind(eqn) != "scan":
            return True
        search = _LayerSearch()
        search.equation(eqn, key, [_taint(v) for v in ins])
        if search.found:
            self.unrolled.add(key)
        return bool(search.found)

    def index(self, value: Value, i: int) -> Value:
        if isinstance(value, View):
            return _index_view(value, i)
        if isinstance(value, Stacked):
            view = _index_stacked(value, i)
            return view if view is not None else Mixed(value.leaves, "a scan over stacked leaves")
        if isinstance(value, Const) and value.compute is not None:
            return Const(lambda c=value.compute, i=i: lax.index_in_dim(c(), i, 0, keepdims=False))
        if isinstance(value, Act):
            return Act(touched=value.touched)
        return value if not isinstance(value, Const) else Const(None)

    def stack(self, values: list[Value]) -> Value:
        if any(isinstance(v, Act) for v in values):
            return Act(touched=self._touched(values, "scan"))
        leaves = frozenset().union(*map(_params_of, values))
        return Mixed(leaves, "an unrolled scan's stacked output") if leaves else Const(None)

    def equation(self, eqn: Equation, key: EqnKey, ins: list[Value]) -> list[Value]:
        name = eqn.primitive.name
        if name in LAYER_PRODUCTS and len(ins) == 2 and any(isinstance(v, Act) for v in ins) \
                and not all(isinstance(v, Act) for v in ins):
            return [self._product(eqn, key, ins)]
        if sub_programs(eqn) and name != "scan":   # a scan is searched before it is (not) entered
            self._no_layers_inside(eqn, key, ins)
        if name in ("add", "add_any"):
            return [self._add(eqn, key, ins)]
        outs = self._view_op(eqn, key, ins)
        if outs is not None:
            self.view_eqns.add(key)
            return outs
        if any(isinstance(v, Act) for v in ins):
            return [self._activation(eqn, ins)] * len(eqn.outvars)
        if not any(_params_of(v) for v in ins):
            return self._constants(eqn, ins)
        return [Mixed(frozenset().union(*map(_params_of, ins)), f"{name}")] * len(eqn.outvars)

    # -- layers and biases ------------------------------------------------------------------
    def _product(self, eqn: Equation, key: EqnKey, ins: list[Value]) -> Value:
        w_pos = 0 if not isinstance(ins[0], Act) else 1
        weight, act = ins[w_pos], ins[1 - w_pos]
        if isinstance(weight, Const):
            return self._activation(eqn, ins)
        path = lambda leaf: self.program.paths[leaf]
        if isinstance(weight, Stacked):
            raise ValueError(
                f"the weight operand of {eqn.primitive.name} concatenates parameter leaves "
                f"{sorted(path(l) for l in weight.leaves)}: OBA scores each Conv/Dense weight as one layer; "
                "multiply by each leaf separately, or store the fused weight as one leaf")
        if isinstance(weight, Mixed):
            raise ValueError(
                f"the weight operand of {eqn.primitive.name} is not a linear view of one parameter leaf: it is "
                f"computed from {sorted(path(l) for l in weight.leaves)} through `{weight.how}`. OBA scores "
                "Conv/Dense weights that are parameter leaves (sliced, reshaped, masked by constants); "
                "reparameterised weights (weight norm, products of leaves) are not supported")
        kind = "dense" if eqn.primitive.name == "dot_general" else "conv"
        pa = product_axes(eqn)
        groups = int(eqn.params.get("feature_group_count", 1)) if kind == "conv" else 1
        if kind == "conv" and w_pos == 0:   # the kernel as the convolution's lhs: a layer, its channel axes not mapped
            in_view = out_view = None
            out_act_axes: tuple[int, ...] = ()
        else:
            in_view, out_view, out_act_axes = pa.contracted[w_pos], pa.free[w_pos], pa.out_free[w_pos]
        axes = weight.axes

        def to_leaf(ax):
            if ax is None or axes is None or any(axes[a] < 0 for a in ax):
                return None
            return tuple(axes[a] for a in ax)

        region = weight.region
        full = _full_region(self.program.param_aval(weight.leaf).shape)
        layer_key = (weight.leaf, region if region != full else "full")
        self.layers.setdefault(layer_key, {
            "weight_leaf": weight.leaf, "bias_leaf": None, "bias_index": None, "kind": kind, "in_axes": to_leaf(in_view),
            "out_axes": to_leaf(out_view), "groups": groups,
            "index": None if region is None or region == full else region, "region_known": region is not None,
        })
        self.uses[key] = (layer_key, w_pos, weight.steps)
        return Act(carriers=((layer_key, out_act_axes),) if out_act_axes else (), touched=act.touched)

    def _add(self, eqn: Equation, key: EqnKey, ins: list[Value]) -> Value:
        out_shape = tuple(eqn.outvars[0].aval.shape)
        acts = [v for v in ins if isinstance(v, Act)]
        if not acts:
            return self._nonact(eqn, ins)
        for y, b, b_var in ((ins[0], ins[1], eqn.invars[1]), (ins[1], ins[0], eqn.invars[0])):
            if isinstance(y, Act) and isinstance(b, View):
                for layer_key, axes in y.carriers:
                    if self._is_bias(layer_key, axes, out_shape, b, tuple(b_var.aval.shape)):
                        self.layers[layer_key]["bias_leaf"] = b.leaf
                        full = _full_region(self.program.param_aval(b.leaf).shape)
                        self.layers[layer_key]["bias_index"] = None if b.region in (None, full) else b.region
                        self.bias_adds[key] = layer_key
                        return y
        carriers = tuple(c for v, var in zip(ins, eqn.invars) if isinstance(v, Act)
                         and tuple(var.aval.shape) == out_shape for c in v.carriers)
        return Act(carriers=carriers, touched=self._touched(ins, eqn.primitive.name))

    def _is_bias(self, layer_key, axes, out_shape, b: View, b_shape) -> bool:
        fields = self.layers[layer_key]
        if fields["bias_leaf"] not in (None, b.leaf) or b.leaf == fields["weight_leaf"]:
            return False
        width = math.prod(out_shape[a] for a in axes)
        if _entries_read(b, self.program.param_aval(b.leaf).shape) != width:
            return False
        if math.prod(b_shape) == width:
            return len(b_shape) != len(out_shape) or all(s == 1 or a in axes for a, s in enumerate(b_shape))
        if b.axes is None:
            return False
        real = [a for a, s in enumerate(b_shape) if b.axes[a] >= 0 and s != 1]
        return set(real) <= set(axes) and math.prod(b_shape[a] for a in real) == width

    # -- views, activations, constants -------------------------------------------------------
    def _view_op(self, eqn: Equation, key: EqnKey, ins: list[Value]) -> list[Value] | None:
        """The outputs when they are views of one leaf (or stacked views); None otherwise."""
        name = eqn.primitive.name
        views = [i for i, v in enumerate(ins) if isinstance(v, (View, Stacked))]
        others_const = all(isinstance(v, Const) for i, v in enumerate(ins) if i not in views)
        if not views or not others_const:
            return None
        if len(views) == 1:
            pos = views[0]
            v = ins[pos]
            if isinstance(v, Stacked):
                return self._sliced_segment(eqn, v)
            if name in UNARY_VIEWS and len(ins) == 1:
                return [_unary_view(eqn, v)]
            out_shape = tuple(eqn.outvars[0].aval.shape)
            same = out_shape == v.shape
            if name in ("mul", "div") and (name == "mul" or pos == 0) and same:       # a constant mask
                return [dataclasses.replace(v, steps=_then(v, _eqn_step(eqn, pos, ins)))]
            if name == "select_n" and pos > 0 and same:                              # where(mask, W, 0)
                return [dataclasses.replace(v, steps=_then(v, _eqn_step(eqn, pos, ins)))]
            if name == "dynamic_slice" and pos == 0:
                starts = [_concrete_int(v) for v in ins[1:]]
                if all(s is not None for s in starts):
                    sizes = eqn.params["slice_sizes"]
                    axes, region = _region_after_slice(v, starts, [s + n for s, n in zip(starts, sizes)], None)
                    return [View(v.leaf, out_shape, axes, region, _then(v, _eqn_step(eqn, pos, ins)))]
            if name == "gather" and pos == 0:
                return [View(v.leaf, out_shape, None, None, _then(v, _eqn_step(eqn, pos, ins)))]
            return None
        if name in ("concatenate", "stack") and len(views) == len(ins) and all(isinstance(v, View) for v in ins):
            axis = eqn.params["axis"] if name == "stack" else eqn.params["dimension"]
            segments, start = [], 0
            for v in ins:
                size = 1 if name == "stack" else v.shape[axis]
                segments.append((start, start + size, v))
                start += size
            return [Stacked(axis, tuple(segments), frozenset(v.leaf for v in ins), name == "stack")]
        return None

    def _sliced_segment(self, eqn: Equation, v: Stacked) -> list[Value] | None:
        """A slice of stacked views that stays inside one segment along the stacking axis."""
        if eqn.primitive.name == "slice":
            starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
            strides = eqn.params["strides"] or (1,) * len(starts)
            shape = tuple(eqn.invars[0].aval.shape)
            others_full = all(starts[a] == 0 and limits[a] == shape[a] and strides[a] == 1
                              for a in range(len(shape)) if a != v.axis)
            if others_full and strides[v.axis] == 1:
                seg = _segment(v, starts[v.axis], limits[v.axis])
                if seg is not None:
                    return [seg]
        return None

    def _activation(self, eqn: Equation, ins: list[Value]) -> Act:
        return Act(carriers=self._carried(eqn, ins), touched=self._touched(ins, eqn.primitive.name))

    def _carried(self, eqn: Equation, ins: list[Value]) -> tuple:
        """Layer outputs still carried channel-wise through a reshape, transpose, broadcast or cast."""
        name = eqn.primitive.name
        if len(ins) != 1 or not isinstance(ins[0], Act) or not ins[0].carriers or len(eqn.outvars) != 1:
            return ()
        in_shape, out_shape = tuple(eqn.invars[0].aval.shape), tuple(eqn.outvars[0].aval.shape)
        out = []
        for layer_key, axes in ins[0].carriers:
            if name in IDENTITY_LIKE:
                out.append((layer_key, axes))
            elif name in ("transpose", "broadcast_in_dim"):
                source = moved_axes(eqn)
                if all(a in source for a in axes):
                    out.append((layer_key, tuple(sorted(source.index(a) for a in axes))))
            elif name in SHAPE_OPS:
                new: list[int] = []
                for gi, go in reshape_groups(in_shape, out_shape):
                    inside = [a in axes for a in gi if in_shape[a] != 1]
                    if inside and all(inside):
                        new.extend(go)
                    elif any(inside):
                        new = []
                        break
                if new and math.prod(out_shape[a] for a in new) == math.prod(in_shape[a] for a in axes):
                    out.append((layer_key, tuple(new)))
        return tuple(out)

    def _touched(self, ins: list[Value], name: str) -> frozenset[int]:
        """The leaves that have entered the activations, ins included (each with why it is no layer)."""
        self._note_uses(name, ins)
        touched = frozenset().union(*(v.touched for v in ins if isinstance(v, Act)))
        return touched.union(*(_params_of(v) for v in ins if not isinstance(v, Act)))

    def _note_uses(self, name: str, ins: list[Value]) -> None:
        """Why a parameter that meets an activation here is not a layer weight or bias."""
        for pos, v in enumerate(ins):
            if isinstance(v, Act):
                continue
            for leaf in _params_of(v):
                if leaf in self.reasons:
                    continue
                if name in ("add", "add_any", "sub"):
                    why = "added to activations (an offset, not the bias of a layer)"
                elif name in ("mul", "div"):
                    why = "scales activations elementwise (a norm scale or gain, not a Conv/Dense weight)"
                elif name in ("concatenate", "stack"):
                    why = "concatenated with activations (e.g. a class token)"
                elif name == "gather" and pos == 0:
                    why = "an embedding table (rows gathered by input-dependent indices)"
                elif name in LAYER_PRODUCTS:
                    why = f"an operand of a {name} that is not a Conv/Dense weight"
                else:
                    why = f"reaches the activations through `{name}`"
                self.reasons[leaf] = why

    def _nonact(self, eqn: Equation, ins: list[Value]) -> Value:
        if not any(_params_of(v) for v in ins):
            return self._constants(eqn, ins)[0]
        return Mixed(frozenset().union(*map(_params_of, ins)), eqn.primitive.name)

    def _constants(self, eqn: Equation, ins: list[Value]) -> list[Value]:
        if any(not isinstance(v, Const) or v.compute is None for v in ins):
            return [Const(None)] * len(eqn.outvars)

        @functools.lru_cache(maxsize=None)
        def outs():
            return tuple(bind(eqn, [v.compute() for v in ins]))
        return [Const(lambda i=i: outs()[i]) for i in range(len(eqn.outvars))]

    def _no_layers_inside(self, eqn: Equation, key: EqnKey, ins: list[Value]) -> None:
        """A layer in a body this analysis does not walk into is a clear error."""
        search = _LayerSearch()
        search.equation(eqn, key, [_taint(v) for v in ins])
        if search.found:
            name = eqn.primitive.name
            construct = _CONTROL_NAMES.get(name, f"`{name}`")
            leaves = sorted(self.program.paths[l] for v in ins for l in _params_of(v))
            why = {"while": "its number of iterations is not known when the program is analysed; use lax.scan "
                            "or lax.fori_loop with static bounds (unrolled by the analysis) or a Python loop",
                   "cond": "which branch runs depends on the data; OBA needs one fixed program (select the "
                           "branch in Python, or compute both and combine them with jnp.where)"}.get(
                name, "the analysis cannot look inside it; call the layers outside it")
            raise NotImplementedError(f"a parameter layer ({search.found[0]} of {leaves or 'a parameter'}) sits "
                                      f"inside {construct}: {why}")

    # -- the record --------------------------------------------------------------------------
    def record(self, outputs: list[Value]) -> FoundLayers:
        paths = self.program.paths
        per_leaf: dict[int, list[tuple[int, Any]]] = {}
        for lk in self.layers:
            per_leaf.setdefault(lk[0], []).append(lk)
        names: dict[tuple[int, Any], str] = {}
        for leaf, keys in per_leaf.items():
            path = paths[leaf]
            base = path[: -len("/kernel")] if path.endswith("/kernel") else path
            for n, lk in enumerate(keys):
                fields = self.layers[lk]
                if len(keys) == 1 and fields["index"] is None:
                    names[lk] = base
                elif fields["index"] is not None:
                    shape = self.program.param_aval(leaf).shape
                    names[lk] = f"{base}[{_region_tag(fields['index'], shape)}]"
                else:
                    names[lk] = f"{base}[view {n}]"
        layers = []
        for lk, f in self.layers.items():
            layers.append(Layer(name=names[lk], weight=paths[f["weight_leaf"]],
                                bias=None if f["bias_leaf"] is None else paths[f["bias_leaf"]], kind=f["kind"],
                                in_axes=f["in_axes"], out_axes=f["out_axes"], feature_group_count=f["groups"],
                                index=f["index"], bias_index=f["bias_index"]))
        scored = {f["weight_leaf"] for f in self.layers.values()} | {
            f["bias_leaf"] for f in self.layers.values() if f["bias_leaf"] is not None}
        reaching = frozenset().union(*(v.touched for v in outputs if isinstance(v, Act)))
        unscored = {}
        for leaf, path in enumerate(paths):
            if leaf in scored:
                continue
            if not is_float(self.program.param_aval(leaf)):
                unscored[leaf] = "not a float array"
            elif leaf in reaching and leaf in self.reasons:
                unscored[leaf] = self.reasons[leaf]
            else:
                unscored[leaf] = "does not reach the logits (unused by this forward pass)"
        return FoundLayers(
            layers=tuple(layers),
            weight_leaves=MappingProxyType({names[lk]: f["weight_leaf"] for lk, f in self.layers.items()}),
            bias_leaves=MappingProxyType({names[lk]: f["bias_leaf"] for lk, f in self.layers.items()
                                          if f["bias_leaf"] is not None}),
            uses=MappingProxyType({k: LayerUse(names[lk], lk[0], w, steps) for k, (lk, w, steps) in self.uses.items()}),
            bias_adds=MappingProxyType({k: names[lk] for k, lk in self.bias_adds.items()}),
            view_eqns=frozenset(self.view_eqns), unrolled=frozenset(self.unrolled),
            unscored=MappingProxyType(unscored))


def _entries_read(view: View, leaf_shape: Sequence[int]) -> int:
    """How many entries of its leaf a view reads (all of them when its region is not known)."""
    if view.region is None:
        return math.prod(leaf_shape)
    return math.prod(1 if isinstance(r, int) else len(range(*r)) for r in view.region)


def _concrete_int(v: Value) -> int | None:
    """The value of a scalar constant (computed now, at analysis time), or None."""
    if not isinstance(v, Const) or v.compute is None:
        return None
    try:
        return int(np.asarray(v.compute()))
    except (TypeError, ValueError):
        return None


def _region_tag(region: Region, shape: Sequence[int]) -> str:
    parts = []
    for r, n in zip(region, shape):
        if isinstance(r, int):
            parts.append(str(r))
        else:
            s, e, st = r
            parts.append(":" if (s, e, st) == (0, n, 1) else f"{s}:{e}" + (f":{st}" if st != 1 else ""))
    while parts and parts[-1] == ":":
        parts.pop()
    return ", ".join(parts)


def find_layers(program: Program) -> FoundLayers:
    """Pass 1 over a traced program: its parameter layers, their biases and the unscored leaves."""
    rules = _FindLayers(program)
    jaxpr = program.jaxpr
    args: list[Value] = []
    for i, v in enumerate(jaxpr.invars):
        if i >= program.n_params:
            args.append(_ACT)
        elif is_float(v.aval):
            shape = tuple(v.aval.shape)
            args.append(View(i, shape, tuple(range(len(shape))), _full_region(shape), ()))
        else:
            args.append(Const(None))
    outputs = run(jaxpr, [rules.constant(c) for c in program.consts], args, rules)
    return rules.record(outputs)
