"""Cheap structural checks of a model before graph-surgeon reads it.

A hostile or corrupt file must end in one clear line (exit 2), not in an exception deep
inside graph-surgeon or shape inference. Each check reads only the model's structure and
the sizes of its inline weights; referenced weights (references.py) were checked when
they were opened.
"""

from __future__ import annotations

import math

import onnx

from .errors import OnnxfoldError
from .references import is_reference, shape_bytes
from .scopes import defined_names, graphs, node_bodies

_KNOWN_TYPES = set(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}


def validate_model(model: onnx.ModelProto) -> None:
    """Raise OnnxfoldError naming the first structural problem of the model, if any."""
    if not _text_is_utf8(model):
        raise OnnxfoldError("a name, op type or other text field is not valid UTF-8")
    _check_scope(model.graph, outer=set())
    for graph in graphs(model):
        for sparse in graph.sparse_initializer:
            _check_sparse(sparse)


def _text_is_utf8(message) -> bool:
    """Every text field of the message and the messages in it is UTF-8 (protobuf hands
    back bytes for one that is not), weights' bytes left unread."""
    if isinstance(message, onnx.TensorProto):
        texts = [message.name, message.doc_string, *(t for e in message.external_data for t in (e.key, e.value))]
        return all(isinstance(text, str) for text in texts)
    for field, value in message.ListFields():
        items = value if field.is_repeated else [value]
        if field.type == field.TYPE_STRING and not all(isinstance(item, str) for item in items):
            return False
        if field.message_type is not None and not all(_text_is_utf8(item) for item in items):
            return False
    return True


def _check_scope(graph: onnx.GraphProto, outer: set) -> None:
    """Every value defined once, every use defined, no cycle; then nested graphs, which
    may read this graph's values."""
    defined = set()
    for tensor in graph.initializer:
        _check_tensor(tensor)
        _define(defined, tensor.name, "initializer")
    for sparse in graph.sparse_initializer:
        _define(defined, sparse.values.name, "initializer")
    weights = set(defined)
    for info in graph.input:
        _check_declared_type(info)
        if info.name not in weights:  # old exports list weights as inputs too
            _define(defined, info.name, "graph input")
    given = defined | outer
    for node in graph.node:
        if not node.output:
            raise OnnxfoldError(f"node '{node.name}' ({node.op_type}) has no outputs")
        for name in node.output:
            if name:
                _define(defined, name, f"node '{node.name}'")
        for attribute in node.attribute:
            if attribute.HasField("t"):
                _check_tensor(attribute.t)
            for tensor in attribute.tensors:
                _check_tensor(tensor)
    visible = defined | outer
    for name in _unordered_reads(graph, given):
        problem = "has a cycle" if name in visible else f"reads '{name}', which nothing defines"
        raise OnnxfoldError(f"the graph {problem} (at value '{name}')" if name in visible else f"the graph {problem}")
    for info in graph.output:
        _check_declared_type(info)
        if info.name not in visible:
            raise OnnxfoldError(f"graph output '{info.name}' names no value")
    for node in graph.node:
        for body in node_bodies(node):
            _check_scope(body, visible)


def _define(defined: set, name: str, what: str) -> None:
    if name in defined:
        raise OnnxfoldError(f"value '{name}' is defined twice (again by {what})")
    defined.add(name)


def _unordered_reads(graph, available: set):
    """Reads that no topological order satisfies (Kahn's algorithm over the nodes)."""
    available = set(available)
    waiting = {index: {n for n in _reads(node) if n} for index, node in enumerate(graph.node)}
    readers = {}
    for index, names in waiting.items():
        for name in names:
            readers.setdefault(name, []).append(index)
    ready = [index for index, names in waiting.items() if not names - available]
    done = set()
    while ready:
        index = ready.pop()
        if index in done:
            continue
        done.add(index)
        for name in graph.node[index].output:
            if name in available:
                continue
            available.add(name)
            ready += [i for i in readers.get(name, ()) if i not in done and not waiting[i] - available]
    return sorted({name for index, names in waiting.items() if index not in done for name in names - available})


def _reads(node: onnx.NodeProto):
    """The node's inputs, and the outer values its nested graphs read (they must exist
    before the node runs)."""
    yield from node.input
    for body in node_bodies(node):
        own = defined_names(body)
        yield from (name for n in body.node for name in _reads(n) if name not in own)
        yield from (info.name for info in body.output if info.name not in own)


def _check_tensor(tensor: onnx.TensorProto) -> None:
    """A known element type, no negative dimension, and as much data as its shape needs."""
    if tensor.data_type not in _KNOWN_TYPES:
        raise OnnxfoldError(f"tensor '{tensor.name}' has an unknown element type {tensor.data_type}")
    if any(d < 0 for d in tensor.dims):
        raise OnnxfoldError(f"tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}")
    if is_reference(tensor) or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return  # checked against its file when opened
    count = math.prod(tensor.dims)
    if tensor.HasField("raw_data"):
        got, needed = len(tensor.raw_data), shape_bytes(tensor)
    else:
        field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
        got, needed = len(getattr(tensor, field)), count * (2 if _is_complex(tensor) else 1)
        needed = (needed + 1) // 2 if tensor.data_type in _PACKED_INT32 else needed
    if got != needed:
        unit = "bytes" if tensor.HasField("raw_data") else "values"
        raise OnnxfoldError(f"tensor '{tensor.name}' of shape {list(tensor.dims)} holds {got} {unit}, "
                            f"its shape needs {needed}")


def _is_complex(tensor) -> bool:
    return tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)


# Element types two to a value of int32_data.
_PACKED_INT32 = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1")
                 if hasattr(onnx.TensorProto, name)}


def _check_declared_type(info: onnx.ValueInfoProto) -> None:
    kind = info.type.WhichOneof("value")
    if kind == "tensor_type" and info.type.tensor_type.elem_type not in _KNOWN_TYPES | {0}:
        raise OnnxfoldError(f"value '{info.name}' has an unknown element type {info.type.tensor_type.elem_type}")


def _check_sparse(sparse: onnx.SparseTensorProto) -> None:
    """Values and indices that agree with the dense shape (onnx's own sparse check)."""
    _check_tensor(sparse.values)
    _check_tensor(sparse.indices)
    try:
        onnx.checker.check_sparse_tensor(sparse)
    except onnx.checker.ValidationError as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else "invalid"
        raise OnnxfoldError(f"sparse tensor '{sparse.values.name}': {text}") from None
