"""Sum trees: a chain of Adds (or an n-ary Sum) is one sum of its terms.

Rules merge two branches that are the two inputs of one Add. DBB's forward writes
`((kxk + 1x1) + avg) + seq`, a distillation head `(xA + a) + (xB + b)`: two terms that
would merge are often not siblings. Here every tree of Adds whose inner sums are read
nowhere else is regrouped so that such terms become siblings, and the rules then merge them.

This is exact up to rounding. `+` is associative and commutative, and so is broadcasting:
each element of the result is the sum of the same elements of the terms whatever the
grouping, and its shape is the broadcast of all the terms' shapes (the original graph is
valid, so every partial broadcast is too). A tree is only regrouped where it enables a
merge: two constants (folded into one), or two terms that a rule rooted at Add would merge,
asked of the engine itself on a trial Add, so this never disagrees with the rules.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .graph import infer_output_shapes, is_constant, is_present, is_standard, producer
from .scopes import graph_and_bodies
from .weights import constant_values

_SUM_OPS = {"Add", "Sum"}
_MAX_TERMS = 32  # beyond this a tree is left as it is: pairs are tried one by one


RULE = REGROUP_SUMS = "regroup-sums"
SUMMARY = "Add(Add(a, b), c) with a and c mergeable  =>  Add(Add(a, c), b), so a rule merges a and c"


def regroup_sums(graph: gs.Graph, engine) -> int:
    """Regroup every sum tree of `graph` where that lets terms merge; return how many."""
    # `kept`: the graph's outputs, and values a nested graph (If, Loop body) reads
    kept = {id(tensor) for tensor in graph.outputs}
    kept |= {id(tensor) for inner in graph_and_bodies(graph)[1:] for node in inner.nodes
             for tensor in node.inputs}
    engine.take_graph_nodes()
    roots = [node for node in graph.nodes if _is_sum(node) and not _is_inner(node, kept)]
    return sum(_regroup(graph, engine, root, kept) for root in roots)


def _is_sum(node) -> bool:
    """An Add or Sum of floating values, every input present."""
    if node.op not in _SUM_OPS or not is_standard(node) or len(node.outputs) != 1:
        return False
    dtype = node.outputs[0].dtype
    return bool(node.inputs) and all(is_present(t) for t in node.inputs) and \
        dtype is not None and np.dtype(dtype).kind == "f"


def _is_inner(node, kept) -> bool:
    """A sum read only by one other sum, and not a graph output: part of a larger tree."""
    result = node.outputs[0]
    consumers = result.outputs
    return id(result) not in kept and len(consumers) == 1 and _is_sum(consumers[0])


def _tree(root, kept, own):
    """The tree's sum nodes (root last) and its terms, in the order the graph adds them;
    only nodes of this graph (`own`), never of an enclosing one."""
    nodes, terms = [], []

    def walk(node):
        for tensor in node.inputs:
            source = producer(tensor)
            if source is not None and source in own and _is_sum(source) and _is_inner(source, kept):
                walk(source)
            else:
                terms.append(tensor)
        nodes.append(node)

    walk(root)
    return nodes, terms


def _regroup(graph, engine, root, kept) -> int:
    nodes, terms = _tree(root, kept, engine.own_nodes)
    if not 3 <= len(terms) <= _MAX_TERMS:
        return 0
    siblings = {frozenset(map(id, node.inputs)) for node in nodes if len(node.inputs) == 2}
    pairs = _mergeable_pairs(graph, engine, nodes, terms)
    if all(frozenset((id(terms[i]), id(terms[j]))) in siblings for i, j in pairs):
        return 0  # nothing a regrouping would merge that the rules have not had their chance at
    _rebuild(graph, engine, nodes, terms, pairs)
    return 1


def _mergeable_pairs(graph, engine, nodes, terms) -> list:
    """Disjoint pairs of term indices that merge, first come first paired."""
    saved = [(node, list(node.inputs)) for node in nodes]
    for node in nodes:  # the trial sees the terms as the regrouped tree will leave them
        node.inputs.clear()
    # A term summed twice is read twice however the tree is grouped: the trial, which
    # sees it read once, would pair it, and no rule would then merge it.
    repeated = {i for i, t in enumerate(terms) if sum(u is t for u in terms) > 1}
    try:
        pairs, paired = [], set(repeated)
        for i in range(len(terms)):
            for j in range(i + 1, len(terms)):
                if i not in paired and j not in paired and _merge(graph, engine, terms[i], terms[j], nodes[-1]):
                    pairs.append((i, j))
                    paired |= {i, j}
    finally:
        for node, inputs in saved:
            node.inputs.extend(inputs)
    return pairs


def _merge(graph, engine, a, b, root) -> bool:
    """Two constants fold into one; other terms merge if a rule fires at Add(a, b)."""
    if is_constant(a) and is_constant(b):
        return True
    result = gs.Variable(f"{root.name}_trial", dtype=root.outputs[0].dtype)
    trial = gs.Node("Add", f"{root.name}_trial", inputs=[a, b], outputs=[result])
    infer_output_shapes(trial, graph.opset)
    engine.own_nodes.add(trial)
    try:
        return engine.first_plan(trial, {}) is not None
    finally:
        engine.own_nodes.discard(trial)
        trial.inputs.clear()
        trial.outputs.clear()


def _rebuild(graph, engine, nodes, terms, pairs) -> None:
    """Replace the tree by Adds: each pair summed first, then everything left to right in
    the original order; the last Add computes the root's value, so its readers keep it."""
    root = nodes[-1]
    result = root.outputs[0]
    tree = {id(node) for node in nodes}
    names = {node.name for node in nodes}
    index = next(i for i, node in enumerate(graph.nodes) if node is root)
    position = sum(1 for node in graph.nodes[:index] if id(node) not in tree)
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()
    graph.nodes[:] = [node for node in graph.nodes if id(node) not in tree]
    for key in [key for key in engine.misses if key[1] in names]:  # said of the old tree
        del engine.misses[key]
    partner = dict(pairs)
    seconds = set(partner.values())
    added = []

    def add(a, b, last):
        output = result if last else gs.Variable(engine.names.fresh(f"{root.name}_sum"), dtype=result.dtype)
        name = root.name if last else engine.names.fresh(f"{root.name}_sum")
        node = gs.Node("Add", name, inputs=[a, b], outputs=[output])
        infer_output_shapes(node, graph.opset)
        added.append(node)
        return output

    items = [(term, terms[partner[i]]) if i in partner else (term,)
             for i, term in enumerate(terms) if i not in seconds]
    total = None
    for position, item in enumerate(items):
        last = position == len(items) - 1
        value = item[0] if len(item) == 1 else add(*item, last=last and total is None)
        total = value if total is None else add(total, value, last=last)
    graph.nodes[position:position] = added
    engine.own_nodes.update(added)


# The types Sum takes that onnxruntime's CPU provider runs it in (not bfloat16, no integers).
_SUM_TYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}


def unstack_sums(graph: gs.Graph) -> int:
    """`torch.stack(terms).sum(0)` as exported, ReduceSum(Concat(Unsqueeze(t) ...), axis a)
    without kept dims, is Sum(terms): Concat needs every stacked term to have one shape, so
    no broadcast is involved; only the order of the additions may differ (rounding).
    ReduceSum also sums integers, Sum does not: those stay."""
    count = 0
    for node in graph.nodes:
        reduces = node.op == "ReduceSum" and is_standard(node) and node.outputs[0].dtype is not None
        terms = _stacked_terms(node) if reduces and np.dtype(node.outputs[0].dtype) in _SUM_TYPES else None
        if terms is not None:
            node.op, node.attrs = "Sum", {}
            node.inputs.clear()
            node.inputs.extend(terms)
            count += 1
    return count


def _stacked_terms(reduce):
    """The terms a ReduceSum adds up, if it sums a stack of them over the stacked axis."""
    concat = producer(reduce.inputs[0])
    if reduce.attrs.get("keepdims", 1) != 0 or concat is None or concat.op != "Concat" or not is_standard(concat):
        return None
    rank = len(reduce.inputs[0].shape) if reduce.inputs[0].shape is not None else None
    axes = _axes(reduce)
    if rank is None or axes is None or len(axes) != 1:
        return None
    axis = axes[0] % rank
    if concat.attrs.get("axis", 0) % rank != axis:
        return None
    terms = []
    for stacked in concat.inputs:
        unsqueeze = producer(stacked)
        if unsqueeze is None or unsqueeze.op != "Unsqueeze" or not is_standard(unsqueeze):
            return None
        unsqueezed = _axes(unsqueeze)
        if unsqueezed is None or [a % rank for a in unsqueezed] != [axis]:
            return None
        terms.append(unsqueeze.inputs[0])
    return terms


def _axes(node):
    """A Reduce or Unsqueeze node's axes, from its constant input (opset 13+) or attribute."""
    if len(node.inputs) > 1 and is_present(node.inputs[1]):
        return constant_values(node.inputs[1]).reshape(-1).tolist() if is_constant(node.inputs[1]) else None
    return node.attrs.get("axes")
