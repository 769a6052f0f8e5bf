"""The pipeline behind `onnxfold optimize`: load, normalize, rewrite to a fixpoint, export."""

from __future__ import annotations

import time

import onnx
import onnx_graphsurgeon as gs

from .cleanups import NAMES as CLEANUP_NAMES, select_cleanups
from .engine import Engine
from .names import NameSource
from .export import export_model
from .errors import OnnxfoldError
from .graph import dims_of, use_numpy_types, without_negative_dims
from .modelio import complaints, copy_without, load_model, validity_complaint, without_large_weights
from .normalize import normalize
from .provenance import remember_metadata, write_metadata
from .report import Report, model_stats, unexplained_leftovers
from .ruleset import load_rules
from .scopes import graphs, without_shadowed_names
from .weights import constants_of, hold_apart_from_input, release_all

def optimize(model, *, only=None, skip=None, rule_dirs=(), rules=None, freeze_weight_inputs=False,
             cleanups=None, provenance=True):
    """Optimize a model (a path or a ModelProto, which is left unchanged).

    `only`/`skip` name rules and clean-ups (cleanups.py); `rules` and `cleanups`, when
    given, are the selected lists themselves. With `provenance`, each node a rule made
    names the rules and the input's nodes behind it in its metadata_props (export.py).

    Weights also listed as graph inputs (old exports) are refused, or with
    `freeze_weight_inputs` taken as fixed: dropped from the graph inputs, then folded.
    Below IR version 4 they are fixed by the format's rule (every weight had to be listed
    as an input; onnxruntime does not take them as feeds), so they are always folded.
    Returns (optimized ModelProto, Report).
    """
    started = time.perf_counter()
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    rules = select_rules(rules if rules is not None else load_rules(rule_dirs), only, skip)
    cleanups = select_cleanups(only, skip) if cleanups is None else cleanups
    try:
        return _optimize(model, rules, freeze_weight_inputs, started, cleanups, provenance)
    except (OnnxfoldError, MemoryError):
        raise
    except Exception as error:
        # A model ONNX itself rejects (a BatchNormalization with three inputs, parameters
        # of the wrong size) is bad input, not a bug; on a valid model this is a bug.
        complaint = validity_complaint(model)
        if complaint is None:
            raise
        raise OnnxfoldError(f"not a valid ONNX model ({complaint}); optimizing it failed "
                            f"({type(error).__name__})") from error


def _optimize(model, rules, freeze_weight_inputs, started, cleanups, provenance):
    source = model
    frozen = _weight_inputs(model)
    if frozen and not freeze_weight_inputs and model.ir_version >= 4:
        _refuse_overridable_weights(frozen)
    if frozen:
        model = _without_inputs(model, set(frozen))
    before = model_stats(model)
    model = without_shadowed_names(model)
    graph = gs.import_onnx(model)
    remember_metadata(graph, model)
    imported = hold_apart_from_input(graph)  # released at the end, even once folded away
    use_numpy_types(graph)
    _apply_inferred_shapes(graph, model)
    graph.toposort()
    # The main graph first, then If/Loop/Scan bodies; one name source for all scopes.
    scopes = [graph, *graph.subgraphs(recursive=True)]
    names = NameSource(scopes)
    engines = [Engine(g, rules, names) for g in scopes]
    normalized = None
    for scope, engine in zip(scopes, engines):
        counts = _rewrite_to_fixpoint(scope, engine, cleanups)
        normalized = counts if normalized is None else {k: normalized[k] + counts[k] for k in counts}
    graph.cleanup(recurse_subgraphs=True).toposort(recurse_subgraphs=True)
    rewrites = [r for e in engines for r in e.rewrites]
    misses = [m for g, e in zip(scopes, engines)
              for m in e.remaining_misses() + unexplained_leftovers(g, e.misses)]
    optimized = export_model(graph, model)
    _check_output(source, optimized)
    write_metadata(graph, optimized, provenance)  # which neither the checker nor onnxruntime reads
    # The graph's nodes and values refer to each other, so only Python's cycle collector
    # frees them, and with them the input's and the output's tensors and folded arrays.
    # Released now, those go at once; a full collection would cost time in proportion to
    # every live object of the process, not just the graph's.
    release_all([*imported, *constants_of(graph)])
    report = Report(before=before, after=model_stats(optimized), seconds=time.perf_counter() - started,
                    normalized=normalized, rewrites=rewrites, misses=misses,
                    rules=[rule.name for rule in rules], frozen_inputs=frozen,
                    warnings=_format_warnings(source, optimized, frozen))
    return optimized, report


def _format_warnings(source, optimized, frozen) -> list:
    """A line for each change of format: a newer IR version, a dropped training section."""
    warnings = []
    if source.training_info:
        warnings.append(f"dropped the model's training_info ({len(source.training_info)} entries): "
                        "it names weights that folds replace; the output is an inference model")
    if optimized.ir_version <= source.ir_version:
        return warnings
    why = (f"below IR 4 its {len(frozen)} weights listed as graph inputs are constants by the "
           "format's rule: folded them as fixed" if frozen and source.ir_version < 4 else
           "before IR 4 every weight had to be a graph input as well")
    return warnings + [f"wrote IR version {optimized.ir_version} (the input has {source.ir_version}): {why}"]


def _check_output(source, optimized) -> None:
    """A written model the ONNX checker or onnxruntime rejects, from an input they accept,
    is a bug: exit 3, never a broken model with exit 0."""
    found = complaints(optimized)
    if not found:
        return
    accepted = [judge for judge in found if judge not in complaints(source)]
    if accepted:
        judge = accepted[0]
        raise RuntimeError(f"{judge} rejects the optimized model ({found[judge]}); it accepts the input")


def _rewrite_to_fixpoint(graph, engine, cleanups) -> dict:
    """Rules and clean-ups in turn until neither changes the graph; the clean-up counts."""
    normalized = normalize(graph, engine.names, cleanups)
    while True:  # a rewrite can expose a clean-up (an identity Reshape), and back
        engine.run()
        again = normalize(graph, engine.names, cleanups)
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
    """The rules to run, after --only and --skip; an unknown name is an error.

    The names may also be clean-ups' (cleanups.py): an `only` that names clean-ups and
    no rule runs no rule.
    """
    known = {rule.name for rule in rules} | set(CLEANUP_NAMES)
    for name in [*(only or []), *(skip or [])]:
        if name not in known:
            raise OnnxfoldError(f"unknown rule '{name}' (see 'onnxfold rules')")
    if only:
        rules = [rule for rule in rules if rule.name in only]
    return [rule for rule in rules if rule.name not in (skip or [])]


def _apply_inferred_shapes(graph, model) -> None:
    """Give every computed value, in every scope, the type and shape ONNX inference finds.

    The file's own annotations (value_info, declared output shapes) are not trusted: a
    stale one would let a clean-up remove a Reshape that does change the shape. Graph
    inputs keep their declared shapes, a negative size read as dynamic (is_static).
    """
    inferred = _inferred_types(model)
    scopes = [graph, *graph.subgraphs(recursive=True)]
    declared = {id(t) for scope in scopes for t in scope.inputs}
    for scope in scopes:
        for tensor in scope.inputs:
            tensor.shape = without_negative_dims(tensor.shape)
        for tensor in scope.tensors().values():
            if not isinstance(tensor, gs.Constant) and id(tensor) not in declared:
                _set_type(tensor, inferred.get(tensor.name))


def _inferred_types(model) -> dict:
    """Value name -> TypeProto from shape inference, run on a copy without big weights nor
    the file's annotations; a name two scopes give different types is left out."""
    skeleton = without_large_weights(model)
    for scope in graphs(skeleton):
        del scope.value_info[:]
        for info in scope.input:
            _forget_sizes(info, keep_static=True)
        for info in scope.output:
            _forget_sizes(info, keep_static=False)
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
    types, ambiguous = {}, set()
    for scope in graphs(inferred):
        for info in [*scope.value_info, *scope.output]:
            if types.setdefault(info.name, info.type) != info.type:
                ambiguous.add(info.name)
    return {name: kind for name, kind in types.items() if name not in ambiguous}


def _forget_sizes(info, keep_static) -> None:
    """Drop a declared tensor shape (an output's), or just its negative sizes (an input's)."""
    kind = info.type.tensor_type if info.type.HasField("tensor_type") else None
    if kind is None or not kind.HasField("shape"):
        return
    if not keep_static:
        kind.ClearField("shape")
        return
    for dim in kind.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value < 0:
            dim.ClearField("dim_value")


def _set_type(tensor, kind) -> None:
    """The inferred type of a computed value; its shape unknown where inference has none."""
    tensor.shape = None
    field = kind.WhichOneof("value") if kind is not None else None
    if field == "tensor_type":
        tensor.type, inner = "tensor_type", kind.tensor_type
        if inner.HasField("shape"):
            tensor.shape = dims_of(inner.shape)
    elif field == "sequence_type" and kind.sequence_type.elem_type.HasField("tensor_type"):
        # A sequence keeps no shape: rules read shapes as those of tensors.
        tensor.type, inner = "sequence_type", kind.sequence_type.elem_type.tensor_type
    else:
        return
    if tensor.dtype is None and inner.elem_type:
        tensor.dtype = onnx.helper.tensor_dtype_to_np_dtype(inner.elem_type)
