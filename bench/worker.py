"""One measurement in a fresh process, so that its peak RSS is its own.

    python bench/worker.py loadsave SOURCE TARGET      onnx.load + onnx.save
    python bench/worker.py optimize SOURCE TARGET [N]  open_model + optimize (N times) + save_model,
                                                       as `onnxfold optimize` does

Prints one JSON line: phase times in seconds, node counts, peak RSS in bytes.
Imports happen before any clock starts.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import onnx

from onnxfold import optimize
from onnxfold.modelio import open_model, save_model


def memory_status(field) -> int:
    """Bytes of a /proc/self/status field: VmRSS (resident now) or VmHWM (peak resident).

    VmHWM, not getrusage's ru_maxrss: on Linux ru_maxrss carries over the parent's peak
    through fork and exec, so a child of a big parent would report the parent's peak.
    """
    with open("/proc/self/status") as status:
        kib = next(line for line in status if line.startswith(field + ":")).split()[1]
    return int(kib) * 1024


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def load_and_save(source, target) -> dict:
    model, load = timed(onnx.load, source)
    _, save = timed(onnx.save, model, target)
    return {"load": load, "save": save, "total": load + save, "nodes": len(model.graph.node)}


def load_optimize_save(source, target, repeats=1) -> dict:
    (model, _), load = timed(open_model, source)
    times = []
    for _ in range(repeats):
        (optimized, report), seconds = timed(optimize, model)
        times.append(seconds)
    _, save = timed(save_model, optimized, target)
    first = times[0]
    return {"load": load, "optimize": first, "optimize_median": statistics.median(times),
            "optimize_all": times, "save": save, "total": load + first + save,
            "nodes_before": report.before["nodes"], "nodes_after": report.after["nodes"]}


def main(argv) -> None:
    mode, source, target = argv[:3]
    rss_at_start = memory_status("VmRSS")
    if mode == "loadsave":
        result = load_and_save(source, target)
    elif mode == "optimize":
        result = load_optimize_save(source, target, int(argv[3]) if len(argv) > 3 else 1)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    result["peak_rss"] = memory_status("VmHWM")
    result["rss_at_start"] = rss_at_start
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
