"""BN -> reshapes, transposes, means -> every consuming Linear (linear_consumers.py).

Each example must lose its BN and keep the function in onnxruntime; each trap must keep
its BN, with a reason --explain shows.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxfold import optimize
from onnxfold.linear_consumers import RULE

from .helpers import assert_same_function, model_from_text, op_counts

STATS = "float[4] gamma, float[4] beta, float[4] mean, float[4] var"
HEAD = '<ir_version: 8, opset_import: ["" : 17]>'

FOLDS = {
    # pre-norm BN before attention: flatten(2).transpose(1, 2) to tokens, then q, k, v
    "pre-norm q, k, v": f"""{HEAD}
g (float[1,4,2,3] x, {STATS}, float[4,3] Wq, float[3] Cq, float[4,3] Wk, float[3] Ck, float[4,5] Wv,
   float[5] Cv) => (float[1,6,3] q, float[1,6,3] k, float[1,6,5] v) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  s = Constant<value=int64[3] {{1, 4, -1}}>()
  r = Reshape(b, s)
  t = Transpose<perm=[0, 2, 1]>(r)
  mq = MatMul(t, Wq)
  q = Add(mq, Cq)
  mk = MatMul(t, Wk)
  k = Add(Ck, mk)
  mv = MatMul(t, Wv)
  v = Add(mv, Cv)
}}""",
    # the hybrid head: BN -> mean over H, W -> Linear
    "BN -> ReduceMean -> Gemm": f"""{HEAD}
g (float[2,4,3,3] x, {STATS}, float[5,4] B, float[5] C) => (float[2,5] y) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  m = ReduceMean<axes=[2, 3], keepdims=0>(b)
  y = Gemm<transB=1, alpha=0.5, beta=2.0>(m, B, C)
}}""",
    "BN -> ReduceMean (opset 18, axes input, keepdims) -> Flatten -> Gemm": f"""
<ir_version: 8, opset_import: ["" : 18]>
g (float[2,4,3,3] x, {STATS}, float[4,5] B) => (float[2,5] y) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  axes = Constant<value=int64[2] {{-1, 2}}>()
  m = ReduceMean(b, axes)
  f = Flatten(m)
  y = Gemm<alpha=3.0>(f, B)
}}""",
    "BN -> GlobalAveragePool -> Flatten -> Gemm, and a transposed Gemm (transA=1)": f"""{HEAD}
g (float[2,4,3,3] x, {STATS}, float[5,4] B, float[5] C, float[4,3] D) => (float[2,5] y, float[2,3] z) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  p = GlobalAveragePool(b)
  f = Flatten(p)
  y = Gemm<transB=1>(f, B, C)
  t = Transpose<perm=[1, 0]>(f)
  z = Gemm<transA=1>(t, D)
}}""",
    "BN on 2-D -> bias-free MatMul (becomes a Gemm) twice": f"""{HEAD}
g (float[3,4] x, {STATS}, float[4,5] W, float[4,2] V) => (float[3,5] y, float[3,2] z) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  y = MatMul(b, W)
  z = MatMul(b, V)
}}""",
    # W is shared with a MatMul on another input: it must be copied, not changed
    "a weight shared with another Linear": f"""{HEAD}
g (float[3,4] x, {STATS}, float[4,5] W, float[3,4] u) => (float[3,5] y, float[3,5] z) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  y = MatMul(b, W)
  z = MatMul(u, W)
}}""",
}

TRAPS = {
    "also read by a Relu": ("not a Linear nor a move", f"""{HEAD}
g (float[1,4,2,3] x, {STATS}, float[4,3] W, float[3] C) => (float[1,6,3] y, float[1,4,6] z) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  s = Constant<value=int64[3] {{1, 4, -1}}>()
  r = Reshape(b, s)
  t = Transpose<perm=[0, 2, 1]>(r)
  m = MatMul(t, W)
  y = Add(m, C)
  z = Relu(r)
}}"""),
    # no transpose: the tokens are [1, 4, 6] and the MatMul contracts the 6 positions
    "channel not on the contracted axis": ("reaches axis 1", f"""{HEAD}
g (float[1,4,2,3] x, {STATS}, float[6,3] W, float[3] C) => (float[1,4,3] y) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  s = Constant<value=int64[3] {{1, 4, -1}}>()
  r = Reshape(b, s)
  m = MatMul(r, W)
  y = Add(m, C)
}}"""),
    "channel merged with the positions": ("merges it with another", f"""{HEAD}
g (float[1,4,2,3] x, {STATS}, float[24,3] W, float[3] C) => (float[1,3] y) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  s = Constant<value=int64[2] {{1, -1}}>()
  r = Reshape(b, s)
  y = Gemm(r, W, C)
}}"""),
    "mean over the channel": ("averages over the BN's channel axis", f"""{HEAD}
g (float[2,4,3] x, {STATS}, float[3,5] W) => (float[2,5] y) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  m = ReduceMean<axes=[1], keepdims=0>(b)
  y = MatMul(m, W)
}}"""),
    "training mode": ("training mode", f"""{HEAD}
g (float[2,4] x, {STATS}, float[4,5] W) => (float[2,5] y) {{
  b, rm, rv = BatchNormalization<training_mode=1>(x, gamma, beta, mean, var)
  t = Identity(b)
  y = MatMul(t, W)
}}"""),
    "weight computed at run time": ("computed at run time", f"""{HEAD}
g (float[1,4,2,3] x, float[4,3] W, {STATS}, float[3] C) => (float[1,6,3] y) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  s = Constant<value=int64[3] {{1, 4, -1}}>()
  r = Reshape(b, s)
  t = Transpose<perm=[0, 2, 1]>(r)
  m = MatMul(t, W)
  y = Add(m, C)
}}"""),
    # on 3-D tokens a bias-free MatMul has nowhere to put the shift (no Gemm on 3-D)
    "no bias Add on 3-D": ("no bias Add to take the BN shift", f"""{HEAD}
g (float[1,4,2,3] x, {STATS}, float[4,3] W) => (float[1,6,3] y, float[1,6,3] z) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  s = Constant<value=int64[3] {{1, 4, -1}}>()
  r = Reshape(b, s)
  t = Transpose<perm=[0, 2, 1]>(r)
  y = MatMul(t, W)
  z = Relu(y)
}}"""),
    "the bias Add is not the product's only reader": ("no bias Add to take the BN shift", f"""{HEAD}
g (float[1,4,2,3] x, {STATS}, float[4,3] W, float[3] C) => (float[1,6,3] y, float[1,6,3] z) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  s = Constant<value=int64[3] {{1, 4, -1}}>()
  r = Reshape(b, s)
  t = Transpose<perm=[0, 2, 1]>(r)
  m = MatMul(t, W)
  y = Add(m, C)
  z = Relu(m)
}}"""),
    "tokens are a graph output": ("is a graph output", f"""{HEAD}
g (float[1,4,2,3] x, {STATS}, float[4,3] W, float[3] C) => (float[1,6,3] y, float[1,6,4] t) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  s = Constant<value=int64[3] {{1, 4, -1}}>()
  r = Reshape(b, s)
  t = Transpose<perm=[0, 2, 1]>(r)
  m = MatMul(t, W)
  y = Add(m, C)
}}"""),
}


@pytest.mark.parametrize("text", FOLDS.values(), ids=FOLDS.keys())
def test_bn_folds_into_every_linear_consumer(text):
    model = model_from_text(text)
    optimized, report = optimize(model, only=[RULE])
    assert "BatchNormalization" not in op_counts(optimized), report.render(explain=True)
    assert report.fired() == {RULE: 1}
    onnx.checker.check_model(optimized, full_check=True)
    assert_same_function(model, optimized)


@pytest.mark.parametrize("reason, text", TRAPS.values(), ids=TRAPS.keys())
def test_trap_keeps_the_bn_and_says_why(reason, text):
    data = ["x", "W"] if "computed at run time" in reason else None
    model = model_from_text(text, data)
    optimized, report = optimize(model, only=[RULE])
    assert op_counts(optimized)["BatchNormalization"] == 1
    reasons = [m.reason for m in report.misses if m.rule == RULE]
    assert any(reason in found for found in reasons), reasons
    assert_same_function(model, optimized)


def test_skip_leaves_the_bn():
    model = model_from_text(FOLDS["pre-norm q, k, v"])
    optimized, report = optimize(model, skip=[RULE])
    assert op_counts(optimized)["BatchNormalization"] == 1 and RULE not in report.rules


@pytest.mark.parametrize("size_type, becomes_split", [("int64", True), ("int32", False)])
def test_split_to_sequence_read_at_stored_positions_becomes_a_split(size_type, becomes_split):
    """The dynamo exporter's tensor.split without its optimizer. SplitToSequence also
    takes int32 sizes, Split only int64: those stay as they are."""
    model = model_from_text(f"""{HEAD}
g (float[2,8] x) => (float[2,3] a, float[2,5] b, float[2,3] c) {{
  sizes = Constant<value={size_type}[2] {{3, 5}}>()
  s = SplitToSequence<axis=1>(x, sizes)
  i0 = Constant<value=int64 {{0}}>()
  a = SequenceAt(s, i0)
  i1 = Constant<value=int64 {{-1}}>()
  b = SequenceAt(s, i1)
  c = SequenceAt(s, i0)
}}""")
    optimized, report = optimize(model)
    assert ("Split" in op_counts(optimized)) == becomes_split, op_counts(optimized)
    if becomes_split:
        assert op_counts(optimized) == {"Split": 1, "Identity": 1}, op_counts(optimized)
    onnx.checker.check_model(optimized, full_check=True)
    assert_same_function(model, optimized)


def test_dynamic_batch_folds():
    """Exports with a dynamic batch dim: its size has a name, and the channel is still tracked."""
    text = FOLDS["pre-norm q, k, v"].replace("float[1,4,2,3] x", "float[N,4,2,3] x").replace(
        "float[1,6,3] q, float[1,6,3] k, float[1,6,5] v", "float[N,6,3] q, float[N,6,3] k, float[N,6,5] v").replace(
        "{1, 4, -1}", "{0, 4, -1}")
    model = model_from_text(text)
    optimized, report = optimize(model, only=[RULE])
    assert "BatchNormalization" not in op_counts(optimized), report.render(explain=True)
    feeds = {"x": np.random.default_rng(0).normal(size=(3, 4, 2, 3)).astype(np.float32)}
    assert_same_function(model, optimized, feeds=feeds)


def test_bn_read_inside_a_nested_graph_stays():
    model = model_from_text(f"""{HEAD}
g (float[2,4] x, bool c, {STATS}, float[4,5] W) => (float[2,5] y, float[2,5] z) {{
  b = BatchNormalization(x, gamma, beta, mean, var)
  y = MatMul(b, W)
  z = If(c) <then_branch = t () => (float[2,5] r) {{ r = MatMul(b, W) }},
             else_branch = e () => (float[2,5] r) {{ r = MatMul(b, W) }}>
}}""", data=["x", "c"])
    optimized, report = optimize(model, only=[RULE])
    assert op_counts(optimized)["BatchNormalization"] == 1
    assert any("nested graph" in m.reason for m in report.misses if m.rule == RULE), report.render(explain=True)
    feeds = {"x": np.ones((2, 4), np.float32), "c": np.array(True)}
    assert_same_function(model, optimized, feeds=feeds)
