"""Every clean-up's examples (it must change the graph) and counterexamples (it must not),
run alone and checked in onnxruntime; then merging, provenance and determinism."""

from __future__ import annotations

import tomllib
from pathlib import Path

import onnx
import pytest

from onnxfold import optimize
from onnxfold.cleanups import CLEANUPS, NAMES

from .helpers import assert_same_function, model_from_text, op_counts

CASES = tomllib.loads((Path(__file__).parent / "data" / "cleanups.toml").read_text())["cases"]
HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def _cases(counter):
    for index, case in enumerate(CASES):
        if ("reason" in case) == counter:
            yield pytest.param(case, id=f"{case['cleanup']}-{index}")


def _load(text):
    return model_from_text(text, data=["x"])


def test_every_cleanup_has_examples_and_counterexamples():
    assert sorted({case["cleanup"] for case in CASES}) == sorted(NAMES)
    for step in CLEANUPS:
        kinds = {"reason" in case for case in CASES if case["cleanup"] == step.name}
        assert kinds == {True, False}, f"{step.name} needs an example and a counterexample"


@pytest.mark.parametrize("case", list(_cases(counter=False)))
def test_example_changes_the_graph_and_keeps_the_function(case):
    model = _load(case["model"])
    optimized, report = optimize(model, only=[case["cleanup"]])
    assert report.normalized == {case["cleanup"]: report.normalized[case["cleanup"]]}, "ran alone"
    assert report.normalized[case["cleanup"]] >= 1, report.render()
    # Fewer nodes or weights; an inlined If leaves its Identity links to identity-and-dropout.
    assert (report.after["nodes"], report.after["parameters"]) < (report.before["nodes"], report.before["parameters"]) \
        or case["cleanup"] == "constant-if" and "If" not in report.after["ops"] \
        or case["cleanup"] == "global-average-pool" and "ReduceMean" not in report.after["ops"] \
        or case["cleanup"] == "transpose-as-reshape" and "Transpose" not in report.after["ops"]
    onnx.checker.check_model(optimized, full_check=True)
    assert_same_function(model, optimized)


@pytest.mark.parametrize("case", list(_cases(counter=True)))
def test_counterexample_is_left_alone(case):
    model = _load(case["model"])
    optimized, report = optimize(model, only=[case["cleanup"]])
    assert report.normalized[case["cleanup"]] == 0, f"{case['cleanup']} changed the graph: {case['reason']}"
    assert_same_function(model, optimized)


def test_only_a_rule_keeps_every_cleanup_and_skip_drops_one():
    model = _load(HEADER + "g (float[2,3] x) => (float[2,3] y) { i = Identity(x)\n y = Relu(i) }")
    _, report = optimize(model, only=["fold-bn-into-conv"])
    # regroup-sums, a pass that only lets rules meet their pattern, runs with them
    assert set(report.normalized) == set(NAMES) and report.rules == ["fold-bn-into-conv", "regroup-sums"]
    optimized, report = optimize(model, skip=["identity-and-dropout"])
    assert "identity-and-dropout" not in report.normalized and op_counts(optimized)["Identity"] == 1
    _, report = optimize(model, only=["identity-slice"])
    assert report.rules == [] and list(report.normalized) == ["identity-slice"]


def test_random_draws_are_never_merged():
    model = _load(HEADER + """g (float[2,3] x) => (float[2,3] y) {
      a = RandomUniformLike(x)
      b = RandomUniformLike(x)
      y = Sub(a, b)
    }""")
    optimized, report = optimize(model, only=["common-subexpressions"])
    assert op_counts(optimized)["RandomUniformLike"] == 2 and report.normalized["common-subexpressions"] == 0


def test_merged_nodes_cascade_and_graph_outputs_keep_their_names():
    model = _load(HEADER + """g (float[2,3] x) => (float[2,3] y, float[2,3] z) {
      a = Relu(x)
      b = Relu(x)
      y = Neg(a)
      z = Neg(b)
    }""")
    optimized, _ = optimize(model, only=["common-subexpressions"])
    # Neg(a) and Neg(b) become one once the Relus are, but both outputs stay.
    assert op_counts(optimized) == {"Relu": 1, "Neg": 2}
    assert [o.name for o in optimized.graph.output] == ["y", "z"]
    assert_same_function(model, optimized)


def test_a_weight_that_is_a_graph_output_is_not_merged():
    model = _load(HEADER + """g (float[2,3] x) => (float[2,3] y, float[3] b) <float[3] a = {1.0, 2.0, 3.0}, float[3] b = {1.0, 2.0, 3.0}> {
      p = Add(x, a)
      y = Mul(p, b)
    }""")
    optimized, report = optimize(model, only=["duplicate-weights"])
    assert report.normalized["duplicate-weights"] == 0
    assert_same_function(model, optimized)


def test_a_noop_whose_output_is_a_graph_output_keeps_the_name():
    model = _load(HEADER + """g (float[2,3] x) => (float[2,3] y) <int64[2] s = {2, 3}> {
      r = Relu(x)
      y = Expand(r, s)
    }""")
    optimized, _ = optimize(model, only=["identity-expand"])
    assert op_counts(optimized) == {"Relu": 1} and optimized.graph.output[0].name == "y"
    assert_same_function(model, optimized)


def test_weights_in_an_external_file_are_merged_only_when_every_byte_agrees(tmp_path):
    """Weights left in the model's file are told apart by a few sampled elements read from
    it; a weight equal at every sampled element but one other is still kept apart."""
    import subprocess
    import sys

    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 64)).astype(np.float32)
    near = a.copy()
    near[0, 1] += 1.0  # element 1: between the sampled elements 0 and 64
    model = _load(HEADER + """g (float[64,64] x, float[64,64] a, float[64,64] b, float[64,64] c) => (float[64,64] y) {
      p = MatMul(x, a)
      q = MatMul(p, b)
      y = MatMul(q, c)
    }""")
    values = {"a": a, "b": a, "c": near}
    for weight in model.graph.initializer:
        weight.CopyFrom(onnx.numpy_helper.from_array(values[weight.name], weight.name))
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source), save_as_external_data=True, size_threshold=0)
    done = subprocess.run([sys.executable, "-m", "onnxfold", "optimize", str(source), str(target),
                           "--only", "duplicate-weights"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "duplicate-weights x1" in done.stdout
    optimized = onnx.load(str(target))
    assert sorted(t.name for t in optimized.graph.initializer) == ["a", "c"]
    assert_same_function(onnx.load(str(source)), optimized)


def test_rules_lists_the_cleanups_and_refuses_a_rule_named_like_one(tmp_path):
    import subprocess
    import sys

    def onnxfold(*args):
        return subprocess.run([sys.executable, "-m", "onnxfold", *map(str, args)], capture_output=True, text=True)

    listing = onnxfold("rules")
    assert listing.returncode == 0
    for step in CLEANUPS:
        assert f"{step.name} " in listing.stdout and step.summary in listing.stdout
    from onnxfold.optimize import PASSES  # the folds no rule file expresses: listed and shown too

    for name in PASSES:
        assert f"{name} " in listing.stdout and onnxfold("rules", name).returncode == 0
    shown = onnxfold("rules", "common-subexpressions")
    assert shown.returncode == 0 and "clean-up" in shown.stdout
    rules = tmp_path / "rules"
    rules.mkdir()
    shipped = Path(__file__).parent.parent / "rules" / "merge-reshape-chain.toml"
    (rules / "identity-slice.toml").write_text(shipped.read_text())
    clash = onnxfold("rules", "--rules", rules)
    assert clash.returncode == 2 and "name of a clean-up" in clash.stderr
