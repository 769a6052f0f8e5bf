"""Failures the fuzzer (tests/test_fuzz.py) found, shrunk to small deterministic models.

Each test runs the same checks as the fuzzer: the optimized model is valid, has no more
nodes, keeps the graph's inputs and outputs, computes the same function in onnxruntime,
and the input model is left unchanged. A test marked xfail(strict=True) is a known
onnxfold bug: once it is fixed the test passes, strict xfail turns that into a failure,
and the marker should go.
"""

from __future__ import annotations

from .helpers import model_from_text
from .test_fuzz import check_optimize

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'


def check(text, data=None):
    return check_optimize(model_from_text(HEADER + text, data))


def test_identity_with_a_consumer():
    check("""
g (float[1,4,3,3] x) => (float[1,4,3,3] y) {
  a = Identity(x)
  y = Relu(a)
}
""")


def test_neutral_mul_with_a_consumer():
    check("""
g (float[1,4,3,3] x, float[4,4,3,3] W, float[1,4,1,1] c) => (float[1,4,3,3] y)
  <float[1,4,1,1] one = {1.0, 1.0, 1.0, 1.0}> {
  a = Conv<pads=[1,1,1,1]>(x, W)
  b = Mul(one, a)
  y = Mul(c, b)
}
""")


def test_bn_after_matmul_whose_bias_raises_the_rank():
    check("""
g (float[1,2] m, float[2,4] W, float[1,1,4] C, float[1] gamma, float[1] beta, float[1] mean, float[1] var) => (float[1,1,4] y) {
  v = MatMul(m, W)
  a = Add(C, v)
  y = BatchNormalization(a, gamma, beta, mean, var)
}
""")


def test_bn_after_matmul_whose_bias_raises_the_rank_square():
    # M = N: the BN parameters even have the feature count, and the fold would be silently wrong
    check("""
g (float[4,5] x, float[5,4] W, float[1,1,4] C, float[4] gamma, float[4] beta, float[4] mean, float[4] var) => (float[1,4,4] y) {
  m = MatMul(x, W)
  a = Add(m, C)
  y = BatchNormalization(a, gamma, beta, mean, var)
}
""")


def test_dropout_whose_mask_is_a_graph_output():
    check("""
g (float[1,4,3,3] x) => (bool[1,4,3,3] mask, float[1,4,3,3] y) {
  d, mask = Dropout(x)
  y = Relu(d)
}
""")
