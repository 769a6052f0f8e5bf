"""The command line: parses options, calls the library, prints, and picks the exit code.

Exit codes: 0 success; 1 parity failed (verify, optimize --verify), or optimize --check found
a model optimizing would change; 2 bad input or usage;
3 an internal error (a bug: please report it with the model if you can); 130 Ctrl-C
(SIGINT), 143 SIGTERM.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import click

from . import __version__
from .cleanups import CLEANUPS
from .errors import OnnxfoldError
from .jobs import (BAD_INPUT, FAILED, INTERNAL, OK, WOULD_CHANGE, JobOptions, batch_inputs, batch_targets,
                   check_report_path, data_file, optimize_file, optimize_many)
from .modelio import made_folder, write_text
from .parity_options import parity_options, parity_settings
from .ruleset import load_rules
from .text import table

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 1, 2, 3
PROGRESS_AFTER_S = 2.0  # verify's latency runs show progress once they take longer


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it cleans up as on Ctrl-C: temporary
    files beside the outputs are removed (`timeout`, CI cancellation, container stops)."""

    signum = signal.SIGTERM


def _on_sigterm(signum, frame):
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise _Terminated()


def _handle_errors(command):
    """Bad input becomes one line on stderr and exit 2; no traceback reaches the user.
    Ctrl-C exits 130 and SIGTERM 143 (128 + the signal), after cleaning up."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        in_main_thread = threading.current_thread() is threading.main_thread()  # else signal() fails
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
        try:
            return command(*args, **kwargs)
        except OnnxfoldError as error:
            click.echo(f"onnxfold: error: {error}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt as stop:
            click.echo("onnxfold: interrupted", err=True)
            sys.exit(128 + getattr(stop, "signum", signal.SIGINT))
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except BrokenPipeError:
            # The reader of stdout went away (`| head`): end as a tool killed by SIGPIPE
            # would, without a word; files were written before the report was printed.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(128 + signal.SIGPIPE)
        except Exception as error:  # noqa: BLE001 - the last line of defence for users
            if os.environ.get("ONNXFOLD_DEBUG"):
                traceback.print_exc()
            click.echo(f"onnxfold: internal error: {type(error).__name__}: {error} "
                       "(set ONNXFOLD_DEBUG=1 for the traceback)", err=True)
            sys.exit(EXIT_INTERNAL)
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _size(text) -> int:
    """'4096', '1K', '64M' or '1.5G' as a number of bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    unit = text[-1:].upper()
    number, scale = (text[:-1], units[unit]) if unit in units else (text, 1)
    try:
        size = float(number) * scale
    except ValueError:
        size = math.nan
    if not math.isfinite(size):  # '', 'x', 'nan', 'inf'
        raise click.BadParameter(f"'{text}' is not a size (bytes, or with a K, M or G suffix)")
    if size < 0:
        raise click.BadParameter(f"'{text}' is negative")
    return int(size)


def _names(text):
    return [name.strip() for name in text.split(",") if name.strip()] if text else []


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxfold")
def main():
    """Exact structural re-parameterization of ONNX models."""


@main.command("optimize")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out-dir", type=click.Path(path_type=Path),
              help="Batch mode: optimize every input (files, or folders of .onnx) into DIR (created if missing).")
@click.option("--check", is_flag=True,
              help="Write no model: say what optimizing would change (rules, clean-ups, node count); exit 1 "
                   "if it would change an input, 0 if every input is already optimized. Any number of inputs.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Batch mode: processes.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the report as JSON.")
@click.option("--only", help="Run only these rules and clean-ups (comma-separated; every clean-up "
                               "runs unless one is named).")
@click.option("--skip", help="Do not run these rules or clean-ups (comma-separated).")
@click.option("--rules", "rule_dirs", multiple=True, type=click.Path(path_type=Path),
              help="A folder of your own rule files, added to the shipped ones.")
@click.option("--explain", is_flag=True, help="Say why rules did not apply where they nearly did.")
@click.option("--verify", "verify", is_flag=True,
              help="Check parity in onnxruntime before writing (settings: the options from --rtol on).")
@click.option("--keep-failed", is_flag=True, help="With --verify: write TARGET even if parity fails.")
@click.option("--external-data/--no-external-data", default=None,
              help="Store weights in TARGET.data (default: as the input did, or when over 2 GB).")
@click.option("--external-data-size-threshold", "size_threshold", default="1K", show_default=True,
              metavar="SIZE", callback=lambda ctx, param, value: _size(value),
              help="With external data: tensors smaller than SIZE (bytes; K, M, G suffixes) stay inline.")
@click.option("--freeze-weight-inputs", is_flag=True,
              help="Old exports list weights as graph inputs too: take them as fixed (they stop "
                   "being inputs) and fold them. Without it such models are refused.")
@click.option("--no-provenance", is_flag=True,
              help="Do not name, in each node a rule made, the rule and the nodes it replaced.")
@click.option("--force", is_flag=True, help="Allow TARGET to overwrite SOURCE.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@parity_options
@_handle_errors
def optimize_command(paths, out_dir, check, jobs, json_path, only, skip, rule_dirs, explain, verify,
                     keep_failed, external_data, size_threshold, freeze_weight_inputs, no_provenance, force, quiet,
                     parity):
    """Optimize SOURCE into TARGET, or many inputs into --out-dir DIR, or --check inputs.

    \b
    onnxfold optimize model.onnx model.opt.onnx
    onnxfold optimize models/ extra.onnx --out-dir optimized/ -j 2
    onnxfold optimize --check models/ extra.onnx
    """
    if check:
        if out_dir is not None or verify or keep_failed:
            raise click.UsageError("--check writes nothing: it takes no --out-dir, --verify or --keep-failed")
        options = JobOptions(_names(only), _names(skip), rule_dirs, freeze_weight_inputs=freeze_weight_inputs,
                             check=True)
        sys.exit(_check_batch(batch_inputs(paths), options, jobs, json_path, quiet))
    if out_dir is None and len(paths) != 2:
        raise click.UsageError("give SOURCE and TARGET, or several inputs with --out-dir DIR")
    sources = batch_inputs(paths) if out_dir is not None else paths[:1]
    options = JobOptions(_names(only), _names(skip), rule_dirs, verify, keep_failed, force, external_data,
                         size_threshold, freeze_weight_inputs, parity_settings(parity, sources) if verify else None,
                         provenance=not no_provenance)
    if out_dir is None:
        result = optimize_file(*paths, options, report=json_path)
        _report_single(result, json_path, explain, quiet)
        sys.exit(_EXIT[result.status])
    with made_folder(out_dir) as created:  # removed again if a check below refuses the run
        if json_path:
            targets = batch_targets(sources, out_dir)
            check_report_path(json_path, {**dict.fromkeys(sources, "an input model"),
                                          **dict.fromkeys(targets, "an output model"),
                                          **dict.fromkeys(map(data_file, targets), "an output's external data")})
        if created and not quiet:
            click.echo(f"onnxfold: created the output folder {out_dir}", err=True)
        results = _run_batch(sources, out_dir, options, jobs, quiet)
    _write_batch_json(json_path, [_job_dict(r) for r in results])
    sys.exit(max(_EXIT[r.status] for r in results))


def _check_batch(sources, options, jobs, json_path, quiet):
    """--check: what optimizing each source would change; the exit code: 1 if any would change."""
    if json_path:
        check_report_path(json_path, dict.fromkeys(sources, "an input model"))
    results = _run_batch(sources, None, options, jobs, quiet, render=_check_lines)
    _write_batch_json(json_path, [{**_job_dict(r), "would_change": r.changes} for r in results])
    return max(_EXIT[r.status] for r in results)


def _write_batch_json(json_path, jobs):
    if json_path:
        write_text(json_path, json.dumps(jobs, indent=2) + "\n")


_EXIT = {OK: 0, FAILED: EXIT_FAILED, WOULD_CHANGE: EXIT_FAILED, BAD_INPUT: EXIT_BAD_INPUT, INTERNAL: EXIT_INTERNAL}


def _report_single(result, json_path, explain, quiet):
    for warning in result.warnings:
        click.echo(f"onnxfold: warning: {warning}", err=True)
    if result.error:
        click.echo(f"onnxfold: error: {result.error}", err=True)
        return
    if json_path:
        write_text(json_path, json.dumps(result.report.to_dict(), indent=2) + "\n")
    if not quiet:
        click.echo(result.report.render(explain=explain))
        click.echo(f"wrote {result.target}" if result.written else f"parity failed: {result.target} not written")


def _run_batch(sources, out_dir, options, jobs, quiet, render=None):
    with click.progressbar(length=len(sources), label="checking" if options.check else "optimizing",
                           file=sys.stderr, hidden=quiet or not sys.stderr.isatty()) as bar:
        results = optimize_many(sources, out_dir, options, jobs, on_done=lambda _: bar.update(1))
    if not quiet:
        click.echo((render or _batch_table)(results))
    for result in results:
        for warning in result.warnings:
            click.echo(f"onnxfold: warning: {warning}", err=True)
        if result.error:
            label = "internal error" if result.status == INTERNAL else "error"
            click.echo(f"onnxfold: {label}: {result.error}", err=True)
    return results


def _batch_table(results) -> str:
    rows = []
    for r in results:
        nodes, seconds = "", ""
        if r.report is not None:
            nodes = f"{r.report.before['nodes']} -> {r.report.after['nodes']}"
            seconds = f"{r.report.seconds:.3f}"
        rows.append([Path(r.source).name, r.status, nodes, seconds])
    lines = table(["model", "status", "nodes", "seconds"], rows, align="<<>>")
    failed = sum(r.status != OK for r in results)
    lines.append(f"{len(results) - failed} of {len(results)} optimized" + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)


def _check_lines(results) -> str:
    """A line per input, then the count: black's --check, for models."""
    lines = []
    for r in results:
        if r.status == WOULD_CHANGE:
            nodes = f"nodes {r.report.before['nodes']} -> {r.report.after['nodes']}"
            lines.append(f"would change {r.source}: {nodes}; {', '.join(r.changes)}")
        elif r.status == OK:
            lines.append(f"already optimized: {r.source}")
    changed = sum(r.status == WOULD_CHANGE for r in results)
    failed = sum(r.status not in (OK, WOULD_CHANGE) for r in results)
    lines.append(f"{changed} of {len(results)} would change" + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)


def _job_dict(result) -> dict:
    return {"source": result.source, "target": result.target, "status": result.status,
            "error": result.error, "warnings": result.warnings, "written": result.written,
            "report": result.report.to_dict() if result.report is not None else None}


@main.command("rules")
@click.argument("name", required=False)
@click.option("--rules", "rule_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Also list the rules in this folder.")
@_handle_errors
def rules_command(name, rule_dirs):
    """List the rules and clean-ups, or show rule NAME in full."""
    from . import linear_consumers, sums  # passes: what no rule file can express; listed with them

    passes = {module.RULE: module for module in (linear_consumers, sums)}
    rules = load_rules(rule_dirs)
    if name is None:
        width = max(len(entry.name) for entry in [*rules, *CLEANUPS])
        for rule in rules:
            click.echo(f"{rule.name:<{width}}  {rule.summary}")
        for pass_name, module in passes.items():
            click.echo(f"{pass_name:<{width}}  {module.SUMMARY}")
        click.echo("\nclean-ups (run before the rules and after each round of them):")
        for step in CLEANUPS:
            click.echo(f"{step.name:<{width}}  {step.summary}")
        return
    if name in passes:
        module = passes[name]
        click.echo(f"{name}\n\n{module.SUMMARY}\n\n{module.__doc__.strip()}\n\nfile: {module.__file__}")
        return
    step = next((step for step in CLEANUPS if step.name == name), None)
    if step is not None:
        click.echo(f"{step.name}\n\nclean-up: {step.summary}")
        return
    rule = next((rule for rule in rules if rule.name == name), None)
    if rule is None:
        raise OnnxfoldError(f"unknown rule '{name}' (see 'onnxfold rules')")
    click.echo(_describe_rule(rule))


def _describe_rule(rule) -> str:
    sections = [rule.name, "", rule.summary, "", rule.description, "", "pattern:"]
    sections += [f"  {line.text}" for line in rule.pattern]
    sections += ["when:"] + [f"  {line.text}" for line in rule.when]
    sections += ["compute:"] + [f"  {line.text}" for line in rule.compute]
    sections += ["result:"] + [f"  {line.text}" for line in rule.result]
    sections += ["", f"{len(rule.examples)} examples, {len(rule.counterexamples)} counterexamples",
                 f"file: {rule.source}"]
    return "\n".join(sections)


@main.command("verify")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("optimized", type=click.Path(path_type=Path))
@click.option("--providers", help="Comma-separated: cpu, cuda (default: cpu, plus cuda if available).")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--iterations", type=int, default=50, show_default=True)
@click.option("--threads", type=int, help="onnxruntime intra-op threads.")
@click.option("--no-latency", is_flag=True, help="Check parity only.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write every number as JSON.")
@parity_options
@_handle_errors
def verify_command(original, optimized, providers, warmup, iterations, threads, no_latency, json_path, parity):
    """Compare OPTIMIZED with ORIGINAL: numerical parity and latency in onnxruntime."""
    from .verify import verify_models

    if json_path:
        check_report_path(json_path, {original: "the original model", optimized: "the optimized model"})
    settings = parity_settings(parity, [original], providers=_names(providers) or None, latency=not no_latency,
                                warmup=warmup, iterations=iterations, threads=threads)
    report = verify_models(original, optimized, settings, progress=_LatencyProgress() if sys.stderr.isatty() else None)
    if json_path:
        write_text(json_path, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    click.echo(report.render())
    sys.exit(0 if report.passed else EXIT_FAILED)


class _LatencyProgress:
    """verify's progress callback: one line on stderr, rewritten in place, once timing has
    taken over PROGRESS_AFTER_S seconds (a short measurement would only flicker)."""

    def __init__(self):
        self.started, self.shown = 0.0, False

    def __call__(self, provider, done, total):
        if done == 0:
            self.started, self.shown = time.perf_counter(), False
        elif time.perf_counter() - self.started > PROGRESS_AFTER_S:
            self.shown = True
            click.echo(f"\rlatency on {provider}: {done}/{total} runs", nl=False, err=True)
        if done == total and self.shown:
            click.echo(err=True)

