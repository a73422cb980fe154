"""Channel sums of per-parameter scores (OBA_SPEC.md §4): the input of structured pruning."""
from __future__ import annotations

import dataclasses

import numpy as np

from oba_jax.graph import Connectivity, Layer
from oba_jax.scores.scoring import ScoreResult

__all__ = ["LayerChannelScores", "channel_scores", "layer_channel_sums"]


@dataclasses.dataclass(frozen=True)
class LayerChannelScores:
    """Signed per-channel sums for one parameter layer, averaged over batches."""

    outputs: np.ndarray   # (out_channels,): weights making that output channel + its bias score
    inputs: np.ndarray    # (in_channels,): weights reading that input channel

    @property
    def out(self) -> np.ndarray:   # the 0.1 names, kept working
        return self.outputs

    @property
    def in_(self) -> np.ndarray:
        return self.inputs


def _flatten_axes(x: np.ndarray, keep: tuple[int, ...]) -> np.ndarray:
    """Sum `x` over every axis not in `keep` (ascending), then flatten the kept axes."""
    other = tuple(a for a in range(x.ndim) if a not in keep)
    return (x.sum(axis=other) if other else x).reshape(-1)


def layer_channel_sums(layer: Layer, weight_scores: np.ndarray,
                       bias_scores: np.ndarray | None) -> LayerChannelScores:
    """Output- and input-channel sums of one layer's weight (and bias) scores."""
    if layer.in_axes is None or layer.out_axes is None:
        raise ValueError(f"layer {layer.name!r}: its weight reaches the product through a reshape whose "
                         "channel axes cannot be mapped, so its channel sums are undefined")
    w = np.asarray(weight_scores, dtype=np.float64)
    in_axes, out_axes = layer.in_axes, layer.out_axes
    if layer.index is not None:
        # The layer reads part of its leaf (one slice of a stacked / fused weight): cut it out first.
        w = w[tuple(r if isinstance(r, int) else slice(*r) for r in layer.index)]
        fixed = [a for a, r in enumerate(layer.index) if isinstance(r, int)]
        renumber = lambda axes: tuple(a - sum(f < a for f in fixed) for a in axes)
        in_axes, out_axes = renumber(in_axes), renumber(out_axes)
        layer = dataclasses.replace(layer, in_axes=in_axes, out_axes=out_axes)
    out = _flatten_axes(w, tuple(sorted(layer.out_axes)))
    if bias_scores is not None:
        bias = np.asarray(bias_scores, dtype=np.float64)
        if layer.bias_index is not None:
            bias = bias[tuple(r if isinstance(r, int) else slice(*r) for r in layer.bias_index)]
        out = out + bias.reshape(-1)
    in_ = _flatten_axes(w, tuple(sorted(layer.in_axes)))
    groups = layer.feature_group_count
    if groups > 1:
        # Grouped conv: kernel in-axis k of output channel o reads input channel (o // (O/G))·(I/G) + k.
        o_axis = layer.out_axes[0]
        per_out = np.moveaxis(w, (layer.in_axes[0], o_axis), (-2, -1))
        per_out = per_out.reshape(-1, per_out.shape[-2], per_out.shape[-1]).sum(0)   # (I/G, O)
        n_in, n_out = per_out.shape
        in_ = np.zeros(n_in * groups)
        for o in range(n_out):
            g = o // (n_out // groups)
            in_[g * n_in:(g + 1) * n_in] += per_out[:, o]
    return LayerChannelScores(outputs=out, inputs=in_)


def channel_scores(result: ScoreResult, graph: Connectivity | None = None,
                   which: str = "mean") -> dict[str, LayerChannelScores]:
    """Per layer: signed output-channel sums (+ bias) and input-channel sums of the scores.

    `which="mean"` averages over batches; since channel sums are linear this equals the mean of the
    per-batch channel sums. `graph` defaults to the connectivity map the OBA score was computed with.
    """
    graph = graph or result.graph
    if graph is None:
        raise ValueError("channel_scores needs the connectivity map: pass graph=oba_jax.connectivity(...) "
                         "(baseline methods do not trace one)")
    by_path = result.by_path(which)
    return {layer.name: layer_channel_sums(layer, by_path[layer.weight],
                                           by_path[layer.bias] if layer.bias else None)
            for layer in graph.layers}
