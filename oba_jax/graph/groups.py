"""Channel dependency groups read from the program: DepGraph for JAX.

Every axis of every value gets an *axis node*; per-primitive rules (`AXIS_RULES`, a rule set on the one
interpreter) say which nodes are the same channels: a conv / dense layer ties its input's channel
axis to its kernel's in-axis and makes a new node for its output channels, elementwise ops and
residual adds unify matching axes, a norm's scale / bias / running statistics join the axis they
broadcast along, a reshape splits or merges nodes (heads × head dims, a flatten before a dense layer),
a concatenation / split makes a node out of segments. The nodes form a union-find whose roots may be
*composite* — a `factor` (row-major product: `(heads, head_dim)`, `(H, W, C)`) or a `concat` of
children — and the atomic roots are the channel groups. A group's members are the parameter leaf
axes it runs along, each with the leaf indices of every channel.

A primitive without a rule makes the groups it touches not prunable, with the primitive and the
equation named; so do a group that reaches the model's inputs or the logits, and the groups in
`ignore`. Nothing is pruned silently wrong.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from oba_jax.graph.layers import FoundLayers, find_layers
from oba_jax.paths import matches
from oba_jax.program import Equation, EqnKey, Program, call_kind, check_param_leaves, run, trace_program
from oba_jax.program.primitives import (ELEMENTWISE, IDENTITY_LIKE, is_float, moved_axes, product_axes,
                                       product_macs, reshape_groups)

__all__ = ["AxisLayout", "ChannelGroup", "GroupGraph", "GroupMember", "KINDS", "axis_layout", "channel_groups",
           "find_groups"]

KINDS = ("channels", "hidden", "heads", "head_dim", "embed")


@dataclasses.dataclass(frozen=True, eq=False)
class GroupMember:
    """One parameter leaf axis of a group: channel c of the group is `indices[c]` on `axis` of `path`
    (one index for a plain channel, a block after a flatten or a reshape into heads)."""

    path: str
    axis: int
    indices: np.ndarray          # (group size, entries per channel), ascending per row
    role: str = "other"          # "out" / "in": a layer weight's output / input channels; "bias"; "other"
    layer: str | None = None     # the layer (its weight path) of an "out" / "in" / "bias" member

    def __repr__(self) -> str:
        return f"GroupMember({self.path!r}, axis={self.axis}, {self.role}, {self.indices.shape[1]} per channel)"


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Channels that must shrink together.

    `kind`: "channels" (conv), "hidden" (dense units), "heads", "head_dim", "embed" (a transformer's
    residual stream). `prunable` is False when the group touches the model's inputs or the classifier's
    outputs, is in `ignore`, or meets a construct without a channel rule; `reason` then says which.
    `producers` are the layers whose output channels the group is (their weight paths).
    """

    name: str
    kind: str
    size: int
    prunable: bool
    members: tuple[GroupMember, ...]
    reason: str | None = None
    producers: tuple[str, ...] = ()

    def member(self, path: str, axis: int | None = None) -> GroupMember:
        for m in self.members:
            if m.path == path and (axis is None or m.axis == axis):
                return m
        raise KeyError(f"group {self.name!r} has no member {path!r}" + (f" axis {axis}" if axis is not None else ""))

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"not prunable: {self.reason}"
        return f"ChannelGroup({self.name!r}, {self.kind}, size={self.size}, {len(self.members)} members, {state})"


# ---------------------------------------------------------------------------------------------
# Axis nodes: a union-find with composite roots


class _Nodes:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.struct: dict[int, tuple[str, tuple[int, ...]]] = {}   # root -> ("factor" | "concat", children)
        self.flags: dict[int, set[str]] = {}                       # node -> {"input", "output", "spatial", ...}
        self.reasons: dict[int, str] = {}                          # node -> why not prunable
        self.residual: set[int] = set()

    def new(self, size: int, flag: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        n = len(self.parent) - 1
        if flag:
            self.flags.setdefault(n, set()).add(flag)
        return n

    def find(self, n: int) -> int:
        root = n
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[n] != root:
            self.parent[n], n = root, self.parent[n]
        return root

    def block(self, n: int, why: str) -> None:
        """Marks a node (every atom under it, at the end) not prunable."""
        self.reasons.setdefault(n, why)

    def unify(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.block(ra, f"axes of {self.size[ra]} and {self.size[rb]} entries meet at {where}")
            self.block(rb, f"axes of {self.size[ra]} and {self.size[rb]} entries meet at {where}")
            return
        sa, sb = self.struct.get(ra), self.struct.get(rb)
        if sa is None:
            self.parent[ra] = rb
        elif sb is None:
            self.parent[rb] = ra
        elif sa[0] == sb[0] == "factor":
            sizes = _common_refinement([self.size[c] for c in sa[1]], [self.size[c] for c in sb[1]])
            if sizes is None:
                self._clash(ra, rb, where)
                return
            for x, y in zip(self.factor(ra, sizes, where), self.factor(rb, sizes, where)):
                self.unify(x, y, where)
            ra, rb = self.find(ra), self.find(rb)
            if ra != rb:
                self.parent[ra] = rb
        elif sa[0] == sb[0] == "concat":
            cuts = sorted(set(_cuts(self, sa[1])) | set(_cuts(self, sb[1])))
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                self.unify(self.split(ra, lo, hi, where), self.split(rb, lo, hi, where), where)
            ra, rb = self.find(ra), self.find(rb)
            if ra != rb:
                self.parent[ra] = rb
        else:
            self._clash(ra, rb, where)

    def _clash(self, ra: int, rb: int, where: str) -> None:
        why = f"the same channels are laid out two incompatible ways (a reshape and a concatenation) at {where}"
        self.block(ra, why)
        self.block(rb, why)
        self.parent[ra] = rb

    def factor(self, n: int, sizes: Sequence[int], where: str) -> list[int]:
        """The node as a row-major product of nodes of `sizes` (made so if it is atomic)."""
        r = self.find(n)
        sizes = [int(s) for s in sizes]
        if math.prod(sizes) != self.size[r]:
            self.block(r, f"a reshape at {where} does not divide its axis")
            return [self.new(s) for s in sizes]
        s = self.struct.get(r)
        if len(sizes) == 1:
            return [r]
        if s is None:
            children = tuple(self.new(k) for k in sizes)
            self.struct[r] = ("factor", children)
            return list(children)
        if s[0] != "factor":
            self.block(r, f"a concatenated axis is reshaped at {where}")
            return [self.new(k) for k in sizes]
        have = [self.size[c] for c in s[1]]
        if have == sizes:
            return list(s[1])
        finer = _common_refinement(have, sizes)
        if finer is None:
            self.block(r, f"a reshape at {where} mixes the factors of an axis")
            return [self.new(k) for k in sizes]
        atoms = [a for c, runs in zip(s[1], _runs(have, finer)) for a in self.factor(c, runs, where)]
        out, i = [], 0
        for runs in _runs(sizes, finer):
            part = atoms[i:i + len(runs)]
            i += len(runs)
            out.append(part[0] if len(part) == 1 else self._composite("factor", part))
        return out

    def merge(self, nodes: Sequence[int]) -> int:
        """A node that is the row-major product of `nodes`."""
        return nodes[0] if len(nodes) == 1 else self._composite("factor", list(nodes))

    def concat(self, nodes: Sequence[int]) -> int:
        return nodes[0] if len(nodes) == 1 else self._composite("concat", list(nodes))

    def _composite(self, kind: str, children: list[int]) -> int:
        n = self.new(sum(self.size[c] for c in children) if kind == "concat" else math.prod(self.size[c] for c in children))
        self.struct[n] = (kind, tuple(children))
        return n

    def split(self, n: int, lo: int, hi: int, where: str) -> int:
        """The node of positions [lo, hi) of `n` (the node becomes a concatenation if it is atomic)."""
        r = self.find(n)
        if (lo, hi) == (0, self.size[r]):
            return r
        s = self.struct.get(r)
        if s is None:
            parts = [(a, b) for a, b in ((0, lo), (lo, hi), (hi, self.size[r])) if b > a]
            children = tuple(self.new(b - a) for a, b in parts)
            self.struct[r] = ("concat", children)
            return children[[p for p in parts].index((lo, hi))]
        if s[0] == "concat":
            offset, inside = 0, []
            for c in s[1]:
                size = self.size[self.find(c)]
                if offset <= lo and hi <= offset + size:
                    return self.split(c, lo - offset, hi - offset, where)
                if lo <= offset and offset + size <= hi:
                    inside.append(c)
                offset += size
            if sum(self.size[self.find(c)] for c in inside) == hi - lo:
                return self.concat(inside)
        self.block(r, f"a slice at {where} cuts across the layout of its axis")
        return self.new(hi - lo)

    def atoms(self, n: int) -> list[int]:
        r = self.find(n)
        s = self.struct.get(r)
        return [r] if s is None else [a for c in s[1] for a in self.atoms(c)]

    def positions(self, n: int) -> dict[int, np.ndarray]:
        """For every atom under `n`: the positions of each of its channels along `n`, (size, k)."""
        r = self.find(n)
        s = self.struct.get(r)
        if s is None:
            return {r: np.arange(self.size[r])[:, None]}
        out: dict[int, np.ndarray] = {}
        if s[0] == "concat":
            offset = 0
            for c in s[1]:
                for atom, pos in self.positions(c).items():
                    out[atom] = np.concatenate([out[atom], pos + offset], axis=1) if atom in out else pos + offset
                offset += self.size[self.find(c)]
            return out
        sizes = [self.size[self.find(c)] for c in s[1]]
        strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
        for i, c in enumerate(s[1]):
            others = [np.arange(k) * st for j, (k, st) in enumerate(zip(sizes, strides)) if j != i]
            rest = _offsets(others)
            for atom, pos in self.positions(c).items():
                full = (pos[:, :, None] * strides[i] + rest[None, None, :]).reshape(pos.shape[0], -1)
                out[atom] = np.concatenate([out[atom], full], axis=1) if atom in out else full
        return out


def _offsets(parts: list[np.ndarray]) -> np.ndarray:
    """All sums of one entry of each array (the offsets of the other factors of a row-major index)."""
    total = np.zeros(1, np.int64)
    for p in parts:
        total = (total[:, None] + p[None, :]).reshape(-1)
    return total


def _cuts(nodes: _Nodes, children: Sequence[int]) -> list[int]:
    cuts = [0]
    for c in children:
        cuts.append(cuts[-1] + nodes.size[nodes.find(c)])
    return cuts


def _common_refinement(a: Sequence[int], b: Sequence[int]) -> list[int] | None:
    """Of two row-major factorisations of one axis, the finer one when the other is made of runs of
    it (e.g. (H·W, C) and (H, W, C)); None when neither refines the other."""
    for fine, coarse in ((list(a), list(b)), (list(b), list(a))):
        if _runs(coarse, fine) is not None:
            return fine
    return None


def _runs(coarse: Sequence[int], fine: Sequence[int]) -> list[list[int]] | None:
    """`fine` cut into consecutive runs whose products are `coarse`, or None."""
    out, i = [], 0
    for c in coarse:
        run, p = [], 1
        while p < c and i < len(fine):
            run.append(fine[i])
            p *= fine[i]
            i += 1
        if p != c:
            return None
        out.append(run or [1])
    return out if i == len(fine) else None


# ---------------------------------------------------------------------------------------------
# Values and rules


@dataclasses.dataclass(frozen=True)
class _Val:
    axes: tuple[int | None, ...]      # one node per axis (None: broadcast, no channel meaning)
    act: bool = False                 # depends on the inputs
    const: bool = False               # computed from constants only


def _unit(n: int) -> bool:
    return n == 1


class _Groups:
    """Rules of the groups pass."""

    def __init__(self, found: FoundLayers, constant_nodes: bool = False):
        self.nodes = _Nodes()
        self.found = found
        # the layout pass (`axis_layout`) gives constants nodes too, so that a constant combined with a
        # channel axis (RoPE tables, masks, a width-derived scale vector) is known to run along it
        self.constant_nodes = constant_nodes
        self.record: dict[EqnKey, tuple[tuple, tuple]] = {}   # key -> (input axes, output axes), layout pass
        self.constant_uses: list[tuple[int, int]] = []        # (a constant's node, its node at one use)
        self.entered: set[EqnKey] = set()
        self.heads: set[int] = set()
        self.head_dims: set[int] = set()   # the per-head feature axes of attention-like products
        self.products: list[tuple[int, tuple[int | None, ...], bool]] = []   # (MACs, axis nodes, attention)

    # -- interpreter hooks ------------------------------------------------------------------
    def constant(self, value: Any) -> _Val:
        if self.constant_nodes:
            return _Val(tuple(self._fresh(s) for s in np.shape(value)), const=True)
        return _Val((None,) * np.ndim(value), const=True)

    def enter(self, eqn: Equation, key: EqnKey, ins: list[_Val]) -> bool:
        entered = call_kind(eqn) != "scan" or key in self.found.unrolled
        if entered and self.constant_nodes:
            self.entered.add(key)
        return entered

    def index(self, value: _Val, i: int) -> _Val:
        return _Val(value.axes[1:], value.act, value.const)

    def stack(self, values: list[_Val]) -> _Val:
        first = values[0]
        for v in values[1:]:
            for a, b in zip(first.axes, v.axes):
                if a is not None and b is not None:
                    self.nodes.unify(a, b, "the outputs of an unrolled lax.scan")
        return _Val((None,) + first.axes, any(v.act for v in values), all(v.const for v in values))

    def equation(self, eqn: Equation, key: EqnKey, ins: list[_Val]) -> list[_Val]:
        name = eqn.primitive.name
        where = f"`{name}` (equation {len(self.nodes.parent)})"
        rule = AXIS_RULES.get(name)
        if rule is None and name in ELEMENTWISE:
            rule = _elementwise
        const = all(v.const for v in ins)
        if not const:
            ins = [self._one_use(v) if v.const else v for v in ins]
        outs = self._unknown(eqn, ins, where) if rule is None else rule(self, eqn, ins, where)
        act = any(v.act for v in ins)
        if self.constant_nodes:
            # every axis gets a node (a broadcast's new axis too), so that what it meets later sizes it
            outs = [tuple(n if n is not None or _unit(s) else self.nodes.new(s) for n, s in zip(o, var.aval.shape))
                    for o, var in zip(outs, eqn.outvars)]
            self.record[key] = (tuple(v.axes for v in ins), tuple(outs))
        return [_Val(o, act, const) for o in outs]

    def _one_use(self, v: _Val) -> _Val:
        """A constant where it meets the program, with nodes of its own for this use: one constant used by
        several layers (a head mask sliced per layer, a shared scale vector) must not tie their channels —
        it is gathered at each use's kept positions. A use's batch axis is tied back after the pass."""
        axes = tuple(None if n is None else self.nodes.new(self.nodes.size[self.nodes.find(n)]) for n in v.axes)
        self.constant_uses.extend((n, m) for n, m in zip(v.axes, axes) if n is not None)
        return _Val(axes, v.act, True)

    def _unknown(self, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
        why = (f"`{eqn.primitive.name}` has no channel rule" + (": its body is not walked (not a scan with layers)"
                                                             if eqn.primitive.name in ("scan", "while", "cond") else ""))
        for v in ins:
            for n in v.axes:
                if n is not None:
                    self.nodes.block(n, why)
        outs = [tuple(self._fresh(s) for s in o.aval.shape) for o in eqn.outvars]
        return [_Val(o, any(v.act for v in ins)) for o in outs]

    def _fresh(self, size: int) -> int | None:
        return None if _unit(size) else self.nodes.new(size)

    def same(self, a: int | None, b: int | None, where: str) -> int | None:
        """Unifies two axis nodes (either may be None: no constraint); returns the result's node."""
        if a is None:
            return b
        if b is not None:
            self.nodes.unify(a, b, where)
        return a


Rule = Callable[[_Groups, Equation, list[_Val], str], list[tuple[int | None, ...]]]


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(var.aval.shape)


def _elementwise(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    """Operands of the output's shape line up axis by axis (size-1 and scalar operands broadcast)."""
    out_shape = _shape(eqn.outvars[0])
    axes: list[int | None] = [None] * len(out_shape)
    joins = eqn.primitive.name in ("add", "add_any", "sub") and all(v.act for v in ins)
    for v, var in zip(ins, eqn.invars):
        shape = _shape(var)
        if len(shape) != len(out_shape):
            continue
        for d, (n, s) in enumerate(zip(v.axes, shape)):
            if s == out_shape[d] and not _unit(s):
                if joins and axes[d] is not None and n is not None and g.nodes.find(axes[d]) != g.nodes.find(n):
                    g.nodes.residual.update((axes[d], n))   # two branches joined: a residual stream
                axes[d] = g.same(axes[d], n, where)
    return [tuple(axes)] * len(eqn.outvars)


def _moved(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    """transpose, broadcast_in_dim: each output axis is an input axis (or new)."""
    return [tuple(None if a is None else ins[0].axes[a] for a in moved_axes(eqn))]


def _reshape(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    in_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    axes: list[int | None] = [None] * len(out_shape)
    for gi, go in reshape_groups(in_shape, out_shape):
        real_in = [a for a in gi if not _unit(in_shape[a])]
        real_out = [d for d in go if not _unit(out_shape[d])]
        if not real_in or not real_out:
            continue
        nodes = [ins[0].axes[a] if ins[0].axes[a] is not None else g.nodes.new(in_shape[a]) for a in real_in]
        if len(real_in) == 1 and len(real_out) == 1:
            axes[real_out[0]] = nodes[0]
        elif len(real_in) == 1:
            for d, n in zip(real_out, g.nodes.factor(nodes[0], [out_shape[d] for d in real_out], where)):
                axes[d] = n
        elif len(real_out) == 1:
            axes[real_out[0]] = g.nodes.merge(nodes)
        else:
            merged = g.nodes.merge(nodes)
            for d, n in zip(real_out, g.nodes.factor(merged, [out_shape[d] for d in real_out], where)):
                axes[d] = n
    return [tuple(axes)]


def _slice(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    shape = _shape(eqn.invars[0])
    p = eqn.params
    strides = p["strides"] or (1,) * len(shape)
    axes = []
    for d, (n, lo, hi, st) in enumerate(zip(ins[0].axes, p["start_indices"], p["limit_indices"], strides)):
        if n is None or (lo, hi, st) == (0, shape[d], 1):
            axes.append(n)
        elif _unit(hi - lo):
            if not _is_spatial(g, n):   # one entry picked by position: pruning would shift which one it is
                g.nodes.block(n, f"a slice picks single channels by position at {where} (e.g. the pairs a "
                                 "rotary embedding rotates)")
            axes.append(None)
        elif st != 1:
            g.nodes.block(n, f"a strided slice of a channel axis at {where}")
            axes.append(g.nodes.new(len(range(lo, hi, st))))
        else:
            axes.append(g.nodes.split(n, lo, hi, where))
    return [tuple(axes)]


def _split(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    axis, sizes = eqn.params["axis"], eqn.params["sizes"]
    outs, lo = [], 0
    for size in sizes:
        axes = list(ins[0].axes)
        n = axes[axis]
        axes[axis] = None if n is None or _unit(size) else g.nodes.split(n, lo, lo + size, where)
        lo += size
        outs.append(tuple(axes))
    return outs


def _concatenate(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    d = eqn.params["dimension"]
    out_shape = _shape(eqn.outvars[0])
    axes: list[int | None] = [None] * len(out_shape)
    for v in ins:
        for a, n in enumerate(v.axes):
            if a != d:
                axes[a] = g.same(axes[a], n, where)
    parts = [v.axes[d] if v.axes[d] is not None else g.nodes.new(_shape(var)[d])
             for v, var in zip(ins, eqn.invars)]
    axes[d] = g.nodes.concat(parts)
    return [tuple(axes)]


def _reduce(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    dropped = set(eqn.params["axes"])
    return [tuple(n for a, n in enumerate(ins[0].axes) if a not in dropped)] * len(eqn.outvars)


def _argreduce(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    dropped = set(eqn.params["axes"])
    return [tuple(n for a, n in enumerate(ins[0].axes) if a not in dropped)]


def _along_axis(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    """cumsum & co., sort: positions along `axis` mix, the other axes stay."""
    axis = eqn.params.get("axis", eqn.params.get("dimension", 0))
    n = ins[0].axes[axis]
    if n is not None:
        g.nodes.block(n, f"`{eqn.primitive.name}` mixes the positions of a channel axis at {where}")
    return [ins[0].axes] * len(eqn.outvars)


def _dot_general(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    pa = product_axes(eqn)
    (lc, rc), (lb, rb) = pa.contracted, pa.batch
    a, b = ins
    for x, y in zip(lc, rc):
        g.same(a.axes[x], b.axes[y], where)
    batch = [g.same(a.axes[x], b.axes[y], where) for x, y in zip(lb, rb)]
    free_a, free_b = [a.axes[i] for i in pa.free[0]], [b.axes[i] for i in pa.free[1]]
    if a.act and b.act:   # attention-like: the shared (batch) axes besides the batch are heads, the
        # contracted and free ones the head dims (q·k's, and v's in att·v) or tokens (flagged apart)
        g.heads.update(n for n in batch if n is not None)
        g.head_dims.update(n for n in [a.axes[x] for x in lc] + free_a + free_b if n is not None)
    out = tuple(batch + free_a + free_b)
    if a.act or b.act:   # per-example work: its MACs shrink with the kept fraction of every axis involved
        g.products.append((product_macs(eqn), out + tuple(a.axes[x] for x in lc), a.act and b.act))
    return [out]


def _conv(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    p = eqn.params
    pa = product_axes(eqn)
    lhs, rhs = ins
    lhs_shape, rhs_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.invars[1]), _shape(eqn.outvars[0])
    groups, batch_groups = int(p["feature_group_count"]), int(p["batch_group_count"])
    (c_in,), (k_in,) = pa.contracted
    (k_out,), (out_channels,) = pa.free[1], pa.out_free[1]
    for d in pa.spatial[1]:
        if rhs.axes[d] is not None:
            g.nodes.flags.setdefault(rhs.axes[d], set()).add("spatial")
    out: list[int | None] = [None] * len(out_shape)
    out[pa.out_free[0][0]] = lhs.axes[pa.free[0][0]]
    for d in pa.spatial[2]:
        out[d] = None if _unit(out_shape[d]) else g.nodes.new(out_shape[d], "spatial")
    out_node = rhs.axes[k_out] if rhs.axes[k_out] is not None else g._fresh(rhs_shape[k_out])
    if groups == 1 and batch_groups == 1:
        g.same(lhs.axes[c_in], rhs.axes[k_in], where)
    elif batch_groups == 1 and rhs_shape[k_in] == 1 and rhs_shape[k_out] == groups == lhs_shape[c_in]:
        out_node = g.same(lhs.axes[c_in], out_node, where)     # depthwise: channel c reads channel c
    else:
        why = f"a grouped convolution ({groups} groups) at {where}: only depthwise convolutions are pruned"
        for n in (lhs.axes[c_in], rhs.axes[k_in], out_node):
            if n is not None:
                g.nodes.block(n, why)
    out[out_channels] = out_node
    if lhs.act or rhs.act:
        g.products.append((product_macs(eqn), (out_node, rhs.axes[k_in]), lhs.act and rhs.act))
    return [tuple(out)]


def _window(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    """reduce_window (pooling): axes with a window of one stay, pooled axes are new."""
    dims = eqn.params["window_dimensions"]
    strides = eqn.params["window_strides"]
    out_shape = _shape(eqn.outvars[0])
    axes = []
    for d, (n, w, s) in enumerate(zip(ins[0].axes, dims, strides)):
        if w == 1 and s == 1:
            axes.append(n)
        else:
            if n is not None and not _is_spatial(g, n):
                g.nodes.block(n, f"a pooling window along a channel axis at {where}")
            axes.append(None if _unit(out_shape[d]) else g.nodes.new(out_shape[d], "spatial"))
    return [tuple(axes)] * len(eqn.outvars)


def _pad(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    axes = []
    for d, (n, (lo, hi, interior)) in enumerate(zip(ins[0].axes, eqn.params["padding_config"])):
        if (lo, hi, interior) == (0, 0, 0):
            axes.append(n)
        else:
            if n is not None and not _is_spatial(g, n):
                g.nodes.block(n, f"padding along a channel axis at {where}")
            axes.append(g._fresh(_shape(eqn.outvars[0])[d]))
    return [tuple(axes)]


def _gather(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    dn = eqn.params["dimension_numbers"]
    operand, indices = ins
    op_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    sizes = eqn.params["slice_sizes"]
    kept = [a for a in range(len(op_shape)) if a not in dn.collapsed_slice_dims and a not in dn.operand_batching_dims]
    for a in dn.start_index_map:
        # an axis addressed by index values (an embedding's rows: vocabulary, positions) is not a set of
        # channels: removing entries would leave indices that still point at them
        n = operand.axes[a]
        if n is not None:
            g.nodes.block(n, f"its entries are looked up by index (a gather / take, e.g. an embedding's rows) at "
                             f"{where}; only channels are pruned")
    out: list[int | None] = [None] * len(out_shape)
    for d, a in zip(dn.offset_dims, kept):
        if sizes[a] == op_shape[a]:
            out[d] = operand.axes[a]
    batch_out = [d for d in range(len(out_shape)) if d not in dn.offset_dims]
    idx_axes = [n for i, n in enumerate(indices.axes) if i != len(indices.axes) - 1]
    for d, n in zip(batch_out, idx_axes):
        out[d] = n
    return [tuple(out)]


def _dynamic_slice(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    shape = _shape(eqn.invars[0])
    axes = []
    for d, (n, size) in enumerate(zip(ins[0].axes, eqn.params["slice_sizes"])):
        if size == shape[d]:
            axes.append(n)
        else:
            if n is not None:
                g.nodes.block(n, f"a dynamic slice of a channel axis at {where}")
            axes.append(g._fresh(size))
    return [tuple(axes)]


def _identity(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    return [v.axes for v in ins][:len(eqn.outvars)]


def _constant_out(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    return [tuple(None for _ in o.aval.shape) for o in eqn.outvars]


def _rev(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    for d in eqn.params["dimensions"]:
        n = ins[0].axes[d]
        if n is not None and not ins[0].act and not _is_spatial(g, n):
            g.nodes.block(n, f"a channel axis is reversed at {where}")
    return [ins[0].axes]


def _is_spatial(g: _Groups, n: int) -> bool:
    return any("spatial" in g.nodes.flags.get(a, ()) or "spatial" in g.nodes.flags.get(n, ())
               for a in g.nodes.atoms(n))


def _stack(g: _Groups, eqn: Equation, ins: list[_Val], where: str) -> list[tuple]:
    axes: list[int | None] = [None] * len(ins[0].axes)
    for v in ins:
        for d, n in enumerate(v.axes):
            axes[d] = g.same(axes[d], n, where)
    axes.insert(eqn.params["axis"], None)
    return [tuple(axes)]


AXIS_RULES: dict[str, Rule] = {
    "broadcast_in_dim": _moved, "reshape": _reshape, "squeeze": _reshape, "expand_dims": _reshape,
    "transpose": _moved, "slice": _slice, "split": _split, "concatenate": _concatenate,
    "reduce_sum": _reduce, "reduce_max": _reduce, "reduce_min": _reduce, "reduce_prod": _reduce,
    "reduce_and": _reduce, "reduce_or": _reduce, "argmax": _argreduce, "argmin": _argreduce,
    "cumsum": _along_axis, "cumprod": _along_axis, "cummax": _along_axis, "cummin": _along_axis,
    "cumlogsumexp": _along_axis, "sort": _along_axis,
    "dot_general": _dot_general, "conv_general_dilated": _conv,
    "reduce_window_sum": _window, "reduce_window_max": _window, "reduce_window_min": _window,
    "reduce_window": _window, "pad": _pad, "gather": _gather, "dynamic_slice": _dynamic_slice,
    "rev": _rev, "stack": _stack,
    **{name: _identity for name in IDENTITY_LIKE},
    "iota": _constant_out, "random_bits": _constant_out, "random_seed": _constant_out,
    "random_wrap": _constant_out, "random_unwrap": _constant_out, "threefry2x32": _constant_out,
}


# ---------------------------------------------------------------------------------------------
# The pass and the groups


@dataclasses.dataclass(frozen=True)
class _Leaf:
    index: int
    path: str
    nodes: tuple[int | None, ...]


def _group_pass(program: Program, found: FoundLayers, ignore: Sequence[str], constant_nodes: bool = False):
    """The walk of the groups: `(rules, leaves, input axes, groups, atom names)`."""
    rules = _Groups(found, constant_nodes)
    nodes = rules.nodes
    jaxpr = program.jaxpr
    leaves: list[_Leaf] = []
    args: list[_Val] = []
    for i, v in enumerate(jaxpr.invars):
        shape = tuple(v.aval.shape)
        if i < program.n_params:
            axes = tuple(None if _unit(s) or not is_float(v.aval) else nodes.new(s) for s in shape)
            leaves.append(_Leaf(i, program.paths[i], axes))
            args.append(_Val(axes))
        else:
            # inputs: the batch axis, then spatial / token axes, the last axis the input channels
            flags = ["batch"] + ["spatial"] * (len(shape) - 2) + ["input"] if len(shape) > 1 else ["batch"]
            args.append(_Val(tuple(None if _unit(s) else nodes.new(s, f) for s, f in zip(shape, flags)), act=True))
    consts = [rules.constant(c) for c in program.consts]
    (logits,) = run(jaxpr, consts, args, rules)
    for n in logits.axes:
        if n is not None:
            nodes.flags.setdefault(n, set()).add("output")
    batch = {a for n, flags in nodes.flags.items() if "batch" in flags for a in nodes.atoms(n)}
    for n, use in rules.constant_uses:   # a constant that meets the batch axis is sized by the batch given
        if batch.intersection(nodes.atoms(use)):
            nodes.unify(n, use, "a constant's batch axis")
    groups, atom_names = _collect(program, found, rules, leaves, ignore)
    return rules, leaves, tuple(a.axes for a in consts + args), logits.axes, groups, atom_names


def find_groups(program: Program, found: FoundLayers | None = None, ignore: Sequence[str] = ()) -> GroupGraph:
    """The channel groups of a traced program (see the module docstring), with what it costs."""
    found = found if found is not None else find_layers(program)
    rules, leaves, _, _, groups, atom_names = _group_pass(program, found, ignore)
    formula = functools.partial(_formula, rules.nodes)
    products = tuple((macs, tuple(formula(n) for n in axes if n is not None), attention)
                     for macs, axes, attention in rules.products)
    sizes = tuple((leaf.path, math.prod(program.param_aval(leaf.index).shape),
                   tuple(formula(n) for n in leaf.nodes if n is not None)) for leaf in leaves
                  if is_float(program.param_aval(leaf.index)))
    return GroupGraph(groups=groups, products=products, leaves=sizes, atoms=MappingProxyType(atom_names))


AxisNodes = tuple  # one node id (or None) per axis of a value


class AxisLayout:
    """Where every axis of every value of a program runs, for rewriting the program (`shrink_program`).

    The groups pass with constants given nodes too, recording for every equation it evaluates (by its
    `EqnKey`) the axis nodes of its inputs and outputs, and which calls and scans it entered. A node's
    size and kept positions follow from the channels kept per atom (`kept_channels`) and the batch size."""

    def __init__(self, program: Program, found: FoundLayers | None = None):
        found = found if found is not None else find_layers(program)
        rules, _, self.start_axes, self.output_axes, self.groups, atom_names = _group_pass(program, found, (), True)
        self.program = program
        self._nodes = rules.nodes
        self.equations: Mapping[EqnKey, tuple[tuple[AxisNodes, ...], tuple[AxisNodes, ...]]] = \
            MappingProxyType(rules.record)
        self.entered = frozenset(rules.entered)
        self._atom_of = {name: atom for atom, name in atom_names.items()}
        self._batch_atoms = frozenset(a for n, flags in self._nodes.flags.items() if "batch" in flags
                                      for a in self._nodes.atoms(n))

    def kept_channels(self, positions: Mapping[tuple[str, int], np.ndarray]) -> dict[int, np.ndarray]:
        """`{atom: kept channel indices}` from the kept positions of parameter leaf axes (`kept_positions`
        of a plan): channel c of an atom is kept when any of its entries on a member axis is. A ValueError
        when the members of one atom disagree (the program ties two groups of the plan together)."""
        out: dict[int, np.ndarray] = {}
        for g in self.groups:
            verdicts = []
            for m in g.members:
                kept = positions.get((m.path, m.axis))
                if kept is not None:
                    # any: along a factored axis (query heads = kv groups × heads per group) the other
                    # factor's plan removes some of a kept channel's entries
                    verdicts.append((m, np.isin(m.indices, kept).any(axis=1)))
            if not verdicts:
                continue
            first = verdicts[0][1]
            for m, v in verdicts[1:]:
                if not np.array_equal(v, first):
                    raise ValueError(f"the plan keeps different channels on {verdicts[0][0].path!r} (axis "
                                     f"{verdicts[0][0].axis}) and {m.path!r} (axis {m.axis}), which the program "
                                     f"ties together (group {g.name!r} of the program); keep the same channels on both")
            if not first.all():
                out[self._atom_of[g.name]] = np.flatnonzero(first)
        return out

    def size(self, n: int | None, kept: Mapping[int, np.ndarray], batch: Any, full: int) -> Any:
        """The size of node `n` with `kept` channels per atom and `batch` examples (`full`: its traced size,
        for a None node)."""
        if n is None:
            return full
        r = self._nodes.find(n)
        s = self._nodes.struct.get(r)
        if s is None:
            if r in self._batch_atoms:
                return batch
            return len(kept[r]) if r in kept else self._nodes.size[r]
        sizes = [self.size(c, kept, batch, 0) for c in s[1]]
        return math.prod(sizes) if s[0] == "factor" else sum(sizes)

    def positions(self, n: int | None, kept: Mapping[int, np.ndarray]) -> np.ndarray | None:
        """The traced positions along node `n` that remain, ascending; None when all do."""
        if n is None:
            return None
        pos = self._nodes.positions(n)
        if not any(a in kept for a in pos):
            return None
        # a removed channel removes every entry it has along the node (a segment of a concatenation, a
        # stride of a factor); what no atom removes remains
        remains = np.ones(self._nodes.size[self._nodes.find(n)], bool)
        for a, p in pos.items():
            if a in kept:
                remains[p[np.setdiff1d(np.arange(p.shape[0]), kept[a])].reshape(-1)] = False
        return np.flatnonzero(remains)

    def is_batch(self, n: int | None) -> bool:
        return n is not None and any(a in self._batch_atoms for a in self._nodes.atoms(n))


def axis_layout(program: Program, found: FoundLayers | None = None) -> AxisLayout:
    """The `AxisLayout` of a traced program."""
    return AxisLayout(program, found)


def _formula(nodes: _Nodes, n: int) -> tuple:
    """The kept fraction of a node as a formula of its atoms' (`_fraction`)."""
    r = nodes.find(n)
    s = nodes.struct.get(r)
    if s is None:
        return ("atom", r)
    if s[0] == "factor":
        return ("factor", tuple(_formula(nodes, c) for c in s[1]))
    return ("concat", tuple((nodes.size[nodes.find(c)], _formula(nodes, c)) for c in s[1]))


def _fraction(formula: tuple, atoms: Mapping[int, str], kept: Mapping[str, float]) -> float:
    kind, body = formula
    if kind == "atom":
        return kept.get(atoms.get(body, ""), 1.0)
    if kind == "factor":
        return math.prod(_fraction(f, atoms, kept) for f in body)
    return sum(size * _fraction(f, atoms, kept) for size, f in body) / sum(size for size, _ in body)


@dataclasses.dataclass(frozen=True)
class GroupGraph:
    """The channel groups of a program and what it costs as a function of the channels kept: MACs of
    every per-example product and entries of every parameter leaf, each a product over its axes of the
    kept fraction of the groups along them (exact for factors and concatenations of groups)."""

    groups: tuple[ChannelGroup, ...]
    products: tuple[tuple[int, tuple[tuple, ...], bool], ...]
    leaves: tuple[tuple[str, int, tuple[tuple, ...]], ...]
    atoms: Mapping[int, str]

    def _fractions(self, kept: Mapping[str, Any]) -> dict[str, float]:
        sizes = {g.name: g.size for g in self.groups}
        return {name: len(idx) / sizes[name] for name, idx in kept.items()}

    def macs(self, kept: Mapping[str, Any] | None = None, *, attention: bool = True) -> int:
        """MACs (for the traced batch) with `kept` channels per group (None: the dense model)."""
        fractions = self._fractions(kept or {})
        return int(round(sum(macs * math.prod(_fraction(f, self.atoms, fractions) for f in axes)
                             for macs, axes, is_attention in self.products if attention or not is_attention)))

    def params(self, kept: Mapping[str, Any] | None = None, include: Callable[[str], bool] | None = None) -> int:
        """Entries of the float parameter leaves (those whose path `include` accepts) with `kept` channels."""
        fractions = self._fractions(kept or {})
        return int(round(sum(size * math.prod(_fraction(f, self.atoms, fractions) for f in axes)
                             for path, size, axes in self.leaves if include is None or include(path))))


def _collect(program: Program, found: FoundLayers, rules: _Groups, leaves: list[_Leaf],
             ignore: Sequence[str]) -> tuple[tuple[ChannelGroup, ...], dict[int, str]]:
    nodes = rules.nodes
    # Flags and reasons of any node hold for every atom under its root.
    atom_flags: dict[int, set[str]] = {}
    atom_reason: dict[int, str] = {}
    for n, flags in nodes.flags.items():
        for a in nodes.atoms(n):
            atom_flags.setdefault(a, set()).update(flags)
    for n, why in nodes.reasons.items():
        for a in nodes.atoms(n):
            atom_reason.setdefault(a, why)
    residual = {a for n in nodes.residual for a in nodes.atoms(n)}
    heads = {a for n in rules.heads for a in nodes.atoms(n)}
    head_dims = {a for n in rules.head_dims for a in nodes.atoms(n)} - heads
    for r, (kind, children) in nodes.struct.items():
        if kind == "factor" and nodes.find(r) == r:
            kids = [nodes.find(c) for c in children]
            if any(k in heads for k in kids):
                head_dims.update(k for k in kids if k not in heads and nodes.struct.get(k) is None)

    layers = {program.paths[found.weight_leaves[l.name]]: l for l in found.layers}
    roles: dict[tuple[str, int], tuple[str, str]] = {}
    bias_of: dict[str, str] = {}
    for layer in found.layers:
        for axis in layer.out_axes or ():
            roles[(layer.weight, axis)] = ("out", layer.weight)
        for axis in layer.in_axes or ():
            roles[(layer.weight, axis)] = ("in", layer.weight)
        if layer.bias is not None:
            bias_of.setdefault(layer.bias, layer.weight)
    members: dict[int, list[GroupMember]] = {}
    for leaf in leaves:
        for axis, n in enumerate(leaf.nodes):
            if n is None:
                continue
            role, owner = roles.get((leaf.path, axis), ("bias", bias_of[leaf.path]) if leaf.path in bias_of
                                    else ("other", None))
            for atom, pos in nodes.positions(n).items():
                members.setdefault(atom, []).append(GroupMember(leaf.path, axis, np.sort(pos, axis=1), role, owner))

    producers: dict[int, list[str]] = {}
    for layer in found.layers:
        if layer.out_axes is None or len(layer.out_axes) != 1:
            continue
        weight = next(l for l in leaves if l.path == layer.weight)
        n = weight.nodes[layer.out_axes[0]]
        if n is not None:
            for atom in nodes.atoms(n):
                producers.setdefault(atom, []).append(layer.weight)

    groups, used_names, atom_names = [], set(), {}
    for atom, mems in members.items():
        flags = atom_flags.get(atom, set())
        if flags & {"batch", "spatial"} or nodes.size[atom] == 1:
            continue   # not a channel axis (batch, spatial positions, tokens, kernel taps), or nothing to prune
        size = nodes.size[atom]
        kinds = {layers[m.path].kind for m in mems if m.path in layers}
        if atom in heads:
            kind = "heads"
        elif atom in head_dims:
            kind = "head_dim"
        elif atom in residual and sum(layers[m.path].kind == "dense" for m in mems if m.path in layers) > \
                sum(layers[m.path].kind == "conv" for m in mems if m.path in layers):
            kind = "embed"
        elif "conv" in kinds:
            kind = "channels"
        else:
            kind = "hidden"
        made_by = tuple(dict.fromkeys(producers.get(atom, ())))
        reason = atom_reason.get(atom)
        if "input" in flags:
            reason = "it runs along the model's input channels"
        elif "output" in flags:
            reason = "it is the classifier's outputs (the logits)"
        elif any(matches(m.path, ignore) for m in mems if m.path in made_by) or any(
                matches(p.rsplit("/", 1)[0], ignore) for p in made_by):
            reason = "its producing layer is in `ignore`"
        name = _group_name("inputs" if "input" in flags else made_by[0] if made_by else mems[0].path,
                           kind, used_names)
        if name in ignore:
            reason = reason or "it is in `ignore`"
        groups.append(ChannelGroup(name=name, kind=kind, size=size, prunable=reason is None,
                                   members=tuple(mems), reason=reason, producers=made_by))
        atom_names[atom] = name
    # in program order: the inputs, then by producing layer, the logits last
    order = {layer.weight: i for i, layer in enumerate(found.layers)}
    rank = lambda g: (-1 if g.name.startswith("inputs") else min((order.get(p, len(order)) for p in g.producers),
                                                                 default=len(order)), "logits" in (g.reason or ""))
    return tuple(sorted(groups, key=lambda g: (rank(g)[1], rank(g)[0]))), atom_names


def _group_name(base: str, kind: str, used: set[str]) -> str:
    """The producing layer's name (its weight path without `/kernel`), `/heads` or `/head_dim` for
    attention groups, `#2`, `#3`… when a name repeats (segments of one fused projection)."""
    base = base[: -len("/kernel")] if base.endswith("/kernel") else base
    if kind in ("heads", "head_dim"):
        base = f"{base}/{kind}"
    name = base
    for k in itertools.count(2):
        if name not in used:
            break
        name = f"{base}#{k}"
    used.add(name)
    return name


def channel_groups(apply_fn: Callable, params: Any, example_inputs: Any,
                   ignore: Sequence[str] = ()) -> tuple[ChannelGroup, ...]:
    """Every channel group of `apply_fn(params, inputs) -> logits` (see the module docstring).

    `ignore`: group names, or paths (prefixes) of layers whose output channels must not shrink.
    """
    check_param_leaves(params, abstract=True)
    return find_groups(trace_program(apply_fn, params, example_inputs), ignore=ignore).groups
