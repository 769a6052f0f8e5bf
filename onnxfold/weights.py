"""How a weight is held: the one module that knows how a graph-surgeon constant stores its values.

A `gs.Constant` keeps them in its private `_values`, as one of:
- `LazyValues`: the TensorProto it was imported from, its bytes in the proto or, for a
  large weight of the main graph, still in the model's file (a reference, references.py);
- `SparseValues`: the SparseTensorProto it was imported from;
- an array: a weight a fold computed, or one read in for onnxruntime.
onnxfold relies on these internals of onnx-graphsurgeon (setup.cfg bounds its version).
The rest of onnxfold reads, reads in, releases and writes weights through this module.
"""

from __future__ import annotations

import weakref

import numpy as np
import onnx
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import Constant, LazyValues, SparseValues

from .references import RAW_TYPES, is_reference, read_reference, sample_reference
from .scopes import graph_and_bodies


def constant_values(tensor) -> np.ndarray:
    """A constant's values, read-only, without keeping them in the graph.

    graph-surgeon's `tensor.values` keeps every weight it reads as an array beside the
    stored bytes, which doubles the memory of a large model; here a stored weight is read
    afresh each time, straight from its bytes, or its file, where it can be.
    """
    stored = tensor._values  # noqa: SLF001
    if isinstance(stored, SparseValues):  # densified without replacing the sparse form
        return _dense_values(stored.tensor)
    if not isinstance(stored, LazyValues):
        return np.asarray(tensor.values)
    proto = stored.tensor
    if is_reference(proto):
        return read_reference(proto)
    dtype = RAW_TYPES.get(proto.data_type)
    if dtype is None or not proto.HasField("raw_data"):
        return stored.load()
    return np.frombuffer(proto.raw_data, dtype=dtype).reshape(tuple(proto.dims))


def _dense_values(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """A sparse tensor as a dense read-only array of its values' type.

    Not graph-surgeon's SparseValues.load: it reads only the typed fields (float_data, ...),
    so values stored as raw_data, as numpy_helper.from_array writes them, come out as zeros.
    The checker's sparse-tensor check (modelio) has vetted the indices' shape and range.
    """
    values = onnx.numpy_helper.to_array(sparse.values).reshape(-1)
    indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64, copy=False)
    shape = tuple(sparse.dims)
    if indices.ndim == 2:  # [NNZ, rank]: one coordinate per row
        indices = np.ravel_multi_index(tuple(indices.T), shape)
    dense = np.zeros(int(np.prod(shape, dtype=np.int64)), values.dtype)
    dense[indices] = values
    dense = dense.reshape(shape)
    dense.flags.writeable = False
    return dense


def _is_in_file(tensor) -> bool:
    """A constant whose values are still in the model's file (references.py)."""
    stored = getattr(tensor, "_values", None)
    return type(stored) is LazyValues and is_reference(stored.tensor)


def set_numpy_type(constant, numpy_type) -> None:
    """Give a constant of a type numpy lacks (bfloat16, float8, ...) its ml_dtypes type:
    `Constant.dtype` reads it from the stored values."""
    constant._values.dtype = numpy_type  # noqa: SLF001


def release_values(constant) -> None:
    """Free what a constant holds, keeping its shape and type: for a weight no node uses.

    graph-surgeon's tensors sit in reference cycles with their lists of producers and
    consumers, so a dropped weight, and the model its proto belongs to, wait for Python's
    cycle collector, which counts objects, not bytes: on a large model, hundreds of
    megabytes of dead weights.
    """
    stored = constant._values  # noqa: SLF001
    constant._values = np.broadcast_to(np.zeros((), stored.dtype), stored.shape)  # noqa: SLF001 - no memory
    constant.__dict__.pop(_SAMPLE, None)  # a sample of values the constant no longer holds


def hold_apart_from_input(graph) -> list:
    """The constants of a graph just imported, which hold the input's tensors until they
    are released; nothing else of the graph holds the input model from now on.

    graph-surgeon keeps the input's list of opsets in each scope, a view that keeps the
    whole parsed input in memory, weights included: each scope gets its own copy.
    """
    for scope in [*graph_and_bodies(graph), *graph.functions]:
        if scope.import_domains is not None:
            scope.import_domains = [onnx.helper.make_opsetid(opset.domain, opset.version)
                                    for opset in scope.import_domains]
    return constants_of(graph)


def constants_of(graph) -> list:
    """Every constant of the graph, of its subgraphs and of its nodes' attributes."""
    found = []
    for scope in graph_and_bodies(graph):
        found += [t for t in scope.tensors().values() if isinstance(t, Constant)]
        found += held_constants(scope)
    return found


def held_constants(scope) -> list:
    """The constants the scope's nodes hold as attributes (a Constant node's value)."""
    return [value for node in scope.nodes for value in node.attrs.values() if isinstance(value, Constant)]


def release_all(constants) -> None:
    """Release every constant: a small one still holding a tensor of the output (or input)
    proto would keep that whole message alive, folded weights included, until the cycle
    collector runs."""
    for constant in constants:
        release_values(constant)


def write_weight(constant, graph: onnx.GraphProto) -> None:
    """Add the constant to `graph`'s initializers, copying its bytes once; it then reads
    its values from there (one copy in memory, not two)."""
    stored = constant._values  # noqa: SLF001 - the one way to reach the original proto
    if isinstance(stored, SparseValues):
        graph.sparse_initializer.add().CopyFrom(stored.tensor)
        return
    proto = graph.initializer.add()
    if isinstance(stored, LazyValues):
        proto.CopyFrom(stored.tensor)
        proto.name = constant.name
        return
    if constant.export_dtype != constant.dtype:  # a type numpy lacks: leave it to graph-surgeon
        proto.CopyFrom(OnnxExporter.export_tensor_proto(constant))
        return
    array = np.asarray(stored)
    if array.dtype == object:  # strings: ONNX keeps them in string_data, never as raw bytes
        proto.CopyFrom(onnx.numpy_helper.from_array(array, constant.name))
        return
    proto.name = constant.name
    proto.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    proto.dims.extend(array.shape)
    proto.raw_data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    constant.values = LazyValues(proto)


def tensor_proto(constant) -> onnx.TensorProto:
    """The constant as a TensorProto with its values in it (a weight still in the model's
    file read in), named as the constant: for a model onnxruntime runs from memory."""
    stored = constant._values  # noqa: SLF001
    if isinstance(stored, LazyValues) and not is_reference(stored.tensor):
        proto = onnx.TensorProto()
        proto.CopyFrom(stored.tensor)
    elif constant.export_dtype != constant.dtype and not isinstance(stored, SparseValues):
        proto = OnnxExporter.export_tensor_proto(constant)  # a type numpy lacks
    else:
        proto = onnx.numpy_helper.from_array(np.asarray(constant_values(constant)))
    proto.name = constant.name
    return proto


_SAMPLE = "_onnxfold_sample"  # (weak reference to the stored values, count, sample) on the constant


def sampled_bytes(tensor, count: int) -> bytes:
    """The bytes of `count` evenly spaced elements of a constant (every `size // count`-th,
    from the first), read from the model's file without reading the whole weight where
    it is still there (references.sample_reference takes the same elements).

    Kept on the constant while it holds the same values: reading a weight in memory copies
    all its bytes (protobuf hands them out whole), and each clean-up pass samples again.
    The values are held weakly: values the constant no longer holds (a folded weight once
    written into the output) must be freed at once, or a large model's peak memory grows
    by its folded weights."""
    stored = tensor._values  # noqa: SLF001
    kept = tensor.__dict__.get(_SAMPLE)
    if kept is not None and kept[0]() is stored and kept[1] == count:
        return kept[2]
    if _is_in_file(tensor) and stored.tensor.data_type in RAW_TYPES:
        sample = sample_reference(stored.tensor, count)
    else:
        flat = constant_values(tensor).reshape(-1)
        sample = np.ascontiguousarray(flat[::max(1, flat.size // count)][:count]).tobytes()
    tensor.__dict__[_SAMPLE] = (weakref.ref(stored), count, sample)
    return sample
