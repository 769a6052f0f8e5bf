"""sibling-matmuls beyond its cleanups.toml cases: nested graphs, the whole pipeline, and a
second run that finds nothing left to merge."""

from __future__ import annotations

import numpy as np
import onnx

from onnxfold import optimize

from .helpers import assert_same_function, model_from_text, op_counts

ATTENTION = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,6,8] x, float[8,8] wq, float[8,8] wk, float[8,8] wv, float[8] bq, float[8] bk, float[8] bv)
  => (float[2,6,8] y) {
  pq = MatMul(x, wq)
  pk = MatMul(x, wk)
  pv = MatMul(x, wv)
  q = Add(pq, bq)
  k = Add(pk, bk)
  v = Add(pv, bv)
  kt = Transpose<perm=[0,2,1]>(k)
  s = MatMul(q, kt)
  a = Softmax<axis=-1>(s)
  y = MatMul(a, v)
}
"""


def test_attention_projections_become_one_matmul_and_a_split():
    model = model_from_text(ATTENTION)
    optimized, report = optimize(model)
    assert report.normalized["sibling-matmuls"] == 3  # 3 MatMuls + 3 Adds -> MatMul, Add, Split
    counts = op_counts(optimized)
    assert counts["Split"] == 1 and counts["MatMul"] == 3 and counts["Add"] == 1
    onnx.checker.check_model(optimized, full_check=True)
    assert_same_function(model, optimized)
    again, report = optimize(optimized)
    assert report.normalized["sibling-matmuls"] == 0 and len(again.graph.node) == len(optimized.graph.node)


def test_projections_inside_an_if_branch_merge_there_and_outer_readers_stay():
    model = model_from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3,4] x, bool c, float[4,2] wq, float[4,2] wk, float[4,2] wv, float[4,2] wo) => (float[3,2] y, float[3,2] o) {
      o = MatMul(x, wo)
      y = If(c) <then_branch = t () => (float[3,2] ty) {
          q = MatMul(x, wq)
          k = MatMul(x, wk)
          v = MatMul(x, wv)
          qk = Mul(q, k)
          ty = Mul(qk, v)
        }, else_branch = e () => (float[3,2] ey) { ey = Neg(o) }>
    }
    """, data=["x", "c"])
    optimized, report = optimize(model)
    assert report.normalized["sibling-matmuls"] == 1
    if_node = next(node for node in optimized.graph.node if node.op_type == "If")
    branch = next(a.g for a in if_node.attribute if a.name == "then_branch")
    branch_ops = [node.op_type for node in branch.node]
    assert branch_ops.count("Split") == 1 and branch_ops.count("MatMul") == 1
    assert op_counts(optimized)["MatMul"] == 1  # the outer one, read by the else branch too
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    for condition in (True, False):
        assert_same_function(model, optimized, feeds={"x": x, "c": np.array(condition)})
