"""The one engine: applies rules to a fixpoint over an onnx-graphsurgeon graph.

Work is driven by a queue in topological order. At each node the rules rooted at its op
are tried in order of benefit (ruleset.py); the first whose plan passes every check
(plan.py) is applied (apply.py). Only the nodes a rewrite could newly enable are queued
again (the new nodes, their consumers, and the consumers of values that lost a consumer),
so the cost grows with the graph, not with its square. A final sweep over every node
confirms the fixpoint. Every rewrite has fewer nodes than it replaces (checked when rules
load), so the loop ends.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from .apply import Change, apply_plan
from .names import NameSource
from .pattern import ALIASES, matches_at
from .plan import Plan, plan_rewrite
from .weights import release_values


class NodeSet:
    """Nodes by identity, each held while it is in the set.

    A set of id()s is not enough: once a node is freed its id can be handed to a new node,
    which would then count as removed (never rewritten) or as this graph's own.
    """

    def __init__(self, nodes=()):
        self._nodes = {id(node): node for node in nodes}

    def __contains__(self, node) -> bool:
        return id(node) in self._nodes

    def add(self, node) -> None:
        self._nodes[id(node)] = node

    def update(self, nodes) -> None:
        self._nodes.update((id(node), node) for node in nodes)

    def discard(self, node) -> None:
        self._nodes.pop(id(node), None)


@dataclass
class Rewrite:
    rule: str
    replaced: list  # names of the nodes removed
    produced: list  # names of the nodes added


class Engine:
    def __init__(self, graph: gs.Graph, rules: list, names: NameSource | None = None):
        self.graph = graph
        self.rules_by_op: dict = {}
        for rule in sorted(rules, key=lambda rule: (-rule.benefit, rule.name)):
            self.rules_by_op.setdefault(rule.root.function, []).append(rule)
        self.names = names or NameSource([graph])
        self.own_nodes = NodeSet(graph.nodes)
        self.removed = NodeSet()  # disconnected nodes: holding them costs little
        self.rewrites: list = []
        self.misses: dict = {}  # (rule, node name) -> the latest Miss seen
        self.computed_weights: dict = {}  # id -> weak reference, for each constant a fold made

    def take_graph_nodes(self) -> None:
        """Count the graph's nodes as its own: clean-ups and passes add nodes between runs
        (an inlined If branch, a regrouped sum), and rules must see those too."""
        self.own_nodes.update(self.graph.nodes)

    def run(self) -> None:
        self.take_graph_nodes()
        budget = len(self.rewrites) + len(self.graph.nodes) + 1
        while self._sweep(self._live_nodes()):
            if len(self.rewrites) > budget:
                raise RuntimeError("rewriting did not converge; a rule does not shrink the graph")

    def remaining_misses(self) -> list:
        """Why rules did not fire, at the nodes still in the graph."""
        live = {node.name for node in self._live_nodes()}
        return [miss for (_, node), miss in self.misses.items() if node in live]

    def _live_nodes(self) -> list:
        return [node for node in self.graph.nodes if node not in self.removed]

    def _sweep(self, nodes) -> bool:
        queue, queued = deque(nodes), {id(node) for node in nodes}
        fired = False
        while queue:
            node = queue.popleft()
            queued.discard(id(node))
            if node in self.removed:
                continue
            for follow_up in self._rewrite_at(node):
                fired = True
                if id(follow_up) not in queued and follow_up not in self.removed:
                    queue.append(follow_up)
                    queued.add(id(follow_up))
        return fired

    def _rewrite_at(self, node) -> list:
        """Apply the first rule that fires at `node`; return the nodes to look at again."""
        plan = self.first_plan(node, self.misses)
        return self._apply(plan) if plan is not None else []

    def first_plan(self, node, misses: dict) -> Plan | None:
        """The plan of the first rule that fires at `node`, or None; why each rule rooted
        at its op did not fire goes into `misses`. Changes nothing."""
        for rule in self.rules_by_op.get(ALIASES.get(node.op, node.op), ()):
            first_miss = None
            for match in matches_at(rule, node):
                outcome = plan_rewrite(rule, match, self.own_nodes, self.graph.outputs)
                if isinstance(outcome, Plan):
                    misses.pop((rule.name, node.name), None)
                    return outcome
                first_miss = first_miss or outcome
            if first_miss:
                misses[(rule.name, node.name)] = first_miss
        return None

    def _apply(self, plan: Plan) -> list:
        change = apply_plan(self.graph, plan, self.names)
        self.removed.update(change.removed)
        self.own_nodes.update(change.added)
        self.rewrites.append(Rewrite(plan.rule.name, [n.name for n in change.removed],
                                     [n.name for n in change.added]))
        self._free_used_up_weights(change)
        follow = list(change.added)
        follow += [c for node in change.added for t in node.outputs for c in t.outputs]
        follow += [c for t in change.inputs for c in t.outputs]
        return follow

    def _free_used_up_weights(self, change: Change) -> None:
        """Free the weights earlier folds made that this one used up.

        Only those: no other scope captures them and no graph outputs them.
        """
        for constant in change.weights:
            self.computed_weights[id(constant)] = weakref.ref(constant)
        for tensor in change.inputs:
            made = self.computed_weights.get(id(tensor))
            if made is not None and made() is tensor and not tensor.outputs:
                del self.computed_weights[id(tensor)]
                release_values(tensor)
