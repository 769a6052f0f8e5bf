"""Weights left in their files until they are needed.

A model read with `modelio.open_model` holds only its structure in memory: each large
initializer of the main graph is a reference to where its bytes lie, in the model file
itself or in its external data file. A reference is ONNX's external-data form with an
absolute `basepath` entry, which only onnxfold writes and never saves. Folds read a
weight when they need it; saving copies untouched weights from file to file in pieces.
So opening a 500 MB model costs a few megabytes, and its weights are never all in memory.

The referenced files must not change while the model is in use. onnxfold's own output is
written to a scratch file and moved into place only when complete, so even an output
that replaces the input is safe.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx

from . import wire
from .errors import OnnxfoldError
from .scopes import graphs

# Weights up to this many bytes are read into memory when a model is opened.
INLINE_LIMIT = 4096

# Element types whose raw bytes numpy reads as they are (little-endian, as ONNX stores them).
RAW_TYPES = {getattr(onnx.TensorProto, name): np.dtype(kind).newbyteorder("<") for name, kind in (
    ("FLOAT", np.float32), ("DOUBLE", np.float64), ("FLOAT16", np.float16), ("INT8", np.int8),
    ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64), ("UINT8", np.uint8),
    ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64), ("BOOL", np.bool_))}

_BASEPATH = "basepath"
_COPY_CHUNK = 1 << 24  # bytes per read when copying a weight from file to file


def is_reference(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        entry.key == _BASEPATH for entry in tensor.external_data)


def read_reference(tensor: onnx.TensorProto) -> np.ndarray:
    """The referenced weight as a new read-only array."""
    path, offset, length = _where(tensor)
    array = np.empty(tuple(tensor.dims), RAW_TYPES[tensor.data_type])
    with _open(path, offset) as source:
        got = source.readinto(array.reshape(-1).view(np.uint8))
    if got != length:
        raise OnnxfoldError(f"the data of weight '{tensor.name}' ends early", path)
    array.flags.writeable = False
    return array


def copy_reference(tensor: onnx.TensorProto, target) -> None:
    """Write the referenced bytes to the open file `target`, a piece at a time."""
    path, offset, length = _where(tensor)
    buffer = memoryview(bytearray(min(length, _COPY_CHUNK)))
    with _open(path, offset) as source:
        while length:
            got = source.readinto(buffer[:min(length, len(buffer))])
            if not got:
                raise OnnxfoldError(f"the data of weight '{tensor.name}' ends early", path)
            target.write(buffer[:got])
            length -= got


def loaded(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model with every referenced weight read in: for onnxruntime."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if is_reference(tensor):
            data = read_reference(tensor).tobytes()
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            tensor.raw_data = data
    return copy


# --- opening a model -----------------------------------------------------------------------

def scan_model(buffer, path: Path) -> onnx.ModelProto:
    """The model encoded in `buffer`, the contents of the file `path`, with the large
    initializers of its main graph left in the file as references.

    Only the fields of the model and its main graph are walked, and the fields of large
    initializers; protobuf parses everything else, in one piece. Raises wire.Malformed
    where the bytes are not what onnx.save writes, for the caller to read the file whole.
    """
    head, graph_value = [], None
    for number, start, value_start, stop in wire.fields(buffer, 0, len(buffer)):
        if number == wire.MODEL_GRAPH and value_start is not None:
            if graph_value is not None:
                raise wire.Malformed("two graph fields")
            graph_value = (value_start, stop)
        else:
            head.append(buffer[start:stop])
    model = onnx.ModelProto.FromString(b"".join(head))
    if graph_value is None:
        forget_basepaths(model)
        return model
    pieces, references, count = [], [], 0
    for number, start, value_start, stop in wire.fields(buffer, *graph_value):
        if number == wire.GRAPH_INITIALIZER and value_start is not None:
            shell, raw = _without_raw_data(buffer, value_start, stop)
            if shell is not None:
                pieces.append(wire.field_header(wire.GRAPH_INITIALIZER, len(shell)) + shell)
                references.append((count, raw))
                count += 1
                continue
            count += 1
        pieces.append(buffer[start:stop])
    model.graph.ParseFromString(b"".join(pieces))
    forget_basepaths(model)
    for index, (offset, length) in references:
        _refer(model.graph.initializer[index], path, offset, length)
    return model


def _without_raw_data(buffer, start, stop):
    """(the encoding of the tensor in buffer[start:stop] without its bytes, (offset,
    length) of them), or (None, None) where they are small or a reference cannot stand
    for them (then the tensor is read as it is)."""
    if stop - start <= INLINE_LIMIT:
        return None, None
    raw, shell = None, []
    for number, field_start, value_start, field_stop in wire.fields(buffer, start, stop):
        if number == wire.TENSOR_RAW_DATA and value_start is not None and raw is None:
            raw = (value_start, field_stop - value_start)
        else:
            shell.append(buffer[field_start:field_stop])
    if raw is None or raw[1] <= INLINE_LIMIT:
        return None, None
    shell = b"".join(shell)
    tensor = onnx.TensorProto.FromString(shell)
    if tensor.HasField("raw_data") or tensor.data_location != onnx.TensorProto.DEFAULT or \
            not _plain_raw(tensor, raw[1]):
        return None, None
    return shell, raw


def forget_basepaths(model: onnx.ModelProto) -> None:
    """Drop `basepath` entries a file gave its tensors: only onnxfold makes references,
    and a file must not point onnxfold at data outside its folder."""
    for tensor in all_tensors(model):
        if any(entry.key == _BASEPATH for entry in tensor.external_data):
            kept = [entry for entry in tensor.external_data if entry.key != _BASEPATH]
            del tensor.external_data[:]
            tensor.external_data.extend(kept)


def refer_to_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Turn the main graph's external-data weights into references, where they are plain
    and inside `folder`; read every other external tensor in (as onnx.load would)."""
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or is_reference(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        path = _inside(folder, info.get("location", ""))
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") else _expected_bytes(tensor)
        expected = _expected_bytes(tensor)
        if length is not None and expected is not None and length != expected:
            raise ValueError(f"weight '{tensor.name}' has {length} bytes of data, its shape needs {expected}")
        if path and length is not None and offset >= 0 and _plain_raw(tensor, length) and \
                offset + length <= path.stat().st_size:
            _refer(tensor, path, offset, length)
    load_external_data(model, folder)


def load_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Read every external tensor but references in, sparse ones included. onnx's loader
    checks each file is inside `folder` and holds the bytes named."""
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and not is_reference(tensor):
            onnx.external_data_helper.load_external_data_for_tensor(tensor, str(folder))


def dense_tensors(model: onnx.ModelProto):
    """The tensors onnx's external-data helpers see: the initializers and attribute tensors
    of every graph and function, not the values and indices of sparse tensors."""
    return onnx.external_data_helper._get_all_tensors(model)  # noqa: SLF001 - onnx's own walk


def all_tensors(model: onnx.ModelProto):
    """Every tensor of the model whose data may be in a file: the dense tensors, plus the
    values and indices of sparse tensors."""
    yield from dense_tensors(model)
    for graph in graphs(model):
        sparse = list(graph.sparse_initializer)
        for node in graph.node:
            for attribute in node.attribute:
                sparse += [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
                sparse += attribute.sparse_tensors
        for tensor in sparse:
            yield tensor.values
            yield tensor.indices


def _inside(folder: Path, location: str):
    """The regular file `location` names inside `folder`, or None (onnx's loader then
    reads it, or says what is wrong with it)."""
    if not location or os.path.isabs(location):
        return None
    path = folder / location
    try:
        if not path.is_file() or folder.resolve() not in path.resolve().parents:
            return None
    except OSError:
        return None
    return path


def _plain_raw(tensor: onnx.TensorProto, length: int) -> bool:
    """Plain little-endian bytes numpy reads as they are, exactly as many as the shape says."""
    return not tensor.HasField("segment") and _expected_bytes(tensor) == length


def _expected_bytes(tensor: onnx.TensorProto):
    """The bytes its shape needs, for types a reference can stand for (else None)."""
    return shape_bytes(tensor) if tensor.data_type in RAW_TYPES else None


# Element types stored two to a byte.
_HALF_BYTE = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1")
              if hasattr(onnx.TensorProto, name)}


def shape_bytes(tensor: onnx.TensorProto) -> int:
    """The size of the tensor's data as raw bytes, from its shape and element type."""
    count = math.prod(tensor.dims)
    if tensor.data_type in _HALF_BYTE:
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _refer(tensor: onnx.TensorProto, path: Path, offset: int, length: int) -> None:
    path = Path(os.path.abspath(path))
    point_to(tensor, location=path.name, offset=offset, length=length, **{_BASEPATH: path.parent})


def point_to(tensor: onnx.TensorProto, **entries) -> None:
    """Say the tensor's bytes are in a file (ONNX external data: location, offset, length)."""
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def _where(tensor: onnx.TensorProto):
    info = {entry.key: entry.value for entry in tensor.external_data}
    return Path(info[_BASEPATH]) / info["location"], int(info["offset"]), int(info["length"])


def _open(path: Path, offset: int):
    """The file, open for reading at `offset`."""
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise OnnxfoldError(f"cannot read a weight's data ({error.strerror})", path) from None
    handle.seek(offset)  # never past what the reference was checked against
    return handle


def sample_reference(tensor: onnx.TensorProto, count: int) -> bytes:
    """The bytes of `count` evenly spaced elements of the referenced weight (every
    `size // count`-th, from the first), read without reading the rest: a cheap
    fingerprint to tell weights apart before comparing them whole (cse.py)."""
    path, offset, length = _where(tensor)
    itemsize = np.dtype(RAW_TYPES[tensor.data_type]).itemsize
    size = length // itemsize
    pieces = []
    with _open(path, offset) as source:
        for index in range(0, size, max(1, size // count))[:count]:
            source.seek(offset + index * itemsize)
            pieces.append(source.read(itemsize))
    return b"".join(pieces)
