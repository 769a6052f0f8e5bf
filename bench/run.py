"""The onnxfold benchmark behind `make bench`. A benchmark, not a test: it prints, never fails.

Sections:
  1. sample networks: node counts and onnxruntime CPU latency of the train-time graph, of
     onnxfold's output and of the re-parameterized oracle, measured interleaved;
  2. optimizer cost on a RepVGG-B3-sized train-time model (~500 MB): time against
     onnx.load + onnx.save, and peak RSS against the file size;
  3. scaling: optimize() time per node on synthetic graphs of 1k, 10k and 100k nodes;
  4. other tools (onnxsim, onnxslim) on the sample networks, where installed;
  5. never slower: onnxfold's output against its input, every train-time sample and each
     model given with --networks (public classification networks exported by you).
Then a summary, also written as JSON to build/bench.json.

    python bench/run.py [--quick] [--large-mb N] [--sections samples,large,scaling,never-slower]
                        [--networks MODEL.onnx ...] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ort.set_default_logger_severity(4)  # probing larger input shapes makes expected errors

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synth  # noqa: E402

from onnxfold import optimize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
WORKER = Path(__file__).resolve().parent / "worker.py"
NETWORKS = ("repvgg_net", "mobileone_net")
TOOLS = ("onnxsim", "onnxslim")
SECTIONS = ("samples", "large", "scaling", "never-slower")


# --- printing ------------------------------------------------------------------------------

def heading(text):
    print(f"\n=== {text} " + "=" * max(0, 86 - len(text)), flush=True)


def print_table(headers, rows):
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


def ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def fmt_ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def mib(n_bytes):
    return f"{n_bytes / 2**20:,.0f} MiB"


def short_error(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:100] if lines else ''}"


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


# --- onnxruntime latency -------------------------------------------------------------------

def make_session(model, threads, spinning=True):
    """A CPU session for timing. spinning=False: intra-op threads that spin while waiting
    for a core make every latency a measure of the neighbours on a shared machine."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def with_dynamic_dims(model, axes):
    """A copy whose input dims `axes` and all output dims are symbolic, no value_info left."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weights = {t.name for t in copy.graph.initializer}
    inputs = [v for v in copy.graph.input if v.name not in weights]
    for value in inputs[:1]:
        for axis in axes:
            value.type.tensor_type.shape.dim[axis].dim_param = f"d{axis}"
    for value in copy.graph.output:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            dim.dim_param = f"out{axis}"
    del copy.graph.value_info[:]
    return copy


def larger_shapes(shape, batch):
    """(input axes made symbolic, enlarged shape): about 16x the pixels of a conv input,
    else `batch` x dim 0; the sample shape last."""
    attempts = []
    spatial = len(shape) - 2
    if len(shape) >= 3:
        factor = max(2, round(16 ** (1 / spatial)))
        attempts.append((range(2, len(shape)), [*shape[:2], *(d * factor for d in shape[2:])]))
    if batch > 1:
        attempts.append(([0], [shape[0] * batch, *shape[1:]]))
    return attempts + [([], list(shape))]


def sessions_for(models, input_shape, batch, threads, enlarge=True):
    """Sessions and one feed for all models, with the largest input that every model takes
    with equal output shapes (the given shape only, unless `enlarge`). Returns (sessions,
    feeds, shape, outputs)."""
    rng = np.random.default_rng(0)
    for axes, shape in larger_shapes(input_shape, batch) if enlarge else [([], list(input_shape))]:
        x = rng.standard_normal(shape).astype(np.float32)
        try:
            sessions = [make_session(with_dynamic_dims(m, axes) if axes else m, threads) for m in models]
            feeds = [{s.get_inputs()[0].name: x} for s in sessions]
            outputs = [s.run(None, f)[0] for s, f in zip(sessions, feeds)]
        except Exception:  # noqa: BLE001 - shapes baked into the graph: try the next shape
            continue
        if len({o.shape for o in outputs}) == 1:
            return sessions, feeds, shape, outputs
    raise RuntimeError("onnxruntime could not run these models")


def interleaved_samples(sessions, feeds, rounds, sample_seconds=0.0015):
    """Seconds per run, one sample per session per round; sessions take turns (A,B,C,C,B,A...)."""
    inner = []
    for session, feed in zip(sessions, feeds):
        for _ in range(5):
            session.run(None, feed)  # warm-up
        started = time.perf_counter()
        session.run(None, feed)
        inner.append(max(1, int(sample_seconds / max(time.perf_counter() - started, 1e-6))))
    samples = [[] for _ in sessions]
    for round_index in range(rounds):
        # Every other round in reverse order: the session that runs first in a round was
        # measured up to 3x slower than the next one, the same model in both places.
        order = list(enumerate(zip(sessions, feeds)))
        for index, (session, feed) in (order if round_index % 2 == 0 else order[::-1]):
            started = time.perf_counter()
            for _ in range(inner[index]):
                session.run(None, feed)
            samples[index].append((time.perf_counter() - started) / inner[index])
    return samples


def paired_ratio(a, b):
    """Median over rounds of a[i] / b[i]: samples taken side by side share the machine's mood."""
    return statistics.median(x / y for x, y in zip(a, b))


# --- section 1 and 4: sample networks ------------------------------------------------------

def sample_entries():
    """Train-time sample models that have an oracle, whole networks first."""
    manifest = SAMPLES / "manifest.json"
    if not manifest.exists():
        return []
    entries = [e for e in json.loads(manifest.read_text())
               if e.get("variant") != "oracle" and e.get("oracle")
               and (SAMPLES / e["file"]).exists() and (SAMPLES / e["oracle"]).exists()]
    return sorted(entries, key=lambda e: (e["block"] not in NETWORKS, e["block"], e["variant"]))


def installed_tools():
    found = {}
    for name in TOOLS:
        try:
            found[name] = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an optional extra, absent or broken
            pass
    return found


def run_tool(name, module, model):
    """(optimized model, seconds) from another tool, its chatter silenced."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if name == "onnxsim":
            result, _ = module.simplify(model)
        else:
            result = module.slim(model)
    return result, time.perf_counter() - started


def bench_sample(entry, tools, args):
    train = onnx.load(str(SAMPLES / entry["file"]))
    oracle = onnx.load(str(SAMPLES / entry["oracle"]))
    folded, report = optimize(train)
    candidates = {"train": train, "onnxfold": folded, "oracle": oracle}
    result = {"name": f"{entry['block']}.{entry['variant']}", "block": entry["block"],
              "variant": entry["variant"], "seconds": {"onnxfold": report.seconds}, "errors": {}}
    for name, module in tools.items():
        try:
            candidates[name], result["seconds"][name] = run_tool(name, module, train)
        except Exception as error:  # noqa: BLE001 - report a tool's failure, go on
            result["errors"][name] = short_error(error)
    result["nodes"] = {k: len(m.graph.node) for k, m in candidates.items()}
    rounds = args.rounds * (2 if entry["block"] in NETWORKS else 1)
    sessions, feeds, shape, outputs = sessions_for(list(candidates.values()), entry["input_shape"],
                                                   args.batch, args.threads)
    samples = dict(zip(candidates, interleaved_samples(sessions, feeds, rounds)))
    result["input_shape"] = shape
    result["latency"] = {name: statistics.median(s) for name, s in samples.items()}
    result["vs_onnxfold"] = {name: paired_ratio(s, samples["onnxfold"]) for name, s in samples.items()}
    result["max_abs_diff"] = float(np.max(np.abs(outputs[1] - outputs[0]))) if outputs[0].size else 0.0
    return result


def fold_vs_oracle(result):
    return 1 / result["vs_onnxfold"]["oracle"]


def bench_samples(args, tools):
    heading("1. sample networks: nodes and onnxruntime CPU latency (train | onnxfold | oracle)")
    entries = sample_entries()
    if not entries:
        print("no sample models with an oracle found in sample_models/ (run `make samples`)")
        return []
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, ORT_ENABLE_ALL, "
          f"intra_op_num_threads={args.threads}; inputs enlarged (16x pixels, else x{args.batch} batch) "
          "where the model allows; "
          f"interleaved, median of {args.rounds} rounds ({2 * args.rounds} for whole networks); "
          "ratios are medians of per-round ratios")
    results, rows = [], []
    for entry in entries:
        try:
            r = bench_sample(entry, tools, args)
        except Exception as error:  # noqa: BLE001 - one broken sample must not stop the bench
            print(f"  {entry['file']}: failed: {short_error(error)}")
            continue
        results.append(r)
        lat, nodes = r["latency"], r["nodes"]
        rows.append([r["name"], "x".join(map(str, r["input_shape"])),
                     f"{nodes['train']}/{nodes['onnxfold']}/{nodes['oracle']}",
                     ms(lat["train"]), ms(lat["onnxfold"]), ms(lat["oracle"]),
                     fmt_ratio(fold_vs_oracle(r)), fmt_ratio(r["vs_onnxfold"]["train"]),
                     f"{r['max_abs_diff']:.1e}"])
    print_table(["model", "input", "nodes t/f/o", "train ms", "onnxfold ms", "oracle ms",
                 "fold/oracle", "train/fold", "max|diff|"], rows)
    return results


def print_tools(results, tools):
    heading("4. other tools on the same sample networks")
    for name in TOOLS:
        if name not in tools:
            print(f"{name}: not installed")
    if not tools or not results:
        return
    print("versions: " + ", ".join(f"{n} {getattr(m, '__version__', '?')}" for n, m in tools.items()))
    headers, rows = ["model", "nodes train", "onnxfold"], []
    for name in tools:
        headers += [name]
    headers += ["fold ms"] + [f"{n} ms" for n in tools] + ["fold s"] + [f"{n} s" for n in tools]
    for r in results:
        row = [r["name"], r["nodes"]["train"], r["nodes"]["onnxfold"]]
        row += [r["nodes"].get(n, "fail") for n in tools]
        row += [ms(r["latency"]["onnxfold"])] + [ms(r["latency"].get(n)) for n in tools]
        row += [f"{r['seconds'][k]:.3f}" if k in r["seconds"] else "-" for k in ("onnxfold", *tools)]
        rows.append(row)
    print_table(headers, rows)
    for r in results:
        for name, error in r["errors"].items():
            print(f"  {r['name']}: {name} failed: {error}")


# --- section 5: never slower ----------------------------------------------------------------

def never_slower_models(args):
    """(name, path, input shape or None) of every train-time sample, then each --networks file."""
    manifest = SAMPLES / "manifest.json"
    entries = json.loads(manifest.read_text()) if manifest.exists() else []
    models = [(f"{e['block']}.{e['variant']}", SAMPLES / e["file"], e.get("input_shape"))
              for e in entries if e.get("variant") != "oracle" and (SAMPLES / e["file"]).exists()]
    return models + [(Path(path).stem, Path(path), None) for path in args.networks]


def first_input_shape(model):
    """The first graph input's shape, symbolic dims as 1."""
    weights = {t.name for t in model.graph.initializer}
    value = next(v for v in model.graph.input if v.name not in weights)
    return [d.dim_value if d.dim_value > 0 else 1 for d in value.type.tensor_type.shape.dim]


def bench_never_slower(args):
    heading("5. never slower: onnxruntime CPU latency of onnxfold's output against its input")
    print(f"interleaved, {args.rounds} rounds over 3 pairs of sessions; ratio = median over the pairs of the "
          "median of per-round onnxfold/input; samples' inputs "
          "enlarged as in section 1, --networks models at their own shape")
    ratios, rows = {}, []
    for name, path, shape in never_slower_models(args):
        try:
            source = onnx.load(str(path))
            folded, _ = optimize(source)
            # Three pairs of fresh sessions, a third of the rounds each, the median of their
            # ratios: two sessions of one graph measured 0.4x to 2x apart on this machine,
            # for as long as they lived. Samples of 10 ms, not 1.5: sub-millisecond blocks
            # on a busy machine otherwise give ratios of a scheduler's time slice.
            pair_ratios, samples = [], [[], []]
            for _ in range(3):
                sessions, feeds, used, _ = sessions_for([source, folded], shape or first_input_shape(source),
                                                        args.batch, args.threads, enlarge=shape is not None)
                pair = interleaved_samples(sessions, feeds, max(1, args.rounds // 3), sample_seconds=0.01)
                pair_ratios.append(paired_ratio(pair[1], pair[0]))
                samples = [samples[0] + pair[0], samples[1] + pair[1]]
        except Exception as error:  # noqa: BLE001 - one broken model must not stop the bench
            print(f"  {name}: failed: {short_error(error)}")
            continue
        ratios[name] = statistics.median(pair_ratios)
        rows.append([name, "x".join(map(str, used)), f"{len(source.graph.node)}/{len(folded.graph.node)}",
                     ms(statistics.median(samples[0])), ms(statistics.median(samples[1])),
                     f"{ratios[name]:.3f}"])
    print_table(["model", "input", "nodes in/out", "input ms", "onnxfold ms", "onnxfold/input"], rows)
    worst = max(ratios, key=ratios.get) if ratios else None
    return {"ratios": ratios, "worst": worst}


# --- worker processes ----------------------------------------------------------------------

def run_worker(*args, timeout=900):
    """Run bench/worker.py in a fresh process; its JSON result, or {'error': ...}."""
    try:
        done = subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        killed = " (killed: out of memory?)" if done.returncode < 0 else ""
        return {"error": f"exit code {done.returncode}{killed}: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(runs, key):
    return statistics.median(run[key] for run in runs)


# --- section 2: a large model --------------------------------------------------------------

def bench_large(args, scratch):
    heading(f"2. optimizer cost on a RepVGG-B3-sized train-time model (--large-mb {args.large_mb:g})")
    scale = synth.width_scale_for(args.large_mb)
    path, out_plain, out_fold = scratch / "large.onnx", scratch / "large.saved.onnx", scratch / "large.fold.onnx"
    started = time.perf_counter()
    model = synth.repvgg_train(scale)
    nodes = len(model.graph.node)
    onnx.save(model, str(path))
    del model
    gc.collect()
    size = path.stat().st_size
    print(f"widths {synth.b3_widths(scale)}, layers {list(synth.B3_LAYERS)}: {nodes} nodes, "
          f"file {mib(size)} (built in {time.perf_counter() - started:.1f} s)")
    plain, folded = [], []
    for _ in range(3):  # side by side: load+save, optimize, load+save, optimize, ...
        plain.append(run_worker("loadsave", path, out_plain))
        folded.append(run_worker("optimize", path, out_fold))
    for name, runs in (("onnx.load + onnx.save", plain), ("onnxfold optimize", folded)):
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            print(f"{name} failed: {errors[0]}\n(try a smaller model: --large-mb 100)")
            return {"error": errors[0], "file_bytes": size}
    result = {
        "file_bytes": size, "nodes_before": folded[0]["nodes_before"], "nodes_after": folded[0]["nodes_after"],
        "loadsave_s": median_of(plain, "total"), "optimize_e2e_s": median_of(folded, "total"),
        "phases_s": {k: median_of(folded, k) for k in ("load", "optimize", "save")},
        "peak_rss_bytes": max(r["peak_rss"] for r in folded),
        "loadsave_peak_rss_bytes": max(r["peak_rss"] for r in plain),
        "rss_at_start_bytes": folded[0]["rss_at_start"],
    }
    result["time_ratio"] = result["optimize_e2e_s"] / result["loadsave_s"]
    result["rss_ratio"] = result["peak_rss_bytes"] / size
    result["loadsave_rss_ratio"] = result["loadsave_peak_rss_bytes"] / size
    print_large(result, plain, folded)
    return result


def print_large(r, plain, folded):
    times = lambda runs: " ".join(f"{x['total']:.2f}" for x in runs)  # noqa: E731
    phases = r["phases_s"]
    rows = [
        ["onnx.load + onnx.save", f"{r['loadsave_s']:.2f}", times(plain),
         mib(r["loadsave_peak_rss_bytes"]), fmt_ratio(r["loadsave_rss_ratio"]), "1.00x"],
        ["onnxfold load+optimize+save", f"{r['optimize_e2e_s']:.2f}", times(folded),
         mib(r["peak_rss_bytes"]), fmt_ratio(r["rss_ratio"]), fmt_ratio(r["time_ratio"])],
    ]
    print_table(["run (fresh process each)", "median s", "runs s", "peak RSS", "RSS/file", "time ratio"], rows)
    print(f"onnxfold phases (median s): load {phases['load']:.2f}, optimize {phases['optimize']:.2f}, "
          f"save {phases['save']:.2f}; nodes {r['nodes_before']} -> {r['nodes_after']}; "
          f"RSS after imports {mib(r['rss_at_start_bytes'])}, peak above that "
          f"{fmt_ratio((r['peak_rss_bytes'] - r['rss_at_start_bytes']) / r['file_bytes'])} the file")
    print(f"goals: time ratio <= 1.5x: {fmt_ratio(r['time_ratio'])}; peak RSS <= 2x file: {fmt_ratio(r['rss_ratio'])}")


# --- section 3: scaling --------------------------------------------------------------------

def predicted_seconds(done, nodes):
    """Extrapolate optimize time to `nodes` from the last two sizes measured (power law)."""
    if len(done) < 2:
        return None
    (n1, t1), (n2, t2) = [(r["nodes_before"], r["optimize_median"]) for r in done[-2:]]
    exponent = max(1.0, math.log(t2 / t1) / math.log(n2 / n1))
    return t2 * (nodes / n2) ** exponent


def bench_scaling(args, scratch):
    heading("3. scaling: optimize() on deep chains of tiny RepVGG + Conv-BN-ReLU blocks")
    sizes = [1000, 10000] + ([] if args.quick else [100000])
    done, rows, skipped = [], [], {}
    for size in sizes:
        guess = predicted_seconds(done, size)
        if guess is not None and guess > args.scaling_budget:
            skipped[size] = f"skipped: predicted {guess:.0f} s > --scaling-budget {args.scaling_budget:g} s"
            rows.append([size, "-", "-", "-", "-", "-", "-", skipped[size]])
            continue
        path = scratch / f"chain{size}.onnx"
        onnx.save(synth.deep_chain(size), str(path))
        repeats = 1 if size >= 100000 or (args.quick and size >= 10000) else 3
        r = run_worker("optimize", path, scratch / f"chain{size}.fold.onnx", repeats,
                       timeout=int(max(args.scaling_budget, 60)))
        if "error" in r:
            skipped[size] = r["error"][:160]
            rows.append([size, "-", "-", "-", "-", "-", "-", skipped[size]])
            continue
        r["size"] = size
        r["us_per_node"] = r["optimize_median"] / r["nodes_before"] * 1e6
        done.append(r)
        rows.append([size, f"{r['nodes_before']} -> {r['nodes_after']}", f"{r['optimize_median']:.2f}",
                     f"{r['us_per_node']:.0f}", f"{r['load'] / r['nodes_before'] * 1e6:.1f}",
                     f"{r['save'] / r['nodes_before'] * 1e6:.1f}", mib(r["peak_rss"]),
                     f"median of {repeats}" if repeats > 1 else "one run"])
    print_table(["size", "nodes", "optimize s", "optimize us/node", "load us/node", "save us/node",
                 "peak RSS", "note"], rows)
    if len(done) >= 2:
        first, last = done[0], done[-1]
        exponent = math.log(last["optimize_median"] / first["optimize_median"]) / \
            math.log(last["nodes_before"] / first["nodes_before"])
        print(f"optimize time grows as nodes^{exponent:.2f} between {first['size']} and {last['size']} "
              "(1.00 = linear)")
    if args.profile and done:
        profile_optimize(scratch / f"chain{done[-1]['size']}.onnx")
    return {"runs": done, "skipped": skipped}


def profile_optimize(path, top=15):
    """cProfile of one optimize() call: the functions with the most time of their own."""
    import cProfile
    import pstats

    model = onnx.load(str(path))
    profiler = cProfile.Profile()
    profiler.runcall(optimize, model)
    print(f"\ncProfile of optimize() on {path.name}, top {top} by own time:")
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    lines = stream.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print("\n".join(line.replace(str(ROOT) + "/", "") for line in lines[start:] if line.strip()))


# --- summary -------------------------------------------------------------------------------

def summary(results):
    heading("summary")
    large = results.get("large")
    if large and "error" not in large:
        print(f"large model ({mib(large['file_bytes'])}): optimize/(load+save) = {fmt_ratio(large['time_ratio'])} "
              f"(goal <= 1.5x); peak RSS/model size = {fmt_ratio(large['rss_ratio'])} (goal <= 2x; "
              f"onnx.load+save alone: {fmt_ratio(large['loadsave_rss_ratio'])})")
    elif large:
        print(f"large model: failed: {large['error']}")
    else:
        print("large model: skipped")
    scaling = results.get("scaling", {})
    per_node = [f"{r['size'] // 1000}k {r['us_per_node']:.0f} us" for r in scaling.get("runs", [])]
    per_node += [f"{size // 1000}k {why}" for size, why in scaling.get("skipped", {}).items()]
    print("optimize time per node: " + ("; ".join(per_node) or "-"))
    never = results.get("never-slower")
    if never and never["worst"]:
        ratios = never["ratios"]
        slower = sorted(name for name, ratio in ratios.items() if ratio > 1.02)
        print(f"never slower: worst onnxfold/input latency {ratios[never['worst']]:.3f} ({never['worst']}) over "
              f"{len(ratios)} models; above 1.02: {', '.join(slower) or 'none'}")
    samples = results.get("samples", [])
    for network in NETWORKS:
        rows = [r for r in samples if r["block"] == network]
        text = ", ".join(f"{r['variant']} {fmt_ratio(fold_vs_oracle(r))}"
                         for r in rows)
        print(f"onnxfold/oracle latency, {network}: {text or '-'}")
    blocks = {r["name"]: fold_vs_oracle(r)
              for r in samples if r["block"] not in NETWORKS}
    if blocks:
        worst = max(blocks, key=blocks.get)
        print(f"onnxfold/oracle latency, blocks: geometric mean {fmt_ratio(geomean(blocks.values()))} "
              f"over {len(blocks)} models, worst {fmt_ratio(blocks[worst])} ({worst})")
    for tool in TOOLS:
        for label, rows in (("networks", [r for r in samples if r["block"] in NETWORKS]),
                            ("blocks", [r for r in samples if r["block"] not in NETWORKS])):
            ratios = [r["vs_onnxfold"].get(tool) for r in rows]
            if any(ratios):
                print(f"{tool}/onnxfold latency, {label}: geometric mean {fmt_ratio(geomean(ratios))}")


def write_json(results):
    target = ROOT / "build" / "bench.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nwrote {target.relative_to(ROOT)}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the large model and the 100k graph")
    parser.add_argument("--large-mb", type=float, default=500, help="size of the large model (default 500)")
    parser.add_argument("--batch", type=int, default=16, help="input batch multiplier where the model allows")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=60, help="latency rounds per block (2x for networks)")
    parser.add_argument("--scaling-budget", type=float, default=300,
                        help="skip (or stop) a scaling size whose optimize() would take longer (s)")
    parser.add_argument("--networks", nargs="*", default=[],
                        help="more models for the never-slower section (e.g. an exported DenseNet-121)")
    parser.add_argument("--profile", action="store_true", help="cProfile optimize() on the largest chain")
    parser.add_argument("--sections", type=lambda text: text.split(","), default=list(SECTIONS),
                        help="comma-separated, of: " + ",".join(SECTIONS) + " (tools come with samples)")
    args = parser.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    print(f"onnxfold bench: python {sys.version.split()[0]}, onnx {onnx.__version__}, "
          f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, sections {','.join(args.sections)}"
          f"{', --quick' if args.quick else ''}")
    tools = installed_tools() if "samples" in args.sections else {}
    results = {"args": vars(args)}
    results["samples"] = bench_samples(args, tools) if "samples" in args.sections else []
    scratch = Path(tempfile.mkdtemp(prefix="onnxfold-bench-", dir="/tmp"))
    try:
        if "large" in args.sections and not args.quick:
            results["large"] = bench_large(args, scratch)
        if "scaling" in args.sections:
            results["scaling"] = bench_scaling(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if "never-slower" in args.sections:
        results["never-slower"] = bench_never_slower(args)
    if "samples" in args.sections:
        print_tools(results["samples"], tools)
    summary(results)
    results["seconds"] = time.perf_counter() - started
    print(f"bench took {results['seconds']:.0f} s")
    write_json(results)


if __name__ == "__main__":
    main()
