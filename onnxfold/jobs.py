"""One file in, one file out: the job behind `onnxfold optimize`, alone or in a batch."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OnnxfoldError
from .modelio import check_destination, checker_complaint, open_model, require_folder, save_model
from .cleanups import select_cleanups
from .optimize import optimize, select_passes, select_rules
from .references import loaded
from .ruleset import load_rules
from .text import first_line

OK, FAILED, BAD_INPUT, INTERNAL = "ok", "parity failed", "error", "internal error"
WOULD_CHANGE = "would change"  # --check: optimizing would change the model


@dataclass
class JobOptions:
    only: list = field(default_factory=list)
    skip: list = field(default_factory=list)
    rule_dirs: tuple = ()
    verify: bool = False
    keep_failed: bool = False
    force: bool = False
    external_data: bool | None = None  # None: as the input had it, or when too big
    size_threshold: int = 1024  # bytes: smaller tensors stay inline when saving externally
    freeze_weight_inputs: bool = False  # take weights also listed as graph inputs as fixed
    parity: object = None  # with verify: its VerifySettings (None: the defaults)
    check: bool = False  # only tell whether optimizing would change the input; write nothing
    provenance: bool = True  # name each rule-made node's rules and replaced nodes in its metadata


@dataclass
class JobResult:
    source: str
    target: str | None  # None with --check
    status: str = OK
    error: str | None = None
    warnings: list = field(default_factory=list)
    report: object = None  # the Report, when optimizing got that far
    written: bool = False
    changes: list = field(default_factory=list)  # with --check: what optimizing would change


def optimize_file(source, target, options: JobOptions, rules=None, report=None) -> JobResult:
    """Optimize one file; bad input is recorded in the result, never raised.

    `report`: where the caller will write the JSON report, checked with the model's own
    destinations before anything is written.
    """
    result = JobResult(str(source), _text(target))
    try:
        _run(Path(source), target and Path(target), options, rules, result, report and Path(report))
    except OnnxfoldError as error:
        result.status, result.error = BAD_INPUT, str(error)
    return result


def _run(source, target, options, rules, result, report) -> None:
    if rules is None:
        rules = select_rules(load_rules(options.rule_dirs), options.only, options.skip)
    if options.check:
        return _check_only(source, options, rules, result)
    check_destination(target)
    if same_file(source, target) and not options.force:
        raise OnnxfoldError("is both input and output; pass --force to overwrite it", source)
    model, data_files = open_model(source)  # large weights stay in the file until needed
    overwritten = [f for f in (target, data_file(target)) if any(same_file(f, data) for data in data_files)]
    if overwritten and not options.force:
        raise OnnxfoldError(f"the output would replace the input's external data {overwritten[0]}; "
                            "pass --force to allow it", source)
    if report:
        check_report_path(report, {source: "the input model", **dict.fromkeys(data_files, "its external data"),
                                   target: "the output model", data_file(target): "the output's external data"})
    optimized, report = _optimized(model, source, options, rules, result)
    if options.verify:
        from .culprit import verify_optimization

        report.verification = _naming(source, verify_optimization, loaded(model), loaded(optimized), rules,
                                      report, options.freeze_weight_inputs, options.parity,
                                      select_cleanups(options.only, options.skip))
        if not report.verification["passed"]:
            result.status = FAILED
    if result.status == OK or options.keep_failed:
        # By default as the input had it (or when too big for one file); else as asked.
        wanted = (bool(data_files) or None) if options.external_data is None else options.external_data
        save_model(optimized, target, external_data=wanted, size_threshold=options.size_threshold)
        result.written = True


def _check_only(source, options, rules, result) -> None:
    """--check: optimize in memory, record what would change, write nothing."""
    model, _ = open_model(source)
    _, report = _optimized(model, source, options, rules, result)
    result.changes = report.changes()
    if result.changes:
        result.status = WOULD_CHANGE


def _optimized(model, source, options, rules, result) -> tuple:
    """(optimized model, Report) of `model`, read from `source`; warnings go into result."""
    complaint = checker_complaint(model)
    if complaint:
        result.warnings.append(f"{source}: the ONNX checker rejects the input ({complaint}); "
                               "optimizing anyway")
    optimized, report = _naming(source, optimize, model, rules=rules, freeze_weight_inputs=options.freeze_weight_inputs,
                                cleanups=select_cleanups(options.only, options.skip),
                                passes=select_passes(options.only, options.skip), provenance=options.provenance)
    result.report = report
    result.warnings += report.warnings
    return optimized, report


def _naming(source, call, *args, **kwargs):
    """call(*args, **kwargs); a refusal about the model in memory names its file, `source`."""
    try:
        return call(*args, **kwargs)
    except OnnxfoldError as error:
        raise error if error.path else OnnxfoldError(str(error), source) from None


def check_report_path(report, models: dict) -> None:
    """Refuse a report path that could not be written or would replace one of the files
    in `models` ({path: what it is}: inputs, their external data, outputs), before
    anything is written."""
    check_destination(report, text=True)
    for model, what in models.items():
        if same_file(Path(report), Path(model)):
            raise OnnxfoldError(f"the report would replace {what}", report)


def data_file(target: Path) -> Path:
    """Where save_model puts the external data of `target`."""
    return target.with_name(target.name + ".data")


def same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def batch_inputs(paths) -> list:
    """Files as given, and the *.onnx files of any folder given, sorted."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(path.glob("*.onnx"))
        else:
            found.append(path)
    if not found:
        raise OnnxfoldError("no .onnx files found in the inputs given")
    return found


def batch_targets(sources, out_dir) -> list:
    """The output of each source in out_dir: its file name there."""
    out_dir = Path(out_dir)
    require_folder(out_dir)
    targets = [out_dir / Path(source).name for source in sources]
    if len(set(targets)) != len(targets):
        raise OnnxfoldError("two inputs have the same file name; they would overwrite each other")
    return targets


def optimize_many(sources, out_dir, options: JobOptions, jobs=1, on_done=None) -> list:
    """Optimize each source into out_dir, independently; one bad model stops nothing.
    With options.check there is no out_dir (None): nothing is written."""
    targets = [None] * len(sources) if options.check else batch_targets(sources, out_dir)
    select_rules(load_rules(options.rule_dirs), options.only, options.skip)  # fail early
    results = [None] * len(sources)
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(optimize_file, s, t, options): i for i, (s, t) in enumerate(zip(sources, targets))}
        try:
            for future in as_completed(futures):
                i = futures[future]
                results[i] = _outcome(future, sources[i], targets[i])
                if on_done:
                    on_done(results[i])
        except BaseException:  # Ctrl-C or SIGTERM: start no more jobs
            for future in futures:
                future.cancel()
            raise
    return results


def _outcome(future, source, target) -> JobResult:
    """The job's result; a bug (or a crashed worker) is that job's status, not the batch's end."""
    try:
        return future.result()
    except Exception as error:  # noqa: BLE001 - reported, with the exit code of a bug
        return JobResult(str(source), _text(target), INTERNAL,
                         f"{source}: {type(error).__name__}: {first_line(error)} "
                         "(run it alone with ONNXFOLD_DEBUG=1 for the traceback)")


def _text(path) -> str | None:
    return None if path is None else str(path)
