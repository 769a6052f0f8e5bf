"""Types and shapes of computed values, from ONNX shape inference only.

The file's own annotations are never trusted (a stale one would let a clean-up remove a
Reshape that does change the shape). Inference runs once on the input, and again each time
constant folding made a shape computation constant: a Reshape whose target became a
constant lets inference see past it, and what it then knows lets more shape arithmetic fold.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from .export import value_info
from .graph import constant_bytes, dims_of, holds_graphs, is_static, sort_nodes, without_negative_dims
from .modelio import attribute_value, copy_fields, without_large_weights
from .references import INLINE_LIMIT
from .scopes import graph_and_bodies, graphs


def apply_inferred_shapes(graph, model) -> list:
    """Give every computed value, in every scope, the type and shape ONNX inference finds.

    The file's own annotations (value_info, declared output shapes) are not trusted: a
    stale one would let a clean-up remove a Reshape that does change the shape. The main
    graph's inputs keep their declared shapes, a negative size read as dynamic (is_static);
    a Loop or Scan body's inputs have none while onnxfold reasons (see _forget_sizes).
    Returns [(body input, its declared shape)], for restore_declared to write back.
    """
    inferred = _inferred_types(model)
    scopes = graph_and_bodies(graph)
    declared = {id(t) for scope in scopes for t in scope.inputs}
    body_inputs = [(tensor, tensor.shape) for body in scopes[1:] for tensor in body.inputs]
    for scope in scopes:
        for tensor in scope.inputs:
            tensor.shape = without_negative_dims(tensor.shape) if scope is graph else None
        for tensor in scope.tensors().values():
            if not isinstance(tensor, gs.Constant) and id(tensor) not in declared:
                _set_type(tensor, inferred.get(tensor.name))
    return body_inputs


def restore_declared(body_inputs) -> None:
    """Give body inputs back the shapes they declared, to be written as they were:
    onnxruntime wants a Loop body's iteration count and condition shaped."""
    for tensor, shape in body_inputs:
        tensor.shape = shape


def _inferred_types(model) -> dict:
    """Value name -> TypeProto from shape inference, run on a copy without big weights nor
    the file's annotations; a name two scopes give different types is left out."""
    skeleton = without_large_weights(model)
    for scope in graphs(skeleton):
        del scope.value_info[:]
        for info in scope.input:
            _forget_sizes(info, keep_static=scope is skeleton.graph)
        for info in scope.output:
            _forget_sizes(info, keep_static=False)
    _hide_sizes_inference_gets_wrong(skeleton)
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    types, ambiguous = {}, set()
    for scope in graphs(inferred):
        for info in [*scope.value_info, *scope.output]:
            if types.setdefault(info.name, info.type) != info.type:
                ambiguous.add(info.name)
    return {name: kind for name, kind in types.items() if name not in ambiguous}


_POOLS = {"MaxPool", "AveragePool", "LpPool"}


def _hide_sizes_inference_gets_wrong(skeleton) -> None:
    """Where ONNX inference and onnxruntime disagree on a node's output sizes, inference is
    made to know its rank only, and so everything computed from it.

    A pool with ceil_mode=1: onnxruntime (as PyTorch) drops a last window that would start
    in the end padding, which ONNX inference counts (5 wide, kernel 2, stride 2, pads 1:
    3 against 4). The output is read through a Reshape to a shape no one knows."""
    for graph in graphs(skeleton):
        nodes = []
        for node in graph.node:
            nodes.append(node)
            if node.domain in ("", "ai.onnx") and node.op_type in _POOLS and attribute_value(node, "ceil_mode") == 1:
                rank = 2 + len(attribute_value(node, "kernel_shape") or [])
                unknown = f"__onnxfold_unknown_shape_{rank}"
                if unknown not in {info.name for info in skeleton.graph.input}:
                    skeleton.graph.input.append(onnx.helper.make_tensor_value_info(unknown, onnx.TensorProto.INT64, [rank]))
                for index, pooled in enumerate(node.output):  # MaxPool's Indices too
                    if pooled:
                        node.output[index] = f"{pooled}__onnxfold_as_inferred"
                        nodes.append(onnx.helper.make_node("Reshape", [node.output[index], unknown], [pooled]))
        if len(nodes) > len(graph.node):
            copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
            del graph.node[:]
            graph.node.extend(copies)


def _forget_sizes(info, keep_static) -> None:
    """Drop a declared tensor shape, or just its negative sizes (a main graph input's).

    onnxruntime holds the main graph's inputs to their declared static sizes, not a Loop or
    Scan body's: a loop-carried value may grow each iteration past the shape its body
    input declares, so a body input's shape is never trusted."""
    kind = info.type.tensor_type if info.type.HasField("tensor_type") else None
    if kind is None or not kind.HasField("shape"):
        return
    if not keep_static:
        kind.ClearField("shape")
        return
    for dim in kind.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value < 0:
            dim.ClearField("dim_value")


def _set_type(tensor, kind) -> None:
    """The inferred type of a computed value; its shape unknown where inference has none."""
    tensor.shape = None
    field = kind.WhichOneof("value") if kind is not None else None
    if field == "tensor_type":
        tensor.type, inner = "tensor_type", kind.tensor_type
        if inner.HasField("shape"):
            tensor.shape = dims_of(inner.shape)
    elif field == "sequence_type" and kind.sequence_type.elem_type.HasField("tensor_type"):
        # A sequence keeps no shape: rules read shapes as those of tensors.
        tensor.type, inner = "sequence_type", kind.sequence_type.elem_type.tensor_type
    else:
        return
    if tensor.dtype is None and inner.elem_type:
        tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(inner.elem_type)


def refine_shapes(graph: gs.Graph, model: onnx.ModelProto) -> bool:
    """Run inference again on the rewritten graph (main graph and bodies); where it now
    knows a computed value's shape, that replaces what was known. Where every computed
    value's type and shape are already fully known, there is nothing left to learn:
    False then, True when inference ran."""
    if _all_known(graph):
        return False
    sort_nodes(graph)  # rewrites insert nodes where they fit; inference reads in order
    inferred = _inferred_types(_skeleton(graph, model))
    scopes = graph_and_bodies(graph)
    declared = {id(t) for scope in scopes for t in scope.inputs}
    for scope in scopes:
        for tensor in scope.tensors().values():
            kind = inferred.get(tensor.name)
            if _has_shape(kind) and not isinstance(tensor, gs.Constant) and id(tensor) not in declared:
                _set_type(tensor, kind)
    return True


def _all_known(graph) -> bool:
    return not holds_graphs(graph) and all(
        tensor.dtype is not None and is_static(tensor.shape)
        for node in graph.nodes for tensor in node.outputs if tensor.name)


def _has_shape(kind) -> bool:
    return kind is not None and kind.HasField("tensor_type") and kind.tensor_type.HasField("shape")


def _skeleton(graph, model) -> onnx.ModelProto:
    """The graph as a model for inference: small weights as they are, large ones as typed
    inputs (never read from their file, never copied)."""
    skeleton = onnx.ModelProto()
    copy_fields(model, skeleton, but=("graph", "training_info"))
    target = skeleton.graph
    # Nodes a rewrite disconnected stay in the list until the next clean-up: not those.
    target.node.extend(OnnxExporter.export_node(node) for node in graph.nodes if node.outputs)
    declared = {info.name: info for info in [*model.graph.input, *model.graph.output]}
    target.input.extend(value_info(t, declared) for t in graph.inputs)
    target.output.extend(value_info(t, declared) for t in graph.outputs)
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant):
            continue
        if constant_bytes(tensor) <= INLINE_LIMIT:
            target.initializer.append(OnnxExporter.export_tensor_proto(tensor))
        else:
            target.input.append(value_info(gs.Variable(tensor.name, tensor.dtype, tensor.shape), {}))
    return skeleton
