"""The protobuf wire format, as far as onnxfold reads and writes models in pieces.

A message is a sequence of fields, each a key (field number and wire type) then a value,
and its encoding is the concatenation of its fields' encodings, in any order. So a large
model can be read a field at a time, leaving its weights where they are in the file, and
written a field at a time, never holding its whole encoding in memory.
"""

from __future__ import annotations

import onnx

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5

# The fields onnxfold walks: a model's graph, a graph's initializers, a tensor's bytes.
MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
TENSOR_RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


class Malformed(ValueError):
    """The bytes are not a protobuf message that onnxfold walks field by field."""


def read_varint(buffer, position: int, end: int):
    """(the varint at `position`, the position after it)."""
    value = shift = 0
    while position < end and shift < 64:
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise Malformed("a varint runs past its message")


def fields(buffer, start: int, end: int):
    """(number, field start, value start, field end) of each length-delimited field in
    buffer[start:end]; fields of other wire types come with value start None."""
    position = start
    while position < end:
        key, after_key = read_varint(buffer, position, end)
        number, wire = key >> 3, key & 7
        value_start = None
        if wire == VARINT:
            stop = read_varint(buffer, after_key, end)[1]
        elif wire == FIXED64:
            stop = after_key + 8
        elif wire == FIXED32:
            stop = after_key + 4
        elif wire == LENGTH_DELIMITED:
            length, value_start = read_varint(buffer, after_key, end)
            stop = value_start + length
        else:
            raise Malformed(f"wire type {wire} is not used by ONNX")
        if number == 0 or stop > end:
            raise Malformed("a field runs past its message")
        yield number, position, value_start, stop
        position = stop


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field_header(number: int, size: int) -> bytes:
    """The key and length of a length-delimited field holding `size` bytes."""
    return varint(number << 3 | LENGTH_DELIMITED) + varint(size)


def field_size(number: int, size: int) -> int:
    """Bytes taken by a length-delimited field holding `size` bytes."""
    return len(field_header(number, size)) + size
