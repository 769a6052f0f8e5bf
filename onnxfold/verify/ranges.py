"""What the graph says of an integer input's values: the range random data is drawn from.

An integer input that reaches the indices of a Gather over a constant table (an embedding
lookup: token ids, token-type ids, position ids) must lie in [0, the table's size on the
Gather's axis): onnxruntime refuses an index past it, so a random draw beyond it fails the
run instead of checking parity. An integer input that is cast to a float or bool type
(an attention mask, 1 - mask scaled by the dtype's lowest value) is read as a value: it is
drawn from {0, 1}, since a mask of 2 or 3 overflows that scaling to infinity and the
outputs to NaN, which compares nothing. Other integer inputs keep the default range.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx

from ..modelio import attribute_value

MASK_RANGE = (0, 2)

# Ops that pass an input's values on unchanged (moved, repeated, a subset, another type):
# op -> the input positions whose values reach the output; None: every input (Concat).
_PASS_THROUGH = {"Cast": (0,), "CastLike": (0,), "Identity": (0,), "Unsqueeze": (0,), "Squeeze": (0,),
                 "Reshape": (0,), "Flatten": (0,), "Expand": (0,), "Tile": (0,), "Transpose": (0,),
                 "Slice": (0,), "Concat": None}
_VALUE_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16, onnx.TensorProto.BOOL}


@dataclass(frozen=True)
class GraphRange:
    low: int
    high: int  # excluded
    reason: str  # for the report: why the graph bounds it


def graph_ranges(model: onnx.ModelProto, names) -> dict:
    """{input name: GraphRange} for those of the graph inputs `names` (the integer ones)
    whose use in the main graph bounds them; the others are left out."""
    graph = model.graph
    uses = defaultdict(list)
    for node in graph.node:
        if node.domain in ("", "ai.onnx"):
            for position, name in enumerate(node.input):
                uses[name].append((node, position))
    tables = _constant_shapes(graph)
    found = {}
    for name in names:
        gathers, cast = _reached(name, uses, tables)
        if gathers:
            size, table, axis = min(gathers)
            entries = f"{size} entries on axis {axis}" if axis else f"{size} rows"
            found[name] = GraphRange(0, size, f"indices into '{table}' ({entries})")
        elif cast:
            found[name] = GraphRange(*MASK_RANGE, "cast to float or bool: taken as a 0/1 mask")
    return found


def _reached(name, uses, tables) -> tuple:
    """([(table size, table name, axis)] of the Gathers whose indices `name` becomes
    through pass-through ops, whether it is cast to a float or bool type on the way)."""
    gathers, cast, seen, pending = [], False, {name}, [name]
    while pending:
        for node, position in uses[pending.pop()]:
            if node.op_type == "Gather" and position == 1 and node.input[0] in tables:
                gathers.append(_gathered(node, tables[node.input[0]]))
            elif _passes_on(node, position):
                cast |= node.op_type == "Cast" and attribute_value(node, "to") in _VALUE_TYPES
                pending += [out for out in node.output[:1] if out and out not in seen]
                seen.update(node.output[:1])
    return [g for g in gathers if g[0] > 0], cast


def _passes_on(node, position) -> bool:
    if node.op_type not in _PASS_THROUGH:
        return False
    carried = _PASS_THROUGH[node.op_type]
    return carried is None or position in carried


def _gathered(node, dims) -> tuple:
    axis = attribute_value(node, "axis") or 0
    axis = axis + len(dims) if axis < 0 else axis
    size = dims[axis] if 0 <= axis < len(dims) else 0
    return size, node.input[0], axis


def _constant_shapes(graph) -> dict:
    """{name: dims} of the graph's initializers and Constant node tensors."""
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                shapes[node.output[0]] = list(value.dims)
    return shapes


