"""Write the forms onnxruntime fuses, where an exporter wrote an equal one it does not.

Once the rules reach their fixpoint, two shapes cost time for no reason (measured in
onnxruntime 1.32 CPU, interleaved rounds; figures in the README):

- GELU as the dynamo exporter decomposes it below opset 20,
  `Mul(x, Mul(0.5, Add(Erf(Div(x, sqrt 2)), 1)))`. onnxruntime's GeluFusion only knows
  `Mul(Mul(x, 0.5), Add(Erf(Div(x, sqrt 2)), 1))` and `Mul(Mul(x, Add(...)), 0.5)`, so
  the Erf, Muls and Div run one by one. From opset 20 on it becomes the standard `Gelu`;
  below, the first form GeluFusion knows. The constants must be sqrt(2) (or 1/sqrt(2) as
  a Mul), 1 and 0.5 exactly, rounded to the value's type: anything else is another
  function and stays.
- A pooled head as `ReduceMean(x, axes=[2, 3])` of a 4-D x, where the deploy form has
  `GlobalAveragePool`, the same average over the same axes.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph import attributes, drop_unused_nodes, is_constant, is_standard, producer
from .names import NameSource
from .weights import constant_values

COUNTS = ("gelu", "global-average-pool")
_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}


def write_runtime_forms(graph: gs.Graph, names: NameSource, kinds=COUNTS) -> dict:
    """Rewrite every GELU and pooled head found (of `kinds`); return how many of each."""
    counts = dict.fromkeys(COUNTS, 0)
    outputs = {id(t) for t in graph.outputs}
    for node in list(graph.nodes):
        if not is_standard(node) or not node.outputs:
            continue
        if "gelu" in kinds and (node.op == "Erf" or (node.op == "Tanh" and graph.opset >= 20)):
            counts["gelu"] += _gelu(graph, node, outputs, names)
        elif "global-average-pool" in kinds and node.op == "ReduceMean":
            counts["global-average-pool"] += _global_pool(node, graph.opset, outputs)
    if any(counts.values()):
        drop_unused_nodes(graph)
    return counts


# --- GELU ---------------------------------------------------------------------------------

def _equals(tensor, value) -> bool:
    """A scalar-like float constant that is `value` rounded to its own type."""
    if tensor is None or not is_constant(tensor) or np.dtype(tensor.dtype) not in _FLOATS:
        return False
    if int(np.prod(tensor.shape, dtype=np.int64)) != 1 or len(tensor.shape) > 1:
        return False
    stored = constant_values(tensor).reshape(-1)[0]
    return bool(stored == np.asarray(value, dtype=np.float64).astype(stored.dtype))


def _other(node, tensor):
    """The operand of a two-input node that is not `tensor` (None if neither or both are)."""
    a, b = node.inputs
    if a is tensor and b is not tensor:
        return b
    if b is tensor and a is not tensor:
        return a
    return None


def _sole_consumer(tensor, op, outputs):
    """The one node reading `tensor`, if it is an `op` and the value is no graph output."""
    if len(tensor.outputs) != 1 or id(tensor) in outputs:
        return None
    node = tensor.outputs[0]
    return node if node.op == op and is_standard(node) and len(node.inputs) == 2 else None


def _erf_argument(erf):
    """(x, the node dividing it by sqrt 2) for Erf(Div(x, sqrt 2)) or Erf(Mul(x, 1/sqrt 2))."""
    scale = producer(erf.inputs[0])
    if scale is None or not is_standard(scale) or len(scale.inputs) != 2:
        return None, None
    if scale.op == "Div" and _equals(scale.inputs[1], np.sqrt(2.0)):
        return scale.inputs[0], scale
    if scale.op == "Mul":
        for x, factor in (scale.inputs, scale.inputs[::-1]):
            if _equals(factor, np.sqrt(0.5)) and not is_constant(x):
                return x, scale
    return None, None


def _private(tensor, outputs) -> bool:
    """A middle value of the subgraph: one reader, not a graph output."""
    return len(tensor.outputs) == 1 and id(tensor) not in outputs


def _standard(node, op):
    return node is not None and node.op == op and is_standard(node) and len(node.inputs) == 2


def _tanh_argument(tanh, outputs):
    """(x, the nodes) for Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)), x^3 as Pow(x, 3) or
    x * (x * x) in either order; (None, None) for anything else."""
    scale = producer(tanh.inputs[0])
    if not _standard(scale, "Mul") or not _private(scale.outputs[0], outputs):
        return None, None
    for inner, factor in (scale.inputs, scale.inputs[::-1]):
        add = producer(inner)
        if not _equals(factor, np.sqrt(2 / np.pi)) or not _standard(add, "Add") or not _private(inner, outputs):
            continue
        for x, term in (add.inputs, add.inputs[::-1]):
            nodes = _cubic_term(term, x, outputs)
            if nodes is not None:
                return x, [*nodes, add, scale]
    return None, None


def _cubic_term(term, x, outputs):
    """The nodes of 0.044715 * x^3 computing `term`, or None."""
    times = producer(term)
    if is_constant(x) or not _standard(times, "Mul") or not _private(term, outputs):
        return None
    for cube, factor in (times.inputs, times.inputs[::-1]):
        node = producer(cube)
        if not _equals(factor, 0.044715) or node is None or not _private(cube, outputs):
            continue
        if _standard(node, "Pow") and node.inputs[0] is x and _equals(node.inputs[1], 3.0):
            return [node, times]
        if _standard(node, "Mul") and x in node.inputs:
            square = producer(_other(node, x) if _other(node, x) is not None else x)
            if _standard(square, "Mul") and square.inputs[0] is x and square.inputs[1] is x \
                    and _private(square.outputs[0], outputs):
                return [square, node, times]
    return None


def _gelu_nodes(kernel, outputs):
    """The nodes of x * 0.5 * (1 + erf(x / sqrt 2)) (or of tanh's approximation, from a
    Tanh), in any association of the product, the last one first; x; and whether the
    product is one GeluFusion knows: (x * 0.5) * (1 + erf) or (x * (1 + erf)) * 0.5.
    Nones where the subgraph is anything else."""
    if kernel.op == "Erf":
        x, scale = _erf_argument(kernel)
        argument = [scale] if x is not None else None
    else:
        x, argument = _tanh_argument(kernel, outputs)
    if x is None or np.dtype(x.dtype or np.float32) not in _FLOATS or not _private(kernel.inputs[0], outputs):
        return None, None, False
    add = _sole_consumer(kernel.outputs[0], "Add", outputs)
    if add is None or not _equals(_other(add, kernel.outputs[0]), 1.0):
        return None, None, False
    first = _sole_consumer(add.outputs[0], "Mul", outputs)
    factor = first and _other(first, add.outputs[0])
    if factor is None:
        return None, None, False
    tail = [add, kernel, *argument[::-1]]
    half = producer(factor)
    if half is not None and half.op == "Mul" and is_standard(half) and len(factor.outputs) == 1 \
            and id(factor) not in outputs and _equals(_other(half, x), 0.5):
        return [first, half, *tail], x, True
    if factor is x or _equals(factor, 0.5):
        last = _sole_consumer(first.outputs[0], "Mul", outputs) if len(first.outputs[0].outputs) == 1 else None
        other = last and _other(last, first.outputs[0])
        if other is not None and (other is x if factor is not x else _equals(other, 0.5)):
            return [last, first, *tail], x, factor is x  # x * (1 + erf), then * 0.5
    return None, None, False


def _broadcast_free(nodes, x) -> bool:
    """The subgraph's constants add no axis to x: those of shape [1] turn a rank-0 x (or
    one of unknown rank) into [1], which Gelu(x) or the rank-0 constants written would not."""
    if x.shape is not None and len(x.shape) >= 1:
        return True
    return all(len(t.shape) == 0 for node in nodes for t in node.inputs if is_constant(t))


def _gelu(graph, kernel, outputs, names) -> int:
    """Rewrite the GELU around `kernel` (its Erf, or its Tanh from opset 20); 1 if done."""
    nodes, x, fused_form = _gelu_nodes(kernel, outputs)
    if nodes is None or not _broadcast_free(nodes, x):
        return 0
    if graph.opset < 20 and fused_form and nodes[-1].op == "Div":
        return 0  # onnxruntime fuses it already
    result = nodes[0].outputs[0]
    first_name = nodes[-1].name
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()
    if graph.opset >= 20:
        attrs = {"approximate": "tanh"} if kernel.op == "Tanh" else {}
        graph.nodes.append(gs.Node("Gelu", first_name, attrs=attrs, inputs=[x], outputs=[result]))
        return 1
    dtype = np.dtype(x.dtype)

    def constant(label, value):
        return gs.Constant(names.fresh(f"{first_name}_{label}"), np.asarray(value, dtype=np.float64).astype(dtype))

    def value(label):
        return gs.Variable(names.fresh(f"{first_name}_{label}"), dtype=dtype)

    half, scaled, erf_out, plus = value("half"), value("scaled"), value("erf"), value("plus")
    made = [("Mul", [x, constant("0.5", 0.5)], half), ("Div", [x, constant("sqrt2", np.sqrt(2.0))], scaled),
            ("Erf", [scaled], erf_out), ("Add", [erf_out, constant("one", 1.0)], plus),
            ("Mul", [half, plus], result)]
    for index, (op, inputs, output) in enumerate(made):
        name = first_name if index == 0 else names.fresh(f"{first_name}_{op}")
        names.take(name)
        graph.nodes.append(gs.Node(op, name, inputs=inputs, outputs=[output]))
    return 1


# --- pooled heads -------------------------------------------------------------------------

def _reduced_axes(node, opset):
    """ReduceMean's axes as a sorted list of non-negative numbers, or None when unknown."""
    attrs = node.attrs
    if opset >= 18:
        axes_input = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1].name else None
        if axes_input is None or not is_constant(axes_input):
            return None
        axes = constant_values(axes_input).reshape(-1).tolist()
    else:
        axes = attrs.get("axes")
    if not axes:
        return None
    return sorted(int(a) % 4 for a in axes)


def _global_pool(node, opset, outputs) -> int:
    """ReduceMean over the spatial axes of a 4-D value is GlobalAveragePool; with
    keepdims=0 too, where only Flatten and Reshape read the result (they see the same
    elements in the same order either way)."""
    x = node.inputs[0]
    if x.shape is None or len(x.shape) != 4 or x.dtype is None or np.dtype(x.dtype) not in _FLOATS:
        return 0
    if _reduced_axes(node, opset) != [2, 3]:
        return 0
    result = node.outputs[0]
    if not attributes(node).get("keepdims", 1):
        readers = result.outputs
        if id(result) in outputs or not readers or any(r.op not in ("Flatten", "Reshape") for r in readers):
            return 0
        for reader in readers:
            if reader.op == "Flatten" and reader.attrs.get("axis", 1) < 0:
                reader.attrs["axis"] = reader.attrs["axis"] + 2  # counted from the 2-D result
        result.shape = [*x.shape[:2], 1, 1]
    node.op, node.attrs = "GlobalAveragePool", {}
    while len(node.inputs) > 1:
        del node.inputs[-1]
    return 1
