"""Where each node of the output comes from, in its NodeProto.metadata_props.

A node a rule made gets `onnxfold.rule` (the rules behind it, comma-separated, in the order
they applied) and `onnxfold.replaced` (the input's nodes it stands for, comma-separated):
Netron shows them with the node, so a user who sees an unexpected weight can tell a fold
from a bug. Every other node keeps the metadata_props it had in the input (the dynamo
exporter's stack traces and module names), which onnx-graphsurgeon does not carry.

NodeProto.metadata_props came with IR version 10; the ONNX checker and onnxruntime accept
it at any IR version and older readers skip it as an unknown field, so the model's IR
version is kept as it was.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .scopes import holds_graph

_ORIGIN = "onnxfold_origin"  # on a gs.Node a rule made: (rules, replaced node names)
_METADATA = "onnxfold_metadata"  # on a gs.Node read from the input: its metadata_props


def rewrite_origin(rule_name, removed) -> tuple:
    """(rules, replaced) for the nodes a rewrite makes. A removed node a rule made passes
    on its own origin, so folds of folds name the input's nodes, never an intermediate
    node (whose name a later node may take)."""
    rules, replaced = [], []
    for node in removed:
        earlier = getattr(node, _ORIGIN, None)
        if earlier is None:
            replaced.append(node.name)
        else:
            rules += earlier[0]
            replaced += earlier[1]
    rules.append(rule_name)
    return tuple(dict.fromkeys(rules)), tuple(dict.fromkeys(replaced))


def mark_origin(node, origin) -> None:
    setattr(node, _ORIGIN, origin)


def remember_metadata(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Keep each imported node's metadata_props on it; call right after gs.import_onnx."""
    for node, proto in _pairs(graph, model.graph):
        if proto.metadata_props:
            setattr(node, _METADATA, list(proto.metadata_props))


def write_metadata(graph: gs.Graph, model: onnx.ModelProto, provenance=True) -> None:
    """Each exported node's metadata_props: a rule's node its origin (with `provenance`),
    any other the input's metadata."""
    for node, proto in _pairs(graph, model.graph):
        origin = getattr(node, _ORIGIN, None)
        if origin is None:
            if hasattr(node, _METADATA):  # most have none: no call into protobuf for them
                proto.metadata_props.extend(getattr(node, _METADATA))
        elif provenance:
            for key, names in (("onnxfold.rule", origin[0]), ("onnxfold.replaced", origin[1])):
                proto.metadata_props.add(key=key, value=",".join(names))


def _pairs(graph: gs.Graph, proto: onnx.GraphProto):
    """(gs node, NodeProto) in every scope: graph-surgeon imports and exports a graph's
    nodes, and a node's subgraphs, in order, so they pair up by position."""
    if len(graph.nodes) != len(proto.node):
        raise RuntimeError(f"graph '{proto.name}' has {len(proto.node)} nodes exported of {len(graph.nodes)}")
    for node, node_proto in zip(graph.nodes, proto.node):
        yield node, node_proto
        if not holds_graph(node):
            continue  # reading the proto's attributes costs more than this
        for attribute in node_proto.attribute:
            if attribute.HasField("g"):
                yield from _pairs(node.attrs[attribute.name], attribute.g)
