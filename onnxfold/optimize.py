"""The pipeline behind `onnxfold optimize`: load, normalize, rewrite to a fixpoint, export."""

from __future__ import annotations

import gc
import time

import onnx
import onnx_graphsurgeon as gs

from .engine import Engine, NameSource
from .export import export_model
from .graph import use_numpy_types
from .errors import OnnxfoldError
from .modelio import copy_without, load_model, without_large_weights
from .normalize import normalize
from .report import Report, model_stats, unexplained_leftovers
from .ruleset import load_rules

def optimize(model, *, only=None, skip=None, rule_dirs=(), rules=None, freeze_weight_inputs=False):
    """Optimize a model (a path or a ModelProto, which is left unchanged).

    Weights also listed as graph inputs (old exports) are refused, or with
    `freeze_weight_inputs` taken as fixed: dropped from the graph inputs, then folded.
    Returns (optimized ModelProto, Report).
    """
    started = time.perf_counter()
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    rules = select_rules(rules if rules is not None else load_rules(rule_dirs), only, skip)
    frozen = _weight_inputs(model)
    if frozen and not freeze_weight_inputs:
        _refuse_overridable_weights(frozen)
    if frozen:
        model = _without_inputs(model, set(frozen))
    before = model_stats(model)
    graph = gs.import_onnx(model)
    use_numpy_types(graph)
    _apply_inferred_shapes(graph, model)
    graph.toposort()
    # The main graph first, then If/Loop/Scan bodies; one name source for all scopes.
    graphs = [graph, *graph.subgraphs(recursive=True)]
    names = NameSource(graphs)
    engines = [Engine(g, rules, names) for g in graphs]
    normalized = None
    for scope, engine in zip(graphs, engines):
        counts = _rewrite_to_fixpoint(scope, engine)
        normalized = counts if normalized is None else {k: normalized[k] + counts[k] for k in counts}
    graph.cleanup(recurse_subgraphs=True).toposort(recurse_subgraphs=True)
    rewrites = [r for e in engines for r in e.rewrites]
    misses = [m for g, e in zip(graphs, engines)
              for m in e.remaining_misses() + unexplained_leftovers(g, e.misses)]
    optimized = export_model(graph, model)
    # The graph's nodes and values refer to each other: only the cycle collector frees
    # them, and with them the arrays of folded weights; on a large model, do it now.
    del graph, graphs, engines, names
    gc.collect()
    report = Report(before=before, after=model_stats(optimized), seconds=time.perf_counter() - started,
                    normalized=normalized, rewrites=rewrites, misses=misses,
                    rules=[rule.name for rule in rules], frozen_inputs=frozen)
    return optimized, report


def _rewrite_to_fixpoint(graph, engine) -> dict:
    """Rules and clean-ups in turn until neither changes the graph; the clean-up counts."""
    normalized = normalize(graph)
    while True:  # a rewrite can expose a clean-up (an identity Reshape), and back
        engine.run()
        again = normalize(graph)
        normalized = {key: normalized[key] + again[key] for key in normalized}
        if not any(again.values()):
            return normalized


def _weight_inputs(model) -> list:
    """Names of weights also listed as graph inputs: values that may be replaced at run time."""
    inputs = {info.name for info in model.graph.input}
    return [t.name for t in model.graph.initializer if t.name in inputs]


def _refuse_overridable_weights(names) -> None:
    raise OnnxfoldError(
        f"{len(names)} weights are also graph inputs (overridable at run time, e.g. '{names[0]}'); "
        "folding them would not be exact. Pass --freeze-weight-inputs to take them as fixed "
        "(they stop being inputs), or re-export with keep_initializers_as_inputs=False")


def _without_inputs(model, names) -> onnx.ModelProto:
    """A copy of the model with the named graph inputs dropped (IR 4+ needs no others)."""
    copy = copy_without(model, "input")
    copy.graph.input.extend(info for info in model.graph.input if info.name not in names)
    copy.ir_version = max(copy.ir_version, 4)
    return copy


def select_rules(rules, only=None, skip=None) -> list:
    """The rules to run, after --only and --skip; an unknown name is an error."""
    known = {rule.name for rule in rules}
    for name in [*(only or []), *(skip or [])]:
        if name not in known:
            raise OnnxfoldError(f"unknown rule '{name}' (see 'onnxfold rules')")
    if only:
        rules = [rule for rule in rules if rule.name in only]
    return [rule for rule in rules if rule.name not in (skip or [])]


def _apply_inferred_shapes(graph, model) -> None:
    """Fill in value shapes from ONNX shape inference, run on a copy without big weights."""
    inferred = onnx.shape_inference.infer_shapes(without_large_weights(model), strict_mode=False, data_prop=True)
    tensors = graph.tensors()
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = tensors.get(info.name)
        if tensor is None or isinstance(tensor, gs.Constant) or tensor.shape is not None:
            continue
        kind = info.type.tensor_type
        if not kind.HasField("shape"):
            continue
        tensor.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                        for d in kind.shape.dim]
        if tensor.dtype is None and kind.elem_type:
            tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type)
