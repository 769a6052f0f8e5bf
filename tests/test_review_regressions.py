"""Cases an adversarial review found where a fold or clean-up changed the function.

Each builds the smallest model that showed it and checks validity and parity.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxfold import OnnxfoldError, optimize

from .helpers import assert_same_function, model_from_text, op_counts, run

OPSET17 = '<ir_version: 8, opset_import: ["" : 17]>\n'


def check(model, feeds=None):
    optimized, report = optimize(model)
    onnx.checker.check_model(optimized, full_check=True)
    assert_same_function(model, optimized, feeds=feeds)
    return optimized, report


def test_batchnorm_with_statistics_outputs_is_training_mode_before_opset_14():
    model = model_from_text("""<ir_version: 7, opset_import: ["" : 9]>
g (float[2,4,8,8] x, float[6,4,3,3] W, float[6] gamma, float[6] beta, float[6] mean, float[6] var) => (float[2,6,6,6] y) {
  c = Conv(x, W)
  y, rm, rv, sm, sv = BatchNormalization(c, gamma, beta, mean, var)
}""")
    optimized, report = check(model)
    assert "BatchNormalization" in op_counts(optimized)
    assert any("training mode" in m.reason for m in report.misses)


def test_shape_with_start_is_folded_with_its_slice():
    model = onnx.parser.parse_model(OPSET17 + """g (float[2,3,4] x) => (float[2,3,4] y) {
  s = Shape<start=1>(x)
  i = Constant<value=int64 {1}>()
  d = Gather<axis=0>(s, i)
  f = Cast<to=1>(d)
  two = Constant<value=float {2.0}>()
  k = Neg(two)
  m = Mul(x, f)
  y = Mul(m, k)
}""")
    check(model)


def test_integer_arithmetic_through_casts_is_not_elided():
    model = onnx.parser.parse_model(OPSET17 + """g (int64[4] x, float[4] z) => (int64[4] y, float[4] w) {
  xf = Cast<to=1>(x)
  h = Constant<value=float {0.5}>()
  m = Mul(xf, h)
  y = Cast<to=7>(m)
  c = Constant<value=float {2.0}>()
  k = Neg(c)
  w = Mul(z, k)
}""")
    feeds = {"x": np.array([4, 6, -2, 10], np.int64), "z": np.ones(4, np.float32)}
    check(model, feeds)


def test_random_draws_are_not_frozen():
    model = onnx.parser.parse_model(OPSET17 + """g (float[4] x) => (float[4] y) {
  n = RandomNormal<shape=[4]>()
  c = Constant<value=float {2.0}>()
  k = Neg(c)
  m = Mul(x, k)
  y = Add(m, n)
}""")
    optimized, _ = optimize(model)
    assert "RandomNormal" in op_counts(optimized)


def test_custom_domain_ops_with_standard_names_are_left_alone():
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
g (float[2,4] x) => (float[2,4] y) { d = local.Identity(x)  y = Relu(d) }
<domain: "local", opset_import: ["" : 17]>
Identity (a) => (r) { r = Neg(a) }""")
    optimized, _ = check(model)
    assert "Identity" in op_counts(optimized)


def test_a_subgraph_rule_never_reaches_into_the_main_graph():
    model = onnx.parser.parse_model(OPSET17 + """g (float[1,4,8,8] x, bool cond) => (float[1,6,6,6] z, float[1,6,6,6] c) <float[6,4,3,3] W = {""" +
                                    ",".join(["0.1"] * 216) + """}, float[6] gamma = {1,2,3,4,5,6}, float[6] beta = {1,1,1,1,1,1}, float[6] mean = {0,0,0,0,0,0}, float[6] var = {1,1,1,1,1,1}> {
  c = Conv(x, W)
  z = If(cond) <then_branch = t () => (float[1,6,6,6] o) { o = BatchNormalization(c, gamma, beta, mean, var) },
                else_branch = e () => (float[1,6,6,6] o2) { o2 = Neg(c) }>
}""")
    feeds = {"x": np.ones((1, 4, 8, 8), np.float32), "cond": np.array(True)}
    check(model, feeds)


def test_integer_matmul_chain_is_not_folded_into_floats():
    model = model_from_text(OPSET17 + """g (int64[2,3] x, int64[3,4] A, int64[4] a, int64[4,2] B, int64[2] b) => (int64[2,2] y) {
  h = MatMul(x, A)
  ha = Add(h, a)
  m = MatMul(ha, B)
  y = Add(m, b)
}""")
    for init in model.graph.initializer:  # model_from_text draws normals: make them small ints
        values = np.round(onnx.numpy_helper.to_array(init) * 3).astype(np.int64)
        init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    optimized, report = optimize(model)
    onnx.checker.check_model(optimized, full_check=True)
    assert "fold-matmul-chain" not in report.fired()
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    np.testing.assert_array_equal(run(optimized, {"x": x})["y"], run(model, {"x": x})["y"])


def test_bn_statistics_of_another_type_than_the_data_are_left():
    model = model_from_text(OPSET17 + """g (float16[1,4,8,8] x, float[4] gamma, float[4] beta, float[4] mean, float[4] var) => (float16[1,4,6,6] y) {
  p = AveragePool<kernel_shape=[3,3]>(x)
  y = BatchNormalization(p, gamma, beta, mean, var)
}""")
    optimized, report = check(model)
    assert any("mix element types" in m.reason for m in report.misses)


def test_weights_that_are_also_graph_inputs_are_refused():
    model = model_from_text(OPSET17 + """g (float[2,4] x, float[4] one) => (float[2,4] y) {
  a = Mul(x, one)
  y = Relu(a)
}""")
    model.graph.input.append(onnx.helper.make_tensor_value_info("one", onnx.TensorProto.FLOAT, [4]))
    with pytest.raises(OnnxfoldError, match="graph inputs"):
        optimize(model)


def _old_style_conv_bn(ir_version=7):
    """Conv + BN as exporters write it with keep_initializers_as_inputs: opset 8, every
    weight also a graph input (overridable from IR 4 on; see test_adversarial_models for IR 3)."""
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 8]>
g (float[1,3,8,8] x, float[4,3,3,3] W, float[4] gamma, float[4] beta, float[4] mean, float[4] var)
  => (float[1,4,8,8] y) {
  c = Conv<pads=[1,1,1,1]>(x, W)
  y = BatchNormalization(c, gamma, beta, mean, var)
}""")
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                             for t in model.graph.initializer)
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def test_weight_inputs_are_folded_when_asked_to_freeze_them():
    model = _old_style_conv_bn()
    with pytest.raises(OnnxfoldError, match="--freeze-weight-inputs"):
        optimize(model)
    optimized, report = optimize(model, freeze_weight_inputs=True)
    assert [n.op_type for n in optimized.graph.node] == ["Conv"]
    assert [i.name for i in optimized.graph.input] == ["x"]
    assert sorted(report.frozen_inputs) == ["W", "beta", "gamma", "mean", "var"]
    assert optimized.ir_version >= 4
    onnx.checker.check_model(optimized, full_check=True)
    feeds = {"x": np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)}
    assert_same_function(model, optimized, feeds=feeds)  # the weights as stored, not fed


def test_freeze_weight_inputs_from_the_command_line(tmp_path):
    from .test_cli import onnxfold

    source, target, report = tmp_path / "old.onnx", tmp_path / "out.onnx", tmp_path / "report.json"
    onnx.save(_old_style_conv_bn(), str(source))
    refused = onnxfold("optimize", source, target)
    assert refused.returncode == 2 and "--freeze-weight-inputs" in refused.stderr and not target.exists()
    done = onnxfold("optimize", source, target, "--freeze-weight-inputs", "--verify", "--json", report)
    assert done.returncode == 0, done.stderr
    assert "froze 5 weights" in done.stdout and "parity in onnxruntime: passed" in done.stdout
    assert len(json.loads(report.read_text())["frozen_weight_inputs"]) == 5
    check = onnxfold("verify", source, target, "--no-latency")
    assert check.returncode == 0, check.stdout + check.stderr
