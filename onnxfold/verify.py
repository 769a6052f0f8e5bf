"""`onnxfold verify`: numerical parity and latency of an optimized model against its original.

Parity
    The reference is ORIGINAL run by onnxruntime on CPU with every graph optimization
    disabled (ORT_DISABLE_ALL). With them enabled onnxruntime fuses Conv+BatchNormalization
    itself, on both sides alike, and would hide a wrong fold. The candidate is OPTIMIZED on
    each requested provider with all graph optimizations on (ORT_ENABLE_ALL), as deployed.
    Outputs are matched by name. An element is within tolerance when
    |candidate - reference| <= atol + rtol * |reference| (numpy.allclose style, reference on
    the right). NaN/Inf agree only when both sides hold the same value (NaN in both, or the
    same infinity); a NaN/Inf in the candidate where the reference is finite is a failure.

Default tolerances (by output dtype; --rtol/--atol and per-output overrides replace them)
    float16: rtol 1e-2, atol 1e-3 * max|reference|
    float32: rtol 1e-4, atol 1e-5 * max|reference|
    float64: rtol 1e-7, atol 1e-9 * max|reference|
    integers and bools: exact.
    The absolute part scales with the output's magnitude (max |reference| over all samples,
    taken as 1 when the reference is all zero) because legitimate rounding differences from
    refolding weights grow with the size of the sums, not with each element: elements near
    zero would otherwise fail on pure cancellation noise. A user-given atol is absolute.
    The bounds sit far below what a real folding bug produces (a wrong scale or weight moves
    outputs by 1e-2 or more) yet above the rounding noise of re-associated float sums.

Latency
    Both models on each provider with ORT_ENABLE_ALL: warm-up runs, then interleaved runs
    (original, optimized, original, ...) so that machine noise hits both alike. Reports the
    median and p90 in ms and speedup = median(original) / median(optimized).

CUDA
    The CUDA provider comes with the `onnxruntime-gpu` package, which is installed *instead
    of* `onnxruntime` (uninstall onnxruntime first; both provide the same module). When CUDA is
    requested but onnxruntime lacks CUDAExecutionProvider, or a session silently falls back
    to CPU, that provider is reported as "unavailable" with the reason and no numbers:
    CPU numbers are never reported as CUDA numbers. An unavailable provider does not fail
    parity by itself; the report passes only if parity passes on every provider that ran,
    and at least one did.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import OnnxfoldError
from .graph import dims_of
from .modelio import load_model

CPU = "CPUExecutionProvider"
PROVIDERS = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}

# dtype -> (rtol, atol as a fraction of max|reference|); see the module docstring for why.
FLOAT_TOLERANCES = {
    np.dtype(np.float16): (1e-2, 1e-3),
    np.dtype(np.float32): (1e-4, 1e-5),
    np.dtype(np.float64): (1e-7, 1e-9),
}
DEFAULT_INPUT_RANGE = (-1.0, 1.0)
# Random integer inputs are drawn from [0, 8): small and non-negative, because integer
# inputs are mostly indices (token ids, gather indices) that must stay in range.
INT_RANGE = (0, 8)
PROGRESS_AFTER_S = 2.0


# ----------------------------------------------------------------------------- report


@dataclass
class InputInfo:
    name: str
    dtype: str
    shape: list
    source: str  # "random" or "file"
    range: list | None  # [low, high) of random values; None for bools and file data


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

    @property
    def passed(self) -> bool:
        ran = [p for p in self.providers if p.status == "ran"]
        return bool(ran) and all(p.passed for p in ran)

    def to_dict(self) -> dict:
        """Plain JSON-able dict; non-finite numbers become None (JSON has no NaN/Inf)."""
        return _jsonable({"passed": self.passed, **dataclasses.asdict(self)})

    def render(self) -> str:
        return "\n".join(_render(self)) + "\n"


# ----------------------------------------------------------------------------- entry point


def verify_models(original, optimized, *, providers=None, rtol=None, atol=None,
                  output_tolerances=None, samples=1, input_range=None, shapes=None,
                  inputs=None, seed=0, latency=True, warmup=5, iterations=50,
                  threads=None, progress=False) -> VerifyReport:
    """Compare OPTIMIZED with ORIGINAL: output parity on each provider, then latency.

    original, optimized: paths or onnx.ModelProto.
    providers: short names ("cpu", "cuda", ...) or full execution-provider names;
        None = ["cpu"], plus "cuda" where onnxruntime has CUDAExecutionProvider and its library loads.
    rtol, atol: tolerances for every output (atol absolute); None = dtype defaults.
    output_tolerances: {output name: (rtol, atol)}, either may be None; beats rtol/atol.
    samples: number of random input sets (forced to 1 when `inputs` is given).
    input_range: (low, high) for random float inputs; default (-1, 1).
    shapes: {input name: shape} for dynamic dims. An unset dynamic batch dim (dim 0) is 1,
        with a note; any other unset dynamic dim is an error.
    inputs: a .npz path (keys = input names), or {input name: .npy path or array}; it must
        cover every input.
    latency=False skips timing; warmup/iterations are runs per model; threads sets
        intra_op_num_threads; progress prints a progress line on stderr once timing has
        taken more than about 2 s.
    Raises OnnxfoldError for every problem with the inputs given.
    """
    _check_counts(samples, warmup, iterations, threads)
    low, high = _check_range(input_range)
    original, optimized = _open(original, "original"), _open(optimized, "optimized")
    orig_sig, opt_sig = _signature(original), _signature(optimized)
    _check_signatures(orig_sig, opt_sig)
    output_names = list(orig_sig["output"])
    overrides = _check_overrides(output_tolerances, output_names, rtol, atol)
    specs = _input_specs(orig_sig["input"], opt_sig["input"], shapes)
    provider_names = _resolve_providers(providers)

    notes, warnings = [], []
    if inputs is not None:
        feeds, infos = _user_feeds(inputs, specs, notes)
        if samples != 1:
            notes.append(f"inputs come from files, so 1 sample is used (not {samples})")
        samples = 1
    else:
        feeds, infos = _random_feeds(specs, samples, seed, (low, high), notes)

    reference = _session(original, CPU, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, threads)
    ref_outputs = [_run(reference, feed, output_names, original) for feed in feeds]
    tolerances = _tolerances(orig_sig["output"], ref_outputs, rtol, atol, overrides)

    results = []
    for short, ep in provider_names:
        result, candidate = _verify_on(short, ep, optimized, feeds, ref_outputs, tolerances,
                                       threads)
        if result.status == "ran" and latency:
            result.latency = _latency(result, (original, optimized), candidate, feeds[0],
                                      warmup, iterations, threads, progress)
            if result.latency is None:
                warnings.append(f"{short}: no latency: onnxruntime did not put the original "
                                f"model on {ep}, and timings across providers do not compare")
        if result.status != "ran":
            warnings.append(f"{short} was requested but is unavailable: nothing was verified on it")
        results.append(result)
    if not any(r.status == "ran" for r in results):
        warnings.append("no provider ran, so nothing was verified: the report fails")

    settings = {
        "samples": samples, "seed": seed, "input_range": [low, high],
        "reference": "original on CPUExecutionProvider, graph optimizations disabled",
        "candidate_graph_optimization": "all",
        "latency_graph_optimization": "all" if latency else None,
        "warmup": warmup if latency else None,
        "iterations": iterations if latency else None,
        "threads": threads,
    }
    return VerifyReport(original.label, optimized.label, ort.__version__, settings, infos, results,
                        notes, warnings)


# ----------------------------------------------------------------------------- arguments


def _check_counts(samples, warmup, iterations, threads):
    for name, value, least in (("samples", samples, 1), ("warmup", warmup, 0),
                               ("iterations", iterations, 1)):
        if not isinstance(value, int) or value < least:
            raise OnnxfoldError(f"{name} must be an integer >= {least}, got {value!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise OnnxfoldError(f"threads must be an integer >= 1, got {threads!r}")


def _check_range(input_range):
    if input_range is None:
        return DEFAULT_INPUT_RANGE
    try:
        low, high = (float(v) for v in input_range)
    except (TypeError, ValueError):
        raise OnnxfoldError("input range must be two numbers (low, high), "
                            f"got {input_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise OnnxfoldError(f"input range must be finite with low < high, got ({low}, {high})")
    return low, high


def _resolve_providers(providers):
    """[(short name, execution provider name)], deduplicated, in the order given."""
    if providers is None:
        providers = ["cpu"]
        # onnxruntime-gpu lists CUDA even where the CUDA libraries are missing: only ask for
        # it by default where its library loads (--providers cuda still reports why not).
        cuda = PROVIDERS["cuda"]
        if cuda in ort.get_available_providers() and _provider_library_error(cuda) is None:
            providers.append("cuda")
    by_full = {full.lower(): short for short, full in PROVIDERS.items()}
    resolved = []
    for name in providers:
        key = str(name).strip().lower()
        short = key if key in PROVIDERS else by_full.get(key)
        if short is None:
            raise OnnxfoldError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")
        if (short, PROVIDERS[short]) not in resolved:
            resolved.append((short, PROVIDERS[short]))
    if not resolved:
        raise OnnxfoldError("no provider given")
    return resolved


def _check_overrides(output_tolerances, output_names, rtol, atol):
    for name, value in (("rtol", rtol), ("atol", atol)):
        _check_tolerance(name, value)
    overrides = dict(output_tolerances or {})
    for name, pair in overrides.items():
        if name not in output_names:
            raise OnnxfoldError(f"tolerance given for unknown output '{name}'; outputs: "
                                + ", ".join(output_names))
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise OnnxfoldError(f"tolerance for output '{name}' must be (rtol, atol), got {pair!r}")
        _check_tolerance(f"rtol of output '{name}'", pair[0])
        _check_tolerance(f"atol of output '{name}'", pair[1])
    return overrides


def _check_tolerance(what, value):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
            or not math.isfinite(value):
        raise OnnxfoldError(f"{what} must be a finite number >= 0, got {value!r}")


# ----------------------------------------------------------------------------- models


@dataclass
class _Model:
    role: str  # "original" or "optimized"
    proto: onnx.ModelProto
    source: object  # what onnxruntime loads: a path string or serialized bytes
    label: str  # for the report
    path: str | None  # for error messages


def _open(model, role):
    # Paths go to onnxruntime as paths, so that it resolves external data itself and
    # large models need no re-serializing.
    if isinstance(model, onnx.ModelProto):
        return _Model(role, model, model.SerializeToString(), f"<in-memory {role} model>", None)
    return _Model(role, load_model(model), str(model), str(model), str(model))


def _signature(model):
    """{"input": {name: (elem_type, dims)}, "output": {...}}; dims is None when the rank is
    unknown, and holds ints (static), strings (named dynamic) or None (unnamed dynamic)."""
    graph = model.proto.graph
    weights = {t.name for t in graph.initializer}
    signature = {}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        signature[kind] = {}
        for value in values:
            if value.name in weights:  # old-style models list initializers as inputs
                continue
            if value.type.WhichOneof("value") != "tensor_type":
                raise OnnxfoldError(f"{kind} '{value.name}' of the {model.role} model is not a "
                                    "tensor; verify handles tensor inputs and outputs only",
                                    model.path)
            signature[kind][value.name] = _tensor_type(value.type.tensor_type)
    return signature


def _tensor_type(tensor_type):
    if not tensor_type.HasField("shape"):
        return tensor_type.elem_type, None
    return tensor_type.elem_type, dims_of(tensor_type.shape)


def _check_signatures(orig, opt):
    problems = []
    for kind in ("input", "output"):
        a, b = orig[kind], opt[kind]
        problems += [f"{kind} '{n}' is in original but not in optimized" for n in a if n not in b]
        problems += [f"{kind} '{n}' is in optimized but not in original" for n in b if n not in a]
        for name in (n for n in a if n in b):
            if not _compatible(a[name], b[name]):
                problems.append(f"{kind} '{name}': {_describe(a[name])} in original, "
                                f"{_describe(b[name])} in optimized")
    if problems:
        raise OnnxfoldError("the models' signatures differ: " + "; ".join(problems))
    for name, (elem_type, _) in orig["output"].items():
        if _np_dtype(elem_type) is None:
            raise OnnxfoldError(f"output '{name}' has dtype {_dtype_name(elem_type)}, "
                                "which verify cannot compare")


def _compatible(a, b):
    (type_a, dims_a), (type_b, dims_b) = a, b
    if type_a != type_b:
        return False
    if dims_a is None or dims_b is None:
        return True
    if len(dims_a) != len(dims_b):
        return False
    # Only static dims must agree: a dynamic dim on either side accepts anything.
    return all(x == y for x, y in zip(dims_a, dims_b) if isinstance(x, int) and isinstance(y, int))


def _describe(tensor):
    elem_type, dims = tensor
    if dims is None:
        return f"{_dtype_name(elem_type)} (unknown shape)"
    return f"{_dtype_name(elem_type)} {_dims_text(dims)}"


def _dims_text(dims):
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def _np_dtype(elem_type):
    """The numpy dtype for an ONNX element type, or None when verify cannot handle it
    (strings, bfloat16, float8, complex...)."""
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None
    if dtype.kind in "iub" or dtype in FLOAT_TOLERANCES:
        return dtype
    return None


def _dtype_name(elem_type):
    dtype = _np_dtype(elem_type)
    if dtype is not None:
        return dtype.name
    try:
        return onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type {elem_type}"


# ----------------------------------------------------------------------------- inputs


def _input_specs(orig_inputs, opt_inputs, shapes):
    """{name: (dtype, dims)} with static dims from either model; `shapes` still unapplied."""
    shapes = dict(shapes or {})
    unknown = [n for n in shapes if n not in orig_inputs]
    if unknown:
        raise OnnxfoldError(f"shape given for unknown input '{unknown[0]}'; inputs: "
                            + ", ".join(orig_inputs))
    specs = {}
    for name, (elem_type, dims) in orig_inputs.items():
        dims = _merge_dims(dims, opt_inputs[name][1])
        dtype = _np_dtype(elem_type)
        specs[name] = (dtype, elem_type, dims, shapes.get(name))
    return specs


def _merge_dims(a, b):
    if a is None or b is None:
        return a if b is None else b
    return [x if isinstance(x, int) else (y if isinstance(y, int) else x) for x, y in zip(a, b)]


def _shape_for(name, dims, given, notes):
    """The concrete shape to feed `name`: the user's, else static dims with batch 1."""
    if given is not None:
        return _check_given_shape(name, dims, tuple(given), "--shape")
    if dims is None:
        raise OnnxfoldError(f"input '{name}' has no shape in the model; give its shape (--shape)")
    shape = []
    for index, dim in enumerate(dims):
        if isinstance(dim, int):
            shape.append(dim)
            continue
        label = f"'{dim}'" if dim else "unnamed"
        if index != 0:
            raise OnnxfoldError(f"input '{name}' {_dims_text(dims)}: dim {index} ({label}) is "
                                "dynamic and no shape was given for it (--shape)")
        notes.append(f"input '{name}': dynamic batch dim 0 ({label}) set to 1; "
                     "give a shape (--shape) to use another size")
        shape.append(1)
    return tuple(shape)


def _check_given_shape(name, dims, shape, source):
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        raise OnnxfoldError(f"{source} for input '{name}' must be non-negative integers, "
                            f"got {shape}")
    if dims is None:
        return tuple(int(d) for d in shape)
    if len(shape) != len(dims):
        raise OnnxfoldError(f"{source} for input '{name}' has {len(shape)} dims "
                            f"{list(shape)}, the model's has {len(dims)} {_dims_text(dims)}")
    for index, (dim, size) in enumerate(zip(dims, shape)):
        if isinstance(dim, int) and dim != size:
            raise OnnxfoldError(f"{source} for input '{name}' gives dim {index} as {size}, "
                                f"the model fixes it at {dim} {_dims_text(dims)}")
    return tuple(int(d) for d in shape)


def _random_feeds(specs, samples, seed, value_range, notes):
    shapes = {name: _shape_for(name, dims, given, notes)
              for name, (_, _, dims, given) in specs.items()}
    for name, (dtype, elem_type, _, _) in specs.items():
        if dtype is None:
            raise OnnxfoldError(f"input '{name}' has dtype {_dtype_name(elem_type)}, for which "
                                "verify cannot make random data; give the data (--inputs)")
    rng = np.random.default_rng(seed)
    feeds = [{name: random_array(rng, shapes[name], spec[0], value_range)
              for name, spec in specs.items()} for _ in range(samples)]
    infos = [InputInfo(name, spec[0].name, list(shapes[name]), "random",
                       _random_range(spec[0], value_range)) for name, spec in specs.items()]
    return feeds, infos


def random_array(rng, shape, dtype, value_range=DEFAULT_INPUT_RANGE):
    """Random data of `dtype`: floats uniform in value_range, ints in INT_RANGE, bools 50/50."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.uniform(value_range[0], value_range[1], size=shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(INT_RANGE[0], INT_RANGE[1], size=shape, dtype=dtype)
    if dtype.kind == "b":
        return rng.random(size=shape) < 0.5
    raise OnnxfoldError(f"cannot make random data of dtype {dtype}")


def _random_range(dtype, value_range):
    if dtype.kind == "f":
        return list(value_range)
    if dtype.kind in "iu":
        return list(INT_RANGE)
    return None


def _user_feeds(inputs, specs, notes):
    arrays = _load_arrays(inputs, specs)
    missing = [n for n in specs if n not in arrays]
    extra = [n for n in arrays if n not in specs]
    if missing or extra:
        parts = ([f"no data for input(s) {', '.join(missing)}"] if missing else []) + \
                ([f"data for unknown input(s) {', '.join(extra)}"] if extra else [])
        raise OnnxfoldError("; ".join(parts) + f" (model inputs: {', '.join(specs)})")
    feed, infos = {}, []
    for name, (dtype, elem_type, dims, given) in specs.items():
        array = _as_input(name, arrays[name], dtype, elem_type, notes)
        shape = _check_given_shape(name, dims, array.shape, "the data")
        if given is not None and tuple(given) != shape:
            raise OnnxfoldError(f"input '{name}': --shape {list(given)} disagrees with the data's "
                                f"shape {list(shape)}")
        feed[name] = array
        infos.append(InputInfo(name, array.dtype.name, list(shape), "file", None))
    return [feed], infos


def _load_arrays(inputs, specs):
    """{name: array} from a .npz path (or a .npy path for a one-input model) or a dict of
    .npy paths / arrays."""
    if isinstance(inputs, dict):
        return {name: value if isinstance(value, np.ndarray) else _load_npy(value)
                for name, value in inputs.items()}
    data = _np_load(inputs)
    if isinstance(data, np.ndarray):
        if len(specs) != 1:
            raise OnnxfoldError("a single array needs a one-input model; use an .npz keyed by "
                                "input name", inputs)
        return {next(iter(specs)): data}
    with data:
        return {name: data[name] for name in data.files}


def _load_npy(path):
    data = _np_load(path)
    if not isinstance(data, np.ndarray):
        raise OnnxfoldError("expected one array (.npy), found an archive (.npz)", path)
    return data


def _np_load(path):
    path = Path(path)
    if not path.is_file():
        raise OnnxfoldError("no such file", path)
    try:
        # allow_pickle=False: an input file must not be able to run code.
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise OnnxfoldError(f"not a readable .npy/.npz file ({_first_line(error)})", path) from None


def _as_input(name, array, dtype, elem_type, notes):
    array = np.asarray(array)
    if dtype is None or array.dtype == dtype:
        return array
    # Casting within a kind (float64 -> float32, int32 -> int64) or up from ints/bools is what
    # the user meant; float -> int would silently truncate, so it is refused.
    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise OnnxfoldError(f"input '{name}': the data is {array.dtype}, the model expects "
                            f"{_dtype_name(elem_type)}")
    notes.append(f"input '{name}': data cast from {array.dtype} to {dtype}")
    return array.astype(dtype)


# ----------------------------------------------------------------------------- sessions


def _session(model, provider, level, threads):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    # Errors only: onnxruntime's own fallback warnings would clutter stderr, and
    # fallback is detected and reported here instead. (A provider library that fails to
    # load is still logged by onnxruntime's process-wide logger, as an error.)
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    chain = [provider] if provider == CPU else [provider, CPU]
    try:
        return ort.InferenceSession(model.source, sess_options=options, providers=chain)
    except Exception as error:  # onnxruntime raises its own classes (Fail, InvalidGraph...)
        raise OnnxfoldError(f"onnxruntime cannot load the {model.role} model on {provider} "
                            f"({_first_line(error)})", model.path) from None


def _run(session, feed, output_names, model):
    try:
        values = session.run(output_names, feed)
    except Exception as error:  # onnxruntime raises its own classes
        raise OnnxfoldError(f"onnxruntime failed running the {model.role} model "
                            f"({_first_line(error)})", model.path) from None
    return dict(zip(output_names, values))


def _unavailable_reason(ep):
    available = ort.get_available_providers()
    if ep in available:
        return None
    hint = " (install onnxruntime-gpu in place of onnxruntime)" if ep == PROVIDERS["cuda"] else ""
    return (f"{ep} is not in this onnxruntime's providers [{', '.join(available)}]{hint}")


def _fell_back(session, ep):
    """True when onnxruntime quietly put the session on another provider (e.g. CUDA
    libraries missing): its first provider is then not the one asked for."""
    active = session.get_providers()
    return not active or active[0] != ep


def _fallback_reason(ep, session):
    reason = f"onnxruntime created the session on {', '.join(session.get_providers())} instead of {ep}"
    missing = _provider_library_error(ep)
    if missing:
        return f"{reason}: its provider library does not load ({missing})"
    return f"{reason} (no usable device, or a library it needs is missing)"


def _provider_library_error(ep):
    """The dynamic loader's complaint about EP's shared library, or None when it loads or
    this onnxruntime has none. onnxruntime-gpu lists CUDA as available even where the CUDA
    and cuDNN libraries are absent, then quietly falls back: this names what is missing."""
    name = ep.removesuffix("ExecutionProvider").lower()
    library = next((Path(ort.__file__).parent / "capi").glob(f"*onnxruntime_providers_{name}.*"), None)
    if library is None:
        return None
    try:
        ctypes.CDLL(str(library))
    except OSError as error:
        return _first_line(error)
    return None


# ----------------------------------------------------------------------------- parity


def _verify_on(short, ep, optimized, feeds, ref_outputs, tolerances, threads):
    """(ProviderResult, the candidate session or None). The session has the latency
    settings (ORT_ENABLE_ALL) so that timing reuses it."""
    result = ProviderResult(short, ep, "unavailable")
    result.reason = _unavailable_reason(ep)
    if result.reason:
        return result, None
    candidate = _session(optimized, ep, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads)
    if ep != CPU and _fell_back(candidate, ep):
        result.reason = _fallback_reason(ep, candidate)
        return result, None
    result.status = "ran"
    accumulators = {name: _Accumulator() for name in tolerances}
    for feed, reference in zip(feeds, ref_outputs):
        outputs = _run(candidate, feed, list(tolerances), optimized)
        for name, (dtype, rtol, atol, _) in tolerances.items():
            accumulators[name].add(reference[name], outputs[name], rtol, atol)
    result.outputs = [accumulators[name].result(name, *tolerances[name], ref_outputs[0][name])
                      for name in tolerances]
    result.passed = all(o.passed for o in result.outputs)
    return result, candidate


def _tolerances(output_types, ref_outputs, rtol, atol, overrides):
    """{output: (dtype, rtol, atol, max|reference|)}, precedence: per output, global, default."""
    tolerances = {}
    for name, (elem_type, _) in output_types.items():
        dtype = _np_dtype(elem_type)
        ref_max = _max_abs(r[name] for r in ref_outputs)
        if dtype.kind in "iub":
            default = (0.0, 0.0)
        else:
            default_rtol, scale = FLOAT_TOLERANCES[dtype]
            default = (default_rtol, scale * (ref_max if ref_max > 0 else 1.0))
        out_rtol, out_atol = overrides.get(name, (None, None))
        chosen_rtol = next(v for v in (out_rtol, rtol, default[0]) if v is not None)
        chosen_atol = next(v for v in (out_atol, atol, default[1]) if v is not None)
        tolerances[name] = (dtype, float(chosen_rtol), float(chosen_atol), ref_max)
    return tolerances


def _max_abs(arrays):
    best = 0.0
    for array in arrays:
        values = np.abs(np.asarray(array, dtype=np.float64))
        values = values[np.isfinite(values)]
        if values.size:
            best = max(best, float(values.max()))
    return best


class _Accumulator:
    """Running error statistics of one output over all samples."""

    def __init__(self):
        self.elements = self.finite = self.outside = self.nonfinite = 0
        self.abs_sum = self.max_abs = self.needed_rtol = 0.0
        self.max_rel = None
        self.dot = self.ref_sq = self.cand_sq = 0.0
        self.error = None

    def add(self, ref, cand, rtol, atol):
        ref, cand = np.asarray(ref), np.asarray(cand)
        if ref.shape != cand.shape:
            self.error = (f"shape {list(cand.shape)} in optimized, {list(ref.shape)} in original")
            return
        r, c = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
        finite = np.isfinite(r) & np.isfinite(c)
        # NaN/Inf agree only when identical: NaN in both, or the same infinity.
        bad = ~finite & ~((r == c) | (np.isnan(r) & np.isnan(c)))
        r, c = r[finite], c[finite]
        diff, magnitude = np.abs(c - r), np.abs(r)
        if rtol == 0 and atol == 0:
            # Exact: compare in the native dtype, since float64 cannot hold every int64.
            outside = (ref != cand).ravel()[finite]
        else:
            outside = diff > atol + rtol * magnitude
        self.elements += ref.size
        self.finite += diff.size
        self.nonfinite += int(bad.sum())
        self.outside += int(outside.sum()) + int(bad.sum())
        self.abs_sum += float(diff.sum())
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
        nonzero = magnitude > 0
        if nonzero.any():
            relative = float((diff[nonzero] / magnitude[nonzero]).max())
            self.max_rel = max(self.max_rel or 0.0, relative)
        self.dot += float(r @ c)
        self.ref_sq += float(r @ r)
        self.cand_sq += float(c @ c)
        self.needed_rtol = max(self.needed_rtol, _needed_rtol(diff, magnitude, atol, bad.any()))

    def result(self, name, dtype, rtol, atol, ref_max, first_ref):
        ok = self.error is None
        return OutputResult(
            name=name, dtype=dtype.name, shape=list(np.shape(first_ref)), rtol=rtol, atol=atol,
            elements=self.elements, mismatched=self.outside,
            mismatch_fraction=self.outside / self.elements if self.elements and ok else None,
            nonfinite_mismatches=self.nonfinite,
            max_abs_error=self.max_abs if self.finite and ok else None,
            mean_abs_error=self.abs_sum / self.finite if self.finite and ok else None,
            max_rel_error=self.max_rel if ok else None,
            cosine_similarity=self._cosine() if self.finite and ok else None,
            min_passing_rtol=self.needed_rtol if ok else None,
            reference_max_abs=ref_max,
            passed=ok and self.outside == 0, error=self.error)

    def _cosine(self):
        if self.ref_sq == 0 or self.cand_sq == 0:
            return 1.0 if self.ref_sq == self.cand_sq else 0.0
        return self.dot / (math.sqrt(self.ref_sq) * math.sqrt(self.cand_sq))


def _needed_rtol(diff, magnitude, atol, any_nonfinite):
    """Smallest rtol making every element pass at this atol; inf when none can."""
    if any_nonfinite:
        return math.inf
    over = diff > atol
    if not over.any():
        return 0.0
    if (magnitude[over] == 0).any():
        return math.inf
    return float(((diff[over] - atol) / magnitude[over]).max())


# ----------------------------------------------------------------------------- latency


def _latency(result, models, candidate, feed, warmup, iterations, threads, progress):
    ep = result.execution_provider
    original, optimized = models
    session = _session(original, ep, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads)
    if ep != CPU and _fell_back(session, ep):
        # The optimized model got the provider but the original did not: timing them
        # against each other would compare CPU with GPU, so report no latency at all.
        return None
    runs = ((session, original), (candidate, optimized))
    times = _time_interleaved(runs, feed, warmup, iterations, progress, result.name)
    orig_t, opt_t = (_timing(t) for t in times)
    return Latency(orig_t, opt_t, orig_t.median_ms / opt_t.median_ms, warmup, iterations, threads)


def _time_interleaved(runs, feed, warmup, iterations, progress, label):
    """Per-run milliseconds of each session, runs alternating A, B, A, B... so drift in
    machine load hits both alike."""
    times = ([], [])
    start, shown, total = time.perf_counter(), False, warmup + iterations
    for step in range(total):
        for index, (session, model) in enumerate(runs):
            began = time.perf_counter()
            try:
                session.run(None, feed)
            except Exception as error:  # onnxruntime raises its own classes
                raise OnnxfoldError(f"onnxruntime failed running the {model.role} model "
                                    f"({_first_line(error)})", model.path) from None
            if step >= warmup:
                times[index].append((time.perf_counter() - began) * 1000.0)
        # Only long measurements get a progress line: short ones would just flicker.
        if progress and time.perf_counter() - start > PROGRESS_AFTER_S:
            shown = True
            print(f"\rlatency on {label}: {step + 1}/{total} runs", end="", file=sys.stderr,
                  flush=True)
    if shown:
        print(file=sys.stderr, flush=True)
    return times


def _timing(values):
    values = np.asarray(values)
    return Timing(float(np.median(values)), float(np.percentile(values, 90)),
                  float(values.mean()), float(values.min()))


# ----------------------------------------------------------------------------- rendering


def _render(report):
    settings = report.settings
    lines = [f"onnxfold verify: {'PASS' if report.passed else 'FAIL'}",
             f"original:  {report.original}",
             f"optimized: {report.optimized}",
             f"reference: {settings['reference']}; candidate: optimized, graph optimizations "
             f"{settings['candidate_graph_optimization']}",
             f"onnxruntime {report.onnxruntime_version}; {settings['samples']} sample(s), "
             f"seed {settings['seed']}",
             "", "inputs:"]
    lines += _table(["name", "dtype", "shape", "data"],
                    [[i.name, i.dtype, _dims_text(i.shape), _input_source(i)]
                     for i in report.inputs])
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
    return f"random in [{_num(info.range[0])}, {_num(info.range[1])})"


def _render_provider(provider):
    head = f"parity on {provider.name} ({provider.execution_provider})"
    if provider.status != "ran":
        return [f"{head}: UNAVAILABLE, no numbers reported", f"  reason: {provider.reason}"]
    lines = [f"{head}: {'PASS' if provider.passed else 'FAIL'}"]
    headers = ["output", "dtype", "shape", "max abs", "mean abs", "max rel", "cosine",
               "outside tol", "rtol", "atol", "min rtol", "result"]
    lines += _table(headers, [_output_row(o) for o in provider.outputs])
    for output in provider.outputs:
        if output.error:
            lines.append(f"  output '{output.name}': {output.error}")
        elif output.nonfinite_mismatches:
            lines.append(f"  output '{output.name}': {output.nonfinite_mismatches} NaN/Inf "
                         "value(s) where the original has other values")
    if provider.latency:
        lines += [""] + _render_latency(provider)
    return lines


def _output_row(output):
    cosine = "-" if output.cosine_similarity is None else f"{output.cosine_similarity:.7f}"
    outside = "-" if output.error else f"{output.mismatched}/{output.elements}"
    if output.mismatch_fraction:
        outside += f" ({output.mismatch_fraction:.2%})"
    needed = output.min_passing_rtol
    return [output.name, output.dtype, _dims_text(output.shape), _num(output.max_abs_error),
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
    lines += _table(["model", "median", "p90", "mean", "min"], rows)
    lines.append(f"  speedup (median original / median optimized): {latency.speedup:.2f}x")
    return lines


def _table(headers, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    return ["  " + "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in [headers, *rows]]


def _num(value):
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.3g}"


# ----------------------------------------------------------------------------- helpers


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


def _first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
