"""onnxfold's own constant evaluator: static shape arithmetic, then every subgraph whose
inputs are all constants, evaluated by onnxruntime.

Shapes come from ONNX shape inference only, as optimize.py sets them: a dim is used when
it is a size above 0; a name, an unknown dim or an unknown rank is never guessed. The
shape step only reads dims and picks among them (Shape, Size, Gather, Slice, Concat,
Unsqueeze, Squeeze); any arithmetic on the picked values is left to onnxruntime, which
evaluates it with ONNX's own rules (integer division, casts, saturation).

All foldable nodes of a graph go to onnxruntime as one small model, run once. A failure
is a warning in the report (fold_warnings), never an error and never a library's log line.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from .graph import constant_bytes, constant_size, drop_unused_nodes, is_constant, is_standard, onnx_type
from .text import first_line
from .weights import constant_values, tensor_proto

# Ops whose output is not a function of their inputs. Dropout is never folded: in
# inference mode normalize bypasses it, in training mode it draws a mask.
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
           "Bernoulli", "Dropout"}
# A folded value may be at most this many times the bytes of the constants it is computed
# from, plus a slack: _SLACK bytes (shape vectors, small tables), or up to 1% of the
# graph's weights but never _CAP or more. Below that, storing a value computed at every
# run (Swin's attention masks, a detector's anchor grid) is worth its bytes; a
# ConstantOfShape or an Expand that writes megabytes from a few numbers stays computed.
_GROWTH = 4
_SLACK = 4096
_CAP = 1 << 20
# Element types onnxruntime's Python API cannot return (it has no numpy type for them).
_UNREADABLE = {onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
               getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}
_IR_VERSION = 11  # any opset from 7 on; float4 needs 11
_WARNINGS = "_onnxfold_fold_warnings"


def fold_constants(graph, names) -> int:
    """Fold static shapes and constant subgraphs of one graph; return the nodes removed.

    `names` (a NameSource) names the new constants."""
    before = len(graph.nodes)
    _cast_like_to_cast(graph)
    changed = _fold_static_shapes(graph)
    changed = _static_reshape_targets(graph, names) or changed
    excluded: set = set()
    slack = functools.cache(lambda: _slack(graph))  # a walk of all weights: only for a fold
    while True:
        nodes, frontier = _select(graph, excluded, slack)
        if not frontier:  # nothing, or only nodes no one reads: normalize's clean-up drops them
            break
        values = _evaluate(nodes, frontier, graph.opset)
        if isinstance(values, Exception):  # one node onnxruntime cannot run keeps no other
            failed = _failed_parts(graph, nodes, values)
            if not failed:
                break
            excluded |= {id(n) for n in failed}
            continue
        too_big = [t for t, array in zip(frontier, values) if not _fits(t, array, nodes, slack)]
        if too_big:  # sizes inference did not know: leave those, evaluate the rest again
            excluded |= {id(t.inputs[0]) for t in too_big}
            continue
        _replace(nodes, frontier, values)
        changed = True
        break
    if changed:  # a clean-up costs a walk of the whole graph: only when there is something
        drop_unused_nodes(graph)
    return before - len(graph.nodes)


def fold_warnings(graph) -> list:
    """What constant folding could not do in this graph, one line each, for the report."""
    return list(vars(graph).get(_WARNINGS, {}))


def _warn(graph, message) -> None:
    # vars(): graph-surgeon's Graph takes any unknown attribute read for an op to build.
    vars(graph).setdefault(_WARNINGS, {})[message] = None  # normalize runs often: each line once


# ---- static shape arithmetic ----------------------------------------------------------

_SHAPE_OPS = {"Shape", "Size", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze"}


def _fold_static_shapes(graph) -> bool:
    """Values computed from static dims become constants, even where the shape they are
    read from has dynamic dims (Gather of a static dim of Shape(x)); True if any did."""
    known: dict = {}
    folded = False
    outputs = {id(t) for t in graph.outputs}
    for node in list(graph.nodes):
        if node.op not in _SHAPE_OPS or not is_standard(node) or len(node.outputs) != 1:
            continue
        result = node.outputs[0]
        if id(result) in outputs or all(is_constant(t) for t in node.inputs):
            continue  # all-constant nodes are onnxruntime's
        picked = _picked(result, known)
        if picked is None or None in picked[0]:
            continue
        dims, scalar = picked
        node.outputs.clear()
        result.to_constant(np.asarray(dims[0] if scalar else dims, dtype=np.int64))
        folded = True
    return folded


def _static_reshape_targets(graph, names) -> bool:
    """A Reshape to a computed shape of which all dims but one are known becomes a Reshape
    to a constant, -1 for that one dim: the shape arithmetic feeding it (Shape -> Gather ->
    Concat of a dynamic batch, as exporters write `x.view(B, H, W, C)`) goes. The dims are
    known from the target's own values (static picks) or from the inferred result shape."""
    known: dict = {}
    folded = False
    for node in graph.nodes:
        if node.op != "Reshape" or not is_standard(node) or is_constant(node.inputs[1]):
            continue
        target = _known_but_one(_picked(node.inputs[1], known)) or _known_but_one(_result_dims(node))
        if target is not None:
            node.inputs[1] = gs.Constant(names.fresh(f"{node.name}_shape"), np.asarray(target, dtype=np.int64))
            folded = True
    return folded


def _result_dims(node):
    shape = node.outputs[0].shape
    return None if shape is None else ([d if isinstance(d, int) and d > 0 else None for d in shape], False)


def _known_but_one(picked):
    """The dims with -1 for the one unknown, when all others are sizes above 0 (a 0 copies
    an input dim, maybe 0 itself, with which -1 could not be resolved)."""
    if picked is None or picked[1]:
        return None
    dims = picked[0]
    if dims.count(None) != 1 or any(d is not None and d <= 0 for d in dims):
        return None
    return [-1 if d is None else d for d in dims]


def _picked(tensor, known):
    """(dims, is_scalar) of an int64 value that holds dims or constants, each an int or
    None where not static; None if the value is not of that kind."""
    key = id(tensor)
    if key not in known:
        known[key] = None  # a guard, should a malformed graph have a cycle
        known[key] = _pick(tensor, known)
    return known[key]


def _pick(tensor, known):
    if is_constant(tensor):
        values = _small_ints(tensor)
        if values is None or tensor.dtype != np.int64 or values.ndim > 1:
            return None
        return values.reshape(-1).tolist(), values.ndim == 0
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or not is_standard(node) or node.op not in _SHAPE_OPS:
        return None
    if node.op in ("Shape", "Size") and node.inputs[0].shape is None:
        return None  # unknown rank: not even how many dims there are is known
    if node.op == "Shape":
        return _shape_dims(node), False
    if node.op == "Size":
        dims = _shape_dims(node, whole=True)
        return ([math.prod(dims)] if None not in dims else [None]), True
    vector = _picked(node.inputs[0], known)
    if node.op == "Concat":
        parts = [_picked(t, known) for t in node.inputs]
        if node.attrs.get("axis") not in (0, -1) or any(p is None or p[1] for p in parts):
            return None
        return [d for part in parts for d in part[0]], False
    if vector is None:
        return None
    dims, scalar = vector
    if node.op == "Gather":
        return _gather(node, dims, scalar)
    if node.op == "Slice":
        return _slice(node, dims, scalar)
    axes = _axes(node)
    if node.op == "Unsqueeze" and scalar and axes in ([0], [-1]):
        return dims, False
    if node.op == "Squeeze" and not scalar and len(dims) == 1 and axes in (None, [0], [-1]):
        return dims, True
    return None


def _shape_dims(node, whole=False) -> list:
    """The dims Shape reads (start and end honoured), each a size above 0 or None."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in node.inputs[0].shape]
    if whole:
        return dims
    return dims[slice(node.attrs.get("start", 0), node.attrs.get("end", None))]


def _gather(node, dims, scalar):
    indices = _small_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if scalar or indices is None or indices.ndim > 1 or node.attrs.get("axis", 0) not in (0, -1):
        return None
    if any(not -len(dims) <= i < len(dims) for i in indices.reshape(-1).tolist()):
        return None  # out of range: onnxruntime's error to raise, at run time
    return [dims[i] for i in indices.reshape(-1).tolist()], indices.ndim == 0


def _slice(node, dims, scalar):
    if scalar:
        return None
    if len(node.inputs) == 1:  # before opset 10, the parameters are attributes
        params = [node.attrs.get(k) for k in ("starts", "ends", "axes")] + [None]
    else:
        params = [_optional_ints(t) for t in node.inputs[1:]] + [None] * (5 - len(node.inputs))
    if _UNKNOWN in params:
        return None
    starts, ends, axes, steps = params
    steps = steps or [1]
    if starts is None or ends is None or len(starts) != 1 or len(ends) != 1 or \
            axes not in (None, [0], [-1]) or steps[0] == 0 or not dims:
        return None
    if steps[0] < 0 and ends[0] in _SLICE_TO_THE_END:
        return None  # to the front in onnxruntime, nothing in the ONNX spec: no fold can be right for both
    return [dims[i] for i in slice_positions(len(dims), starts[0], ends[0], steps[0])], False


_SLICE_TO_THE_END = (2**31 - 1, 2**63 - 1)  # an end onnxruntime reads as "to the end", in the step's direction


def slice_positions(length, start, end, step) -> range:
    """The positions Slice takes along an axis of `length`, clamped as onnxruntime clamps them.

    Not Python's slice(): for a negative step, a start below -length is clamped to 0 (one
    element), where Python takes none; and an end of INT_MAX is "to the end".
    """
    start += length if start < 0 else 0
    start = min(max(start, 0), length - 1 if step < 0 else length)
    if end in _SLICE_TO_THE_END:
        end = -1 if step < 0 else length
    else:
        end += length if end < 0 else 0
        end = min(max(end, -1 if step < 0 else 0), length)
    return range(start, end, step)


_UNKNOWN = "unknown"  # a parameter that is given but not a small integer constant


def _optional_ints(tensor):
    """An optional input's values as a list: None where omitted, else _UNKNOWN if not known."""
    if not tensor.name:
        return None
    values = _small_ints(tensor)
    return _UNKNOWN if values is None else values.reshape(-1).tolist()


def _axes(node):
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    return _optional_ints(node.inputs[1]) if len(node.inputs) > 1 else None


def _small_ints(tensor):
    """A small integer constant's values, or None."""
    if not is_constant(tensor) or constant_size(tensor) > 64 or tensor.dtype is None:
        return None
    values = constant_values(tensor)
    return values if np.issubdtype(values.dtype, np.integer) else None


def _cast_like_to_cast(graph) -> None:
    """CastLike(constant, x) with x's type known is Cast(constant, to=that type), a constant
    subgraph: onnxruntime then folds it with ONNX's own rounding and saturation, which
    numpy's astype does not follow for float8 and int4 (the dynamo exporter's habit)."""
    for node in graph.nodes:
        if node.op != "CastLike" or not is_standard(node) or not is_constant(node.inputs[0]) or node.inputs[1].dtype is None:
            continue
        saturate = {key: value for key, value in node.attrs.items() if key == "saturate"}
        node.op, node.attrs = "Cast", {"to": onnx_type(node.inputs[1].dtype), **saturate}
        del node.inputs[1]


# ---- constant subgraphs ---------------------------------------------------------------

def _slack(graph) -> int:
    """The bytes any fold may take, whatever it is computed from (see _GROWTH)."""
    weights = sum(constant_bytes(t) for t in graph.tensors().values() if is_constant(t) and t.dtype is not None)
    return max(_SLACK, min(_CAP - 1, weights // 100))


def _select(graph, excluded, slack):
    """The nodes computed from constants alone, in an order onnxruntime can run, and the
    values they hand to the rest of the graph (the frontier); a node whose frontier value
    cannot be folded (a graph output, an unreadable type, too large) is left out in turn."""
    while True:
        nodes = _constant_nodes(graph, excluded)
        frontier = _frontier(graph, nodes)
        bad = {id(t.inputs[0]) for t in frontier if not _foldable_value(graph, t, nodes, slack)}
        if not bad:
            return nodes, frontier
        excluded |= bad


def _constant_nodes(graph, excluded) -> list:
    chosen, ids = [], set()
    pending = [n for n in graph.nodes if id(n) not in excluded]
    progress = True
    while pending and progress:  # in order of dependence, whatever the graph's order
        progress, waiting = False, []
        for node in pending:  # inputs first: cheaper than _may_fold, and most nodes fail it
            if not all(not t.name or is_constant(t) or (t.inputs and id(t.inputs[0]) in ids) for t in node.inputs):
                waiting.append(node)
            elif _may_fold(node):
                chosen.append(node)
                ids.add(id(node))
                progress = True
        pending = waiting
    return chosen


def is_random(node) -> bool:
    """A node whose output is not a function of its inputs (random draws, Dropout)."""
    return node.op in _RANDOM


# A quantized weight's DequantizeLinear is the form runtimes fuse into QLinearConv and
# MatMulInteger; folded, the weight would be stored in float, four times the bytes.
_KEPT_FOR_RUNTIMES = {"DequantizeLinear"}


# The most a value computed on the way to a fold may hold, where it is more than _GROWTH
# times what it is computed from: a ConstantOfShape of 5e8 floats summed to one number
# folds to a scalar, but onnxruntime would have to hold the 2 GB. A Transpose or Cast of a
# large weight is no such blow-up, and still folds.
_EVALUATION_CAP = 64 << 20


def _may_fold(node) -> bool:
    return bool(node.inputs) and bool(node.outputs) and node.op != "Constant" and not is_random(node) and \
        node.op not in _KEPT_FOR_RUNTIMES and is_standard(node) and next(node.subgraphs(), None) is None \
        and not _blows_up(node)


def _blows_up(node) -> bool:
    read = sum(_known_bytes(t) for t in node.inputs if t.name)
    return any(_known_bytes(t) > max(_EVALUATION_CAP, _GROWTH * read) for t in node.outputs)


def _known_bytes(tensor) -> int:
    """The bytes of a value, where its static shape is known (from inference or, where
    inference did not see it, from the stored sizes a ConstantOfShape, Expand or Tile
    reads); else 0."""
    if is_constant(tensor):
        return constant_bytes(tensor)
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        shape = _sizes_read(tensor.inputs[0]) if tensor.inputs else None
    if tensor.dtype is None or shape is None:
        return 0
    return math.prod(shape) * np.dtype(tensor.dtype).itemsize


def _sizes_read(node):
    """The output sizes an op takes from a stored input, at least (Expand broadcasts them
    with its input's): None for other ops, or sizes not stored."""
    if node.op not in ("ConstantOfShape", "Expand", "Tile") or len(node.inputs) < (1 if node.op == "ConstantOfShape" else 2):
        return None
    sizes = _small_ints(node.inputs[0 if node.op == "ConstantOfShape" else 1])
    if sizes is None or (sizes < 0).any():
        return None
    if node.op == "Tile":
        data = node.inputs[0].shape
        if data is None or len(data) != sizes.size or not all(isinstance(d, int) for d in data):
            return None
        return [d * r for d, r in zip(data, sizes.tolist())]
    return sizes.reshape(-1).tolist()


def _frontier(graph, nodes) -> list:
    """Values of `nodes` read by any other node (of any scope) or output by the graph."""
    ids = {id(n) for n in nodes}
    outputs = {id(t) for t in graph.outputs}
    return [t for n in nodes for t in n.outputs
            if t.name and (id(t) in outputs or any(id(c) not in ids for c in t.outputs))]


def _foldable_value(graph, tensor, nodes, slack) -> bool:
    if tensor in graph.outputs or tensor.type != "tensor_type" or tensor.dtype is None:
        return False
    if onnx_type(tensor.dtype) in _UNREADABLE:
        return False
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return True  # checked once evaluated
    return _within_budget(math.prod(shape) * np.dtype(tensor.dtype).itemsize, tensor, nodes, slack)


def _fits(tensor, array, nodes, slack) -> bool:
    return isinstance(array, np.ndarray) and _within_budget(array.nbytes, tensor, nodes, slack)


def _within_budget(size, tensor, nodes, slack) -> bool:
    """`slack()` gives the bytes any fold may take (_slack)."""
    return size <= slack() or size <= _budget(tensor, nodes, slack)  # most folds are small: no walk


def _budget(tensor, nodes, slack) -> int:
    """The most bytes `tensor` may take as a constant: _GROWTH times the constants it is
    computed from, plus `slack()`."""
    ids = {id(n) for n in nodes}
    seen, leaves, stack = set(), {}, [tensor]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if is_constant(value):
            leaves[id(value)] = constant_bytes(value)
        elif value.inputs and id(value.inputs[0]) in ids:
            stack.extend(t for t in value.inputs[0].inputs if t.name)
    return _GROWTH * sum(leaves.values()) + slack()


def _evaluate(nodes, frontier, opset):
    """The frontier's values, from one onnxruntime run of `nodes`; the error on failure."""
    try:
        model = _evaluation_model(nodes, frontier, opset)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 4  # never print: a failure becomes a warning
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        run_options = ort.RunOptions()
        run_options.log_severity_level = 4
        values = session.run([t.name for t in frontier], {}, run_options)
    except Exception as error:  # noqa: BLE001 - any failure leaves the nodes computed
        return error
    return [_typed(t, v) for t, v in zip(frontier, values)]


def _failed_parts(graph, nodes, error) -> list:
    """The nodes of the unconnected parts of a failed batch that fail alone too (each
    reported), so that the others still fold; none if every part runs alone."""
    parts = _parts(nodes)
    if len(parts) == 1:
        _warn_failure(graph, nodes, error)
        return nodes
    failed = []
    for part in parts:
        outcome = _evaluate(part, _frontier(graph, part), graph.opset)
        if isinstance(outcome, Exception):
            _warn_failure(graph, part, outcome)
            failed += part
    return failed


def _parts(nodes) -> list:
    """`nodes` split into groups that share no value, each in the order given."""
    group = {id(n): id(n) for n in nodes}

    def root(key):
        while group[key] != key:
            group[key] = group[group[key]]
            key = group[key]
        return key
    for node in nodes:
        for tensor in node.inputs:
            if tensor.inputs and id(tensor.inputs[0]) in group:
                group[root(id(tensor.inputs[0]))] = root(id(node))
    parts: dict = {}
    for node in nodes:
        parts.setdefault(root(id(node)), []).append(node)
    return list(parts.values())


def _warn_failure(graph, nodes, error) -> None:
    reason = first_line(error).split(" : ")[-1][:200]  # onnxruntime's "[ONNXRuntimeError] : 2 : ..." cut
    _warn(graph, f"constant folding: onnxruntime could not evaluate {len(nodes)} constant nodes of graph "
                 f"'{graph.name}' ({nodes[0].op} '{nodes[0].name}' first: {reason}); they stay computed")


def _typed(tensor, value):
    """onnxruntime returns float8 values as uint8: given back their own type."""
    if isinstance(value, np.ndarray) and value.dtype != tensor.dtype and value.dtype.itemsize == np.dtype(tensor.dtype).itemsize:
        return value.view(tensor.dtype)
    return value


def _evaluation_model(nodes, frontier, opset) -> onnx.ModelProto:
    leaves = {}
    for node in nodes:
        for tensor in node.inputs:
            if tensor.name and is_constant(tensor):
                leaves.setdefault(tensor.name, tensor)
    outputs = [onnx.helper.make_tensor_value_info(t.name, onnx_type(t.dtype), None) for t in frontier]
    protos = [OnnxExporter.export_node(n) for n in nodes]
    for proto in protos:
        proto.domain = ""  # "ai.onnx" is the same domain, and the only one imported here
    body = onnx.helper.make_graph(protos, "constants", [], outputs, [tensor_proto(t) for t in leaves.values()])
    return onnx.helper.make_model(body, ir_version=_IR_VERSION,
                                  opset_imports=[onnx.helper.make_opsetid("", opset)])


def _replace(nodes, frontier, values) -> None:
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()
    for tensor, array in zip(frontier, values):
        tensor.to_constant(array)
