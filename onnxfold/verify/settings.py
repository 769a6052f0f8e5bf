"""What a verify run compares and how: one object, checked when it is made."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import OnnxfoldError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}

# dtype -> (rtol, atol as a fraction of max|reference|); parity.py says why.
FLOAT_TOLERANCES = {
    np.dtype(np.float16): (1e-2, 1e-3),
    np.dtype(np.float32): (1e-4, 1e-5),
    np.dtype(np.float64): (1e-7, 1e-9),
}
DEFAULT_INPUT_RANGE = (-1.0, 1.0)


@dataclass(frozen=True)
class VerifySettings:
    """How verify_models compares two models. Every value is checked here, when the
    settings are made (an OnnxfoldError names the bad one); only what needs the models
    (output and input names, shapes) is checked against them later.

    providers: short names ("cpu", "cuda", ...) or full execution-provider names, kept as
        short names; None = "cpu", plus "cuda" where onnxruntime has CUDAExecutionProvider
        and its library loads.
    rtol, atol: tolerances for every float output (atol absolute); None = dtype defaults.
        Integer and bool outputs stay exact.
    output_tolerances: {output name: (rtol, atol)}, either may be None; beats rtol/atol,
        and applies to an output of any dtype (integers included).
    samples: number of random input sets (1 when `inputs` is given).
    input_range: (low, high) of random float inputs; None = (-1, 1).
    input_ranges: {input name: (low, high)} for those inputs, of any numeric dtype; beats
        input_range and the range the graph gives an integer input (see ranges.py).
        Integer inputs take integer bounds; high is excluded for every dtype.
    shapes: {input name: shape} for dynamic dims. A named dim takes one size in every input
        that names it. An unset dynamic batch dim (dim 0) is 1, with a note; any other unset
        dynamic dim is an error.
    inputs: a .npz path (keys = input names), or {input name: .npy path or array}; it must
        cover every input.
    seed: of the random inputs.
    latency=False skips timing; warmup and iterations are runs per model; threads sets
        onnxruntime's intra_op_num_threads.
    """

    providers: tuple | None = None
    rtol: float | None = None
    atol: float | None = None
    output_tolerances: dict = field(default_factory=dict)
    samples: int = 1
    input_range: tuple = DEFAULT_INPUT_RANGE
    input_ranges: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    inputs: object = None
    seed: int = 0
    latency: bool = True
    warmup: int = 5
    iterations: int = 50
    threads: int | None = None

    def __post_init__(self):
        for name, least in (("samples", 1), ("warmup", 0), ("iterations", 1)):
            _check_count(name, getattr(self, name), least)
        _check_count("seed", self.seed, 0)
        if self.threads is not None:
            _check_count("threads", self.threads, 1)
            if self.threads > MAX_THREADS:  # onnxruntime would try to start them all
                raise OnnxfoldError(f"threads must be at most {MAX_THREADS} (4 per CPU here), got {self.threads}")
        _check_tolerance("rtol", self.rtol)
        _check_tolerance("atol", self.atol)
        # Normalized in place (frozen: through object.__setattr__), so that a copy made
        # with dataclasses.replace checks the same values again and passes.
        object.__setattr__(self, "providers", _short_names(self.providers))
        object.__setattr__(self, "input_range", _range(self.input_range))
        object.__setattr__(self, "input_ranges", {name: _range(pair, f"input range of '{name}'")
                                                  for name, pair in (self.input_ranges or {}).items()})
        object.__setattr__(self, "output_tolerances", _output_tolerances(self.output_tolerances))
        object.__setattr__(self, "shapes", dict(self.shapes or {}))

    def summary(self, samples) -> dict:
        """The settings as the report states them; `samples`: the number that ran."""
        return {
            "samples": samples, "seed": self.seed, "input_range": list(self.input_range),
            "input_ranges": {name: list(pair) for name, pair in self.input_ranges.items()},
            "reference": "original on CPUExecutionProvider, graph optimizations disabled",
            "candidate_graph_optimization": "all",
            "latency_graph_optimization": "all" if self.latency else None,
            "warmup": self.warmup if self.latency else None,
            "iterations": self.iterations if self.latency else None,
            "threads": self.threads,
        }


MAX_THREADS = 4 * (os.cpu_count() or 1)


def _check_count(name, value, least):
    if not isinstance(value, int) or value < least:
        raise OnnxfoldError(f"{name} must be an integer >= {least}, got {value!r}")


def _check_tolerance(what, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
            or not math.isfinite(value):
        raise OnnxfoldError(f"{what} must be a finite number >= 0, got {value!r}")


def _range(input_range, what="input range"):
    if input_range is None:
        return DEFAULT_INPUT_RANGE
    try:
        low, high = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise OnnxfoldError(f"{what} must be two numbers (low, high), "
                            f"got {input_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise OnnxfoldError(f"{what} must be finite with low < high, got ({low}, {high})")
    return low, high


def _short_names(providers):
    """The providers as short names, deduplicated, in the order given; None stays None
    (the default depends on the machine: sessions.py decides it)."""
    if providers is None:
        return None
    by_full = {full.lower(): short for short, full in PROVIDERS.items()}
    names = []
    for name in providers:
        key = str(name).strip().lower()
        short = key if key in PROVIDERS else by_full.get(key)
        if short is None:
            raise OnnxfoldError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
        if short not in names:
            names.append(short)
    if not names:
        raise OnnxfoldError("no provider given")
    return tuple(names)


def _output_tolerances(output_tolerances):
    tolerances = dict(output_tolerances or {})
    for name, pair in tolerances.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise OnnxfoldError(f"tolerance for output '{name}' must be (rtol, atol), got {pair!r}")
        _check_tolerance(f"rtol of output '{name}'", pair[0])
        _check_tolerance(f"atol of output '{name}'", pair[1])
    return tolerances
