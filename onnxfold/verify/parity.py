"""Output parity: the optimized model's outputs against the original's, element by element.

The reference is ORIGINAL run by onnxruntime on CPU with every graph optimization disabled
(ORT_DISABLE_ALL). With them enabled onnxruntime fuses Conv+BatchNormalization itself, on
both sides alike, and would hide a wrong fold. The candidate is OPTIMIZED on each requested
provider with all graph optimizations on (ORT_ENABLE_ALL), as deployed. Outputs are matched
by name. An element is within tolerance when |candidate - reference| <= atol + rtol *
|reference| (numpy.allclose style, reference on the right). NaN/Inf agree only when both
sides hold the same value (NaN in both, or the same infinity); a NaN/Inf in the candidate
where the reference is finite is a failure.

Default tolerances (by output dtype, settings.FLOAT_TOLERANCES; per-output overrides replace
them, and so do rtol/atol for float outputs)
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
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort

from ..errors import OnnxfoldError
from .models import np_dtype
from .report import OutputResult, ProviderResult
from .sessions import CPU, fallback_reason, fell_back, run, session, unavailable_reason
from .settings import FLOAT_TOLERANCES


def reference_outputs(original, feeds, output_names, threads) -> list:
    """The original's outputs, {name: array} per feed: on CPU, graph optimizations off."""
    reference = session(original, CPU, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, threads)
    return [_outputs(reference, feed, output_names, original) for feed in feeds]


def verify_on(short, ep, optimized, feeds, ref_outputs, tolerances, threads) -> tuple:
    """(ProviderResult, the candidate session or None). The session has the latency
    settings (ORT_ENABLE_ALL) so that timing reuses it."""
    result = ProviderResult(short, ep, "unavailable")
    result.reason = unavailable_reason(ep)
    if result.reason:
        return result, None
    candidate = session(optimized, ep, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, threads)
    if fell_back(candidate, ep):
        result.reason = fallback_reason(ep, candidate)
        return result, None
    result.status = "ran"
    accumulators = {name: Accumulator() for name in tolerances}
    for feed, reference in zip(feeds, ref_outputs):
        outputs = _outputs(candidate, feed, list(tolerances), optimized)
        for name, (dtype, rtol, atol, _) in tolerances.items():
            accumulators[name].add(reference[name], outputs[name], rtol, atol)
    result.outputs = [accumulators[name].result(name, *tolerances[name], ref_outputs[0][name])
                      for name in tolerances]
    result.passed = all(o.passed for o in result.outputs)
    return result, candidate


def _outputs(model_session, feed, output_names, model):
    return dict(zip(output_names, run(model_session, feed, output_names, model)))


def check_tolerance_names(settings, output_names) -> None:
    """Refuse a per-output tolerance for an output the model does not have (a typo would
    otherwise leave that output at the default tolerance, silently)."""
    unknown = [name for name in settings.output_tolerances if name not in output_names]
    if unknown:
        raise OnnxfoldError(f"tolerance given for unknown output '{unknown[0]}'; outputs: "
                            + ", ".join(output_names))


def tolerances(output_types, ref_outputs, settings) -> dict:
    """{output: (dtype, rtol, atol, max|reference|)}, precedence: per output, global, default.
    The global rtol/atol are for float outputs only: integers and bools stay exact (an index
    off by one, a flipped flag, is never rounding), unless a per-output tolerance names them."""
    chosen = {}
    for name, (elem_type, _) in output_types.items():
        dtype = np_dtype(elem_type)
        ref_max = _max_abs(r[name] for r in ref_outputs)
        if dtype.kind in "iub":
            default, overall = (0.0, 0.0), (None, None)
        else:
            default_rtol, scale = FLOAT_TOLERANCES[dtype]
            default = (default_rtol, scale * (ref_max if ref_max > 0 else 1.0))
            overall = (settings.rtol, settings.atol)
        out_rtol, out_atol = settings.output_tolerances.get(name, (None, None))
        rtol = next(v for v in (out_rtol, overall[0], default[0]) if v is not None)
        atol = next(v for v in (out_atol, overall[1], default[1]) if v is not None)
        chosen[name] = (dtype, float(rtol), float(atol), ref_max)
    return chosen


def _max_abs(arrays):
    best = 0.0
    for array in arrays:
        values = np.abs(np.asarray(array, dtype=np.float64))
        values = values[np.isfinite(values)]
        if values.size:
            best = max(best, float(values.max()))
    return best


class Accumulator:
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
