"""The connectivity map of a JAX model, read from its jaxpr.

`connectivity(apply_fn, params, example_inputs)` traces `apply_fn(params, inputs) -> logits` once and
classifies every equation of the program:

* a *parameter layer* is a `dot_general` / `conv_general_dilated` whose one operand is (a structural
  view of) a parameter leaf and whose other operand is not; an `add` of a parameter leaf of the
  layer's output width right after it is that layer's bias;
* a *parallel product* is a `dot_general` or `mul` whose two operands both depend on layer
  parameters and come from disjoint sets of nearest upstream layers (``Q Kᵀ``, ``A V``, gated MLPs);
  a product whose operands share a source layer (``x·sigmoid(x)``, BatchNorm's ``x̂·rsqrt(var)``) is a
  nonlinearity of that layer instead;
* everything else is linear (kept as it is by the OBA surrogate) or nonlinear (linearised by it).

The same classification drives the OBA surrogate in `oba_jax.hessian`, so the graph the user sees is
the graph the score uses. Sub-jaxprs of `jit`, `checkpoint`, `custom_jvp_call` and `custom_vjp_call`
are walked recursively.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

__all__ = [
    "Connectivity",
    "Layer",
    "ParallelProduct",
    "connectivity",
    "leaf_paths",
    "trace_program",
]

# Primitives that are linear in every operand that depends on the parameters (given that at most
# one operand of the multiplicative ones depends on them: see `_is_linear`).
_STRUCTURAL = frozenset({
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "convert_element_type",
    "copy", "copy_p", "rev", "slice", "reduce_precision",
})
_LINEAR = _STRUCTURAL | frozenset({
    "add", "add_any", "sub", "neg", "concatenate", "pad", "reduce_sum", "dynamic_slice",
    "dynamic_update_slice", "gather", "select_n", "split", "cumsum", "real", "imag", "complex", "conj",
    "squeeze", "mul", "div", "dot_general", "conv_general_dilated", "reduce_window_sum",
    "scatter-add", "scatter_add", "optimization_barrier", "sharding_constraint", "pjit_sharding",
    "psum", "device_put", "name",
})
# Primitives whose second operand (or more) may not depend on parameters for them to be linear.
_BILINEAR = frozenset({"mul", "dot_general", "conv_general_dilated"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat", "remat2"})
_CUSTOM = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_CONTROL = frozenset({"scan", "while", "cond"})


class Role(enum.Enum):
    """What the OBA surrogate does with an equation."""

    CONSTANT = "constant"      # does not depend on layer parameters: evaluate as is
    LINEAR = "linear"          # linear in its parameter-dependent operands: evaluate as is
    LAYER = "layer"            # a parameter layer's bilinear product: evaluate as is
    PARALLEL = "parallel"      # activation × activation product: as is (or linearised for the series part)
    NONLINEAR = "nonlinear"    # linearised at the current point
    INLINE = "inline"          # a call whose body is walked equation by equation


@dataclasses.dataclass(frozen=True)
class Layer:
    """A Conv/Dense parameter layer: `Y = W ⊛ X (+ b)`.

    `in_axes` / `out_axes` are axes of the weight leaf that read input channels / make output
    channels (None when the weight reaches the product through a reshape we cannot map).
    """

    name: str
    weight: str
    bias: str | None
    kind: str                        # "dense" | "conv"
    in_axes: tuple[int, ...] | None
    out_axes: tuple[int, ...] | None
    feature_group_count: int = 1


@dataclasses.dataclass(frozen=True)
class ParallelProduct:
    """An activation-by-activation product; `operands` holds the nearest layers feeding each side."""

    index: int
    primitive: str
    operands: tuple[tuple[str, ...], tuple[str, ...]]
    shape: tuple[int, ...]
    sources: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())   # with slice tags, e.g. `qkv[0:64]`


@dataclasses.dataclass(frozen=True)
class Connectivity:
    """Layers, series relation, parallel products and unscored leaves of one traced program."""

    layers: tuple[Layer, ...]
    upstream: dict[str, tuple[str, ...]]       # layer -> every layer upstream of its input
    parallel: tuple[ParallelProduct, ...]
    unscored: tuple[str, ...]                  # parameter leaves OBA never perturbs nor scores
    leaf_paths: tuple[str, ...]                # every parameter leaf, in flattening order

    @property
    def scored_leaves(self) -> tuple[str, ...]:
        """Weight and bias leaves of the parameter layers (the θ of OBA)."""
        out = []
        for layer in self.layers:
            out.append(layer.weight)
            if layer.bias is not None:
                out.append(layer.bias)
        return tuple(dict.fromkeys(out))

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no parameter layer named {name!r}; layers: {[l.name for l in self.layers]}")

    def series_pairs(self) -> tuple[tuple[str, str], ...]:
        """(upstream layer, downstream layer) for every series-connected pair."""
        return tuple((up, down) for down, ups in self.upstream.items() for up in ups)

    def coupled(self, a: str, b: str) -> bool:
        """Whether OBA's Hessian has a nonzero block between layers a and b (structurally)."""
        if a in self.upstream.get(b, ()) or b in self.upstream.get(a, ()):
            return True
        return any((a in p.operands[0] and b in p.operands[1]) or (b in p.operands[0] and a in p.operands[1])
                   for p in self.parallel)

    def summary(self) -> str:
        """A readable description: one line per layer, then the parallel products and unscored leaves."""
        lines = [f"{len(self.layers)} parameter layers, {len(self.parallel)} parallel products, "
                 f"{len(self.unscored)} unscored leaves"]
        for layer in self.layers:
            ups = self.upstream.get(layer.name, ())
            bias = f" + {layer.bias}" if layer.bias else ""
            lines.append(f"  [{layer.kind:5s}] {layer.name}: {layer.weight}{bias} "
                         f"in_axes={layer.in_axes} out_axes={layer.out_axes} upstream={len(ups)}")
        for p in self.parallel:
            lines.append(f"  [parallel {p.primitive}] {'+'.join(p.sources[0])} × {'+'.join(p.sources[1])} "
                         f"-> {p.shape}")
        if self.unscored:
            lines.append("  not scored by OBA: " + ", ".join(self.unscored))
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Graphviz DOT: solid edges = direct series connections, dashed red = parallel products."""
        direct = _direct_edges(self.upstream)
        out = ["digraph oba {", "  rankdir=LR;", "  node [shape=box, fontname=Helvetica];"]
        for layer in self.layers:
            out.append(f'  "{layer.name}" [label="{layer.name}\\n{layer.kind}"];')
        for up, down in direct:
            out.append(f'  "{up}" -> "{down}";')
        for p in self.parallel:
            node = f"{p.primitive}#{p.index}"
            out.append(f'  "{node}" [shape=ellipse, color=red, label="{p.primitive} {p.shape}"];')
            for side in p.operands:
                for name in side:
                    out.append(f'  "{name}" -> "{node}" [style=dashed, color=red];')
        out.append("}")
        return "\n".join(out)


def _direct_edges(upstream: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """Transitive reduction of the series relation (for drawing)."""
    edges = []
    for down, ups in upstream.items():
        for up in ups:
            if not any(up in upstream.get(mid, ()) for mid in ups if mid != up):
                edges.append((up, down))
    return edges


def _slice_tag(eqn: jcore.JaxprEqn, out_index: int) -> str:
    """A readable name of the part of its input a `slice`/`split` output is."""
    if eqn.primitive.name == "split":
        sizes = [int(s) for s in eqn.params["sizes"]]
        start = sum(sizes[:out_index])
        return f"axis{eqn.params['axis']}:{start}:{start + sizes[out_index]}"
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    return ",".join(f"{a}:{b}" for a, b in zip(starts, limits))


def _layer_names(sources: frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted({s.split("[", 1)[0] for s in sources}))


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_paths(params: Any) -> list[str]:
    """Readable '/'-joined paths of the leaves of `params` (NNX's trailing `.value` dropped)."""
    paths = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [_key_name(k) for k in path]
        if len(names) > 1 and names[-1] == "value":
            names = names[:-1]
        paths.append("/".join(names) if names else "<root>")
    return paths


def _check_param_leaves(params: Any) -> list[Any]:
    leaves = jax.tree_util.tree_leaves(params)
    for path, leaf in zip(leaf_paths(params), leaves):
        if not isinstance(leaf, (jax.Array, np.ndarray)) or not hasattr(leaf, "dtype"):
            raise TypeError(f"parameter leaf {path!r} is a {type(leaf).__name__}, not an array; "
                            "pass a pytree whose leaves are jax or numpy arrays")
    return leaves


# ---------------------------------------------------------------------------------------------
# Tracing


@dataclasses.dataclass
class Program:
    """A traced `apply_fn(params, inputs)`: the jaxpr and how its inputs map to leaves."""

    closed: jcore.ClosedJaxpr
    n_params: int
    params_treedef: Any
    out_shape: tuple[int, ...]


def trace_program(apply_fn: Callable, params: Any, example_inputs: Any) -> Program:
    """`jax.make_jaxpr` of apply_fn over the flattened parameter leaves and inputs."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    in_leaves, in_treedef = jax.tree_util.tree_flatten(example_inputs)

    def flat_fn(*flat):
        p = jax.tree_util.tree_unflatten(treedef, flat[: len(leaves)])
        x = jax.tree_util.tree_unflatten(in_treedef, flat[len(leaves):])
        return apply_fn(p, x)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves, *in_leaves)
    out_leaves = jax.tree_util.tree_leaves(out_shape)
    if len(out_leaves) != 1:
        raise ValueError(f"apply_fn must return one array of logits (batch, classes); it returned "
                         f"{len(out_leaves)} arrays")
    return Program(closed=closed, n_params=len(leaves), params_treedef=treedef,
                   out_shape=tuple(out_leaves[0].shape))


# ---------------------------------------------------------------------------------------------
# Analysis


@dataclasses.dataclass(frozen=True)
class _Info:
    """What is known of one variable of the program."""

    dep: bool = False                                   # depends on a layer parameter (θ)
    src: frozenset[str] = frozenset()                   # nearest upstream layers
    anc: frozenset[str] = frozenset()                   # all upstream layers
    # (leaf index, axis map view->leaf, structural equations applied) if a view of a parameter leaf
    view: tuple[int, tuple[int, ...] | None, tuple[Any, ...]] | None = None
    layer_out: str | None = None                        # direct output of this layer's product (+bias)
    layer_out_axes: tuple[int, ...] | None = None       # its output-channel axes


_NOTHING = _Info()


def _sub_jaxpr(eqn: jcore.JaxprEqn) -> jcore.ClosedJaxpr | jcore.Jaxpr | None:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is not None and (hasattr(sub, "eqns") or hasattr(sub, "jaxpr")):
            return sub
    return None


def _open(sub: Any) -> tuple[jcore.Jaxpr, list[Any]]:
    if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
        return sub.jaxpr, list(sub.consts)
    return sub, []


def _is_float(aval: Any) -> bool:
    return hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.inexact)


def _view_through(eqn: jcore.JaxprEqn, view: tuple[int, Any, tuple[Any, ...]]) -> tuple[int, Any, tuple] | None:
    """Follow a structural op applied to a parameter leaf; returns the new view or None."""
    leaf, axes, chain = view
    chain = chain + (eqn,)
    name = eqn.primitive.name
    if len(eqn.invars) != 1:
        return None
    if name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
        return (leaf, axes, chain)
    if name == "transpose":
        perm = eqn.params["permutation"]
        return (leaf, None if axes is None else tuple(axes[p] for p in perm), chain)
    if name in ("reshape", "broadcast_in_dim", "squeeze", "expand_dims"):
        in_shape = tuple(eqn.invars[0].aval.shape)
        out_shape = tuple(eqn.outvars[0].aval.shape)
        if axes is None:
            return (leaf, None, chain)
        # Only size-1 insertions/removals keep a readable axis map.
        in_real = [(a, s) for a, s in zip(axes, in_shape) if s != 1]
        out_real = [i for i, s in enumerate(out_shape) if s != 1]
        if [s for _, s in in_real] != [out_shape[i] for i in out_real]:
            return (leaf, None, chain)
        new = [-1] * len(out_shape)
        for (a, _), i in zip(in_real, out_real):
            new[i] = a
        return (leaf, tuple(new), chain)
    return None


class _Analysis:
    """Two walks over the program: first find layers and biases, then dependence and sources."""

    def __init__(self, program: Program, paths: Sequence[str]):
        self.program = program
        self.paths = list(paths)
        self.layers: dict[str, dict[str, Any]] = {}        # weight path -> layer fields
        # Equations are keyed by the ids of the call equations enclosing them plus their own id:
        # one jitted function called at two sites shares its jaxpr object between them.
        self.layer_of_eqn: dict[tuple[int, ...], str] = {}   # key -> weight path
        self.bias_eqns: dict[tuple[int, ...], str] = {}      # key -> weight path
        self.roles: dict[tuple[int, ...], Role] = {}
        self.parallel: list[ParallelProduct] = []
        self.upstream: dict[str, set[str]] = {}
        self.theta: set[int] = set()
        self.weight_position: dict[tuple[int, ...], int] = {}
        self.weight_chain: dict[tuple[int, ...], tuple[Any, ...]] = {}   # leaf -> operand equations
        self.nonlinear_deps: dict[tuple[int, ...], list[bool]] = {}

    # -- pass 1: layers and biases -----------------------------------------------------------
    def find_layers(self) -> None:
        jaxpr = self.program.closed.jaxpr
        env: dict[Any, _Info] = {}
        for i, v in enumerate(jaxpr.invars[: self.program.n_params]):
            if _is_float(v.aval):
                env[v] = _Info(view=(i, tuple(range(len(v.aval.shape))), ()))
        self._walk_layers(jaxpr, env)
        # θ = weights and biases of layers
        for fields in self.layers.values():
            self.theta.add(fields["weight_index"])
            if fields["bias_index"] is not None:
                self.theta.add(fields["bias_index"])

    def _walk_layers(self, jaxpr: jcore.Jaxpr, env: dict[Any, _Info], ctx: tuple[int, ...] = ()) -> list[_Info]:
        read = lambda v: env.get(v, _NOTHING) if not isinstance(v, jcore.Literal) else _NOTHING
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            name = eqn.primitive.name
            outs: list[_Info] = [_NOTHING] * len(eqn.outvars)
            sub = _sub_jaxpr(eqn)
            if sub is not None and (name in _CALLS or name in _CUSTOM):
                sj, _ = _open(sub)
                sub_env = {v: info for v, info in zip(sj.invars, ins[len(ins) - len(sj.invars):])}
                outs = self._walk_layers(sj, sub_env, ctx + (id(eqn),))
            elif name in _CONTROL and any(i.view is not None for i in ins) and self._control_has_layers(eqn):
                raise NotImplementedError(
                    f"a parameter layer sits inside lax.{name}; OBA's connectivity map needs the layers "
                    "unrolled (use a Python loop instead of lax.scan/nnx.scan/cond for the layer stack)")
            elif name in _STRUCTURAL and ins and ins[0].view is not None:
                outs = [_Info(view=_view_through(eqn, ins[0].view))]
            elif name in ("convert_element_type", "copy", "copy_p") and ins and ins[0].layer_out is not None:
                outs = [ins[0]]
            elif name in ("dot_general", "conv_general_dilated"):
                outs = [self._maybe_layer(eqn, ins, ctx + (id(eqn),))]
            elif name == "add" and len(ins) == 2:
                outs = [self._maybe_bias(eqn, ins, ctx + (id(eqn),))]
                if outs[0].layer_out is None:
                    outs = [self._through_residual(eqn, ins)]
            for v, info in zip(eqn.outvars, outs):
                env[v] = info
        return [read(v) for v in jaxpr.outvars]

    def _maybe_layer(self, eqn: jcore.JaxprEqn, ins: list[_Info], key: tuple[int, ...]) -> _Info:
        views = [info.view for info in ins[:2]]
        if (views[0] is None) == (views[1] is None):
            return _NOTHING
        w_pos = 0 if views[0] is not None else 1
        leaf, axes, chain = views[w_pos]
        path = self.paths[leaf]
        kind = "dense" if eqn.primitive.name == "dot_general" else "conv"
        w_ndim = len(eqn.invars[w_pos].aval.shape)
        groups = 1
        if kind == "dense":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            contract = rc if w_pos == 1 else lc
            batch = rb if w_pos == 1 else lb
            free = [d for d in range(w_ndim) if d not in contract and d not in batch]
            in_view, out_view = tuple(contract), tuple(free)
            x_ndim = len(eqn.invars[1 - w_pos].aval.shape)
            x_contract = lc if w_pos == 1 else rc
            x_free = x_ndim - len(x_contract) - len(batch)
            start = len(batch) + (x_free if w_pos == 1 else 0)
            out_act_axes = tuple(range(start, start + len(free)))
        else:
            dn = eqn.params["dimension_numbers"]
            if w_pos != 1:
                return _NOTHING
            rhs_spec, out_spec = dn.rhs_spec, dn.out_spec
            in_view, out_view = (rhs_spec[1],), (rhs_spec[0],)
            out_act_axes = (out_spec[1],)
            groups = int(eqn.params.get("feature_group_count", 1))
        to_leaf = lambda ax: None if axes is None or any(axes[a] < 0 for a in ax) else tuple(axes[a] for a in ax)
        name = path[: -len("/kernel")] if path.endswith("/kernel") else path
        self.layers.setdefault(path, {
            "name": name, "weight": path, "weight_index": leaf, "bias": None, "bias_index": None,
            "kind": kind, "in_axes": to_leaf(in_view), "out_axes": to_leaf(out_view), "groups": groups,
        })
        self.layer_of_eqn[key] = path
        self.weight_position[key] = w_pos
        self.weight_chain[key] = chain
        return _Info(layer_out=path, layer_out_axes=out_act_axes)

    def _maybe_bias(self, eqn: jcore.JaxprEqn, ins: list[_Info], key: tuple[int, ...]) -> _Info:
        for y, b, b_var in ((ins[0], ins[1], eqn.invars[1]), (ins[1], ins[0], eqn.invars[0])):
            if y.layer_out is None or b.view is None:
                continue
            fields = self.layers[y.layer_out]
            out_shape = eqn.outvars[0].aval.shape
            width = int(np.prod([out_shape[a] for a in y.layer_out_axes])) if y.layer_out_axes else -1
            b_size = int(np.prod(b_var.aval.shape))
            b_leaf = b.view[0]
            leaf_size = int(np.prod(self.program.closed.jaxpr.invars[b_leaf].aval.shape))
            if b_size != width or leaf_size != width:
                continue
            if fields["bias_index"] not in (None, b_leaf):
                continue
            fields["bias"] = self.paths[b_leaf]
            fields["bias_index"] = b_leaf
            self.bias_eqns[key] = y.layer_out
            return dataclasses.replace(y)
        return _NOTHING

    def _through_residual(self, eqn: jcore.JaxprEqn, ins: list[_Info]) -> _Info:
        """`y_L + r` still carries layer L's output channels, so a bias added next is L's (`h + x@W + b`)."""
        carriers = [i for i, info in enumerate(ins)
                    if info.layer_out is not None and self.layers[info.layer_out]["bias_index"] is None]
        if len(carriers) != 1 or ins[1 - carriers[0]].view is not None:
            return _NOTHING
        if tuple(eqn.invars[carriers[0]].aval.shape) != tuple(eqn.outvars[0].aval.shape):
            return _NOTHING
        return ins[carriers[0]]

    # -- pass 2: dependence, sources, roles --------------------------------------------------
    def classify(self) -> None:
        jaxpr = self.program.closed.jaxpr
        env: dict[Any, _Info] = {}
        for i, v in enumerate(jaxpr.invars[: self.program.n_params]):
            if i in self.theta:
                env[v] = _Info(dep=True)
        self._walk_roles(jaxpr, env)

    def _walk_roles(self, jaxpr: jcore.Jaxpr, env: dict[Any, _Info],
                    ctx: tuple[int, ...] = ()) -> tuple[list[_Info], bool]:
        read = lambda v: env.get(v, _NOTHING) if not isinstance(v, jcore.Literal) else _NOTHING
        has_exact = False
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            name = eqn.primitive.name
            key = ctx + (id(eqn),)
            deps = [info.dep and _is_float(v.aval) for info, v in zip(ins, eqn.invars)]
            src = frozenset().union(*(i.src for i in ins))
            anc = frozenset().union(*(i.anc for i in ins))
            out_info = _Info(dep=any(deps), src=src, anc=anc)
            sub = _sub_jaxpr(eqn)
            role: Role
            if key in self.layer_of_eqn:
                lname = self.layers[self.layer_of_eqn[key]]["name"]
                self.upstream.setdefault(lname, set()).update(anc)
                out_info = _Info(dep=True, src=frozenset({lname}), anc=anc | {lname})
                role, has_exact = Role.LAYER, True
            elif not any(deps):
                role = Role.CONSTANT
            elif sub is not None and (name in _CALLS or name in _CUSTOM):
                sj, _ = _open(sub)
                sub_env = {v: info for v, info in zip(sj.invars, ins[len(ins) - len(sj.invars):])}
                outs, inner_exact = self._walk_roles(sj, sub_env, key)
                if name in _CALLS or inner_exact:
                    role = Role.INLINE
                    has_exact |= inner_exact
                    for v, info in zip(eqn.outvars, outs):
                        env[v] = info
                    self.roles[key] = role
                    continue
                role = Role.NONLINEAR
            elif name in _CONTROL:
                role = Role.NONLINEAR
            elif name in ("mul", "dot_general") and sum(deps) == 2:
                a, b = ins[0].src, ins[1].src
                if a and b and not (a & b):
                    role, has_exact = Role.PARALLEL, True
                    self.parallel.append(ParallelProduct(
                        index=len(self.parallel), primitive=name,
                        operands=(_layer_names(a), _layer_names(b)),
                        sources=(tuple(sorted(a)), tuple(sorted(b))),
                        shape=tuple(eqn.outvars[0].aval.shape)))
                else:
                    role = Role.NONLINEAR
            elif self._is_linear(eqn, deps):
                role = Role.LINEAR
            else:
                role = Role.NONLINEAR
            self.roles[key] = role
            if role is Role.NONLINEAR:
                self.nonlinear_deps[key] = deps
            for j, v in enumerate(eqn.outvars):
                info = out_info
                if name in ("split", "slice") and out_info.dep:
                    # Q, K, V sliced from one fused projection are different activations.
                    info = dataclasses.replace(out_info, src=frozenset(f"{s}[{_slice_tag(eqn, j)}]" for s in src))
                env[v] = info if _is_float(v.aval) else _NOTHING
        return [read(v) for v in jaxpr.outvars], has_exact

    @staticmethod
    def _control_has_layers(eqn: jcore.JaxprEqn) -> bool:
        subs = [eqn.params.get(k) for k in ("jaxpr", "body_jaxpr", "cond_jaxpr")]
        subs += list(eqn.params.get("branches", ()))
        for sub in subs:
            if sub is not None and any(e.primitive.name in ("dot_general", "conv_general_dilated")
                                       for e in _open(sub)[0].eqns):
                return True
        return False

    @staticmethod
    def _is_linear(eqn: jcore.JaxprEqn, deps: list[bool]) -> bool:
        name = eqn.primitive.name
        if name not in _LINEAR:
            return False
        if name in _BILINEAR:
            return sum(deps) <= 1
        if name == "div":
            return not deps[1]
        if name == "select_n":
            return not deps[0]
        if name in ("dynamic_slice", "dynamic_update_slice", "gather"):
            return not any(deps[1:]) if name != "dynamic_update_slice" else not any(deps[2:])
        return True


def _matches(path: str, patterns: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in patterns)


def analyse(program: Program, paths: Sequence[str], exclude: Sequence[str] = ()) -> _Analysis:
    """Run both walks; raises if the program has no parameter layer.

    `exclude`: leaf paths (or path prefixes) of layer parameters to hold fixed: they are neither
    perturbed (v = 0) nor scored, but their layers still couple the others.
    """
    analysis = _Analysis(program, paths)
    analysis.find_layers()
    if not analysis.layers:
        raise ValueError("the model has no parameter layers: OBA scores Conv/Dense weights and biases, "
                         "found as dot_general/conv_general_dilated with a parameter operand; none was found")
    unknown = [p for p in exclude if not any(_matches(q, [p]) for q in paths)]
    if unknown:
        raise ValueError(f"exclude names no parameter leaf: {unknown}; leaves are e.g. {list(paths)[:5]}")
    analysis.theta = {i for i in analysis.theta if not _matches(paths[i], exclude)}
    if not analysis.theta:
        raise ValueError("every layer parameter is excluded: nothing left to score")
    analysis.classify()
    return analysis


def _build(analysis: _Analysis) -> Connectivity:
    layers = tuple(
        Layer(name=f["name"], weight=f["weight"], bias=f["bias"], kind=f["kind"],
              in_axes=f["in_axes"], out_axes=f["out_axes"], feature_group_count=f["groups"])
        for f in analysis.layers.values())
    order = {l.name: i for i, l in enumerate(layers)}
    upstream = {l.name: tuple(sorted(analysis.upstream.get(l.name, ()), key=order.__getitem__))
                for l in layers}
    theta_paths = {analysis.paths[i] for i in analysis.theta}
    unscored = tuple(p for p in analysis.paths if p not in theta_paths)
    return Connectivity(layers=layers, upstream=upstream, parallel=tuple(analysis.parallel),
                        unscored=unscored, leaf_paths=tuple(analysis.paths))


def connectivity(apply_fn: Callable, params: Any, example_inputs: Any) -> Connectivity:
    """The OBA connectivity map of `apply_fn(params, inputs) -> logits`.

    `params` is any pytree of arrays (an `nnx.State`, a dict, ...); `example_inputs` only needs the
    right shapes and dtypes. The program is traced once with `jax.make_jaxpr`.
    """
    _check_param_leaves(params)
    program = trace_program(apply_fn, params, example_inputs)
    return _build(analyse(program, leaf_paths(params)))
