"""Layer 2: what the program is — parameter layers found by dataflow, roles, the connectivity map."""
from oba_jax.graph.connectivity import Analysis, Connectivity, ParallelProduct, Role, analyse, connectivity
from oba_jax.graph.cost import MacCount, count_macs, count_params, mac_count
from oba_jax.graph.groups import (KINDS, AxisLayout, ChannelGroup, GroupGraph, GroupMember, axis_layout, channel_groups,
                                  find_groups)
from oba_jax.graph.layers import FoundLayers, Layer, LayerUse, find_layers

__all__ = ["AxisLayout", "axis_layout", "KINDS", "MacCount", "count_macs", "count_params", "mac_count", "Analysis", "ChannelGroup", "GroupGraph", "Connectivity", "FoundLayers", "GroupMember", "channel_groups",
           "find_groups", "Layer", "LayerUse", "ParallelProduct", "Role", "analyse",
           "connectivity", "find_layers"]
