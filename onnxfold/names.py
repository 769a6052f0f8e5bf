"""The one naming scheme: unique, deterministic names for nodes and values.

Reports and rewrites refer to nodes by name, and a model's values are joined by name, so
every name onnxfold gives (to an unnamed node, a folded weight, an inlined branch's value)
comes from one NameSource per model: `base`, else `base_1`, `base_2`, ...
"""

from __future__ import annotations


class NameSource:
    """Names not yet used by any node or value of the given graphs, nor given before."""

    def __init__(self, graphs):
        self.used = set()
        self.next_suffix: dict = {}  # base -> the next counter to try, so naming stays linear
        for graph in graphs:
            self.used |= {node.name for node in graph.nodes} | set(graph.tensors().keys())

    def take(self, name):
        self.used.add(name)

    def fresh(self, base) -> str:
        name, counter = base, self.next_suffix.get(base, 0)
        if counter:
            name = f"{base}_{counter}"
        while name in self.used:
            counter += 1
            name = f"{base}_{counter}"
        self.next_suffix[base] = counter + 1
        self.used.add(name)
        return name


def name_nodes(graph, names: NameSource) -> None:
    """Give every node of `graph` a unique name: an unnamed node, or the second of two
    with one name, is called after its op (or that name) and its position."""
    seen = set()
    for index, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = names.fresh(f"{node.name or node.op}_{index}")
        seen.add(node.name)
