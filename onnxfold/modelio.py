"""Loading and saving models: clear errors on bad input, atomic writes, external data."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import OnnxfoldError

# protobuf refuses to serialize a message of 2 GiB or more; stay well below it.
PROTOBUF_LIMIT = 2**31 - 2**24


def load_model(path) -> onnx.ModelProto:
    """Read an ONNX model with its external data, or raise OnnxfoldError naming the problem."""
    return read_model(path)[0]


def read_model(path):
    """(model with its external data loaded, whether the file kept weights outside)."""
    path = Path(path)
    if not path.exists():
        raise OnnxfoldError("no such file", path)
    if not path.is_file():
        raise OnnxfoldError("not a file", path)
    if path.stat().st_size == 0:
        raise OnnxfoldError("the file is empty", path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise OnnxfoldError(f"not a readable ONNX model ({_first_line(error)})", path) from None
    if not model.opset_import or not model.HasField("graph"):
        raise OnnxfoldError("not an ONNX model (no graph or no opset import)", path)
    external = uses_external_data(model)
    if external:
        _load_external_data(model, path)
    return model, external


def checker_complaint(model: onnx.ModelProto, path) -> str | None:
    """What onnx.checker says against the model, if anything (the model may still run)."""
    try:
        if tensor_bytes(model) > PROTOBUF_LIMIT:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError, OSError) as error:
        return _first_line(error)
    return None


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model))


def save_model(model: onnx.ModelProto, path, external_data: bool | None = None, size_threshold=1024) -> None:
    """Write `model` to `path` atomically: a reader never sees a half-written file.

    `external_data=None` stores weights in `<name>.data` beside the model only where the
    model would not fit in one protobuf; tensors under `size_threshold` bytes stay inline.
    Note: saving with external data moves the
    tensor bytes out of `model`.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxfoldError("the output folder does not exist", folder)
    if not os.access(folder, os.W_OK):
        raise OnnxfoldError("the output folder is not writable", folder)
    too_big = tensor_bytes(model) > PROTOBUF_LIMIT
    if too_big and external_data is False:
        raise OnnxfoldError("the model is over 2 GiB, the most one protobuf file can hold; "
                            "save it with external data (drop --no-external-data)", path)
    external_data = too_big if external_data is None else external_data
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.") as scratch:
        staged = Path(scratch) / path.name
        data_name = path.name + ".data"
        try:
            if external_data:
                onnx.save_model(model, str(staged), save_as_external_data=True,
                                all_tensors_to_one_file=True, location=data_name, size_threshold=size_threshold)
            else:
                with open(staged, "wb") as handle:
                    write_in_pieces(model, handle)
        except (OSError, ValueError) as error:
            raise OnnxfoldError(f"could not write the model ({_first_line(error)})", path) from None
        if (Path(scratch) / data_name).exists():  # absent when every tensor stayed inline
            os.replace(Path(scratch) / data_name, folder / data_name)
        os.replace(staged, path)


def write_in_pieces(model: onnx.ModelProto, handle) -> None:
    """Write the model's protobuf encoding with its weights encoded one at a time.

    onnx.save encodes the whole model in memory first (and measures it by encoding it once
    more): two extra copies of a large model. A message's encoding is the concatenation of
    its fields' encodings, in any order, so the graph's initializers can follow the rest of
    the graph one by one; parsing the file gives back the same model.
    """
    head, graph = _without_weights(model)
    sizes = [_encoded_tensor_size(weight) for weight in model.graph.initializer]
    weights_size = sum(_field_size(_INITIALIZER, size) for size in sizes)
    handle.write(head.SerializeToString())
    handle.write(_key(_GRAPH) + _varint(graph.ByteSize() + weights_size))
    handle.write(graph.SerializeToString())
    for weight, size in zip(model.graph.initializer, sizes):
        handle.write(_key(_INITIALIZER) + _varint(size))
        handle.write(weight.SerializeToString())


def encoded_size(model: onnx.ModelProto) -> int:
    """model.ByteSize(), without encoding the weights (ByteSize encodes the whole model)."""
    head, graph = _without_weights(model)
    weights_size = sum(_field_size(_INITIALIZER, _encoded_tensor_size(w)) for w in model.graph.initializer)
    return head.ByteSize() + _field_size(_GRAPH, graph.ByteSize() + weights_size)


def _without_weights(model):
    """(the model without its graph, the graph without its initializers): small messages."""
    head, graph = onnx.ModelProto(), onnx.GraphProto()
    copy_fields(model, head, but="graph")
    copy_fields(model.graph, graph, but="initializer")
    return head, graph


def _encoded_tensor_size(tensor: onnx.TensorProto) -> int:
    if not tensor.HasField("raw_data") or payload_bytes(tensor) < 1 << 16:
        return tensor.ByteSize()  # encoding a small tensor is cheaper than copying its fields
    shell = onnx.TensorProto()
    copy_fields(tensor, shell, but="raw_data")
    return shell.ByteSize() + _field_size(_RAW_DATA, payload_bytes(tensor))


_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def _key(number: int) -> bytes:
    return _varint(number << 3 | 2)  # wire type 2: length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field_size(number: int, size: int) -> int:
    """Bytes taken by a length-delimited field holding `size` bytes."""
    return len(_key(number)) + len(_varint(size)) + size


def copy_fields(source, target, but: str) -> None:
    """Copy every field set in `source` but one into the empty message `target`.

    The skipped field is never read: reading a bytes field copies it.
    """
    for field in source.DESCRIPTOR.fields:
        if field.name == but:
            continue
        if field.is_repeated:
            values = getattr(source, field.name)
            if values:
                getattr(target, field.name).extend(values)
        elif source.HasField(field.name):
            if field.message_type is not None:
                getattr(target, field.name).CopyFrom(getattr(source, field.name))
            else:
                setattr(target, field.name, getattr(source, field.name))


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data held in the model (initializers and Constant nodes)."""
    return sum(payload_bytes(t) for t in _all_tensors(model))


# Element types stored two to a byte.
_HALF_BYTE = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1")
              if hasattr(onnx.TensorProto, name)}


def payload_bytes(tensor: onnx.TensorProto) -> int:
    """The size of a tensor's data, from its shape where it is raw bytes.

    Not len(tensor.raw_data): reading the field copies the bytes, which on a model of
    hundreds of megabytes costs as much as loading it.
    """
    if not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    count = math.prod(tensor.dims)
    if tensor.data_type in _HALF_BYTE:
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        raise OnnxfoldError(f"cannot read its external data ({_first_line(error)})", path) from None


def _all_tensors(model: onnx.ModelProto):
    return onnx.external_data_helper._get_all_tensors(model)


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def write_text(path, text: str) -> None:
    """Write a text file atomically (reports, JSON)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxfoldError("the output folder does not exist", folder)
    try:
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f".{path.name}.", delete=False,
                                         encoding="utf-8") as handle:
            handle.write(text)
        os.replace(handle.name, path)
    except OSError as error:
        raise OnnxfoldError(f"could not write ({_first_line(error)})", path) from None
