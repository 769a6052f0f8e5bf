"""Valid models whose optimized form once failed to load or computed something else:
constant If nodes, dynamic (negative) dims, stale annotations, non-tensor outputs, and
IR version 3. Every written model must pass the checker and load in onnxruntime."""

from __future__ import annotations

import importlib
import json

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnxfold import optimize

from .helpers import assert_same_function, op_counts, run

F = TensorProto.FLOAT
vi = helper.make_tensor_value_info


def _model(nodes, inputs, outputs, initializers=(), value_info=(), opset=17, ir_version=8):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def _valid(optimized):
    """The output passes the checker (with types) and loads in onnxruntime."""
    onnx.checker.check_model(optimized, full_check=True)
    return optimized


def _shape_condition(then_nodes, then_out, else_nodes, else_out, extra=()):
    """If(Shape(x)[0] == 1) as PyTorch exports `if x.shape[0] == 1`, x of shape [1, 4]."""
    then_g = helper.make_graph(then_nodes, "then", [], [vi(then_out, F, None)], list(extra))
    else_g = helper.make_graph(else_nodes, "else", [], [vi(else_out, F, None)])
    return [helper.make_node("Shape", ["x"], ["sh"]),
            helper.make_node("Gather", ["sh", "zero"], ["d0"], axis=0),
            helper.make_node("Equal", ["d0", "one"], ["cond"]),
            helper.make_node("If", ["cond"], ["t0"], then_branch=then_g, else_branch=else_g)]


_INDEX_CONSTANTS = [nh.from_array(np.array(0, np.int64), "zero"), nh.from_array(np.array(1, np.int64), "one")]
_X = {"x": np.array([[-1, 2, -3, 4]], np.float32)}


def test_if_with_shape_derived_condition_becomes_its_branch():
    nodes = _shape_condition([helper.make_node("Relu", ["x"], ["t"])], "t",
                             [helper.make_node("Neg", ["x"], ["e"])], "e")
    model = _model([*nodes, helper.make_node("Sigmoid", ["t0"], ["y"])], [vi("x", F, [1, 4])],
                   [vi("y", F, [1, 4])], _INDEX_CONSTANTS)
    optimized, report = optimize(model)
    assert op_counts(_valid(optimized)) == {"Relu": 1, "Sigmoid": 1}
    assert report.normalized["constant-if"] == 1
    assert_same_function(model, optimized, feeds=_X)


def test_if_whose_condition_is_known_only_at_run_time_stays():
    """The trap: a batch dim that is dynamic (N) makes Shape(x)[0] == 1 a run-time value."""
    nodes = _shape_condition([helper.make_node("Relu", ["x"], ["t"])], "t",
                             [helper.make_node("Neg", ["x"], ["e"])], "e")
    model = _model([*nodes, helper.make_node("Sigmoid", ["t0"], ["y"])], [vi("x", F, ["N", 4])],
                   [vi("y", F, ["N", 4])], _INDEX_CONSTANTS)
    optimized, report = optimize(model)
    assert op_counts(_valid(optimized))["If"] == 1 and report.normalized["constant-if"] == 0
    for batch in (1, 2):  # each branch taken once
        feeds = {"x": np.tile(_X["x"], (batch, 1))}
        np.testing.assert_array_equal(run(optimized, feeds)["y"], run(model, feeds)["y"])


@pytest.mark.parametrize("kind", ["outer value", "branch weight", "read inside too"])
def test_inlined_branch_keeps_outputs_that_no_node_of_it_computes_alone(kind):
    """graph-surgeon's own inlining lost these: the If's output then had no producer."""
    extra, then_nodes, then_out = [], [helper.make_node("Identity", ["x"], ["t"])], "t"
    if kind == "branch weight":
        extra, then_out = [nh.from_array(np.full((1, 4), 3, np.float32), "w")], "w"
    if kind == "read inside too":
        then_nodes, then_out = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "r"], ["s"])], "r"
    nodes = _shape_condition(then_nodes, then_out, [helper.make_node("Neg", ["x"], ["e"])], "e", extra)
    model = _model([*nodes, helper.make_node("Mul", ["t0", "x"], ["y"])], [vi("x", F, [1, 4])],
                   [vi("y", F, [1, 4])], _INDEX_CONSTANTS)
    optimized, _ = optimize(model)
    assert "If" not in op_counts(_valid(optimized))
    assert_same_function(model, optimized, feeds=_X)


def test_two_inlined_ifs_with_the_same_inner_names_stay_distinct():
    nodes = []
    for index, op in enumerate(["Relu", "Neg"]):
        branch = helper.make_graph([helper.make_node(op, ["x"], ["inner"])], f"b{index}", [], [vi("inner", F, None)])
        nodes.append(helper.make_node("If", ["true"], [f"o{index}"], then_branch=branch, else_branch=branch))
    nodes.append(helper.make_node("Add", ["o0", "o1"], ["y"]))
    model = _model(nodes, [vi("x", F, [1, 4])], [vi("y", F, [1, 4])], [nh.from_array(np.array(True), "true")])
    optimized, _ = optimize(model)
    assert "If" not in op_counts(_valid(optimized))
    assert_same_function(model, optimized, feeds=_X)


def test_if_output_that_is_a_graph_output_keeps_its_name():
    nodes = _shape_condition([helper.make_node("Relu", ["x"], ["t"])], "t",
                             [helper.make_node("Neg", ["x"], ["e"])], "e")
    model = _model(nodes, [vi("x", F, [1, 4])], [vi("t0", F, [1, 4])], _INDEX_CONSTANTS)
    optimized, _ = optimize(model)
    assert [o.name for o in _valid(optimized).graph.output] == ["t0"]
    assert op_counts(optimized) == {"Relu": 1}
    assert_same_function(model, optimized, feeds=_X)


def test_negative_dim_value_is_dynamic():
    """onnxruntime takes any size for a dim_value of -1: Shape(x) is not a constant."""
    model = _model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["y"], to=F)],
                   [vi("x", F, [-1, 4])], [vi("y", F, [2])])
    optimized, _ = optimize(model)
    assert "Shape" in op_counts(_valid(optimized))
    feeds = {"x": np.ones((3, 4), np.float32)}
    assert run(optimized, feeds)["y"].tolist() == [3.0, 4.0]
    assert optimized.graph.input[0] == model.graph.input[0]  # declared as it was


def test_stale_value_info_does_not_make_a_reshape_an_identity():
    model = _model([helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Reshape", ["t", "s"], ["y"])],
                   [vi("x", F, [1, 4, 8, 8])], [vi("y", F, [1, 4, 64])],
                   [nh.from_array(np.array([1, 4, 64], np.int64), "s")],
                   value_info=[vi("t", F, [1, 4, 64])])  # stale: Relu keeps [1,4,8,8]
    optimized, _ = optimize(model)
    assert "Reshape" in op_counts(_valid(optimized))
    assert run(optimized, {"x": np.ones((1, 4, 8, 8), np.float32)})["y"].shape == (1, 4, 64)
    assert not [v for v in optimized.graph.value_info if v.name == "t"]  # the stale note is dropped


def test_value_info_that_agrees_with_inference_is_kept():
    model = _model([helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Neg", ["t"], ["y"])],
                   [vi("x", F, [1, 4])], [vi("y", F, [1, 4])], value_info=[vi("t", F, [1, 4])])
    optimized, _ = optimize(model)
    assert [v.name for v in optimized.graph.value_info] == ["t"]


def test_sequence_output_behind_identity_keeps_its_type():
    seq = helper.make_sequence_type_proto(helper.make_tensor_type_proto(F, [1, 4]))
    model = _model([helper.make_node("SplitToSequence", ["x"], ["s"]), helper.make_node("Identity", ["s"], ["y"])],
                   [vi("x", F, [4, 4])], [helper.make_value_info("y", seq)])
    optimized, _ = optimize(model)
    assert optimized.graph.output[0] == model.graph.output[0]
    assert op_counts(_valid(optimized)) == {"SplitToSequence": 1}
    assert len(run(optimized, {"x": np.ones((4, 4), np.float32)})["y"]) == 4


def test_optional_output_behind_identity_keeps_its_type():
    optional = helper.make_optional_type_proto(helper.make_tensor_type_proto(F, [4]))
    model = _model([helper.make_node("Optional", ["x"], ["o"]), helper.make_node("Identity", ["o"], ["y"])],
                   [vi("x", F, [4])], [helper.make_value_info("y", optional)], opset=18)
    optimized, _ = optimize(model)
    assert optimized.graph.output[0] == model.graph.output[0]
    _valid(optimized)
    assert run(optimized, {"x": np.ones(4, np.float32)})["y"].tolist() == [1.0] * 4


# IR version 3: every weight must also be a graph input, and is a constant all the same.

def _ir3_conv_bn(weights_as_constant_nodes=False):
    """Conv + BN as exporters wrote it at IR 3, opset 8."""
    rng = np.random.default_rng(0)
    weights = {"W": rng.normal(size=(4, 3, 3, 3)), "B": rng.normal(size=4), "gamma": rng.uniform(0.5, 2, 4),
               "beta": rng.normal(size=4), "mean": rng.normal(size=4), "var": rng.uniform(0.5, 2, 4)}
    weights = {name: values.astype(np.float32) for name, values in weights.items()}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])]
    inputs, initializers = [vi("x", F, [1, 3, 8, 8])], []
    if weights_as_constant_nodes:
        nodes[:0] = [helper.make_node("Constant", [], [name], value=nh.from_array(v)) for name, v in weights.items()]
    else:
        inputs += [vi(name, F, v.shape) for name, v in weights.items()]
        initializers = [nh.from_array(v, name) for name, v in weights.items()]
    return _model(nodes, inputs, [vi("y", F, [1, 4, 8, 8])], initializers, opset=8, ir_version=3)


_IR3_FEEDS = {"x": np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)}


def test_ir3_weight_inputs_are_constants_and_folded_by_default():
    model = _ir3_conv_bn()
    optimized, report = optimize(model)
    assert op_counts(_valid(optimized)) == {"Conv": 1}
    assert [i.name for i in optimized.graph.input] == ["x"]
    assert optimized.ir_version == 4 and len(report.frozen_inputs) == 6
    assert len(report.warnings) == 1 and "IR version 4 (the input has 3)" in report.warnings[0]
    assert_same_function(model, optimized, feeds=_IR3_FEEDS)


def test_ir3_constant_nodes_become_weights_of_a_valid_model():
    model = _ir3_conv_bn(weights_as_constant_nodes=True)
    optimized, report = optimize(model)
    assert op_counts(_valid(optimized)) == {"Conv": 1}
    assert optimized.ir_version == 4 and report.frozen_inputs == [] and len(report.warnings) == 1
    assert_same_function(model, optimized, feeds=_IR3_FEEDS)


def test_ir3_model_from_the_command_line(tmp_path):
    from .test_cli import onnxfold

    source, target, report = tmp_path / "old.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(_ir3_conv_bn(), str(source))
    done = onnxfold("optimize", source, target, "--verify", "--json", report)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("onnxfold: warning:") == 1 and "IR version 4" in done.stderr
    assert "parity in onnxruntime: passed" in done.stdout
    written = json.loads(report.read_text())
    assert len(written["frozen_weight_inputs"]) == 6 and len(written["warnings"]) == 1
    optimized = onnx.load(str(target))
    assert op_counts(_valid(optimized)) == {"Conv": 1}
    assert_same_function(onnx.load(str(source)), optimized, feeds=_IR3_FEEDS)


def test_a_broken_output_is_an_internal_error(monkeypatch):
    """The pipeline checks what it wrote: an output the checker rejects is never returned."""
    pipeline = importlib.import_module("onnxfold.optimize")  # the package exports a function of that name

    real_export = pipeline.export_model

    def broken_export(graph, original):
        model = real_export(graph, original)
        del model.graph.node[0]  # a value no node computes any more
        return model

    monkeypatch.setattr(pipeline, "export_model", broken_export)
    model = _model([helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Neg", ["t"], ["y"])],
                   [vi("x", F, [1, 4])], [vi("y", F, [1, 4])])
    with pytest.raises(RuntimeError, match="checker"):
        optimize(model)


def test_an_output_onnxruntime_refuses_is_an_internal_error(monkeypatch):
    """The plain checker does not check types: a wrongly declared output passes it, and
    onnxruntime refuses the model. The pipeline loads what it wrote in onnxruntime too."""
    pipeline = importlib.import_module("onnxfold.optimize")
    real_export = pipeline.export_model

    def retyped_export(graph, original):
        model = real_export(graph, original)
        model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64
        return model

    monkeypatch.setattr(pipeline, "export_model", retyped_export)
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", F, [1, 4])], [vi("y", F, [1, 4])])
    with pytest.raises(RuntimeError, match="onnxruntime rejects the optimized model"):
        optimize(model)


def test_subgraph_sequence_output_behind_identity_keeps_its_type_when_inference_cannot_tell():
    """A Loop body's sequence output computed by a custom op (no inference) through Identity."""
    seq = helper.make_sequence_type_proto(helper.make_tensor_type_proto(F, None))
    body = helper.make_graph(
        [helper.make_node("Identity", ["cin"], ["cout"]),
         helper.make_node("MakeSequence", ["sin", "x"], ["s2"], domain="custom"),
         helper.make_node("Identity", ["s2"], ["sout"])],
        "body", [vi("i", TensorProto.INT64, []), vi("cin", TensorProto.BOOL, []), helper.make_value_info("sin", seq)],
        [vi("cout", TensorProto.BOOL, []), helper.make_value_info("sout", seq)])
    graph = helper.make_graph([helper.make_node("SequenceEmpty", [], ["s0"]),
                               helper.make_node("Loop", ["n", "", "s0"], ["sf"], body=body)], "g",
                              [vi("x", F, [2]), vi("n", TensorProto.INT64, [])], [helper.make_value_info("sf", seq)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    model.ir_version = 8
    optimized, _ = optimize(model)
    body = optimized.graph.node[-1].attribute[0].g
    assert [n.op_type for n in body.node].count("Identity") == 1  # the sequence's Identity went
    assert body.output[1].type.WhichOneof("value") == "sequence_type"


@pytest.mark.parametrize("target, value, expected", [
    (TensorProto.FLOAT8E4M3FN, 1000.0, 448.0),  # saturates to the largest finite value
    (TensorProto.FLOAT8E5M2, -1e6, -57344.0),
    (TensorProto.INT4, 7.0, 7.0),
])
def test_cast_like_constant_folds_with_onnx_cast_rules(target, value, expected):
    """CastLike(constant, x) folded with numpy's astype gave NaN where ONNX saturates a
    float8 cast to 448: the fold must follow onnxruntime's Cast."""
    model = _model([helper.make_node("Cast", ["x"], ["low"], to=target),
                    helper.make_node("CastLike", ["c", "low"], ["c_low"]),
                    helper.make_node("Cast", ["c_low"], ["c_back"], to=F),
                    helper.make_node("Add", ["x", "c_back"], ["y"])],
                   [vi("x", F, [1, 4])], [vi("y", F, [1, 4])],
                   [nh.from_array(np.float32([value]), "c")], opset=21, ir_version=10)
    optimized, report = optimize(model)
    _valid(optimized)
    assert "CastLike" not in op_counts(optimized) and report.normalized["constant-subgraphs"] >= 1
    feeds = {"x": np.zeros((1, 4), np.float32)}
    expected_y = run(model, feeds)["y"]
    np.testing.assert_array_equal(expected_y, np.full((1, 4), expected, np.float32))
    np.testing.assert_array_equal(run(optimized, feeds)["y"], expected_y)


def _bn_weights(rng, names=("g", "b", "m", "v")):
    scale = [rng.normal(size=4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.5, 2, 4)]
    return [nh.from_array(values.astype(np.float32), name) for name, values in zip(names, scale)]


def test_a_body_weight_that_shadows_an_outer_one_is_the_one_folded():
    """An If body may define its own g, b, m, v while the enclosing graph has some too
    (lexical scoping, as onnxruntime runs it); graph-surgeon read the outer ones inside the
    body, and the body's Conv+BN was folded with the wrong statistics."""
    rng = np.random.default_rng(0)
    # Each conv its own kernel: a kernel two convs read is not folded (the cost guard).
    then = helper.make_graph([helper.make_node("Conv", ["x", "Wt"], ["c2"]),
                              helper.make_node("BatchNormalization", ["c2", "g", "b", "m", "v"], ["t"])],
                             "then", [], [vi("t", F, [1, 4, 4, 4])], _bn_weights(rng))
    other = helper.make_graph([helper.make_node("Conv", ["x", "We"], ["e"])], "else", [], [vi("e", F, [1, 4, 4, 4])])
    weights = [nh.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), name) for name in ("W", "Wt", "We")]
    model = _model([helper.make_node("Conv", ["x", "W"], ["c"]),
                    helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["o1"]),
                    helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                   [vi("x", F, [1, 3, 4, 4]), vi("cond", TensorProto.BOOL, [])],
                   [vi("y", F, [1, 4, 4, 4]), vi("o1", F, [1, 4, 4, 4])], [*weights, *_bn_weights(rng)])
    optimized, report = optimize(model)
    _valid(optimized)
    assert report.fired() == {"fold-bn-into-conv": 2}
    for cond in (True, False):
        feeds = {"x": rng.normal(size=(1, 3, 4, 4)).astype(np.float32), "cond": np.array(cond)}
        assert_same_function(model, optimized, feeds=feeds)


def test_a_branch_weight_is_overridden_where_a_sibling_branch_reads_the_outer_name():
    """The then-branch holds its own W1, the else-branch reads the outer W1: onnxruntime
    feeds the If the outer W1 and that overrides the branch's weight, so both branches
    read the outer one (onnx.reference agrees). Renaming the branch's W1 apart made the
    then-branch read 100x the values."""
    then = helper.make_graph([helper.make_node("Add", ["x", "W1"], ["o"])], "then", [], [vi("o", F, [4])],
                             [nh.from_array(np.float32([100, 200, 300, 400]), "W1")])
    other = helper.make_graph([helper.make_node("Sub", ["x", "W1"], ["o2"])], "else", [], [vi("o2", F, [4])])
    model = _model([helper.make_node("If", ["cond"], ["r"], then_branch=then, else_branch=other),
                    helper.make_node("Mul", ["r", "W1"], ["y"])],
                   [vi("x", F, [4]), vi("cond", TensorProto.BOOL, [])], [vi("y", F, [4])],
                   [nh.from_array(np.float32([1, 2, 3, 4]), "W1")])
    optimized, _ = optimize(model)
    _valid(optimized)
    for cond in (True, False):
        feeds = {"x": np.zeros(4, np.float32), "cond": np.array(cond)}
        np.testing.assert_array_equal(run(model, feeds)["y"], [1, 4, 9, 16] if cond else [-1, -4, -9, -16])
        assert_same_function(model, optimized, feeds=feeds)


def test_a_loop_body_input_that_shadows_an_outer_value_keeps_its_meaning():
    """The body's input `s` is its loop-carried state, not the outer `s` of the same name."""
    body = helper.make_graph([helper.make_node("Identity", ["keep"], ["keep_out"]),
                              helper.make_node("Add", ["s", "one"], ["s_out"])], "body",
                             [vi("i", TensorProto.INT64, []), vi("keep", TensorProto.BOOL, []), vi("s", F, [4])],
                             [vi("keep_out", TensorProto.BOOL, []), vi("s_out", F, [4])],
                             [nh.from_array(np.ones(4, np.float32), "one")])
    model = _model([helper.make_node("Mul", ["x", "two"], ["s"]),
                    helper.make_node("Loop", ["n", "", "x"], ["y"], body=body),
                    helper.make_node("Add", ["y", "s"], ["z"])],
                   [vi("x", F, [4]), vi("n", TensorProto.INT64, [])], [vi("z", F, [4])],
                   [nh.from_array(np.float32([2, 2, 2, 2]), "two")])
    optimized, _ = optimize(model)
    _valid(optimized)
    feeds = {"x": np.float32([1, 2, 3, 4]), "n": np.array(3, np.int64)}
    np.testing.assert_array_equal(run(optimized, feeds)["z"], run(model, feeds)["z"])


def test_training_info_is_dropped_with_a_warning():
    """training_info binds the weights by name; after a fold replaced W it named nothing."""
    rng = np.random.default_rng(0)
    weight = nh.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "W")
    model = _model([helper.make_node("Conv", ["x", "W"], ["c"]),
                    helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])],
                   [vi("x", F, [1, 3, 4, 4])], [vi("y", F, [1, 4, 4, 4])], [weight, *_bn_weights(rng)])
    training = model.training_info.add()
    training.algorithm.CopyFrom(helper.make_graph([helper.make_node("Identity", ["W"], ["W_new"])], "step", [],
                                                  [vi("W_new", F, [4, 3, 1, 1])]))
    binding = training.update_binding.add()
    binding.key, binding.value = "W", "W_new"
    optimized, report = optimize(model)
    _valid(optimized)
    assert report.fired() == {"fold-bn-into-conv": 1} and not optimized.training_info
    assert any("training_info" in warning for warning in report.warnings)
    assert_same_function(model, optimized)
