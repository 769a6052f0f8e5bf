"""onnxruntime sessions on the providers asked for, and telling when a provider cannot run.

The CUDA provider comes with the `onnxruntime-gpu` package, which is installed *instead of*
`onnxruntime` (uninstall onnxruntime first; both provide the same module). When CUDA is
requested but onnxruntime lacks CUDAExecutionProvider, or a session silently falls back to
CPU, that provider is reported as "unavailable" with the reason and no numbers: CPU numbers
are never reported as CUDA numbers.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import onnxruntime as ort

from ..errors import OnnxfoldError
from ..text import first_line
from .settings import PROVIDERS

CPU = PROVIDERS["cpu"]
CUDA = PROVIDERS["cuda"]


def execution_providers(short_names) -> list:
    """[(short name, execution provider name)] for the settings' providers; None: cpu, plus
    cuda where onnxruntime has it and its library loads."""
    if short_names is None:
        short_names = ["cpu"]
        # onnxruntime-gpu lists CUDA even where the CUDA libraries are missing: only ask for
        # it by default where its library loads (--providers cuda still reports why not).
        if CUDA in ort.get_available_providers() and _provider_library_error(CUDA) is None:
            short_names.append("cuda")
    return [(short, PROVIDERS[short]) for short in short_names]


def session(model, provider, level, threads):
    """An onnxruntime session of `model` on `provider` (CPU as its fallback)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    # Fatal only: onnxruntime logs its errors too (a failed run's, in red) before raising
    # them, and onnxfold words them itself (run, session); its fallback warnings would
    # clutter stderr, and fallback is detected and reported here instead. (A provider
    # library that fails to load is still logged by onnxruntime's process-wide logger.)
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = threads
    chain = [provider] if provider == CPU else [provider, CPU]
    try:
        return ort.InferenceSession(model.source, sess_options=options, providers=chain)
    except Exception as error:  # onnxruntime raises its own classes (Fail, InvalidGraph...)
        raise OnnxfoldError(f"onnxruntime cannot load the {model.role} model on {provider} "
                            f"({first_line(error)})", model.path) from None


def run(session, feed, output_names, model) -> list:
    """The outputs of one run, in the order of `output_names` (None: every output)."""
    try:
        return session.run(output_names, feed)
    except Exception as error:  # onnxruntime raises its own classes
        hint = ("; is an integer input out of range? give it with --input-range NAME:LOW,HIGH"
                if "out of" in str(error) and "bounds" in str(error) else "")
        raise OnnxfoldError(f"onnxruntime failed running the {model.role} model "
                            f"({first_line(error)}){hint}", model.path) from None


def unavailable_reason(ep) -> str | None:
    available = ort.get_available_providers()
    if ep in available:
        return None
    hint = " (install onnxruntime-gpu in place of onnxruntime)" if ep == CUDA else ""
    return (f"{ep} is not in this onnxruntime's providers [{', '.join(available)}]{hint}")


def fell_back(session, ep) -> bool:
    """True when onnxruntime quietly put the session on another provider (e.g. CUDA
    libraries missing): its first provider is then not the one asked for."""
    if ep == CPU:
        return False
    active = session.get_providers()
    return not active or active[0] != ep


def fallback_reason(ep, session) -> str:
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
        return first_line(error)
    return None
