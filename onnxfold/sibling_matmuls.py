"""MatMuls that read one value with constant weights become one MatMul and a Split.

Attention computes q, k and v as three Linears of one input: `x.Wq (+ bq)`, `x.Wk (+ bk)`,
`x.Wv (+ bv)`. Column j of `x.W` depends only on column j of W, so with
W = concat(Wq, Wk, Wv) along the columns (and b = concat(bq, bk, bv)),

    x.W + b = concat(x.Wq + bq, x.Wk + bk, x.Wv + bv)  along the last axis,

and splitting it there gives back each projection, up to the rounding of the dot products
(a kernel may block a longer row of columns differently). The parameters and
multiply-adds stay the same, but the Split copies the product once more. Measured in
onnxruntime 1.32 CPU (2 threads, interleaved, merged/separate time of an attention block):
with weights up to 128x128 the merged form is as fast or faster (0.95-1.01 over 16-1024
tokens; MobileViT's 64-96 wide projections 0.99), with wider ones slower (1.02-1.03 at
192-768 wide; BERT and ViT 1.03). So only narrow projections are merged.
Run once the rules are done: they fold scales and BNs into each MatMul apart.

Only where it removes nodes: three MatMuls or more, or two with their bias Adds. Left
alone: weights read by any other node (the concatenation would store them twice), weights
that are not 2-D constants of one type, and readers of the value in a nested graph.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph import drop_unused_nodes, is_constant, is_standard
from .names import NameSource
from .weights import constant_values

NAME = "sibling-matmuls"
SUMMARY = ("x.Wq (+bq), x.Wk (+bk), x.Wv (+bv), weights at most 128x128  =>  "
           "Split(x.[Wq Wk Wv] (+[bq bk bv]))")
NARROW = 128  # the widest weight (rows and columns) merged: wider ones ran slower merged


def merge_sibling_matmuls(graph: gs.Graph, names: NameSource) -> int:
    """Merge every group of MatMuls reading one value; return how many nodes that removed."""
    own = {id(node) for node in graph.nodes}
    outputs = {id(t) for t in graph.outputs}
    removed, seen = 0, set()
    for node in list(graph.nodes):
        value = node.inputs[0] if node.op == "MatMul" and node.inputs else None
        if value is None or id(value) in seen or is_constant(value):
            continue
        seen.add(id(value))
        group = _siblings(value, own) if value.shape is not None or graph.opset >= 11 else []
        biases = _biases(group, own, outputs)
        saved = len(group) - 2 + (len(group) - 1 if biases else 0)  # the Split is one node more
        if saved > 0:
            _merge(graph, value, group, biases, names)
            removed += saved
    if removed:
        drop_unused_nodes(graph)
    return removed


def _siblings(value, own) -> list:
    """The MatMuls of this graph reading `value` as their left operand with a narrow 2-D
    constant weight of their own, of the type and height of the first one's."""
    group = []
    for reader in value.outputs:
        if id(reader) not in own or reader.op != "MatMul" or not is_standard(reader) or len(reader.inputs) != 2:
            continue
        weight = reader.inputs[1]
        if reader.inputs[0] is not value or not is_constant(weight) or len(weight.shape) != 2 \
                or len(weight.outputs) != 1 or max(weight.shape) > NARROW:
            continue
        if group and (weight.dtype != group[0].inputs[1].dtype or weight.shape[0] != group[0].inputs[1].shape[0]):
            continue
        group.append(reader)
    return group


def _biases(group, own, outputs) -> list | None:
    """Each MatMul's bias Add (node, bias constant) when every one has a 1-D bias of its
    width, and its product is read by that Add alone; None otherwise."""
    found = []
    for matmul in group:
        product = matmul.outputs[0]
        if len(product.outputs) != 1 or id(product) in outputs:
            return None
        add = product.outputs[0]
        if id(add) not in own or add.op != "Add" or not is_standard(add) or len(add.inputs) != 2:
            return None
        bias = add.inputs[1] if add.inputs[0] is product else add.inputs[0]
        width = matmul.inputs[1].shape[1]
        if not is_constant(bias) or list(bias.shape) != [width] or len(bias.outputs) != 1 \
                or bias.dtype != matmul.inputs[1].dtype or add.inputs[0] is add.inputs[1]:
            return None
        found.append((add, bias))
    return found


def _merge(graph, value, group, biases, names) -> None:
    first = group[0].name
    weight = gs.Constant(names.fresh(f"{first}_merged_weight"),
                         np.concatenate([constant_values(m.inputs[1]) for m in group], axis=1))
    widths = [m.inputs[1].shape[1] for m in group]
    results = [add.outputs[0] for add, _ in biases] if biases else [m.outputs[0] for m in group]
    merged = gs.Variable(names.fresh(f"{first}_merged"), dtype=results[0].dtype)
    nodes = [gs.Node("MatMul", names.fresh(f"{first}_merged"), inputs=[value, weight], outputs=[merged])]
    if biases:
        bias = gs.Constant(names.fresh(f"{first}_merged_bias"),
                           np.concatenate([constant_values(b) for _, b in biases]))
        summed = gs.Variable(names.fresh(f"{first}_merged_biased"), dtype=results[0].dtype)
        nodes.append(gs.Node("Add", names.fresh(f"{first}_merged_bias"), inputs=[merged, bias], outputs=[summed]))
        merged = summed
    for old in [*group, *(add for add, _ in biases or [])]:
        old.inputs.clear()
        old.outputs.clear()
    nodes.append(_split(graph, value, merged, widths, results, names, names.fresh(f"{first}_split")))
    graph.nodes.extend(nodes)


def _split(graph, value, merged, widths, results, names, name) -> gs.Node:
    """Split `merged` along its last axis into `results` of the given widths (a negative
    axis only from opset 11, where the rank is unknown)."""
    axis = max(len(value.shape), 1) - 1 if value.shape is not None else -1
    sizes = np.asarray(widths, dtype=np.int64)
    if graph.opset >= 13:
        inputs, attrs = [merged, gs.Constant(names.fresh(f"{name}_sizes"), sizes)], {"axis": axis}
    else:
        inputs, attrs = [merged], {"axis": axis, "split": [int(w) for w in widths]}
    return gs.Node("Split", name, attrs=attrs, inputs=inputs, outputs=list(results))
