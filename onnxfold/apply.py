"""Applying a Plan: the one place a rule changes the graph.

The matched nodes are disconnected (graph.cleanup drops them later) and the result lines
become new nodes: the first takes the name of the pattern's first node, and the root's
output value is kept, so consumers and graph outputs need no rewiring.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from .graph import infer_output_shapes
from .names import NameSource
from .plan import Plan
from .provenance import mark_origin, rewrite_origin
from .rulesyntax import Literal


@dataclass(frozen=True)
class Change:
    removed: list  # the matched nodes, disconnected
    added: list  # the result nodes, in order
    weights: list  # the constants the plan's computed values became
    inputs: list  # the values the removed nodes read; some may now be unused


def apply_plan(graph: gs.Graph, plan: Plan, names: NameSource) -> Change:
    """Replace the plan's matched nodes by its result lines; say what changed."""
    removed = [plan.match.nodes[line.text] for line in plan.rule.pattern]
    inputs = [tensor for node in removed for tensor in node.inputs]
    for node in removed:
        node.inputs.clear()
        node.outputs.clear()
    builder = _ResultBuilder(plan, names, first_name=removed[0].name)
    origin = rewrite_origin(plan.rule.name, removed)
    added = []
    for index, (line, attrs) in enumerate(zip(plan.rule.result, plan.attrs)):
        node = builder.node(line, index)
        node.attrs.update(attrs)
        mark_origin(node, origin)
        graph.nodes.append(node)
        infer_output_shapes(node, graph.opset)
        added.append(node)
    return Change(removed, added, builder.weights, inputs)


class _ResultBuilder:
    """The nodes of a plan's result lines, each reading the values the lines before made."""

    def __init__(self, plan: Plan, names: NameSource, first_name: str):
        self.names, self.first_name = names, first_name
        self.computed = plan.computed
        self.root_name = plan.rule.root.targets[0]
        self.root = plan.match.values[self.root_name]
        # The pattern's free values; those its nodes computed went with them.
        self.scope = {name: tensor for name, tensor in plan.match.values.items()
                      if name not in plan.rule.producers}
        self.weights = []

    def node(self, line, index) -> gs.Node:
        # Names are drawn inputs first, then outputs, then the node: the order fixes them.
        inputs = [self._input(arg) for arg in line.args]
        outputs = [self._output(target) for target in line.targets]
        name = self.first_name if index == 0 else self.names.fresh(f"{self.first_name}_{line.function}")
        self.names.take(name)
        return gs.Node(op=line.function, name=name, inputs=inputs, outputs=outputs)

    def _input(self, arg):
        if isinstance(arg, Literal):  # None: an omitted optional input
            return gs.Variable.empty()
        if arg.name in self.scope:
            tensor = self.scope[arg.name]
            return tensor if tensor is not None else gs.Variable.empty()
        value = self.computed[arg.name]
        if value is None:
            return gs.Variable.empty()
        constant = gs.Constant(self.names.fresh(arg.name), value)
        self.scope[arg.name] = constant
        self.weights.append(constant)
        return constant

    def _output(self, target):
        """The root's value is kept, so its consumers and the graph outputs need no change."""
        if target == self.root_name:
            return self.root
        self.scope[target] = gs.Variable(self.names.fresh(f"{self.first_name}_{target}"), dtype=self.root.dtype)
        return self.scope[target]
