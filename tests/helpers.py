"""Shared test helpers: models from ONNX text, seeded weights, and onnxruntime parity."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort


def model_from_text(text, data=None, seed=0):
    """Parse an ONNX text model; every graph input not named in `data` becomes a seeded weight.

    Inputs named var* get positive values (they are variances); the rest are normal.
    By default only the first input is data.
    """
    model = onnx.parser.parse_model(text)
    data = set(data or [model.graph.input[0].name])
    rng = np.random.default_rng(seed)
    keep = []
    for info in model.graph.input:
        if info.name in data:
            keep.append(info)
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
        shape = [d.dim_value for d in info.type.tensor_type.shape.dim]
        if info.name.startswith("var"):
            values = rng.uniform(0.5, 2.0, size=shape)
        else:
            values = rng.normal(size=shape)
        model.graph.initializer.append(onnx.numpy_helper.from_array(values.astype(dtype), info.name))
    del model.graph.input[:]
    model.graph.input.extend(keep)
    onnx.checker.check_model(model)
    return model


def random_feeds(model, seed=1):
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in model.graph.input:
        tensor_type = info.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = [d.dim_value if d.dim_value > 0 else 1 for d in tensor_type.shape.dim]
        feeds[info.name] = rng.uniform(-1, 1, size=shape).astype(dtype)
    return feeds


def run(model, feeds, optimize_graph=False):
    """Outputs of `model` in onnxruntime on the CPU; graph optimizations off by default."""
    options = ort.SessionOptions()
    if not optimize_graph:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def assert_same_function(original, optimized, rtol=1e-5, feeds=None):
    """Every output of `optimized` matches `original` (the reference, run unoptimized)."""
    feeds = feeds or random_feeds(original)
    expected, actual = run(original, feeds), run(optimized, feeds)
    assert list(expected) == list(actual), "output names changed"
    for name, reference in expected.items():
        wide = reference.dtype == np.float16
        tolerance = dict(rtol=1e-2, atol=1e-2) if wide else dict(rtol=rtol, atol=rtol * max(1.0, float(np.abs(reference).max())))
        np.testing.assert_allclose(actual[name].astype(np.float64), reference.astype(np.float64),
                                   err_msg=f"output {name}", **tolerance)


def op_counts(model):
    counts = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def bench_module(relative: str):
    """A module of bench/ (not a package), e.g. "public/compare.py", imported from its file."""
    path = Path(__file__).resolve().parents[1] / "bench" / relative
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
