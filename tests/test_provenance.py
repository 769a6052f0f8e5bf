"""Each node a rule made names, in its metadata_props, the rules and the input's nodes
behind it (issue 14, item 8); the output stays byte-deterministic; --no-provenance."""

from __future__ import annotations

import subprocess
import sys

import onnx

from onnxfold import optimize

from .helpers import assert_same_function, model_from_text

# A RepVGG block: two conv+BN branches and an identity, summed. Folding the BNs, then
# merging the branches, makes one Conv from five nodes of the input (and the Adds).
REPVGG = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,8,8] x, float[4,4,3,3] Wa, float[4] ga, float[4] ba, float[4] ma, float[4] vara,
   float[4,4,1,1] Wb, float[4] gb, float[4] bb, float[4] mb, float[4] varb) => (float[1,4,8,8] y) {
  ca = Conv<pads=[1,1,1,1]>(x, Wa)
  na = BatchNormalization(ca, ga, ba, ma, vara)
  cb = Conv(x, Wb)
  nb = BatchNormalization(cb, gb, bb, mb, varb)
  s = Add(na, nb)
  y = Relu(s)
}
"""


def _props(node) -> dict:
    return {entry.key: entry.value for entry in node.metadata_props}


def test_folds_of_folds_name_the_input_nodes_and_every_rule():
    model = model_from_text(REPVGG)
    optimized, report = optimize(model)
    assert report.fired() == {"fold-bn-into-conv": 2, "merge-conv-branches": 1}
    # onnxfold names the unnamed nodes of the text model op_index, in topological order.
    conv = next(node for node in optimized.graph.node if node.op_type == "Conv")
    assert _props(conv) == {
        "onnxfold.rule": "fold-bn-into-conv,merge-conv-branches",
        "onnxfold.replaced": "Conv_0,BatchNormalization_2,Conv_1,BatchNormalization_3,Add_4"}
    relu = next(node for node in optimized.graph.node if node.op_type == "Relu")
    assert not relu.metadata_props, "a node no rule made carries nothing"
    # NodeProto.metadata_props is IR 10; written at IR 8 without raising the version,
    # which the checker and onnxruntime accept.
    assert optimized.ir_version == 8
    onnx.checker.check_model(optimized, full_check=True)
    assert_same_function(model, optimized)


def test_provenance_off_writes_none():
    optimized, _ = optimize(model_from_text(REPVGG), provenance=False)
    assert not any(node.metadata_props for node in optimized.graph.node)


def test_optimizing_twice_gives_the_same_bytes(tmp_path):
    source, first, second = tmp_path / "in.onnx", tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(model_from_text(REPVGG), str(source))
    for target in (first, second):
        done = subprocess.run([sys.executable, "-m", "onnxfold", "optimize", str(source), str(target), "-q"],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert first.read_bytes() == second.read_bytes()
    assert any(node.metadata_props for node in onnx.load(str(first)).graph.node)
    plain = tmp_path / "plain.onnx"
    done = subprocess.run([sys.executable, "-m", "onnxfold", "optimize", str(source), str(plain), "-q",
                           "--no-provenance"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not any(node.metadata_props for node in onnx.load(str(plain)).graph.node)


def test_nodes_keep_the_metadata_the_input_gave_them_in_every_scope():
    """graph-surgeon drops a node's metadata_props (the dynamo exporter's stack traces):
    the nodes no rule replaced get theirs back, in subgraphs too."""
    model = model_from_text("""
    <ir_version: 10, opset_import: ["" : 17]>
    g (float[2,3] x, bool c) => (float[2,3] y) {
      r = Relu(x)
      y = If(c) <then_branch = g1 () => (float[2,3] t) { t = Neg(r) }, else_branch = g2 () => (float[2,3] e) { e = Abs(r) }>
    }""", data=["x", "c"])
    relu, branch = model.graph.node
    relu.metadata_props.add(key="pkg.torch.onnx.stack_trace", value="line 1")
    branch.attribute[0].g.node[0].metadata_props.add(key="namespace", value="inner")
    optimized, _ = optimize(model)
    relu, branch = optimized.graph.node
    assert _props(relu) == {"pkg.torch.onnx.stack_trace": "line 1"}
    inner = {a.name: a.g for a in branch.attribute}
    assert _props(inner[model.graph.node[1].attribute[0].name].node[0]) == {"namespace": "inner"}
