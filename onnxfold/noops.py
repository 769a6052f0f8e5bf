"""Clean-ups for nodes that compute their input unchanged, and for chains that cancel.

Each no-op is recognized only from what is certain: constant parameters, and shapes from
ONNX inference where every size needed is known (a dim_param, an unknown size or rank is
never guessed). A removed node's output that is a graph output keeps its name (_bypass).
The output's type must equal the input's: a Cast is dropped only to the type it already has.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph import is_constant, is_present, is_standard, is_static, onnx_type, producer, rank_of
from .normalize import Cleanup, _bypass, bypassing
from .weights import constant_values

_INT64_MAX = np.iinfo(np.int64).max


def _ints(node, index, attr):
    """An integer parameter given as input `index` (newer opsets) or attribute `attr`:
    a list, [] where absent, None where it is an input whose value is not a constant."""
    if len(node.inputs) > index and is_present(node.inputs[index]):
        tensor = node.inputs[index]
        return constant_values(tensor).reshape(-1).tolist() if is_constant(tensor) else None
    return list(node.attrs.get(attr, []))


def _same_type(a, b) -> bool:
    return a.dtype is not None and a.dtype == b.dtype


def _full_slice_source(node):
    """Slice taking every element of every axis it names, in order (step 1)."""
    data, parameters = node.inputs[0], _slice_parameters(node)
    if parameters is None or any(step != 1 for step in parameters[3]):
        return None
    for start, end, axis in zip(*parameters[:3]):
        size = data.shape[axis]
        known = isinstance(size, int) and size >= 0
        # Without the size, only start 0 and the largest end are surely the full range.
        if start != 0 and not (known and start <= -size):
            return None
        if end != _INT64_MAX and not (known and end >= size):
            return None
    return data


def _same_shape_expand_source(node):
    """Expand to a shape its input already has (broadcasting adds nothing)."""
    data, shape = node.inputs[0], node.inputs[1]
    if not is_constant(shape) or data.shape is None:
        return None
    target = [int(d) for d in constant_values(shape).reshape(-1)]
    if len(target) > len(data.shape):
        return None
    if all(d == 1 for d in target):
        return data  # ones broadcast to any size
    if not is_static(data.shape):
        return None
    try:
        return data if list(np.broadcast_shapes(tuple(data.shape), tuple(target))) == list(data.shape) else None
    except ValueError:
        return None


def _identity_flatten_source(node):
    """Flatten of a 2-D input at axis 1, or of an input already of the 2-D shape it makes."""
    data = node.inputs[0]
    rank = rank_of(data)
    if rank is None:
        return None
    axis = node.attrs.get("axis", 1)
    axis = axis + rank if axis < 0 else axis
    if rank == 2 and axis == 1:
        return data
    if not is_static(data.shape):
        return None
    made = [int(np.prod(data.shape[:axis], dtype=np.int64)), int(np.prod(data.shape[axis:], dtype=np.int64))]
    return data if made == list(data.shape) else None


def _identity_transpose_source(node):
    data = node.inputs[0]
    rank = rank_of(data)
    perm = node.attrs.get("perm")
    if perm is None:  # the default reverses the axes: the identity only up to rank 1
        return data if rank is not None and rank <= 1 else None
    return data if list(perm) == list(range(len(perm))) else None


def _same_type_cast_source(node):
    data = node.inputs[0]
    if node.op == "CastLike":
        return data if _same_type(data, node.inputs[1]) else None
    return data if data.dtype is not None and onnx_type(data.dtype) == node.attrs.get("to") else None


def _zero_pad_source(node):
    pads = _ints(node, 1, "pads")
    return node.inputs[0] if pads is not None and pads and not any(pads) else None


def _single_concat_source(node):
    return node.inputs[0] if len(node.inputs) == 1 else None


_UNDOES = {"Squeeze": "Unsqueeze", "Unsqueeze": "Squeeze"}


def _cancelling_squeeze_source(node):
    """Squeeze(Unsqueeze(x, a), a) and Unsqueeze(Squeeze(x, a), a) are x.

    Squeeze fails unless every axis it removes has size 1, so in either order the pair
    gives x back. Negative axes count from the rank of the larger (unsqueezed) tensor.
    """
    first = producer(node.inputs[0])
    if first is None or first.op != _UNDOES[node.op] or not is_standard(first):
        return None
    axes, first_axes = _ints(node, 1, "axes"), _ints(first, 1, "axes")
    if not axes or not first_axes:  # Squeeze without axes removes whatever sizes are 1
        return None
    wide = rank_of(first.outputs[0] if node.op == "Squeeze" else first.inputs[0])
    if wide is None and min(axes + first_axes) < 0:
        return None
    normal = sorted(a % wide if wide else a for a in axes)
    if normal != sorted(a % wide if wide else a for a in first_axes) or len(set(normal)) != len(normal):
        return None
    return first.inputs[0]


def _merge_transpose_chains(graph, names) -> int:
    """Transpose(Transpose(x, p), q) is Transpose(x, p[q]), and x when that is the identity.

    The second reads x directly; the first goes once nothing else reads it.
    """
    count = 0
    own = {id(node) for node in graph.nodes}  # a Transpose of an outer scope stays
    for node in list(graph.nodes):
        if node.op != "Transpose" or not node.outputs or not is_standard(node):
            continue
        first = producer(node.inputs[0])
        if first is None or first.op != "Transpose" or not is_standard(first) or id(first) not in own:
            continue
        p, q = first.attrs.get("perm"), node.attrs.get("perm")
        if p is None or q is None or len(p) != len(q):
            continue  # a default perm needs the rank; exports write perm
        composed = [p[axis] for axis in q]
        node.inputs[0] = first.inputs[0]
        node.attrs["perm"] = composed
        count += 1
        source = _identity_transpose_source(node)
        if source is not None:
            _bypass(graph, node, source)
    return count


def _transposes_to_reshapes(graph, names) -> int:
    """A Transpose that keeps the order of every axis larger than 1 (it moves only axes of
    size 1, as a [1, L, C] -> [L, 1, C] of batch-first attention does) leaves the elements
    in place: it is a Reshape, which copies nothing and merges with the Reshapes around it.
    Needs every size known, none 0."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "Transpose" or not node.outputs or not is_standard(node):
            continue
        shape, perm = node.inputs[0].shape, node.attrs.get("perm")
        if perm is None or not is_static(shape) or len(perm) != len(shape) or 0 in shape:
            continue
        kept = [axis for axis in perm if shape[axis] != 1]
        if kept != sorted(kept) or list(perm) == list(range(len(perm))):
            continue
        target = np.asarray([shape[axis] for axis in perm], dtype=np.int64)
        node.op, node.attrs = "Reshape", {}
        node.inputs.append(gs.Constant(names.fresh(f"{node.name}_shape"), target))
        count += 1
    return count


def _merge_slice_chains(graph, names) -> int:
    """Slice(Slice(x, a), b) over different axes is one Slice over both: slicing one axis
    does not move the elements of another. Every parameter must be a constant; the first
    Slice goes once nothing else reads it."""
    count = 0
    own = {id(node) for node in graph.nodes}
    for node in list(graph.nodes):
        if node.op != "Slice" or not node.outputs or not is_standard(node) or graph.opset < 10:
            continue
        first = producer(node.inputs[0])
        if first is None or first.op != "Slice" or not is_standard(first) or id(first) not in own:
            continue
        outer, inner = _slice_parameters(first), _slice_parameters(node)
        if outer is None or inner is None or set(outer[2]) & set(inner[2]):
            continue
        merged = [np.asarray(a + b, dtype=np.int64) for a, b in zip(outer, inner)]
        parameters = [gs.Constant(names.fresh(f"{node.name}_{what}"), values)
                      for what, values in zip(("starts", "ends", "axes", "steps"), merged)]
        data = first.inputs[0]
        node.inputs.clear()  # graph-surgeon's input list keeps each value's readers in step
        node.inputs.extend([data, *parameters])
        count += 1
    return count


def _slice_parameters(node):
    """(starts, ends, axes >= 0, steps) of a Slice whose parameters are all constants and
    whose input's rank is known; else None."""
    starts, ends = _ints(node, 1, "starts"), _ints(node, 2, "ends")
    axes, steps = _ints(node, 3, "axes"), _ints(node, 4, "steps")
    rank = rank_of(node.inputs[0])
    if None in (starts, ends, axes, steps) or rank is None or len(starts) != len(ends):
        return None
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    if len(axes) != len(starts) or len(steps) != len(starts) or not all(-rank <= a < rank for a in axes):
        return None
    return starts, ends, [a % rank for a in axes], steps


STEPS = [
    Cleanup("identity-slice", "a Slice of the full range of every axis it names is removed",
            bypassing({"Slice"}, _full_slice_source)),
    Cleanup("identity-expand", "an Expand to a shape its input already has is removed",
            bypassing({"Expand"}, _same_shape_expand_source)),
    Cleanup("identity-flatten", "a Flatten to the shape its input already has is removed",
            bypassing({"Flatten"}, _identity_flatten_source)),
    Cleanup("identity-transpose", "a Transpose that keeps every axis in place is removed",
            bypassing({"Transpose"}, _identity_transpose_source)),
    Cleanup("identity-cast", "a Cast or CastLike to the type its input has is removed",
            bypassing({"Cast", "CastLike"}, _same_type_cast_source)),
    Cleanup("zero-pad", "a Pad that adds nothing on any side is removed",
            bypassing({"Pad"}, _zero_pad_source)),
    Cleanup("single-concat", "a Concat of one input is removed",
            bypassing({"Concat"}, _single_concat_source)),
    Cleanup("squeeze-unsqueeze", "a Squeeze and Unsqueeze of the same axes cancel",
            bypassing({"Squeeze", "Unsqueeze"}, _cancelling_squeeze_source)),
    Cleanup("transpose-chain", "two Transposes in a row become one, or none",
            _merge_transpose_chains),
    Cleanup("transpose-as-reshape", "a Transpose that moves only axes of size 1 is a Reshape",
            _transposes_to_reshapes),
    Cleanup("slice-chain", "two Slices in a row over different axes become one",
            _merge_slice_chains),
]
