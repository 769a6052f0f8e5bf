"""Latency: both models on each provider with ORT_ENABLE_ALL, warm-up runs, then
interleaved runs (original, optimized, original, ...) so that machine noise hits both
alike. Reports the median and p90 in ms and speedup = median(original) / median(optimized).
"""

from __future__ import annotations

import functools
import time

import numpy as np
import onnxruntime as ort

from .report import Latency, Timing
from .sessions import fell_back, run, session


def measure_latency(result, models, candidate, feed, settings, progress=None) -> Latency | None:
    """Latency of both models on the provider of `result`, reusing the candidate session;
    None when onnxruntime would not put the original on that provider.

    progress(provider, runs done, runs in all), if given, is called before the first run
    (0 done) and after each pair of runs.
    """
    ep = result.execution_provider
    original, optimized = models
    reference = session(original, ep, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, settings.threads)
    if fell_back(reference, ep):
        # The optimized model got the provider but the original did not: timing them
        # against each other would compare CPU with GPU, so report no latency at all.
        return None
    runs = ((reference, original), (candidate, optimized))
    tick = functools.partial(progress, result.name) if progress else None
    times = _time_interleaved(runs, feed, settings.warmup, settings.iterations, tick)
    orig_t, opt_t = (_timing(t) for t in times)
    return Latency(orig_t, opt_t, orig_t.median_ms / opt_t.median_ms, settings.warmup,
                   settings.iterations, settings.threads)


def _time_interleaved(runs, feed, warmup, iterations, tick):
    """Per-run milliseconds of each session, runs alternating A, B, A, B... so drift in
    machine load hits both alike. tick(done, total), if given, follows the steps."""
    times = ([], [])
    total = warmup + iterations
    if tick:
        tick(0, total)
    for step in range(total):
        for index, (model_session, model) in enumerate(runs):
            began = time.perf_counter()
            run(model_session, feed, None, model)
            if step >= warmup:
                times[index].append((time.perf_counter() - began) * 1000.0)
        if tick:
            tick(step + 1, total)
    return times


def _timing(values):
    values = np.asarray(values)
    return Timing(float(np.median(values)), float(np.percentile(values, 90)),
                  float(values.mean()), float(values.min()))
