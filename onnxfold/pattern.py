"""Matching a rule's pattern against the graph, rooted at one node.

The pattern is a small DAG; matching walks from its last line (the root) up through the
producers of each input. Free names bind to graph values (the same name twice must be the
same value); Add and Mul are tried in both operand orders.
"""

from __future__ import annotations

from dataclasses import dataclass

from .graph import is_present, is_standard, producer
from .ruleset import COMMUTATIVE, Rule


@dataclass(frozen=True)
class Match:
    values: dict  # pattern name -> graph tensor (None for an absent optional input)
    nodes: dict  # pattern line text -> graph node


def matches_at(rule: Rule, node):
    """Every way `rule`'s pattern matches with its root line at `node` (operand orders)."""
    if not _fed_as_pattern_says(rule, node):
        return
    producers = rule.producers
    for values, nodes in _match_line(rule.root, node, {}, {}, producers):
        yield Match(values, nodes)


def _fed_as_pattern_says(rule: Rule, node) -> bool:
    """A quick test that most nodes fail: for each pattern line the root reads, some
    input of `node` comes from a node of that line's op (a match needs that, in any order)."""
    sources = [producer(tensor) for tensor in node.inputs if is_present(tensor)]
    return all(any(source is not None and _op_matches(op, source) for source in sources)
               for op in rule.root_feeders)


# Node op -> the pattern op it also matches: a two-input Sum is an Add.
ALIASES = {"Sum": "Add"}


def _op_matches(pattern_op, node) -> bool:
    if not is_standard(node):
        return False
    if node.op == pattern_op:
        return True
    return ALIASES.get(node.op) == pattern_op and len(node.inputs) == 2


def _match_line(line, node, values, nodes, producers):
    # `is`, not `in`: graph-surgeon's Node.__eq__ compares fields (and logs each call).
    if not _op_matches(line.function, node) or line.text in nodes or any(n is node for n in nodes.values()):
        return
    if len(node.outputs) < len(line.targets) or len(node.inputs) > len(line.args):
        return
    values = dict(values)
    for name, tensor in zip(line.targets, node.outputs):
        if values.setdefault(name, tensor) is not tensor:
            return
    nodes = {**nodes, line.text: node}
    inputs = list(node.inputs) + [None] * (len(line.args) - len(node.inputs))
    inputs = [tensor if is_present(tensor) else None for tensor in inputs]
    orders = [inputs]
    if line.function in COMMUTATIVE and len(inputs) == 2:
        orders.append(inputs[::-1])
    for order in orders:
        yield from _match_inputs(line.args, order, values, nodes, producers)


def _match_inputs(args, tensors, values, nodes, producers):
    if not args:
        yield values, nodes
        return
    name, tensor = args[0].name, tensors[0]
    for values_after, nodes_after in _match_value(name, tensor, values, nodes, producers):
        yield from _match_inputs(args[1:], tensors[1:], values_after, nodes_after, producers)


def _match_value(name, tensor, values, nodes, producers):
    if name in values:
        if values[name] is tensor:
            yield values, nodes
    elif name in producers:
        source = producer(tensor)
        if source is not None:
            yield from _match_line(producers[name], source, values, nodes, producers)
    else:
        yield {**values, name: tensor}, nodes
