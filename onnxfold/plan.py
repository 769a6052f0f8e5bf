"""Deciding whether a rule fires at a match: a Plan to apply, or a Miss that says why not.

Nothing here changes the graph. Every check a rewrite must pass is made here, in this
order: the pattern lies in this graph, the values it removes are its own, the folded
weights share one floating type, the rule's `when` lines hold, its `compute` lines can be
done, and the weights they make stay finite in the site's type. The plan then holds the
new weights and attributes, so applying it (apply.py) decides nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import cost
from .errors import CannotTell, OnnxfoldError
from .graph import attributes, is_constant, producer
from .pattern import Match
from .predicates import PREDICATES
from .rulesyntax import Attribute, Literal, Name
from .ruleset import Rule
from .transforms import STORED_TYPE_ARGS, TRANSFORMS
from .weights import constant_values


@dataclass(frozen=True)
class Miss:
    """Why `rule` did not fire at `node`, and the graph values that reason is about."""
    rule: str
    node: str
    reason: str
    values: tuple = ()


@dataclass(frozen=True)
class Plan:
    """A rewrite that may be done: the match it replaces, the new weights (already in the
    site's type) and the attributes of each result line."""
    rule: Rule
    match: Match
    computed: dict
    attrs: list


def plan_rewrite(rule: Rule, match: Match, own_nodes, graph_outputs) -> Plan | Miss:
    """The Plan for `match`, or the Miss of the first check it fails.

    `own_nodes` holds this graph's nodes (a pattern may not reach into an
    enclosing graph); `graph_outputs` are the values the graph must keep.
    """
    failure = (_outside_the_graph(match, own_nodes) or _removed_values_private(rule, match, graph_outputs)
               or _element_types_agree(rule, match) or _failed_condition(rule, match))
    if failure is None:
        try:
            computed = _compute(rule, match)
            attrs = [_result_attributes(line, match, computed) for line in rule.result]
        except CannotTell as error:
            failure = (f"the arithmetic cannot be done: {error}", _compute_inputs(rule, match))
        else:
            # The cost guard first: it reads sizes only, and refuses what DenseNet's transitions
            # would make of fold-avgpool-into-pointwise before megabytes are cast for nothing.
            failure = _raises_cost(rule, match, computed) or _cast_weights(rule, match, computed)
    if failure is not None:
        reason, values = failure
        return Miss(rule.name, match.nodes[rule.root.text].name, reason, values)
    return Plan(rule, match, computed, attrs)


# Each check returns None when it passes, else (reason, names of the values it is about).

def _outside_the_graph(match, own_nodes):
    for node in match.nodes.values():
        if node not in own_nodes:
            return "the pattern reaches into an enclosing graph", tuple(t.name for t in node.outputs)
    return None


def _removed_values_private(rule, match, graph_outputs):
    """Every value the rewrite removes is used only inside the pattern."""
    matched = {id(node) for node in match.nodes.values()}
    outputs = {id(tensor) for tensor in graph_outputs}
    root = rule.root.text
    for line_text, node in match.nodes.items():
        for tensor in node.outputs:
            if line_text == root and tensor is node.outputs[0]:
                continue
            if id(tensor) in outputs:
                return f"'{tensor.name}' is a graph output and would disappear", (tensor.name,)
            others = [c.name for c in tensor.outputs if id(c) not in matched]
            if others:
                return f"'{tensor.name}' is also used by {others[0]!r}", (tensor.name,)
    return None


def _element_types_agree(rule, match):
    """Weights folded together share one floating type, that of the value computed."""
    folded = _compute_inputs(rule, match)
    typed = [t for t in match.values.values()
             if t is not None and is_constant(t) and np.dtype(t.dtype).kind in "fiuV" and t.name in folded]
    root = match.values[rule.root.targets[0]]
    if root.dtype is not None:
        typed.append(root)
    kinds = {np.dtype(t.dtype).name for t in typed}
    about = tuple(dict.fromkeys(t.name for t in typed))
    if len(kinds) > 1:
        return f"the weights and the result mix element types ({', '.join(sorted(kinds))})", about
    kind = np.dtype(kinds.pop()) if kinds else None
    if kind is not None and kind.kind in "iub":
        return "the values are not floating point: folding would change integer rounding", about
    if kind is not None and kind not in _FOLDED_TYPES:
        return f"onnxfold folds float16, float32 and float64 values, not {kind.name}", about
    return None


# The types the engine folds in float64 and casts back once; onnxruntime runs them on the
# CPU, so every fold in them is checked there. bfloat16 and float8 are left as they are.
_FOLDED_TYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}


def _failed_condition(rule, match):
    """The first `when` line that does not hold."""
    for line in rule.when:
        try:
            reason = PREDICATES[line.function](*[_predicate_arg(a, match) for a in line.args])
        except CannotTell as error:
            reason = f"{line.function} cannot tell: {error}"
        if reason:
            return reason, _graph_names(match, _value_args(line))
    return None


def _all_finite(array) -> bool:
    """Every element is finite. A sum is NaN or inf if any element is: one pass, no
    temporary. Only a sum that is not finite (that, or one that overflowed) needs the
    element-wise look."""
    return math.isfinite(array.sum(dtype=np.promote_types(array.dtype, np.float32))) or bool(np.isfinite(array).all())


def _cast_weights(rule, match, computed):
    """Cast the computed weights to the site's type, in place; or say why they may not be.

    The one check for every rule: a weight that is not finite once cast (float16 overflow,
    a BatchNormalization scale 1/sqrt(0)) turns outputs the original computed into inf or
    NaN, and folding is only exact in real arithmetic, where inf and NaN do not occur.
    """
    dtype = _site_dtype(match)
    for name in sorted(rule.weight_names):
        value = computed[name]
        if value is None:
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            cast = np.ascontiguousarray(np.asarray(value).astype(dtype, copy=False))
        if cast.dtype.kind == "f" and not _all_finite(cast):
            if np.isfinite(value).all():
                reason = f"folded weights overflow {dtype.name}: '{name}' reaches {np.abs(value).max():.4g}"
            else:
                reason = f"folded weights are not finite: '{name}' would hold inf or NaN"
            return reason, _compute_inputs(rule, match)
        computed[name] = cast
    return None


def _site_dtype(match):
    constants = [t for t in match.values.values()
                 if t is not None and is_constant(t) and np.issubdtype(np.dtype(t.dtype), np.floating)]
    return np.dtype(constants[0].dtype) if constants else np.dtype(np.float32)


def _compute_inputs(rule, match) -> tuple:
    """Graph names of the pattern values the compute lines read."""
    return _graph_names(match, sorted(rule.compute_arguments))


def _value_args(line) -> list:
    """The pattern names a line reads: its names, and the nodes whose attributes it reads."""
    return [arg.name if isinstance(arg, Name) else arg.value
            for arg in line.args if isinstance(arg, (Name, Attribute))]


def _graph_names(match, pattern_names) -> tuple:
    tensors = [match.values.get(name) for name in pattern_names]
    return tuple(dict.fromkeys(t.name for t in tensors if t is not None))


# --- what the plan holds ---------------------------------------------------------------

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


def _plain(value):
    """Attribute values as ONNX wants them: Python ints, floats and lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# --- the cost guard ------------------------------------------------------------------------

def _raises_cost(rule, match, computed):
    """The rewrite may not raise the parameters or multiply-adds of what it replaces,
    unless the rule's `merge_step` holds: the new node is then a step towards a merge that
    removes it (DBB's pooled branch joins a KxK conv that is there anyway)."""
    raised = cost.compare(_pattern_cost(rule, match), _result_cost(rule, match, computed))
    if raised is None:
        return None
    names = _compute_inputs(rule, match)
    if rule.merge_step is None:
        return f"the rewrite {raised}", names
    try:
        reason = PREDICATES[rule.merge_step.function](*[_predicate_arg(a, match) for a in rule.merge_step.args])
    except CannotTell as error:
        reason = f"{rule.merge_step.function} cannot tell: {error}"
    return (f"the rewrite {raised}, and is no step towards a merge: {reason}", names) if reason else None


def _pattern_cost(rule, match):
    nodes = [match.nodes[line.text] for line in rule.pattern]
    # A weight some other node reads stays in the model: the rewrite replaces none of it.
    own = {id(node) for node in nodes}
    params = cost.parameters(t for node in nodes for t in node.inputs
                             if all(id(reader) in own for reader in t.outputs))
    return params, _sum_known(cost.multiply_adds(node.op, [cost.shape_of(t) for t in node.inputs],
                                                 cost.shape_of(node.outputs[0])) for node in nodes)


def _result_cost(rule, match, computed):
    def value(arg):
        if not isinstance(arg, Name):
            return None
        return computed[arg.name] if arg.name in computed else match.values.get(arg.name)

    inputs = [value(arg) for line in rule.result for arg in line.args]
    params = cost.parameters(v for v in inputs if isinstance(v, np.ndarray) or (v is not None and is_constant(v)))
    root = rule.root.targets[0]
    macs = []
    for line in rule.result:
        output = match.values[root] if line.targets[0] == root else None
        macs.append(cost.multiply_adds(line.function, [cost.shape_of(value(a)) for a in line.args],
                                       cost.shape_of(output)))
    return params, _sum_known(macs)


def _sum_known(counts):
    counts = list(counts)
    return None if None in counts else sum(counts)
