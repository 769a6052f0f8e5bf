"""The cost guard: a rewrite may not raise the parameters or multiply-adds it replaces,
unless it is a step towards a merge that removes it (plan.py, rule files' `merge_step`)."""

from __future__ import annotations

import pytest

from onnxfold import optimize
from onnxfold.errors import OnnxfoldError
from onnxfold.ruleset import load_rule_file

from .helpers import assert_same_function, model_from_text, op_counts

# DenseNet's transition: BN -> ReLU -> 1x1 conv -> 2x2 stride-2 average pool. One 2x2
# stride-2 conv has four times the weights and runs slower in onnxruntime.
TRANSITION = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,16,8,8] x, float[16] s, float[16] t, float[16] m, float[16] var, float[8,16,1,1] W) => (float[1,8,4,4] y) {
  n = BatchNormalization(x, s, t, m, var)
  r = Relu(n)
  c = Conv(r, W)
  y = AveragePool<kernel_shape=[2,2], strides=[2,2]>(c)
}
"""

# DBB: the pooled branch becomes a 3x3 conv that merges into the 3x3 next to it.
DBB = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,8,8] x, float[4,4,1,1] W, float[4,4,3,3] K) => (float[1,4,8,8] y) {
  c = Conv(x, W)
  p = AveragePool<kernel_shape=[3,3], pads=[1,1,1,1], count_include_pad=1>(c)
  k = Conv<pads=[1,1,1,1]>(x, K)
  y = Add(k, p)
}
"""


def test_densenet_transition_keeps_its_pointwise_conv():
    model = model_from_text(TRANSITION)
    optimized, report = optimize(model)
    assert op_counts(optimized).get("AveragePool") == 1
    assert report.after["parameters"] <= report.before["parameters"]
    reasons = [m.reason for m in report.misses if m.rule == "fold-avgpool-into-pointwise"]
    assert any("raises the parameters from 128 to 512" in reason for reason in reasons), reasons
    assert "raises the parameters" in report.render(explain=True)
    assert_same_function(model, optimized)


def test_dbb_pooled_branch_still_merges():
    model = model_from_text(DBB)
    optimized, report = optimize(model)
    assert op_counts(optimized) == {"Conv": 1}, report.render(explain=True)
    assert report.after["parameters"] <= report.before["parameters"]
    assert_same_function(model, optimized, rtol=1e-4)


def test_a_weight_two_convs_share_is_not_copied_into_each_fold():
    """Two convs tie one kernel, each with its own BN: each fold would write its own copy
    while the other conv keeps the original, twice the weights. The guard counts a weight
    as replaced only where no node outside the pattern reads it."""
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,8,6,6] x, float[8,8,3,3] W, float[8] g0, float[8] b0, float[8] m0, float[8] var0,
   float[8] g1, float[8] b1, float[8] m1, float[8] var1) => (float[1,8,6,6] y) {
  c0 = Conv<pads=[1,1,1,1]>(x, W)
  n0 = BatchNormalization(c0, g0, b0, m0, var0)
  c1 = Conv<pads=[1,1,1,1]>(n0, W)
  y = BatchNormalization(c1, g1, b1, m1, var1)
}
""")
    optimized, report = optimize(model)
    assert report.after["parameters"] <= report.before["parameters"]
    assert op_counts(optimized) == op_counts(model)
    reasons = {m.reason for m in report.misses if m.rule == "fold-bn-into-conv"}
    assert any("raises the parameters from 0 to 576" in reason for reason in reasons), reasons
    assert_same_function(model, optimized)


def test_merge_step_must_name_a_predicate(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('summary = "s"\npattern = """\nc = Conv(x, W)\ny = AveragePool(c)\n"""\n'
                    'result = "y = Conv(x, W)"\nmerge_step = "no_such_check(y)"\n')
    with pytest.raises(OnnxfoldError, match="unknown predicate 'no_such_check'"):
        load_rule_file(path)
