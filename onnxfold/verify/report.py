"""What verify found: the result of every provider and output, as JSON and as text."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from ..text import table
from .models import dims_text


@dataclass
class InputInfo:
    name: str
    dtype: str
    shape: list
    source: str  # "random" or "file"
    range: list | None  # [low, high) of random values; None for bools and file data
    range_reason: str | None = None  # why that range, where not the default: the graph's, or given


@dataclass
class OutputResult:
    name: str
    dtype: str
    shape: list | None  # the reference output's shape (first sample)
    rtol: float
    atol: float
    elements: int
    mismatched: int  # elements outside tolerance, non-finite mismatches included
    mismatch_fraction: float | None
    nonfinite_mismatches: int
    max_abs_error: float | None
    mean_abs_error: float | None
    max_rel_error: float | None  # over elements whose reference is non-zero
    cosine_similarity: float | None
    min_passing_rtol: float | None  # None: no rtol passes at this atol
    reference_max_abs: float | None
    passed: bool
    error: str | None = None  # e.g. a shape mismatch; then the metrics are not meaningful


@dataclass
class Timing:
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float


@dataclass
class Latency:
    original: Timing
    optimized: Timing
    speedup: float  # median(original) / median(optimized)
    warmup: int
    iterations: int
    threads: int | None


@dataclass
class ProviderResult:
    name: str  # short name, e.g. "cuda"
    execution_provider: str  # e.g. "CUDAExecutionProvider"
    status: str  # "ran" or "unavailable"
    reason: str | None = None  # why it is unavailable
    passed: bool | None = None  # None when it did not run
    outputs: list = field(default_factory=list)  # OutputResult, one per output
    latency: Latency | None = None


@dataclass
class VerifyReport:
    original: str
    optimized: str
    onnxruntime_version: str
    settings: dict
    inputs: list  # InputInfo
    providers: list  # ProviderResult
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    disagreements: list = field(default_factory=list)  # why the models differ before any output (inputs)

    @property
    def passed(self) -> bool:
        """No disagreement, and parity passed on every provider that ran, and one at least
        did: an unavailable provider does not fail the report by itself."""
        ran = [p for p in self.providers if p.status == "ran"]
        return not self.disagreements and bool(ran) and all(p.passed for p in ran)

    def to_dict(self) -> dict:
        """Plain JSON-able dict; non-finite numbers become None (JSON has no NaN/Inf)."""
        return _jsonable({"passed": self.passed, **dataclasses.asdict(self)})

    def render(self) -> str:
        return "\n".join(_render(self)) + "\n"


def _render(report):
    settings = report.settings
    lines = [f"onnxfold verify: {'PASS' if report.passed else 'FAIL'}",
             f"original:  {report.original}",
             f"optimized: {report.optimized}",
             f"reference: {settings['reference']}; candidate: optimized, graph optimizations "
             f"{settings['candidate_graph_optimization']}",
             f"onnxruntime {report.onnxruntime_version}; {settings['samples']} sample(s), "
             f"seed {settings['seed']}",
             ""]
    if report.disagreements:
        lines += ["the models disagree, so no output was compared:"]
        lines += [f"  - {item}" for item in report.disagreements]
    else:
        lines += ["inputs:"]
        lines += table(["name", "dtype", "shape", "data"],
                       [[i.name, i.dtype, dims_text(i.shape), _input_source(i)] for i in report.inputs],
                       indent="  ")
    for provider in report.providers:
        lines += [""] + _render_provider(provider)
    for title, items in (("notes", report.notes), ("warnings", report.warnings)):
        if items:
            lines += ["", f"{title}:"] + [f"  - {item}" for item in items]
    return lines


def _input_source(info):
    if info.source == "file":
        return "from file"
    if info.range is None:
        return "random"
    why = f": {info.range_reason}" if info.range_reason else ""
    low, high = (str(v) if isinstance(v, int) else _num(v) for v in info.range)  # ints exactly: 30522
    return f"random in [{low}, {high}){why}"


def _render_provider(provider):
    head = f"parity on {provider.name} ({provider.execution_provider})"
    if provider.status != "ran":
        return [f"{head}: UNAVAILABLE, no numbers reported", f"  reason: {provider.reason}"]
    lines = [f"{head}: {'PASS' if provider.passed else 'FAIL'}"]
    headers = ["output", "dtype", "shape", "max abs", "mean abs", "max rel", "cosine",
               "outside tol", "rtol", "atol", "min rtol", "result"]
    lines += table(headers, [_output_row(o) for o in provider.outputs], indent="  ")
    for output in provider.outputs:
        if output.error:
            lines.append(f"  output '{output.name}': {output.error}")
        elif output.nonfinite_mismatches:
            lines.append(f"  output '{output.name}': {output.nonfinite_mismatches} value(s) where one "
                         "model gives NaN/Inf and the other a different value")
    if provider.latency:
        lines += [""] + _render_latency(provider)
    return lines


def _output_row(output):
    cosine = "-" if output.cosine_similarity is None else f"{output.cosine_similarity:.7f}"
    outside = "-" if output.error else f"{output.mismatched}/{output.elements}"
    if output.mismatch_fraction:
        outside += f" ({output.mismatch_fraction:.2%})"
    needed = output.min_passing_rtol
    return [output.name, output.dtype, dims_text(output.shape), _num(output.max_abs_error),
            _num(output.mean_abs_error), _num(output.max_rel_error), cosine, outside,
            _num(output.rtol), _num(output.atol),
            "none" if needed is not None and math.isinf(needed) else _num(needed),
            "PASS" if output.passed else "FAIL"]


def _render_latency(provider):
    latency = provider.latency
    lines = [f"latency on {provider.name} (ms; {latency.iterations} interleaved runs each after "
             f"{latency.warmup} warm-up, graph optimizations all"
             + (f", {latency.threads} threads)" if latency.threads else ")")]
    rows = [[label, f"{t.median_ms:.3f}", f"{t.p90_ms:.3f}", f"{t.mean_ms:.3f}", f"{t.min_ms:.3f}"]
            for label, t in (("original", latency.original), ("optimized", latency.optimized))]
    lines += table(["model", "median", "p90", "mean", "min"], rows, indent="  ")
    lines.append(f"  speedup (median original / median optimized): {latency.speedup:.2f}x")
    return lines


def _num(value):
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.3g}"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
