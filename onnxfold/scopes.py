"""Nested graphs: walking them, and subgraph names that shadow an enclosing graph's,
renamed apart before the import.

ONNX scopes names lexically: an If or Loop body may define its own `g` (an initializer,
an input, a node output) while its enclosing graph has one too, and inside the body `g`
means the body's. onnx-graphsurgeon resolves every name in one table, so it would read
the outer `g` inside the body: a fold there would use the wrong weights. Renaming the
inner definitions (and the body's uses of them) apart keeps each scope's meaning.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs


def without_shadowed_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model itself when no subgraph redefines an enclosing graph's name; else a copy
    in which every such inner name is renamed apart, as onnxruntime reads them: the inner
    definition wins, except a branch's weight whose name a sibling branch reads from the
    enclosing graph (_drop_overridden_weights)."""
    if not any(_clashes(graph, outer) for graph, outer in _scopes(model.graph)):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    taken = _all_names(copy.graph)
    _unshadow(copy.graph, set(), taken)
    return copy


def _scopes(graph, outer=frozenset()):
    """(graph, the names its enclosing graphs define) for the graph and every nested one."""
    yield graph, outer
    bodies = list(_bodies(graph))
    if bodies:  # the names a graph defines matter only to the graphs nested in it
        inner = outer | defined_names(graph)
        for body in bodies:
            yield from _scopes(body, inner)


def _unshadow(graph, outer: set, taken: set) -> None:
    _drop_overridden_weights(graph, outer)
    renames = {}
    for name in sorted(_clashes(graph, outer)):
        renames[name] = _fresh(name, taken)
    if renames:
        _rename_definitions(graph, renames)
        _rename_uses(graph, renames)
    inner = outer | defined_names(graph)
    for body in _bodies(graph):
        _unshadow(body, inner, taken)


def _drop_overridden_weights(graph, outer: set) -> None:
    """onnxruntime feeds a node's bodies every enclosing value any of them reads, and a
    value fed in overrides a body's weight of the same name: if one If branch reads the
    outer W and the other holds its own W, both read the outer one. That weight is dead:
    dropped, so its readers read the outer value, as onnxruntime runs them."""
    for node in graph.node:
        bodies = list(node_bodies(node))
        read = [_free_names(body) & (outer | defined_names(graph)) for body in bodies]
        for index, body in enumerate(bodies):
            fed = set().union(*read[:index], *read[index + 1:])
            _remove_weights(body, fed & {t.name for t in body.initializer})


def _free_names(graph) -> set:
    """The names a graph (or a graph nested in it) reads from the graphs enclosing it."""
    read = {name for node in graph.node for name in node.input if name}
    read |= {info.name for info in graph.output}
    for body in _bodies(graph):
        read |= _free_names(body)
    return read - defined_names(graph)


def _remove_weights(graph, names) -> None:
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name in names:
            del graph.initializer[index]


def _rename_definitions(graph, renames) -> None:
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = renames.get(sparse.values.name, sparse.values.name)
    for info in graph.input:
        info.name = renames.get(info.name, info.name)
    for node in graph.node:
        node.output[:] = [renames.get(name, name) for name in node.output]


def _rename_uses(graph, renames) -> None:
    """Uses of the renamed names in the graph and in bodies that do not define them anew."""
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    for info in [*graph.output, *graph.value_info]:
        info.name = renames.get(info.name, info.name)
    for body in _bodies(graph):
        inherited = {old: new for old, new in renames.items() if old not in defined_names(body)}
        if inherited:
            _rename_uses(body, inherited)


def _clashes(graph, outer) -> set:
    return defined_names(graph) & outer if outer else set()


def defined_names(graph) -> set:
    """The names a graph defines itself: weights, inputs and node outputs."""
    names = {t.name for t in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    names |= {info.name for info in graph.input}
    names |= {name for node in graph.node for name in node.output if name}
    return names


def _bodies(graph):
    for node in graph.node:
        yield from node_bodies(node)


def node_bodies(node):
    """The graphs a node holds in its attributes (If's branches, Loop's and Scan's body)."""
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def holds_graph(node) -> bool:
    """Whether a graph-surgeon node holds a nested graph (If's branches, a Loop's body)."""
    return any(isinstance(value, gs.Graph) for value in node.attrs.values())


def graph_and_bodies(graph) -> list:
    """The graph, then every graph nested in its nodes (If, Loop and Scan bodies) at any
    depth in graph-surgeon's `subgraphs(recursive=True)` order. That walk costs as much
    as a clean-up: it is taken only where some node holds a graph."""
    if any(holds_graph(node) for node in graph.nodes):
        return [graph, *graph.subgraphs(recursive=True)]
    return [graph]


def graphs(model: onnx.ModelProto):
    """The main graph and every graph nested in a node attribute, at any depth."""
    pending = [model.graph]
    while pending:
        graph = pending.pop()
        yield graph
        pending += _bodies(graph)


def _all_names(graph) -> set:
    names = set()
    for scope, _ in _scopes(graph):
        names |= defined_names(scope) | {name for node in scope.node for name in node.input}
    return names


def _fresh(name: str, taken: set) -> str:
    counter = 1
    while f"{name}__{counter}" in taken:
        counter += 1
    taken.add(f"{name}__{counter}")
    return f"{name}__{counter}"
