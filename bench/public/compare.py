"""onnxfold against onnxsim and onnxslim on the public-model set (`make bench-public`).

A benchmark, not a test: it prints, never fails. Per model of build/benchset/manifest.json
(written by make_set.py): each tool runs 3 times, in a fresh process for the model (a
crash costs that tool's cell, the others run in a new process), and this records
  - node counts of the input and of each tool's output, and the op types a peer removed
    that onnxfold kept (the histogram difference);
  - optimizer wall time, median of 3;
  - onnxruntime CPU latency of the input and of each output, interleaved rounds, as medians
    of per-round ratios against onnxfold's output;
  - parity of each output against the input, with onnxruntime's own graph rewrites off:
    max abs diff on all outputs, with integer inputs drawn within their embedding range; `changed` when it exceeds 1e-3 of the
    reference's magnitude (or shapes differ);
  - whether a tool crashed, refused the model, or printed anything.
Then a table, geometric means, and build/bench-public.json. Latency sessions are run.py's
(ORT_ENABLE_ALL, sequential) with intra-op spinning off.

Runs in the benchset venv (`make benchset`), with onnxfold installed there editable.

    python bench/public/compare.py [--set build/benchset] [--only NAME,...] [--exporters torchscript,dynamo] [--rounds 10] [--threads 2] [--update]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run import (geomean, interleaved_samples, make_session, paired_ratio, print_table,  # noqa: E402
                 short_error)

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("onnxfold", "onnxsim", "onnxslim")
REPEATS = 3
TIMEOUT_S = 900


# --- one tool on one model, in its own process -----------------------------------------------

def tool_function(name):
    if name == "onnxfold":
        from onnxfold import optimize
        return lambda model: optimize(model)[0]
    if name == "onnxsim":
        import onnxsim
        return lambda model: onnxsim.simplify(model)[0]
    import onnxslim
    return onnxslim.slim


class CapturedOutput:
    """Collect what is written on file descriptors 1 and 2, Python's and native libraries' alike."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = [os.dup(1), os.dup(2)]
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()


def run_tool(name, model, target) -> dict:
    function = tool_function(name)
    seconds, printed = [], ""
    for _ in range(REPEATS):
        fresh = onnx.ModelProto()
        fresh.CopyFrom(model)  # a tool may change its argument: each run gets the input as exported
        with CapturedOutput() as captured:
            started = time.perf_counter()
            result = function(fresh)
            seconds.append(time.perf_counter() - started)
        printed = printed or captured.text
    onnx.save(result, target)
    return {"seconds": statistics.median(seconds), "all_seconds": seconds,
            "printed": printed.strip().splitlines()[:3]}


def run_tools(source, scratch, tools) -> None:
    """The child: each tool in turn on one model, one JSON line per tool as it finishes."""
    model = onnx.load(source)
    for name in tools:
        try:
            result = run_tool(name, model, str(Path(scratch) / f"{name}.onnx"))
        except Exception as error:  # noqa: BLE001 - the tool's failure is the finding
            result = {"error": short_error(error)}
        print(json.dumps({"tool": name, **result}), flush=True)


def run_children(source, scratch) -> dict:
    """{tool: result} for every tool, in as few fresh processes as crashes allow: a child
    that dies (a native crash, a timeout) is charged to the tool it was running."""
    results, left = {}, list(TOOLS)
    while left:
        command = [sys.executable, __file__, "--child", str(source), str(scratch), *left]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S * len(left))
            stdout, failure = done.stdout, done.returncode and f"exit code {done.returncode}"
            stderr = done.stderr
        except subprocess.TimeoutExpired as expired:
            stdout = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
            failure, stderr = f"timed out after {TIMEOUT_S * len(left)} s", ""
        for line in stdout.splitlines():
            if line.startswith('{"tool"'):
                entry = json.loads(line)
                results[entry.pop("tool")] = entry
        left = [t for t in left if t not in results]
        if left:
            last = ([ln for ln in stderr.strip().splitlines() if ln.strip()] or [""])[-1].strip()[:200]
            results[left.pop(0)] = {"error": f"{failure or 'no result'}: {last}"}
    return results


# --- inputs, parity and latency ----------------------------------------------------------------

def feeds_for(entry, seed=0):
    """One feed from the manifest: floats standard normal, integers within their range."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in entry["inputs"]:
        if "range" in spec:
            low, high = spec["range"]
            feed[spec["name"]] = rng.integers(low, high + 1, spec["shape"]).astype(spec["dtype"])
        else:
            feed[spec["name"]] = rng.standard_normal(spec["shape"]).astype(spec["dtype"])
    return feed


def parity(reference, outputs):
    """(max abs diff over all outputs, changed?, reordered?) of outputs against the reference's.

    An output that holds the reference's rows (its last axis but one) to the tolerance, in
    another order, is reordered, not changed: a top-k over exactly tied scores (RT-DETR's
    300 queries with random weights) breaks the ties by rounding, in every tool's output
    and in the input's own against itself with onnxruntime's optimizations on.
    """
    if len(reference) != len(outputs) or any(r.shape != o.shape for r, o in zip(reference, outputs)):
        return None, True, False
    diff, changed, reordered = 0.0, False, False
    for r, o in zip(reference, outputs):
        if r.size == 0:
            continue
        r64, o64 = r.astype(np.float64), o.astype(np.float64)
        if not np.array_equal(np.isnan(r64), np.isnan(o64)):
            return float("nan"), True, False
        finite = ~np.isnan(r64)
        tolerance = 1e-3 * max(1.0, float(np.max(np.abs(r64[finite]), initial=0.0)))
        d = float(np.max(np.abs(r64[finite] - o64[finite]), initial=0.0))
        if d > tolerance and not np.isnan(r64).any():
            row_diff = _sorted_rows_diff(r64, o64, tolerance)
            if row_diff is not None and row_diff <= tolerance:
                d, reordered = row_diff, True
        diff, changed = max(diff, d), changed or d > tolerance
    return diff, changed, reordered


def _sorted_rows_diff(r, o, tolerance):
    """Max abs diff of the two arrays with the rows of each matrix (last two axes) sorted,
    on values rounded to the tolerance; None for fewer than two axes."""
    if r.ndim < 2:
        return None
    r, o = (x.reshape(-1, *x.shape[-2:]) for x in (r, o))
    diff = 0.0
    for a, b in zip(r, o):
        a, b = (m[np.lexsort(np.round(m / tolerance).T[::-1])] for m in (a, b))
        diff = max(diff, float(np.max(np.abs(a - b), initial=0.0)))
    return diff


def op_histogram(model):
    return collections.Counter(node.op_type for node in model.graph.node)


def kept_by_onnxfold(fold, peer):
    """Op types of which onnxfold's output has more nodes than the peer's: {op: [fold, peer]}."""
    return {op: [n, peer.get(op, 0)] for op, n in sorted(fold.items()) if n > peer.get(op, 0)}


def bench_entry(entry, folder, scratch, args):
    source = folder / entry["file"]
    result = {"file": entry["file"], "name": entry["name"], "exporter": entry["exporter"],
              "seconds": {}, "errors": {}, "printed": {}}
    models = {"input": onnx.load(str(source))}
    for tool, r in run_children(source, scratch).items():
        if "error" in r:
            result["errors"][tool] = r["error"]
            continue
        result["seconds"][tool] = r["seconds"]
        if r["printed"]:
            result["printed"][tool] = r["printed"]
        models[tool] = onnx.load(str(scratch / f"{tool}.onnx"))
    result["nodes"] = {k: len(m.graph.node) for k, m in models.items()}
    histograms = {k: op_histogram(m) for k, m in models.items()}
    result["ops"] = {k: dict(sorted(h.items())) for k, h in histograms.items()}
    if "onnxfold" in models:
        result["kept_by_onnxfold"] = {peer: kept_by_onnxfold(histograms["onnxfold"], histograms[peer])
                                      for peer in ("onnxsim", "onnxslim") if peer in models}
    measure_outputs(result, models, feeds_for(entry), args)
    return result


def plain_outputs(model, feed, threads):
    """Outputs with onnxruntime's own graph rewrites off: parity judges the tool's, not ORT's."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})


def measure_outputs(result, models, feed, args):
    """Parity against the input and interleaved latency, for every model that runs."""
    sessions, outputs = {}, {}
    for name, model in models.items():
        try:
            outputs[name] = plain_outputs(model, feed, args.threads)
            sessions[name] = make_session(model, args.threads, spinning=False)
        except Exception as error:  # noqa: BLE001 - a tool's output onnxruntime refuses
            result["errors"][f"{name} in onnxruntime"] = short_error(error)
    result["max_abs_diff"], result["changed"] = {}, {}
    for name in sessions:
        if name != "input" and "input" in outputs:
            result["max_abs_diff"][name], result["changed"][name], reordered = parity(outputs["input"], outputs[name])
            if reordered:
                result.setdefault("reordered", []).append(name)
    for name in models:
        if name != "input" and name not in sessions:
            result["changed"][name] = True
    if "onnxfold" not in sessions:
        return
    names = list(sessions)
    feeds = [{i.name: feed[i.name] for i in sessions[n].get_inputs()} for n in names]
    samples = dict(zip(names, interleaved_samples([sessions[n] for n in names], feeds, args.rounds)))
    result["latency"] = {n: statistics.median(s) for n, s in samples.items()}
    result["vs_onnxfold"] = {n: paired_ratio(s, samples["onnxfold"]) for n, s in samples.items()}


# --- report ------------------------------------------------------------------------------------

def cell(value, fmt):
    return "-" if value is None else format(value, fmt)


def print_results(results):
    rows = []
    for r in results:
        nodes, sec, vs, diff = r["nodes"], r["seconds"], r.get("vs_onnxfold", {}), r.get("max_abs_diff", {})
        flags = [f"{t} {'failed' if t in r['errors'] else 'changed'}" for t in TOOLS
                 if t in r["errors"] or r["changed"].get(t)]
        flags += [f"{t} reordered rows" for t in r.get("reordered", [])]
        flags += [f"{t} printed" for t in r["printed"]]
        rows.append([r["file"].removesuffix(".onnx"),
                     "/".join(str(nodes.get(k, "x")) for k in ("input", *TOOLS)),
                     "/".join(cell(sec.get(t), ".2f") for t in TOOLS),
                     cell(r.get("latency", {}).get("onnxfold", None) and r["latency"]["onnxfold"] * 1e3, ".2f"),
                     "/".join(cell(vs.get(k), ".2f") for k in ("input", "onnxsim", "onnxslim")),
                     "/".join(cell(diff.get(t), ".0e") for t in TOOLS),
                     ", ".join(flags)])
    print_table(["model.exporter", "nodes in/fold/sim/slim", "opt s fold/sim/slim", "fold ms",
                 "lat in/sim/slim vs fold", "max|diff| fold/sim/slim", "notes"], rows)


def markdown(results, means, info):
    """The table for the README: nodes, latency against onnxfold's output, optimizer seconds."""
    lines = [f"{info['date']}, " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + "; "
             f"onnxruntime CPU, {info['threads']} threads, {info['rounds']} interleaved rounds", "",
             "| model (exporter) | nodes input / onnxfold / onnxsim / onnxslim "
             "| latency onnxfold ms | onnxsim / onnxfold | onnxslim / onnxfold "
             "| optimizer s onnxfold / onnxsim / onnxslim | onnxfold max abs diff | notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        nodes, sec, vs = r["nodes"], r["seconds"], r.get("vs_onnxfold", {})
        notes = [f"{t}: {r['errors'][t]}" for t in TOOLS if t in r["errors"]]
        notes += [f"{t} changed the function" for t in TOOLS if r["changed"].get(t) and t not in r["errors"]]
        notes += [f"{t}: the input's rows in another order (tied scores)" for t in r.get("reordered", [])]
        latency = r.get("latency", {}).get("onnxfold")
        lines.append(f"| {r['name']} ({r['exporter']}) | " + " / ".join(str(nodes.get(k, "-")) for k in ("input", *TOOLS))
                     + f" | {cell(latency and latency * 1e3, '.2f')} | {cell(vs.get('onnxsim'), '.2f')}x"
                     f" | {cell(vs.get('onnxslim'), '.2f')}x | " + " / ".join(cell(sec.get(t), ".2f") for t in TOOLS)
                     + f" | {cell(r.get('max_abs_diff', {}).get('onnxfold'), '.0e')} | {'; '.join(notes)} |")
    lines += ["", "| geometric mean | value | models |", "| --- | --- | --- |"]
    lines += [f"| {key} | {cell(value, '.2f')}x | {n} |" for key, (value, n) in means.items()]
    return "\n".join(lines) + "\n"


def summary(results):
    """Geometric means over the models where both tools ran."""
    def gm(key_a, key_b, field):
        pairs = [(r[field][key_a], r[field][key_b]) for r in results
                 if key_a in r.get(field, {}) and key_b in r.get(field, {}) and r[field][key_b]]
        return geomean([a / b for a, b in pairs]), len(pairs)

    def gm_latency(peer):
        values = [r["vs_onnxfold"][peer] for r in results if peer in r.get("vs_onnxfold", {})]
        return geomean(values), len(values)

    lines = {}
    for peer in ("onnxsim", "onnxslim"):
        lines[f"nodes onnxfold / {peer}"] = gm("onnxfold", peer, "nodes")
        lines[f"latency {peer} / onnxfold"] = gm_latency(peer)
        lines[f"optimizer time {peer} / onnxfold"] = gm(peer, "onnxfold", "seconds")
    lines["nodes onnxfold / input"] = gm("onnxfold", "input", "nodes")
    lines["latency input / onnxfold"] = gm_latency("input")
    return lines


def print_work_list(results):
    print("\nop types onnxfold kept that a peer removed (onnxfold count -> peer count):")
    for r in results:
        for peer, ops in r.get("kept_by_onnxfold", {}).items():
            if ops:
                text = ", ".join(f"{op} {a}->{b}" for op, (a, b) in ops.items())
                print(f"  {r['file']} vs {peer}: {text}")


def versions():
    import onnxruntime
    import onnxsim
    import onnxslim

    import onnxfold
    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "onnxfold": onnxfold.__version__,
            "onnxsim": getattr(onnxsim, "__version__", "?"), "onnxslim": getattr(onnxslim, "__version__", "?")}


def main(argv) -> int:
    if argv[:1] == ["--child"]:
        run_tools(argv[1], argv[2], argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, default=ROOT / "build" / "benchset")
    parser.add_argument("--only", help="comma-separated model names or files")
    parser.add_argument("--exporters", default="torchscript,dynamo", help="which exports of each model")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench-public.json")
    parser.add_argument("--update", action="store_true",
                        help="keep the other models' results in --json, replace those measured now")
    args = parser.parse_args(argv)
    manifest = args.set / "manifest.json"
    if not manifest.exists():
        print(f"no benchmark set at {args.set} (run `make benchset`)")
        return 0
    entries = [e for e in json.loads(manifest.read_text()) if e["exporter"] in args.exporters.split(",")]
    if args.only:
        wanted = set(args.only.split(","))
        entries = [e for e in entries if e["name"] in wanted or e["file"] in wanted]
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": versions(), "threads": args.threads, "rounds": args.rounds,
            "cpus": os.cpu_count()}
    print(f"{info['date']}; {', '.join(f'{k} {v}' for k, v in info['versions'].items())}; "
          f"onnxruntime CPU, ORT_ENABLE_ALL, {args.threads} threads, {args.rounds} interleaved rounds; "
          f"optimizer time median of {REPEATS}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for entry in entries:
            started = time.perf_counter()
            try:
                r = bench_entry(entry, args.set, Path(scratch), args)
            except Exception as error:  # noqa: BLE001 - one broken model must not stop the bench
                print(f"{entry['file']}: failed: {short_error(error)}", flush=True)
                continue
            results.append(r)
            print(f"{entry['file']}: nodes {r['nodes']}, {time.perf_counter() - started:.0f} s", flush=True)
    if args.update and args.json.exists():
        order = [e["file"] for e in json.loads(manifest.read_text())]
        measured = {r["file"] for r in results}
        kept = [r for r in json.loads(args.json.read_text())["results"] if r["file"] not in measured]
        results = sorted(kept + results, key=lambda r: order.index(r["file"]) if r["file"] in order else len(order))
    print()
    print_results(results)
    means = summary(results)
    print("\ngeometric means (models where both ran):")
    for key, (value, n) in means.items():
        print(f"  {key}: {cell(value, '.2f')}x over {n}")
    print_work_list(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**info, "results": results,
                                     "geomeans": {k: v for k, (v, _) in means.items()}}, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(markdown(results, means, info))
    print(f"\nwrote {args.json} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
