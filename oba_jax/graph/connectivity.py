"""Pass 2 of the analysis: what the OBA surrogate does with every equation, and the connectivity map.

Given the layers of pass 1 (`oba_jax.graph.layers`) and θ (their weights and biases, minus
`exclude=`), one more walk of the program tracks, for every value, whether it depends on θ and which
layers lie upstream of it (the nearest ones and all of them). That gives each equation a `Role`:

* a layer product is kept exact and couples its weights with every layer upstream of its input
  (series connectivity);
* a product (`mul`, `dot_general`, `conv_general_dilated`) of two θ-dependent values from disjoint
  sets of nearest layers is a *parallel product* (``Q Kᵀ``, ``A V``, a gated MLP), kept exact; one whose
  operands share a source (``x·sigmoid(x)``, BatchNorm's ``x̂·rsqrt(var)``) is a nonlinearity;
* every other equation is linear in its θ-dependent operands (kept as it is) or nonlinear
  (linearised); calls that hold exact equations are walked into (`Role.CALL`).

The result is two frozen records: `Analysis` (what the score programs need, keyed by equation) and
the public `Connectivity` map.
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from oba_jax.graph.layers import FoundLayers, Layer, LayerUse, find_layers
from oba_jax.paths import matches
from oba_jax.program import (PLAIN_CALLS, Equation, EqnKey, Program, call_kind, check_param_leaves, run,
                             trace_program, walk_into)
from oba_jax.program.primitives import PRODUCTS, is_float, is_linear

__all__ = ["Analysis", "Connectivity", "ParallelProduct", "Role", "analyse", "connectivity"]


class Role(enum.Enum):
    """What the OBA surrogate does with an equation."""

    CONSTANT = "constant"      # does not depend on θ: evaluate as is
    LINEAR = "linear"          # linear in its θ-dependent operands: evaluate as is
    LAYER = "layer"            # a parameter layer's product: evaluate as is
    PARALLEL = "parallel"      # activation × activation product: as is (or linearised for the series part)
    NONLINEAR = "nonlinear"    # linearised at the current point
    CALL = "call"              # a call (or unrolled scan) whose body is walked equation by equation


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
    upstream: Mapping[str, tuple[str, ...]]    # layer -> every layer upstream of its input
    parallel: tuple[ParallelProduct, ...]
    unscored: tuple[str, ...]                  # parameter leaves OBA never perturbs nor scores
    leaf_paths: tuple[str, ...]                # every parameter leaf, in flattening order
    unscored_reasons: Mapping[str, str] = dataclasses.field(default_factory=lambda: MappingProxyType({}))

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

    def relative_to(self, prefix: str) -> "Connectivity":
        """The map with paths relative to `prefix/` (leaves outside it dropped), e.g. `"params"`."""
        lead = prefix.rstrip("/") + "/"
        strip = lambda p: p[len(lead):] if p is not None and p.startswith(lead) else p
        layers = tuple(dataclasses.replace(l, name=strip(l.name), weight=strip(l.weight), bias=strip(l.bias))
                       for l in self.layers)
        parallel = tuple(dataclasses.replace(p, operands=tuple(tuple(map(strip, side)) for side in p.operands),
                                             sources=tuple(tuple(map(strip, side)) for side in p.sources))
                         for p in self.parallel)
        inside = [p for p in self.unscored if p.startswith(lead)]
        return Connectivity(
            layers=layers, upstream=MappingProxyType({strip(k): tuple(map(strip, v)) for k, v in self.upstream.items()}),
            parallel=parallel, unscored=tuple(map(strip, inside)),
            leaf_paths=tuple(strip(p) for p in self.leaf_paths if p.startswith(lead)),
            unscored_reasons=MappingProxyType({strip(p): self.unscored_reasons[p] for p in inside
                                               if p in self.unscored_reasons}))

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
            for path in self.unscored:
                if path in self.unscored_reasons:
                    lines.append(f"    {path}: {self.unscored_reasons[path]}")
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Graphviz DOT: solid edges = direct series connections, dashed red = parallel products."""
        out = ["digraph oba {", "  rankdir=LR;", "  node [shape=box, fontname=Helvetica];"]
        for layer in self.layers:
            out.append(f'  "{layer.name}" [label="{layer.name}\\n{layer.kind}"];')
        for up, down in _direct_edges(self.upstream):
            out.append(f'  "{up}" -> "{down}";')
        for p in self.parallel:
            node = f"{p.primitive}#{p.index}"
            out.append(f'  "{node}" [shape=ellipse, color=red, label="{p.primitive} {p.shape}"];')
            for side in p.operands:
                for name in side:
                    out.append(f'  "{name}" -> "{node}" [style=dashed, color=red];')
        out.append("}")
        return "\n".join(out)


def _direct_edges(upstream: Mapping[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """Transitive reduction of the series relation (for drawing)."""
    edges = []
    for down, ups in upstream.items():
        for up in ups:
            if not any(up in upstream.get(mid, ()) for mid in ups if mid != up):
                edges.append((up, down))
    return edges


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Everything the score programs need to know of one traced program, keyed by equation."""

    program: Program
    found: FoundLayers
    theta: tuple[int, ...]                               # perturbed and scored leaves, ascending
    roles: Mapping[EqnKey, Role]
    nonlinear_deps: Mapping[EqnKey, tuple[bool, ...]]    # which operands of a nonlinear equation move
    graph: Connectivity

    @property
    def uses(self) -> Mapping[EqnKey, LayerUse]:
        return self.found.uses

    def role(self, key: EqnKey) -> Role:
        return self.roles.get(key, Role.CONSTANT)


# ---------------------------------------------------------------------------------------------
# Pass 2


@dataclasses.dataclass(frozen=True)
class _Dep:
    """What pass 2 knows of one value."""

    dep: bool = False                          # depends on θ
    src: frozenset[str] = frozenset()          # nearest upstream layers (with slice tags)
    anc: frozenset[str] = frozenset()          # all upstream layers


_NOTHING = _Dep()
# Calls walked into whenever they depend on θ: their bodies are the function (rematerialised or not).
_TRANSPARENT = PLAIN_CALLS | {"checkpoint", "remat", "remat2"}


def _slice_tag(eqn: Equation, out_index: int) -> str:
    """A readable name of the part of its input a `slice`/`split` output is."""
    if eqn.primitive.name == "split":
        sizes = [int(s) for s in eqn.params["sizes"]]
        start = sum(sizes[:out_index])
        return f"axis{eqn.params['axis']}:{start}:{start + sizes[out_index]}"
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    return ",".join(f"{a}:{b}" for a, b in zip(starts, limits))


class _Roles:
    """Rules of pass 2. `roles`, `parallel` and `upstream` collect its findings."""

    def __init__(self, found: FoundLayers, layer_names: frozenset[str]):
        self.found = found
        self.layer_names = layer_names
        self.roles: dict[EqnKey, Role] = {}
        self.nonlinear_deps: dict[EqnKey, tuple[bool, ...]] = {}
        self.parallel: list[ParallelProduct] = []
        self.upstream: dict[str, set[str]] = {}
        self.has_exact = False

    def constant(self, value: Any) -> _Dep:
        return _NOTHING

    def enter(self, eqn: Equation, key: EqnKey, ins: list[_Dep]) -> bool:
        kind = call_kind(eqn)
        if not any(d.dep and is_float(v.aval) for d, v in zip(ins, eqn.invars)):
            return False    # does not depend on θ: evaluated as it is (Role.CONSTANT)
        if kind == "scan":
            enter = key in self.found.unrolled
        elif kind == "cond" or eqn.primitive.name in _TRANSPARENT:
            enter = True
        else:   # a custom-derivative call: walked into only if it holds layers or parallel products
            dry = _Roles(self.found, self.layer_names)   # throw-away findings
            walk_into(eqn, ins, dry, key)
            enter = dry.has_exact
        if enter:
            self.roles[key] = Role.CALL
        return enter

    def index(self, value: _Dep, i: int) -> _Dep:
        return value

    def stack(self, values: list[_Dep]) -> _Dep:
        return _Dep(dep=any(v.dep for v in values), src=frozenset().union(*(v.src for v in values)),
                    anc=frozenset().union(*(v.anc for v in values)))

    def equation(self, eqn: Equation, key: EqnKey, ins: list[_Dep]) -> list[_Dep]:
        name = eqn.primitive.name
        deps = tuple(info.dep and is_float(v.aval) for info, v in zip(ins, eqn.invars))
        src = frozenset().union(*(i.src for i in ins))
        anc = frozenset().union(*(i.anc for i in ins))
        out_info = _Dep(dep=any(deps), src=src, anc=anc)
        if key in self.found.uses:
            lname = self.found.uses[key].layer
            self.upstream.setdefault(lname, set()).update(anc)
            out_info = _Dep(dep=True, src=frozenset({lname}), anc=anc | {lname})
            role, self.has_exact = Role.LAYER, True
        elif not any(deps):
            role = Role.CONSTANT
        elif name in PRODUCTS and sum(deps) == 2:
            a, b = ins[0].src, ins[1].src
            if a and b and not (a & b):
                role, self.has_exact = Role.PARALLEL, True
                self.parallel.append(ParallelProduct(
                    index=len(self.parallel), primitive=name,
                    operands=(self._names(a), self._names(b)),
                    sources=(tuple(sorted(a)), tuple(sorted(b))),
                    shape=tuple(eqn.outvars[0].aval.shape)))
            else:
                role = Role.NONLINEAR
        elif is_linear(name, deps) and call_kind(eqn) is None:
            role = Role.LINEAR
        else:
            role = Role.NONLINEAR
        self.roles[key] = role
        if role is Role.NONLINEAR:
            self.nonlinear_deps[key] = deps
        outs = []
        for j, v in enumerate(eqn.outvars):
            info = out_info
            if name in ("split", "slice") and out_info.dep:
                # Q, K, V sliced from one fused projection are different activations.
                info = dataclasses.replace(out_info, src=frozenset(f"{s}[{_slice_tag(eqn, j)}]" for s in src))
            outs.append(info if is_float(v.aval) else _NOTHING)
        return outs

    def _names(self, sources: frozenset[str]) -> tuple[str, ...]:
        """Layer names of sources (slice tags removed)."""
        names = set()
        for s in sources:
            while s not in self.layer_names and "[" in s:
                s = s.rsplit("[", 1)[0]
            names.add(s)
        return tuple(sorted(names))


def analyse(program: Program, exclude: Sequence[str] = ()) -> Analysis:
    """Both passes over a traced program; raises if it has no parameter layer.

    `exclude`: leaf paths (or path prefixes) of layer parameters to hold fixed: they are neither
    perturbed (v = 0) nor scored, but their layers still couple the others.
    """
    found = find_layers(program)
    if not found.layers:
        raise ValueError("the model has no parameter layers: OBA scores Conv/Dense weights and biases, "
                         "found as dot_general/conv_general_dilated of an activation and a parameter; none was "
                         "found")
    paths = program.paths
    unknown = [p for p in exclude if not any(matches(q, [p]) for q in paths)]
    if unknown:
        raise ValueError(f"exclude names no parameter leaf: {unknown}; leaves are e.g. {list(paths)[:5]}")
    layer_leaves = set(found.weight_leaves.values()) | set(found.bias_leaves.values())
    theta = tuple(sorted(i for i in layer_leaves if not matches(paths[i], exclude)))
    if not theta:
        raise ValueError("every layer parameter is excluded: nothing left to score")

    rules = _Roles(found, frozenset(l.name for l in found.layers))
    args = [_Dep(dep=True) if i in set(theta) else _NOTHING for i in range(len(program.jaxpr.invars))]
    run(program.jaxpr, [_NOTHING] * len(program.consts), args, rules)

    order = {l.name: i for i, l in enumerate(found.layers)}
    upstream = {l.name: tuple(sorted(rules.upstream.get(l.name, ()), key=order.__getitem__)) for l in found.layers}
    reasons = {paths[i]: why for i, why in found.unscored.items()}
    reasons.update({paths[i]: "held fixed (exclude=)" for i in layer_leaves if i not in theta})
    unscored = tuple(p for i, p in enumerate(paths) if i not in set(theta))
    graph = Connectivity(layers=found.layers, upstream=MappingProxyType(upstream), parallel=tuple(rules.parallel),
                         unscored=unscored, leaf_paths=paths, unscored_reasons=MappingProxyType(reasons))
    return Analysis(program=program, found=found, theta=theta, roles=MappingProxyType(rules.roles),
                    nonlinear_deps=MappingProxyType(rules.nonlinear_deps), graph=graph)


def connectivity(apply_fn: Callable, params: Any, example_inputs: Any) -> Connectivity:
    """The OBA connectivity map of `apply_fn(params, inputs) -> logits`.

    `params` is any pytree of arrays (an `nnx.State`, a dict, ...); `example_inputs` only needs the
    right shapes and dtypes. The program is traced once with `jax.make_jaxpr`.
    """
    check_param_leaves(params, abstract=True)
    return analyse(trace_program(apply_fn, params, example_inputs)).graph
