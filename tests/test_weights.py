"""optimize() frees what a fold used by reference counting, without a whole-heap collection.

A full gc.collect() costs time in proportion to every live object of the process (a
service, a notebook, hypothesis), so optimize must not run one; yet the graph's nodes
and values sit in reference cycles, so whatever they still hold when optimize returns
(the input's tensors, the output's, folded arrays) waits for the cycle collector
unless onnxfold lets go of it.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfold import optimize

CHANNELS = 1024  # a 3x3 conv weight of 36 MiB: above glibc's largest mmap threshold
# (32 MiB), so each such buffer goes back to the system as soon as it is freed.
WEIGHT_MIB = CHANNELS * CHANNELS * 9 * 4 / 2**20


def two_conv_bn(channels=CHANNELS) -> onnx.ModelProto:
    """Two Conv+BN, each with its own large weight: each fold makes a new weight as large.
    (Two convs sharing one weight keep their BNs: the cost guard.)"""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3), np.float32), name)
               for name in ("W", "W2")]
    weights += [numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), name)
                for name in ("gamma", "beta", "mean", "var")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["y1"]),
             helper.make_node("Conv", ["y1", "W2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c2", "gamma", "beta", "mean", "var"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 4, 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def no_automatic_collection():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_after_optimize_the_memory_it_used_is_back_without_the_cycle_collector(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(two_conv_bn(), path)
    optimize(two_conv_bn(channels=8))  # imports and rules loaded once, outside the measure
    with no_automatic_collection():
        baseline = resident_mib()
        # Loads the input: both models are optimize's own. The two BNs share their
        # statistics, so the folded biases are equal: duplicate-weights, which would keep
        # one, is skipped so that every folded value is made and released.
        optimized, report = optimize(path, skip=["duplicate-weights"])
        assert [r.rule for r in report.rewrites].count("fold-bn-into-conv") == 2
        assert len(optimized.graph.initializer) == 4  # two folded weights and biases
        del optimized, report
        retained = resident_mib() - baseline
    # Held by the graph's cycles, the input and output would be 4 weights (144 MiB).
    assert retained < WEIGHT_MIB / 2, f"{retained:.0f} MiB still held after optimize"


def test_optimize_runs_no_garbage_collection():
    collections = []

    def record(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    model = two_conv_bn(channels=8)
    gc.callbacks.append(record)
    try:
        with no_automatic_collection():  # so every collection seen is one optimize asked for
            collections.clear()
            optimize(model)
            asked_for = list(collections)
    finally:
        gc.callbacks.remove(record)
    assert asked_for == []


def test_a_weight_sample_is_kept_while_the_weight_holds_the_same_values():
    import onnx_graphsurgeon as gs

    from onnxfold.weights import release_values, sampled_bytes

    weight = gs.import_onnx(two_conv_bn(channels=4)).tensors()["W"]
    first = sampled_bytes(weight, 8)
    assert sampled_bytes(weight, 8) is first  # kept, not read again
    assert len(sampled_bytes(weight, 4)) == len(first) // 2  # another count is read anew
    weight.values = -np.asarray(weight.values)  # new values: a new sample
    assert sampled_bytes(weight, 8) != first
    release_values(weight)  # nothing of the old values is held once released
    assert "_onnxfold_sample" not in weight.__dict__


def test_a_weight_sample_does_not_keep_values_the_weight_no_longer_holds():
    # A folded weight's array is replaced by its copy in the output model at export: the
    # sample must not keep the array alive (a large model's peak memory doubled).
    import gc
    import weakref

    import onnx_graphsurgeon as gs

    from onnxfold.weights import sampled_bytes

    weight = gs.import_onnx(two_conv_bn(channels=4)).tensors()["W"]
    folded = np.asarray(weight.values) * 2
    weight.values = folded
    first = sampled_bytes(weight, 8)
    gone = weakref.ref(folded)
    weight.values = folded.copy()
    del folded
    gc.collect()
    assert gone() is None
    assert sampled_bytes(weight, 8) == first  # the same bytes, read again from the new values
