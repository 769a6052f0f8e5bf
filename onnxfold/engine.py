"""The one engine: applies rules to a fixpoint over an onnx-graphsurgeon graph.

Work is driven by a queue in topological order. When a rule fires, only the nodes it could
newly enable are queued again (the new nodes, their consumers, and the consumers of values
that lost a consumer), so the cost grows with the graph, not with its square. A final sweep
over every node confirms the fixpoint. Every rewrite has fewer nodes than it replaces
(checked when rules load), so the loop ends.
"""

from __future__ import annotations

import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .errors import CannotTell, OnnxfoldError
from .graph import attributes, infer_output_shapes, is_constant, producer
from .pattern import ALIASES, Match, matches_at
from .predicates import PREDICATES
from .ruleset import Attribute, Literal, Name, Rule
from .transforms import STORED_TYPE_ARGS, TRANSFORMS
from .weights import constant_values, release_values

@dataclass
class Rewrite:
    rule: str
    replaced: list  # names of the nodes removed
    produced: list  # names of the nodes added


@dataclass
class Plan:
    """What a rule that may fire computed: new weights (in the site's type) and attributes."""
    computed: dict
    attrs: list  # per result line


@dataclass
class Miss:
    rule: str
    node: str
    reason: str


class Engine:
    def __init__(self, graph: gs.Graph, rules: list, names=None):
        self.graph = graph
        self.rules_by_op: dict = {}
        for rule in rules:
            self.rules_by_op.setdefault(rule.root.function, []).append(rule)
        self.names = names or NameSource([graph])
        self.own_nodes = {id(node) for node in graph.nodes}
        self.removed: set = set()
        self.rewrites: list = []
        self.misses: dict = {}  # (rule, node name) -> reason, the latest seen
        self.computed_weights: dict = {}  # id -> weak reference, for each constant a fold made

    def run(self) -> None:
        budget = len(self.rewrites) + len(self.graph.nodes) + 1
        while self._sweep(self._live_nodes()):
            if len(self.rewrites) > budget:
                raise RuntimeError("rewriting did not converge; a rule does not shrink the graph")

    def remaining_misses(self) -> list:
        """Reasons recorded for rules that did not fire on nodes still in the graph."""
        live = {node.name for node in self._live_nodes()}
        return [Miss(rule, node, reason) for (rule, node), reason in self.misses.items() if node in live]

    # --- driving -------------------------------------------------------------------------

    def _live_nodes(self) -> list:
        return [node for node in self.graph.nodes if id(node) not in self.removed]

    def _sweep(self, nodes) -> bool:
        queue, queued = deque(nodes), {id(node) for node in nodes}
        fired = False
        while queue:
            node = queue.popleft()
            queued.discard(id(node))
            if id(node) in self.removed:
                continue
            for follow_up in self._rewrite_at(node):
                fired = True
                if id(follow_up) not in queued and id(follow_up) not in self.removed:
                    queue.append(follow_up)
                    queued.add(id(follow_up))
        return fired

    def _rewrite_at(self, node) -> list:
        """Apply the first rule that fires at `node`; return the nodes to look at again."""
        for rule in self.rules_by_op.get(ALIASES.get(node.op, node.op), ()):
            first_reason = None
            for match in matches_at(rule, node):
                reason, plan = self._evaluate(rule, match)
                if not reason:
                    self.misses.pop((rule.name, node.name), None)
                    return self._apply(rule, match, plan)
                first_reason = first_reason or reason
            if first_reason:
                self.misses[(rule.name, node.name)] = first_reason
        return []

    # --- deciding ------------------------------------------------------------------------

    def _evaluate(self, rule: Rule, match: Match):
        """(reason it may not fire, None) or (None, the Plan to apply)."""
        if any(id(node) not in self.own_nodes for node in match.nodes.values()):
            return "the pattern reaches into an enclosing graph", None
        reason = self._removed_values_private(rule, match) or _element_types_agree(rule, match)
        if reason:
            return reason, None
        for line in rule.when:
            try:
                reason = PREDICATES[line.function](*[_predicate_arg(a, match) for a in line.args])
            except CannotTell as error:
                reason = f"{line.function} cannot tell: {error}"
            if reason:
                return reason, None
        try:
            computed = _compute(rule, match)
            attrs = [_result_attributes(line, match, computed) for line in rule.result]
        except CannotTell as error:
            return f"the arithmetic cannot be done: {error}", None
        dtype = _site_dtype(match)
        reason = _cast_weights(rule, computed, dtype)
        return (reason, None) if reason else (None, Plan(computed, attrs))

    def _removed_values_private(self, rule, match) -> str | None:
        """Every value the rewrite removes is used only inside the pattern."""
        matched = {id(node) for node in match.nodes.values()}
        outputs = {id(tensor) for tensor in self.graph.outputs}
        root = rule.root.text
        for line_text, node in match.nodes.items():
            for tensor in node.outputs:
                if line_text == root and tensor is node.outputs[0]:
                    continue
                if id(tensor) in outputs:
                    return f"'{tensor.name}' is a graph output and would disappear"
                others = [c.name for c in tensor.outputs if id(c) not in matched]
                if others:
                    return f"'{tensor.name}' is also used by {others[0]!r}"
        return None

    # --- rewriting -----------------------------------------------------------------------

    def _apply(self, rule, match, plan) -> list:
        root_tensor = match.values[rule.root.targets[0]]
        old_nodes = [match.nodes[line.text] for line in rule.pattern]
        first_name = match.nodes[rule.pattern[0].text].name
        neighbours = [t for node in old_nodes for t in node.inputs]
        for node in old_nodes:
            node.inputs.clear()
            node.outputs.clear()
            self.removed.add(id(node))
        scope = {name: tensor for name, tensor in match.values.items() if name not in rule.producers}
        new_nodes = []
        for index, line in enumerate(rule.result):
            node = self._build_node(line, index, first_name, scope, plan.computed, match, root_tensor)
            node.attrs.update(plan.attrs[index])
            self.graph.nodes.append(node)
            self.own_nodes.add(id(node))
            infer_output_shapes(node, self.graph.opset)
            new_nodes.append(node)
        for tensor in neighbours:  # after the new nodes took what they keep
            self._release_if_unused(tensor)
        self.rewrites.append(Rewrite(rule.name, [n.name for n in old_nodes], [n.name for n in new_nodes]))
        follow = list(new_nodes)
        follow += [c for node in new_nodes for t in node.outputs for c in t.outputs]
        follow += [c for t in neighbours for c in t.outputs]
        return follow

    def _build_node(self, line, index, first_name, scope, computed, match, root_tensor):
        inputs = [self._input_tensor(arg, scope, computed) for arg in line.args]
        outputs = []
        for target in line.targets:
            if tensor_is_root(match, target, root_tensor):
                outputs.append(root_tensor)
            else:
                scope[target] = gs.Variable(self.names.fresh(f"{first_name}_{target}"), dtype=root_tensor.dtype)
                outputs.append(scope[target])
        name = first_name if index == 0 else self.names.fresh(f"{first_name}_{line.function}")
        self.names.take(name)
        return gs.Node(op=line.function, name=name, inputs=inputs, outputs=outputs)

    def _input_tensor(self, arg, scope, computed):
        if isinstance(arg, Literal) and arg.value is None:
            return gs.Variable.empty()
        if arg.name in scope:
            return scope[arg.name] if scope[arg.name] is not None else gs.Variable.empty()
        value = computed[arg.name]
        if value is None:
            return gs.Variable.empty()
        constant = gs.Constant(self.names.fresh(arg.name), value)
        scope[arg.name] = constant
        self.computed_weights[id(constant)] = weakref.ref(constant)
        return constant

    def _release_if_unused(self, tensor) -> None:
        """Free a weight a fold made, once a later fold has used it up.

        Only those: no other scope captures them and no graph outputs them.
        """
        made = self.computed_weights.get(id(tensor))
        if made is not None and made() is tensor and not tensor.outputs:
            del self.computed_weights[id(tensor)]
            release_values(tensor)


def tensor_is_root(match, name, root_tensor) -> bool:
    return match.values.get(name) is root_tensor


def _result_attributes(line, match, computed) -> dict:
    """A result node's attributes: those of its `like=` node, then the keywords given."""
    attrs = {}
    like = line.keywords.get("like")
    if like is not None:
        source = producer(match.values[like.name])
        # kernel_shape is derivable from the weight, which a fold may have resized.
        attrs = {k: v for k, v in source.attrs.items() if k != "kernel_shape"}
    for key, arg in line.keywords.items():
        if key != "like":
            attrs[key] = _plain(_transform_arg(arg, match, computed))
    if "pads" in line.keywords:
        attrs.pop("auto_pad", None)
    return attrs


def _predicate_arg(arg, match):
    if isinstance(arg, Name):
        return match.values[arg.name]
    if isinstance(arg, Attribute):
        return _attribute(arg, match)
    return arg.value


def _attribute(arg, match):
    """`node.attribute` of a rule: the value, ONNX defaults filled in."""
    node = producer(match.values[arg.value])
    attrs = attributes(node)
    if arg.attribute not in attrs:
        raise CannotTell(f"'{node.name}' has no attribute '{arg.attribute}'")
    return attrs[arg.attribute]


def _transform_arg(arg, match, computed, stored_type=False):
    """A transform's argument: constants as float64 arrays, or as stored where asked."""
    if isinstance(arg, Literal):
        return arg.value
    if isinstance(arg, Attribute):
        return _attribute(arg, match)
    if arg.name in computed:
        return computed[arg.name]
    tensor = match.values[arg.name]
    if tensor is None:
        return None
    if not is_constant(tensor):
        raise CannotTell(f"'{tensor.name}' is not a constant")
    values = constant_values(tensor)
    if stored_type or not np.issubdtype(values.dtype, np.floating):
        return values
    return values.astype(np.float64)


def _compute(rule, match) -> dict:
    computed = {}
    for line in rule.compute:
        stored = STORED_TYPE_ARGS[line.function]
        args = [_transform_arg(a, match, computed, i in stored) for i, a in enumerate(line.args)]
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # _cast_weights checks the results
            result = TRANSFORMS[line.function](*args)
        results = result if isinstance(result, tuple) else (result,)
        if len(results) != len(line.targets):  # a rule file that misreads its transform
            raise OnnxfoldError(f"rule '{rule.name}': {line.function} returns {len(results)} values, "
                                f"'{line.text}' names {len(line.targets)}", rule.source)
        computed.update(zip(line.targets, results))
    return computed


def _cast_weights(rule, computed, dtype) -> str | None:
    """Cast the computed weights to the site's type, in place; or say why they may not be.

    The one check for every rule: a weight that is not finite once cast (float16 overflow,
    a BatchNormalization scale 1/sqrt(0)) turns outputs the original computed into inf or
    NaN, and folding is only exact in real arithmetic, where inf and NaN do not occur.
    """
    for name in sorted(rule.weight_names):
        value = computed[name]
        if value is None:
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            cast = np.ascontiguousarray(np.asarray(value).astype(dtype))
        if cast.dtype.kind == "f" and not np.isfinite(cast).all():
            if np.isfinite(value).all():
                return f"folded weights overflow {dtype.name}: '{name}' reaches {np.abs(value).max():.4g}"
            return f"folded weights are not finite: '{name}' would hold inf or NaN"
        computed[name] = cast
    return None


def _float_constants(match):
    return [t for t in match.values.values()
            if t is not None and is_constant(t) and np.issubdtype(np.dtype(t.dtype), np.floating)]


def _site_dtype(match):
    constants = _float_constants(match)
    return np.dtype(constants[0].dtype) if constants else np.dtype(np.float32)


def _element_types_agree(rule, match) -> str | None:
    """Weights folded together share one floating type, that of the value computed."""
    folded = _compute_inputs(rule, match)
    kinds = {np.dtype(t.dtype).name for t in match.values.values()
             if t is not None and is_constant(t) and np.dtype(t.dtype).kind in "fiuV" and t.name in folded}
    root = match.values[rule.root.targets[0]]
    if root.dtype is not None:
        kinds.add(np.dtype(root.dtype).name)
    if len(kinds) > 1:
        return f"the weights and the result mix element types ({', '.join(sorted(kinds))})"
    kind = np.dtype(kinds.pop()) if kinds else None
    if kind is not None and kind.kind in "iub":
        return "the values are not floating point: folding would change integer rounding"
    if kind is not None and kind not in _FOLDED_TYPES:
        return f"onnxfold folds float16, float32 and float64 values, not {kind.name}"
    return None


# The types the engine folds in float64 and casts back once; onnxruntime runs them on the
# CPU, so every fold in them is checked there. bfloat16 and float8 are left as they are.
_FOLDED_TYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}


def _compute_inputs(rule, match) -> set:
    return {match.values[n].name for n in rule.compute_arguments if match.values.get(n) is not None}


def _plain(value):
    """Attribute values as ONNX wants them: Python ints, floats and lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class NameSource:
    """Unique, deterministic names for new nodes and values, across all given graphs."""

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
