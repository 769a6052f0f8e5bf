"""Clean-ups that exported graphs need before rules can see their patterns.

PyTorch's exporters hide the same block behind different shapes: weights as `Constant`
nodes, `Identity` chains, inference `Dropout`, `Add(x, 0)` and `Mul(x, 1)`, small constant
subgraphs. Each step here removes one of those shapes and changes nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from .constfold import fold_constants
from .graph import attributes, drop_unused_nodes, is_constant, is_standard, is_static, producer
from .names import NameSource, name_nodes
from .scopes import graph_and_bodies
from .weights import constant_values

_NEUTRAL = {"Add": (0.0, True), "Sub": (0.0, False), "Mul": (1.0, True), "Div": (1.0, False)}
_PASS_THROUGH = {"Identity", "Dropout"}


@dataclass(frozen=True)
class Cleanup:
    """One named clean-up: `--only/--skip` take its name, `onnxfold rules` lists it.

    `run(graph, names)` changes the graph in place and returns how many nodes (or, for
    weights and chains, how many of what it names) it removed; 0 means no change.
    """

    name: str
    summary: str
    run: Callable


def normalize(graph: gs.Graph, names: NameSource | None = None, steps=None) -> dict:
    """Run every clean-up (or those of `steps`) once; return how many nodes each removed.

    `names` gives fresh names unique across all scopes (for unnamed nodes, inlined If branches).
    """
    drop_unused_nodes(graph)  # nodes an earlier rewrite disconnected
    names = names or NameSource(graph_and_bodies(graph))
    name_nodes(graph, names)
    counts = {}
    for step in STEPS if steps is None else steps:
        counts[step.name] = step.run(graph, names)
    drop_unused_nodes(graph)
    return counts


def bypassing(ops, source_of) -> Callable:
    """A clean-up that removes each standard node of `ops` whose output equals a value it
    reads: `source_of(node)` gives that value, or None where the node is not a no-op."""

    def run(graph, names) -> int:
        count = 0
        for node in list(graph.nodes):
            # A node bypassed earlier in this pass has no outputs left.
            if node.op in ops and node.outputs and is_standard(node):
                source = source_of(node)
                if source is not None:
                    count += _bypass(graph, node, source)
        return count

    return run


def _constant_nodes_to_weights(graph) -> int:
    """`Constant` nodes become stored weights, so rules see one kind of constant."""
    outputs = {id(t) for t in graph.outputs}
    count = 0
    for node in graph.nodes:
        if node.op != "Constant" or id(node.outputs[0]) in outputs:
            continue
        values = _constant_node_values(node)
        if values is None:
            continue
        tensor = node.outputs[0]
        node.outputs.clear()
        tensor.to_constant(values)
        count += 1
    return count


def _constant_node_values(node):
    attrs = node.attrs
    if isinstance(attrs.get("value"), gs.Constant):
        return constant_values(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None  # sparse or string constants are left as they are


def _inline_constant_ifs(graph, names) -> int:
    """An If whose condition is a constant is replaced by the branch it takes."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "If" or not is_standard(node) or not is_constant(node.inputs[0]):
            continue
        condition = constant_values(node.inputs[0]).reshape(-1)
        if condition.size != 1:
            continue
        taken, dropped = ("then_branch", "else_branch") if condition[0] else ("else_branch", "then_branch")
        if len(node.attrs[taken].outputs) != len(node.outputs):
            continue
        _inline_branch(graph, node, node.attrs[taken], names)
        _detach(node.attrs[dropped])
        count += 1
    return count


def _inline_branch(graph, node, branch, names) -> None:
    """Put the branch's nodes in the If's place; Identity nodes pass its results on.

    A branch output may be an outer value, a constant, or also read inside the branch,
    so the If's outputs are not simply handed to the branch's producers; the clean-ups
    remove the Identity nodes where they can. Values the branch computes get fresh
    names (two branches, or a branch and the graph, may use the same names); outer
    values keep theirs.
    """
    outer = graph.tensors()
    for inner in branch.nodes:
        inner.name = names.fresh(inner.name or inner.op)
        for tensor in inner.outputs:
            if tensor.name:
                tensor.name = names.fresh(tensor.name)
        for tensor in inner.inputs:
            if is_constant(tensor) and outer.get(tensor.name, tensor) is not tensor:
                tensor.name = names.fresh(tensor.name)
    results = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()
    links = [gs.Node("Identity", names.fresh(f"{node.name}_{result.name}"), inputs=[value], outputs=[result])
             for value, result in zip(branch.outputs, results)]
    index = graph.nodes.index(node)
    graph.nodes[index:index + 1] = [*branch.nodes, *links]
    branch.nodes, branch.outputs = [], []


def _detach(graph) -> None:
    """Disconnect a dropped branch from the values it reads, so no count of consumers
    (nor a later clean-up of this now unreachable scope) still sees it."""
    for node in graph.nodes:
        for subgraph in node.subgraphs():
            _detach(subgraph)
        node.inputs.clear()
        node.outputs.clear()
    graph.nodes, graph.inputs, graph.outputs = [], [], []


def _is_identity_reshape(node) -> bool:
    """A Reshape whose input already has the (static) shape it asks for."""
    data, target = node.inputs[0], node.inputs[1]
    if not is_constant(target) or not is_static(data.shape):
        return False
    spec = constant_values(target).reshape(-1).tolist()
    if len(spec) != len(data.shape):
        return False
    copy_zero = not attributes(node)["allowzero"]
    resolved = [data.shape[i] if (d == 0 and copy_zero) else d for i, d in enumerate(spec)]
    if resolved.count(-1) == 1:
        known = int(np.prod([d for d in resolved if d != -1]))
        resolved[resolved.index(-1)] = int(np.prod(data.shape)) // known if known else -1
    return resolved == list(data.shape)


def _is_pass_through(node) -> bool:
    if node.op == "Identity":
        return True
    # Dropout is the identity in inference mode, as long as its mask is unused.
    training = len(node.inputs) > 2 and node.inputs[2].name != ""
    mask_used = len(node.outputs) > 1 and node.outputs[1].name != ""
    return not training and not mask_used and attributes(node).get("training_mode", 0) == 0


def _neutral_operand(node):
    """The data input of x+0, x-0, x*1 or x/1 whose constant cannot change x's shape."""
    neutral, commutes = _NEUTRAL[node.op]
    candidates = [(0, 1), (1, 0)] if commutes else [(0, 1)]
    for data_index, constant_index in candidates:
        data, constant = node.inputs[data_index], node.inputs[constant_index]
        if not is_constant(constant) or np.any(constant_values(constant) != neutral):
            continue
        if _broadcast_keeps_shape(data, constant) and data.dtype == constant.dtype:
            return data
    return None


def _broadcast_keeps_shape(data, constant) -> bool:
    if data.shape is None:
        return False
    shape = tuple(constant.shape)
    if len(shape) > len(data.shape):
        return False
    if all(size == 1 for size in shape):
        return True
    return is_static(data.shape) and \
        np.broadcast_shapes(tuple(data.shape), shape) == tuple(data.shape)


def _bypass(graph, node, source=None) -> int:
    """Remove a node whose output equals `source` (its first input by default)."""
    source = node.inputs[0] if source is None else source
    result = node.outputs[0]
    outputs = graph.outputs
    if result in outputs:
        # The graph output keeps its name: the source value takes it over, if it can
        # (not a graph input or output, and computed in this graph, not an outer scope).
        origin = producer(source)
        if source in graph.inputs or source in outputs or origin is None or origin not in graph.nodes:
            return 0
        source.name = result.name
        if source.dtype is None:  # the output's declared kind (a sequence stays one)
            source.dtype, source.type = result.dtype, result.type
        source.shape = source.shape or result.shape
        outputs[outputs.index(result)] = source
    redirect(result, source)
    node.inputs.clear()
    node.outputs.clear()
    return 1


def redirect(value, replacement) -> None:
    """Every node reading `value` reads `replacement` instead."""
    for consumer in list(value.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is value:
                consumer.inputs[index] = replacement


def _sequence_splits_to_split(graph, names) -> int:
    """A SplitToSequence read only by SequenceAt at stored positions is a Split.

    The dynamo exporter without its optimizer writes tensor.split([a, b, c]) that way;
    each SequenceAt becomes an Identity of its piece, which the pass-through clean-up
    then removes. Split takes its sizes as an input from opset 13.
    """
    count = 0
    outputs = {id(t) for t in graph.outputs}
    for node in list(graph.nodes):
        sizes = _stored_split_sizes(node, graph.opset)
        readers = node.outputs[0].outputs if sizes is not None else []
        if not readers or id(node.outputs[0]) in outputs or not all(_reads_at(r, len(sizes)) for r in readers):
            continue
        pieces = [gs.Variable(names.fresh(f"{node.name}_{i}"), dtype=node.inputs[0].dtype) for i in range(len(sizes))]
        for reader in readers[:]:
            position = int(constant_values(reader.inputs[1]).reshape(-1)[0])
            reader.op, reader.attrs = "Identity", {}
            reader.inputs.clear()
            reader.inputs.append(pieces[position])
        node.op, node.attrs = "Split", {"axis": node.attrs.get("axis", 0)}
        node.outputs.clear()
        node.outputs.extend(pieces)
        count += 1
    return count


def _stored_split_sizes(node, opset):
    """The sizes a standard SplitToSequence splits into, when stored as a list; else None."""
    if node.op != "SplitToSequence" or not is_standard(node) or opset < 13 or len(node.inputs) < 2:
        return None
    sizes = constant_values(node.inputs[1]) if is_constant(node.inputs[1]) else None
    if sizes is None or sizes.ndim != 1:
        return None  # a scalar chunk size needs the input's shape to count the pieces
    if sizes.dtype != np.int64:
        return None  # SplitToSequence takes int32 sizes too, Split int64 only
    return sizes.tolist()


def _reads_at(reader, count) -> bool:
    return (reader.op == "SequenceAt" and is_standard(reader) and is_constant(reader.inputs[1])
            and constant_values(reader.inputs[1]).size == 1
            and -count <= int(constant_values(reader.inputs[1]).reshape(-1)[0]) < count)


def _pass_through_source(node):
    return node.inputs[0] if _is_pass_through(node) else None


def _identity_reshape_source(node):
    return node.inputs[0] if _is_identity_reshape(node) else None


# The clean-ups in the order they run; noops.py and cse.py add theirs (cleanups.py).
STEPS = [
    Cleanup("constant-nodes", "Constant nodes become stored weights",
            lambda graph, names: _constant_nodes_to_weights(graph)),
    Cleanup("constant-subgraphs", "what depends only on constants and static shapes is computed",
            fold_constants),
    Cleanup("constant-if", "an If with a constant condition becomes the branch it takes",
            _inline_constant_ifs),
    Cleanup("sequence-split", "a SplitToSequence read by SequenceAt at stored positions is a Split",
            lambda graph, names: _sequence_splits_to_split(graph, names)),
    Cleanup("identity-and-dropout", "Identity, and Dropout in inference mode, are removed",
            bypassing(_PASS_THROUGH, _pass_through_source)),
    Cleanup("neutral-elementwise", "x+0, x-0, x*1 and x/1 that keep x's shape and type are x",
            bypassing(set(_NEUTRAL), _neutral_operand)),
    Cleanup("identity-reshape", "a Reshape to the shape its input has is removed",
            bypassing({"Reshape"}, _identity_reshape_source)),
]
