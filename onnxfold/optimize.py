"""The pipeline behind `onnxfold optimize`: load, normalize, rewrite to a fixpoint, export."""

from __future__ import annotations

import time

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from .cleanups import LATE, NAMES as CLEANUP_NAMES, select_cleanups
from .constfold import fold_warnings
from .engine import Engine
from .linear_consumers import RULE as LINEAR_CONSUMERS, fold_bn_into_linear_consumers
from .names import NameSource
from .export import export_model
from .errors import OnnxfoldError
from .graph import drop_unused_nodes, sort_nodes, use_numpy_types
from .modelio import complaints, copy_without, load_model, validity_complaint
from .normalize import normalize
from .provenance import remember_metadata, write_metadata
from .report import Report, model_stats, unexplained_leftovers
from .ruleset import load_rules
from .scopes import graph_and_bodies, graphs, without_shadowed_names
from .shapes import apply_inferred_shapes, refine_shapes, restore_declared
from .sums import REGROUP_SUMS, regroup_sums
from .weights import constants_of, hold_apart_from_input, release_all

def optimize(model, *, only=None, skip=None, rule_dirs=(), rules=None, freeze_weight_inputs=False,
             cleanups=None, passes=None, provenance=True):
    """Optimize a model (a path or a ModelProto, which is left unchanged).

    `only`/`skip` name rules, passes and clean-ups (cleanups.py); `rules`, `cleanups` and
    `passes`, when given, are the selected lists themselves. With `provenance`, each node
    a rule made names the rules and the input's nodes behind it in its metadata_props.

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
    passes = select_passes(only, skip) if passes is None else passes
    try:
        with G_LOGGER.suppress():  # graph-surgeon's log lines ([W] ...) are not the user's to read
            return _optimize(model, rules, freeze_weight_inputs, started, cleanups, passes, provenance)
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


def _optimize(model, rules, freeze_weight_inputs, started, cleanups, passes, provenance):
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
    body_inputs = apply_inferred_shapes(graph, model)
    sort_nodes(graph)
    # The main graph first, then If/Loop/Scan bodies; one name source for all scopes.
    scopes = graph_and_bodies(graph)
    names = NameSource(scopes)
    engines = [Engine(g, rules, names) for g in scopes]
    normalized = None
    for scope, engine in zip(scopes, engines):
        refine = (lambda: refine_shapes(graph, model)) if scope is graph else None
        counts = _rewrite_to_fixpoint(scope, engine, [s for s in cleanups if s not in LATE], passes, refine)
        counts.update({step.name: step.run(scope, names) for step in cleanups if step in LATE})
        normalized = counts if normalized is None else {k: normalized[k] + counts[k] for k in counts}
    sort_nodes(drop_unused_nodes(graph))  # graph-surgeon's, into nested graphs, where there are any
    rewrites = [r for e in engines for r in e.rewrites]
    misses = [m for g, e in zip(scopes, engines)
              for m in e.remaining_misses() + unexplained_leftovers(g, e.misses)]
    restore_declared(body_inputs)
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
                    rules=[rule.name for rule in rules] + [name for name, _ in passes], frozen_inputs=frozen,
                    warnings=_format_warnings(source, optimized, frozen) +
                    [line for scope in scopes for line in fold_warnings(scope)])
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


def _rewrite_to_fixpoint(graph, engine, cleanups, passes=(), refine=None) -> dict:
    """Rules, passes and clean-ups in turn until none changes the graph; the clean-up counts.

    `refine()` runs shape inference again after constants were folded (main graph only)."""
    normalized = normalize(graph, engine.names, cleanups)
    while refine and normalized.get("constant-subgraphs") and _folded_more(graph, engine, cleanups, refine,
                                                                             normalized):
        pass
    while True:  # a rewrite can expose a clean-up (an identity Reshape), and back
        engine.run()
        passed = sum(run(graph, engine) for _, run in passes)
        again = normalize(graph, engine.names, cleanups)
        if refine and again.get("constant-subgraphs"):
            refine()
        normalized = {key: normalized[key] + again[key] for key in normalized}
        if not passed and not any(again.values()):
            return normalized


def _folded_more(graph, engine, cleanups, refine, normalized) -> bool:
    """Shape inference again, then the clean-ups: True while that folds more constants."""
    if not refine():
        return False
    again = normalize(graph, engine.names, cleanups)
    for key, count in again.items():
        normalized[key] += count
    return again["constant-subgraphs"] > 0


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


# Folds no rule file can express (linear_consumers.py says why), named like rules. Once
# the rules are done, a sum whose mergeable terms are not siblings is regrouped so that
# they are (the rules then merge them).
PASSES = {LINEAR_CONSUMERS: fold_bn_into_linear_consumers, REGROUP_SUMS: regroup_sums}


def select_passes(only=None, skip=None) -> list:
    """The passes (folds no rule file can express) to run, after --only and --skip.

    regroup-sums only lets rules meet their pattern, so it is chosen as a clean-up is:
    it runs with any rule `only` names, unless `only` names clean-ups (or it) instead."""
    names_steps = any(name in CLEANUP_NAMES or name == REGROUP_SUMS for name in (only or []))
    return [(name, run) for name, run in PASSES.items() if name not in (skip or []) and
            (not only or name in only or (name == REGROUP_SUMS and not names_steps))]


def select_rules(rules, only=None, skip=None) -> list:
    """The rules to run, after --only and --skip; an unknown name is an error.

    The names may also be passes' or clean-ups' (cleanups.py): an `only` that names
    clean-ups and no rule runs no rule.
    """
    known = {rule.name for rule in rules} | set(PASSES) | set(CLEANUP_NAMES)
    for name in [*(only or []), *(skip or [])]:
        if name not in known:
            raise OnnxfoldError(f"unknown rule '{name}' (see 'onnxfold rules')")
    if only:
        rules = [rule for rule in rules if rule.name in only]
    return [rule for rule in rules if rule.name not in (skip or [])]
