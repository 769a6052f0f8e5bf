"""From the rewritten onnx-graphsurgeon graph back to a ModelProto, copying each weight once.

onnx-graphsurgeon's own export builds every tensor, then copies them all again into the
graph (onnx.helper.make_graph); on a model of hundreds of megabytes that second copy costs
as much as saving the file. Here each weight is written straight into its place: an
untouched weight is one copy of the original tensor, a folded one is its bytes.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from .graph import onnx_type
from .modelio import copy_fields
from .weights import write_weight


def export_model(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    """The graph as a model with every field but the graph taken from `original`."""
    model = onnx.ModelProto()
    # training_info names the weights folds replace: the output is an inference model.
    copy_fields(original, model, but=("graph", "training_info"))
    target = model.graph
    target.name = graph.name or original.graph.name
    target.doc_string = graph.doc_string or ""
    target.node.extend(OnnxExporter.export_node(node) for node in graph.nodes)
    # Inputs and outputs keep their names and what they hold: declared as the input did.
    declared = {info.name: info for info in [*original.graph.input, *original.graph.output]}
    target.input.extend(_value_info(t, declared) for t in graph.inputs)
    target.output.extend(_value_info(t, declared) for t in graph.outputs)
    tensors = graph.tensors()
    for tensor in tensors.values():
        if isinstance(tensor, gs.Constant):
            write_weight(tensor, target)
    # Keep the input's own annotations of values still computed, where inference agrees.
    target.value_info.extend(v for v in original.graph.value_info
                             if v.name in tensors and _agrees(v, tensors[v.name]))
    if model.ir_version < 4 and _weights_not_inputs(target):
        model.ir_version = 4  # before IR 4 every weight had to be a graph input as well
    return model


def _value_info(tensor, declared: dict) -> onnx.ValueInfoProto:
    """A graph input or output, declared as the input did: no rewrite changes a value's
    type, graph-surgeon cannot export optional or map types, and a dynamic size written
    as -1 stays as it was (graph-surgeon's shapes read it as unknown)."""
    info = declared.get(tensor.name)
    if info is not None:
        return info
    if tensor.dtype is None:
        return onnx.helper.make_empty_tensor_value_info(tensor.name)
    return onnx.helper.make_tensor_value_info(tensor.name, onnx_type(tensor.dtype), tensor.shape)


def _agrees(info: onnx.ValueInfoProto, tensor) -> bool:
    """The annotation says nothing the rewritten graph's (inferred) type contradicts."""
    if isinstance(tensor, gs.Constant):
        return False  # a weight carries its own type
    if not info.type.HasField("tensor_type"):
        return info.type.WhichOneof("value") == getattr(tensor, "type", None) or tensor.dtype is None
    kind = info.type.tensor_type
    if tensor.dtype is not None and kind.elem_type and kind.elem_type != onnx_type(tensor.dtype):
        return False
    if tensor.shape is None or not kind.HasField("shape"):
        return True
    return len(kind.shape.dim) == len(tensor.shape) and all(
        not d.HasField("dim_value") or not isinstance(size, int) or d.dim_value == size
        for d, size in zip(kind.shape.dim, tensor.shape))


def _weights_not_inputs(graph: onnx.GraphProto) -> bool:
    inputs = {info.name for info in graph.input}
    return any(weight.name not in inputs for weight in graph.initializer)
