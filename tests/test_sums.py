"""Sum trees (DESIGN algebra 14) and parallel Linear heads (13), checked in onnxruntime."""

from __future__ import annotations

import onnx
import pytest

from onnxfold import optimize

from .helpers import assert_same_function, model_from_text, op_counts

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
CONVS = "float[1,4,8,8] x, float[4,4,3,3] Wa, float[4,4,1,1] Wb, float[4,4,3,3] Wc"


def _optimized(text, data=None, skip=None):
    model = model_from_text(HEADER + text, data)
    optimized, report = optimize(model, skip=skip)
    onnx.checker.check_model(optimized, full_check=True)
    assert_same_function(model, optimized)
    return op_counts(optimized), report


def test_a_three_input_sum_of_convs_is_one_conv():
    counts, _ = _optimized(f"""
g ({CONVS}) => (float[1,4,8,8] y) {{
  a = Conv<pads=[1,1,1,1]>(x, Wa)
  b = Conv(x, Wb)
  c = Conv<pads=[1,1,1,1]>(x, Wc)
  y = Sum(a, b, c)
}}""")
    assert counts == {"Conv": 1}


def test_convs_merge_across_a_branch_that_cannot():
    # DBB's order: ((kxk + 1x1) + relu) + kxk, and an identity term at the end
    text = f"""
g ({CONVS}) => (float[1,4,8,8] y) {{
  a = Conv<pads=[1,1,1,1]>(x, Wa)
  b = Conv(x, Wb)
  r = Relu(x)
  c = Conv<pads=[1,1,1,1]>(x, Wc)
  s = Add(a, b)
  t = Add(s, r)
  u = Add(t, c)
  y = Add(x, u)
}}"""
    counts, report = _optimized(text)
    assert counts == {"Conv": 1, "Relu": 1, "Add": 1}, report.render(explain=True)
    left, _ = _optimized(text, skip=["regroup-sums"])
    assert left["Conv"] == 2, "without regrouping the last conv stays apart"


def test_a_partial_sum_read_elsewhere_is_not_regrouped():
    counts, _ = _optimized(f"""
g ({CONVS}) => (float[1,4,8,8] y, float[1,4,8,8] t) {{
  a = Conv<pads=[1,1,1,1]>(x, Wa)
  r = Relu(x)
  c = Conv<pads=[1,1,1,1]>(x, Wc)
  t = Add(a, r)
  y = Add(t, c)
}}""")
    assert counts == {"Conv": 2, "Relu": 1, "Add": 2}


def test_regrouping_across_broadcast_terms_keeps_the_function():
    # a [1,1,8,8] run-time term between the convs: the sum's shape is the broadcast of all
    counts, _ = _optimized("""
g (float[1,4,8,8] x, float[1,1,8,8] z, float[4,4,3,3] Wa, float[4,4,3,3] Wc, float[1,4,1,1] k) => (float[1,4,8,8] y) {
  a = Conv<pads=[1,1,1,1]>(x, Wa)
  c = Conv<pads=[1,1,1,1]>(x, Wc)
  s = Add(a, z)
  t = Add(k, s)
  y = Add(t, c)
}""", data=["x", "z"])
    assert counts == {"Conv": 1, "Add": 1}


def test_the_same_model_gives_the_same_bytes():
    model = model_from_text(HEADER + f"""
g ({CONVS}) => (float[1,4,8,8] y) {{
  a = Conv<pads=[1,1,1,1]>(x, Wa)
  r = Relu(x)
  b = Conv(x, Wb)
  c = Conv<pads=[1,1,1,1]>(x, Wc)
  y = Sum(a, r, b, c)
}}""")
    first, _ = optimize(model)
    second, _ = optimize(model)
    assert first.SerializeToString() == second.SerializeToString()
    assert op_counts(first) == {"Conv": 1, "Relu": 1, "Add": 1}


HEADS = "float[3,5] x, float[4,5] A, float[4] a, float[4,5] B, float[4] b"


@pytest.mark.parametrize("average", ["Div(s, two)", "Mul(half, s)"])
def test_averaged_distillation_heads_are_one_gemm(average):
    counts, report = _optimized(f"""
g ({HEADS}) => (float[3,4] y) {{
  two = Constant<value = float {{2.0}}>()
  half = Constant<value = float {{0.5}}>()
  h = Gemm<transB=1>(x, A, a)
  d = Gemm<transB=1>(x, B, b)
  s = Add(h, d)
  y = {average}
}}""")
    assert counts == {"Gemm": 1}, report.render(explain=True)


def test_averaged_heads_on_tokens_are_one_matmul_and_bias():
    counts, _ = _optimized("""
g (float[2,3,5] x, float[5,4] A, float[4] a, float[5,4] B, float[4] b) => (float[2,3,4] y) {
  two = Constant<value = float {2.0}>()
  ma = MatMul(x, A)
  h = Add(a, ma)
  mb = MatMul(x, B)
  d = Add(mb, b)
  s = Add(h, d)
  y = Div(s, two)
}""")
    assert counts == {"MatMul": 1, "Add": 1}


def test_heads_on_different_inputs_stay_apart():
    counts, _ = _optimized(f"""
g (float[3,5] x, float[3,5] z, float[4,5] A, float[4] a, float[4,5] B, float[4] b) => (float[3,4] y) {{
  h = Gemm<transB=1>(x, A, a)
  d = Gemm<transB=1>(z, B, b)
  y = Add(h, d)
}}""", data=["x", "z"])
    assert counts == {"Gemm": 2, "Add": 1}


def test_a_head_read_elsewhere_stays_apart():
    counts, _ = _optimized(f"""
g ({HEADS}) => (float[3,4] y, float[3,4] h) {{
  h = Gemm<transB=1>(x, A, a)
  d = Gemm<transB=1>(x, B, b)
  y = Add(h, d)
}}""")
    assert counts == {"Gemm": 2, "Add": 1}


@pytest.mark.parametrize("divisor", ["float[3,4] s2", "float[3,1] s2"])
def test_a_divisor_that_is_not_a_feature_scale_stays(divisor):
    counts, _ = _optimized(f"""
g ({HEADS}, {divisor}) => (float[3,4] y) {{
  h = Gemm<transB=1>(x, A, a)
  d = Gemm<transB=1>(x, B, b)
  s = Add(h, d)
  y = Div(s, s2)
}}""")
    assert counts == {"Gemm": 1, "Div": 1}


def test_a_run_time_divisor_stays():
    counts, _ = _optimized(f"""
g (float[3,5] x, float[1] s2, float[4,5] A, float[4] a, float[4,5] B, float[4] b) => (float[3,4] y) {{
  h = Gemm<transB=1>(x, A, a)
  d = Gemm<transB=1>(x, B, b)
  s = Add(h, d)
  y = Div(s, s2)
}}""", data=["x", "s2"])
    assert counts == {"Gemm": 1, "Div": 1}


def _stack(out, keep, axis):
    return f"""
g ({CONVS}) => (float[{out}] y) {{
  a = Conv<pads=[1,1,1,1]>(x, Wa)
  b = Conv(x, Wb)
  c = Conv<pads=[1,1,1,1]>(x, Wc)
  zero = Constant<value = int64[1] {{0}}>()
  sa = Unsqueeze(a, zero)
  sb = Unsqueeze(b, zero)
  sc = Unsqueeze(c, zero)
  s = Concat<axis=0>(sa, sb, sc)
  axis = Constant<value = int64[1] {{{axis}}}>()
  y = ReduceSum<keepdims={keep}>(s, axis)
}}"""


def test_a_stack_summed_over_its_axis_is_one_conv():
    # torch.stack([conv_a(x), conv_b(x), conv_c(x)]).sum(0), as both exporters write it
    counts, report = _optimized(_stack("1,4,8,8", 0, 0))
    assert counts == {"Conv": 1}, report.render(explain=True)


@pytest.mark.parametrize("out, keep, axis", [("1,1,4,8,8", 1, 0), ("3,4,8,8", 0, 1)])
def test_a_stack_summed_otherwise_stays(out, keep, axis):
    counts, _ = _optimized(_stack(out, keep, axis))
    assert counts["ReduceSum"] == 1 and counts["Conv"] == 3


@pytest.mark.parametrize("dtype", ["int64", "int32"])
def test_a_stack_of_values_sum_does_not_take_stays_a_reduce_sum(dtype):
    """Sum runs on float16, float and double only (and bfloat16, not on onnxruntime's CPU):
    an integer stack-sum became a Sum onnxruntime rejects."""
    counts, _ = _optimized(f"""
g ({dtype}[2,3] a, {dtype}[2,3] b) => ({dtype}[2,3] y) {{
  zero = Constant<value = int64[1] {{0}}>()
  sa = Unsqueeze(a, zero)
  sb = Unsqueeze(b, zero)
  s = Concat<axis=0>(sa, sb)
  y = ReduceSum<keepdims=0>(s, zero)
}}""", data=["a", "b"])
    assert counts["ReduceSum"] == 1 and "Sum" not in counts


def test_a_term_summed_twice_is_not_paired_but_the_others_still_merge():
    """Sum(a, a, b, a): a is read three times in any grouping, so no rule merges it; the
    trial Add saw it read once and the tree became three Adds for nothing. With c beside
    b, those two still merge."""
    counts, _ = _optimized(f"""
g ({CONVS}) => (float[1,4,8,8] y) {{
  a = Conv<pads=[1,1,1,1]>(x, Wa)
  b = Conv(x, Wb)
  y = Sum(a, a, b, a)
}}""")
    assert counts == {"Conv": 2, "Sum": 1}
    counts, _ = _optimized(f"""
g ({CONVS}) => (float[1,4,8,8] y) {{
  a = Conv<pads=[1,1,1,1]>(x, Wa)
  b = Conv(x, Wb)
  c = Conv<pads=[1,1,1,1]>(x, Wc)
  y = Sum(a, b, a, c)
}}""")
    assert counts["Conv"] == 2 and counts["Add"] == 2, counts


def test_a_sum_begun_outside_an_if_branch_is_left_to_its_own_graph():
    # s = Relu(x) + k1 outside, y = s + k2 inside the then-branch: the branch may not
    # regroup (and so rewire) the enclosing graph's Add
    import numpy as np
    from onnx import TensorProto, helper

    def value(name):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])

    then = helper.make_graph([helper.make_node("Add", ["s", "k2"], ["yt"])], "then", [], [value("yt")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["ye"])], "other", [], [value("ye")])
    weights = [onnx.numpy_helper.from_array(np.array([[1.0, 2, 3, 4]], np.float32) * i, f"k{i}") for i in (1, 2)]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "k1"], ["s"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)], "g",
        [value("x"), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [value("y")], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    optimized, _ = optimize(model)
    onnx.checker.check_model(optimized, full_check=True)
    for condition in (True, False):
        feeds = {"x": np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4), "cond": np.array(condition)}
        assert_same_function(model, optimized, feeds=feeds)
