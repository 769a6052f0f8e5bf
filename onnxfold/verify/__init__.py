"""`onnxfold verify`: numerical parity and latency of an optimized model against its original.

settings.py  VerifySettings: what to compare and how, checked when made
models.py    the two models and their signatures, which must agree
feeds.py     the inputs: random data, or the user's .npy/.npz files
ranges.py    what the graph says of an integer input's range (embedding indices, masks)
sessions.py  onnxruntime sessions; when a provider (CUDA) cannot run, and why
parity.py    the outputs compared, element by element, within tolerances
latency.py   both models timed, interleaved
report.py    the results, as JSON and as text

The library prints nothing: a caller that wants to show progress passes a callback.
"""

from __future__ import annotations

import onnxruntime as ort

from .feeds import input_specs, make_feeds
from .latency import measure_latency
from .models import check_signatures, narrowed_inputs, open_model, reordered_outputs, signature
from .parity import check_tolerance_names, reference_outputs, tolerances, verify_on
from .report import VerifyReport
from .sessions import execution_providers
from .settings import VerifySettings

__all__ = ["VerifyReport", "VerifySettings", "verify_models"]


def verify_models(original, optimized, settings: VerifySettings | None = None, progress=None) -> VerifyReport:
    """Compare OPTIMIZED with ORIGINAL: output parity on each provider, then latency.

    original, optimized: paths or onnx.ModelProto. settings: VerifySettings (None: the
    defaults). progress(provider, runs done, runs in all), if given, follows the latency
    runs, which can take a while on a large model.
    Raises OnnxfoldError for every problem with the models or inputs given.
    """
    settings = settings or VerifySettings()
    original, optimized = open_model(original, "original"), open_model(optimized, "optimized")
    orig_sig, opt_sig = signature(original), signature(optimized)
    check_signatures(orig_sig, opt_sig)
    output_names = list(orig_sig["output"])
    check_tolerance_names(settings, output_names)
    specs = input_specs(orig_sig["input"], settings.shapes)
    disagreements = narrowed_inputs(orig_sig["input"], opt_sig["input"]) + reordered_outputs(orig_sig, opt_sig)
    if disagreements:  # the optimized model cannot take the original's place: a failure, not bad input
        return VerifyReport(original.label, optimized.label, ort.__version__, settings.summary(0),
                            [], [], disagreements=disagreements)
    providers = execution_providers(settings.providers)

    notes, warnings = [], []
    feeds, infos = make_feeds(specs, settings, notes, original.proto)
    ref_outputs = reference_outputs(original, feeds, output_names, settings.threads)
    chosen = tolerances(orig_sig["output"], ref_outputs, settings)

    results = []
    for short, ep in providers:
        result, candidate = verify_on(short, ep, optimized, feeds, ref_outputs, chosen, settings.threads)
        if result.status == "ran" and settings.latency:
            result.latency = measure_latency(result, (original, optimized), candidate, feeds[0],
                                             settings, progress)
            if result.latency is None:
                warnings.append(f"{short}: no latency: onnxruntime did not put the original "
                                f"model on {ep}, and timings across providers do not compare")
        if result.status != "ran":
            warnings.append(f"{short} was requested but is unavailable: nothing was verified on it")
        results.append(result)
    if not any(r.status == "ran" for r in results):
        warnings.append("no provider ran, so nothing was verified: the report fails")

    return VerifyReport(original.label, optimized.label, ort.__version__, settings.summary(len(feeds)),
                        infos, results, notes, warnings)
