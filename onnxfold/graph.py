"""Small helpers over the onnx-graphsurgeon IR, shared by predicates and engine: reading
it, and the two structural steps every stage takes (drop unused nodes, sort the rest)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import CannotTell
from .scopes import graph_and_bodies, holds_graph
from .weights import constant_values, held_constants, set_numpy_type

# ONNX defaults, filled in so rules compare attributes as the runtime sees them.
_SPATIAL_DEFAULTS = {"auto_pad": "NOTSET", "group": 1}
_DEFAULTS = {
    "BatchNormalization": {"epsilon": 1e-5, "momentum": 0.9, "training_mode": 0},
    "Gemm": {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0},
    "AveragePool": {"auto_pad": "NOTSET", "ceil_mode": 0, "count_include_pad": 0},
    "Reshape": {"allowzero": 0},
}
_WINDOWED = {"Conv", "ConvTranspose", "AveragePool"}


def producer(tensor):
    """The node that computes `tensor`, or None for inputs and constants."""
    if tensor is None or not tensor.inputs:
        return None
    return tensor.inputs[0]


def is_present(tensor) -> bool:
    """False for an omitted optional input (an empty name in ONNX)."""
    return tensor is not None and tensor.name != ""


def is_standard(node) -> bool:
    """An op of the default ONNX domain: a custom op may reuse a standard name."""
    return node.domain in (None, "", "ai.onnx")


def is_constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def use_numpy_types(graph) -> None:
    """Give every value of the graph and its subgraphs a numpy element type.

    graph-surgeon keeps ONNX's type number for the types numpy lacks (bfloat16, float8,
    int4, ...), where the rest of onnxfold compares numpy dtypes; ml_dtypes, which onnx
    installs, has them all. Their dtype kind tells the engine whether it may fold them.
    """
    for scope in graph_and_bodies(graph):
        for tensor in [*scope.tensors().values(), *held_constants(scope)]:
            if not isinstance(tensor.dtype, int):
                continue
            numpy_type = onnx.helper.tensor_dtype_to_np_dtype(tensor.dtype)
            if is_constant(tensor):
                set_numpy_type(tensor, numpy_type)
            else:
                tensor.dtype = numpy_type


def constant_size(tensor) -> int:
    """Number of elements of a constant, without reading it."""
    return math.prod(tensor.shape)


def constant_bytes(tensor) -> int:
    """Bytes of a constant's values, without reading them."""
    return constant_size(tensor) * np.dtype(tensor.dtype).itemsize


def spatial_rank(node) -> int:
    if "kernel_shape" in node.attrs:
        return len(node.attrs["kernel_shape"])
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is not None and weight.shape is not None:
        return len(weight.shape) - 2
    raise CannotTell(f"cannot tell the spatial rank of {node.op} node {node.name!r}")


def attributes(node) -> dict:
    """The node's attributes with ONNX defaults filled in."""
    filled = dict(_DEFAULTS.get(node.op, {}))
    if node.op in _WINDOWED:
        rank = spatial_rank(node)
        filled.update(_SPATIAL_DEFAULTS if node.op != "AveragePool" else {})
        filled.update(strides=[1] * rank, dilations=[1] * rank, pads=[0] * (2 * rank))
        if "kernel_shape" not in node.attrs and node.op != "AveragePool":
            filled["kernel_shape"] = list(node.inputs[1].shape[2:])
    filled.update(node.attrs)
    if filled.get("auto_pad") == "VALID":
        filled["pads"] = [0] * (2 * spatial_rank(node))
    return filled


def is_static(shape) -> bool:
    """Every dim of the shape is a known size.

    A negative dim_value is how some converters mark a dynamic dim (onnxruntime takes
    any size there); 0 is a real size (an empty tensor), enforced like any other.
    """
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def dims_of(shape) -> list:
    """A TensorShapeProto's dims as graph-surgeon holds them: a size, a name, or None
    when unknown (a negative size included)."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
            for d in shape.dim]


def without_negative_dims(shape):
    """A graph-surgeon shape with negative sizes (dynamic, see is_static) as unknown."""
    if shape is None:
        return None
    return [None if isinstance(d, int) and d < 0 else d for d in shape]


def rank_of(tensor):
    """The tensor's rank if known (constants always are), else None."""
    if tensor is None or tensor.shape is None:
        return None
    return len(tensor.shape)


def infer_output_shapes(node, opset) -> None:
    """Give a new node's untyped outputs their shapes, from ONNX's per-node inference.

    Later rules check ranks and shapes of values earlier rewrites created. Where a shape
    cannot be inferred it stays unknown, and rules that need it do not fire.
    """
    present = [t for t in node.inputs if t.name]
    if all(t.shape is not None for t in node.outputs):
        return  # a rewrite keeps its root's value, whose shape is known: nothing to infer
    if any(t.dtype is None or t.shape is None for t in present):
        return
    try:
        schema = onnx.defs.get_schema(node.op, opset, node.domain or "")
        types = {t.name: onnx.helper.make_tensor_type_proto(onnx_type(t.dtype), t.shape) for t in present}
        data = {t.name: onnx.numpy_helper.from_array(constant_values(t), t.name)
                for t in present if is_constant(t) and constant_size(t) <= 64}
        proto = onnx.helper.make_node(node.op, [t.name for t in node.inputs],
                                      [t.name for t in node.outputs], **node.attrs)
        inferred = onnx.shape_inference.infer_node_outputs(schema, proto, types, data)
    except Exception:  # noqa: BLE001 - any inference failure just leaves shapes unknown
        return
    for tensor in node.outputs:
        kind = inferred.get(tensor.name)
        if tensor.shape is None and kind is not None and kind.tensor_type.HasField("shape"):
            tensor.shape = dims_of(kind.tensor_type.shape)


def onnx_type(dtype) -> int:
    """The ONNX element type of a numpy dtype (ml_dtypes included) or ONNX type number.

    Not graph-surgeon's dtype_to_onnx, which calls float8_e4m3fnuz FLOAT8E4M3FN."""
    return dtype if isinstance(dtype, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# --- dropping unused nodes and sorting ------------------------------------------------------
# graph-surgeon's cleanup() and toposort() look for nested graphs and outer-scope values at
# every node and name every tensor of the graph on each call; the pipeline calls them a dozen
# times, and on a 500-node model that was a fifth of the optimizer's time. Where no node
# holds a graph and the model has no local functions, the walks below do the same by identity.

def holds_graphs(graph) -> bool:
    """Whether a node of `graph` holds a nested graph, or the graph has local functions:
    then graph-surgeon's own walks, which follow values into them, are used."""
    return bool(graph.functions) or any(holds_graph(node) for node in graph.nodes)


def drop_unused_nodes(graph):
    """graph.cleanup(): nodes no graph output depends on leave the graph, disconnected."""
    if holds_graphs(graph):
        return graph.cleanup()
    for tensor in graph.inputs:
        tensor.inputs.clear()  # a graph input has no producer in this graph
    own = {id(node) for node in graph.nodes}
    used, seen, pending = set(), set(), list(graph.outputs)
    while pending:
        tensor = pending.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        for node in tensor.inputs:
            if id(node) in own and id(node) not in used:
                used.add(id(node))
                pending.extend(node.inputs)
    kept = []
    for node in graph.nodes:
        if id(node) in used:
            kept.append(node)
        else:
            node.inputs.clear()
            node.outputs.clear()
    graph.nodes = kept
    return graph


def sort_nodes(graph):
    """graph.toposort(), in its very order: nodes by their depth from the inputs, ties in
    the order a depth-first walk from each node, in graph order, finishes them."""
    if holds_graphs(graph):
        return graph.toposort()
    own = {id(node) for node in graph.nodes}
    depth = {}  # id -> (depth, node), in the order nodes are finished

    def producers(node):
        found = {}
        for tensor in node.inputs:
            for source in tensor.inputs:
                if id(source) in own:
                    found.setdefault(id(source), source)
        return list(found.values())

    for start in graph.nodes:
        pending, open_nodes = [(start, None)], set()  # (node, its producers once visited)
        while pending:
            node, sources = pending.pop()
            if sources is not None:  # every producer is finished: so is the node
                depth[id(node)] = (1 + max((depth[id(p)][0] for p in sources), default=-1), node)
                open_nodes.discard(id(node))
                continue
            if id(node) in depth:
                continue
            if id(node) in open_nodes:
                raise ValueError(f"the graph has a cycle through node '{node.name}'")
            open_nodes.add(id(node))
            sources = producers(node)
            pending.append((node, sources))
            pending.extend((p, None) for p in reversed(sources) if id(p) not in depth)
    graph.nodes = [node for _, node in sorted(depth.values(), key=lambda entry: entry[0])]
    return graph
