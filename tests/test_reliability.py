"""Graph shapes found in real models, and batch use: what every rule must survive."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfold import optimize

from .helpers import assert_same_function, model_from_text, op_counts, run
from .test_cli import CONV_BN, onnxfold


def conv_bn_model(opset=17, batch="1"):
    text = CONV_BN.replace('"" : 17', f'"" : {opset}').replace("float[1,4,8,8] x", f"float[{batch},4,8,8] x")
    return model_from_text(text.replace("float[1,6,8,8] y", f"float[{batch},6,8,8] y"))


def test_model_fields_and_io_names_are_kept():
    model = conv_bn_model()
    model.producer_name, model.producer_version, model.model_version = "exporter", "9.9", 7
    model.doc_string, model.graph.doc_string = "model doc", "graph doc"
    onnx.helper.set_model_props(model, {"author": "someone", "license": "MIT"})
    optimized, _ = optimize(model)
    for field in ("producer_name", "producer_version", "model_version", "doc_string", "ir_version"):
        assert getattr(optimized, field) == getattr(model, field), field
    assert optimized.graph.doc_string == "graph doc"
    assert {p.key: p.value for p in optimized.metadata_props} == {"author": "someone", "license": "MIT"}
    assert list(optimized.opset_import) == list(model.opset_import)
    names = [n.name for n in optimized.graph.node]
    assert len(names) == len(set(names)) and all(names)
    onnx.checker.check_model(optimized, full_check=True)


def test_the_input_model_object_is_not_modified():
    model = conv_bn_model()
    before = model.SerializeToString()
    optimize(model)
    assert model.SerializeToString() == before


def test_dynamic_batch_folds_and_keeps_the_function():
    model = conv_bn_model(batch="N")
    optimized, report = optimize(model)
    assert "BatchNormalization" not in op_counts(optimized)
    x = np.random.default_rng(0).normal(size=(3, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(optimized, {"x": x})["y"], run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_a_rule_that_needs_a_shape_does_not_guess():
    """MatMul -> BN folds only when the input is known to be 2-D; an unknown rank stays."""
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,5] x, float[5,4] W, float[4] gamma, float[4] beta, float[4] mean, float[4] var) => (float[N,4] y) {
  m = MatMul(x, W)
  y = BatchNormalization(m, gamma, beta, mean, var)
}""")
    assert "BatchNormalization" not in op_counts(optimize(model)[0])
    model.graph.input[0].type.tensor_type.ClearField("shape")  # rank unknown
    model.graph.output[0].type.tensor_type.ClearField("shape")
    optimized, report = optimize(model)
    assert "BatchNormalization" in op_counts(optimized)
    assert any("rank unknown" in m.reason for m in report.misses)


REPVGG_BLOCK = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,8,8] x, float[4,4,3,3] W3, float[4,4,1,1] W1, float[4] g3, float[4] b3, float[4] m3,
   float[4] var3, float[4] g1, float[4] b1, float[4] m1, float[4] var1) => (float[1,4,8,8] y) {
  c3 = Conv<pads=[1,1,1,1]>(x, W3)
  n3 = BatchNormalization(c3, g3, b3, m3, var3)
  c1 = Conv(x, W1)
  n1 = BatchNormalization(c1, g1, b1, m1, var1)
  s = Add(n3, n1)
  t = Add(s, x)
  y = Relu(t)
}"""


@pytest.mark.parametrize("opset", range(9, onnx.defs.onnx_opset_version() + 1))
def test_every_opset_from_9_to_the_newest_folds_a_repvgg_block(opset):
    model = model_from_text(REPVGG_BLOCK.replace('"" : 17', f'"" : {opset}'))
    model.ir_version = onnx.helper.find_min_ir_version_for([model.opset_import[0]])
    optimized, _ = optimize(model)
    assert op_counts(optimized) == {"Conv": 1, "Relu": 1}, opset
    onnx.checker.check_model(optimized, full_check=True)
    try:
        run(model, {"x": np.ones((1, 4, 8, 8), np.float32)})
    except Exception as error:  # noqa: BLE001 - onnxruntime may lag onnx's newest opset
        pytest.skip(f"onnxruntime {ort.__version__} cannot run opset {opset}: {str(error)[:80]}")
    assert_same_function(model, optimized)


def test_old_opsets_fold_and_spatial_zero_is_left():
    for opset in (9, 11, 13, 15):
        model = conv_bn_model(opset=opset)
        optimized, _ = optimize(model)
        assert "BatchNormalization" not in op_counts(optimized), opset
        assert_same_function(model, optimized)
    model = conv_bn_model(opset=7)
    model.ir_version = 3
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.attribute.append(helper.make_attribute("spatial", 0))
    optimized, report = optimize(model)
    assert "BatchNormalization" in op_counts(optimized)
    assert any("spatial=0" in m.reason for m in report.misses)


def test_subgraphs_pass_through_unchanged_and_valid():
    then_branch = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4, 8, 8])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4, 8, 8])])
    model = conv_bn_model()
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    graph.node.append(helper.make_node("If", ["flag"], ["z"], then_branch=then_branch, else_branch=else_branch))
    graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8]))
    optimized, _ = optimize(model)
    onnx.checker.check_model(optimized, full_check=True)
    assert "If" in op_counts(optimized) and "BatchNormalization" not in op_counts(optimized)
    feeds = {"x": np.ones((1, 4, 8, 8), np.float32), "flag": np.array(True)}
    assert_same_function(model, optimized, feeds=feeds)


def test_quantized_graph_passes_through_unchanged():
    scale, zero = numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(128), "z")
    weight = numpy_helper.from_array(np.random.default_rng(0).integers(0, 255, (6, 4, 3, 3), dtype=np.uint8), "w")
    bias = numpy_helper.from_array(np.zeros(6, np.int32), "b")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "s", "z", "w", "s", "z", "s", "z", "b"], ["yq"], pads=[1, 1, 1, 1]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])],
                              [scale, zero, weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    optimized, report = optimize(model)
    assert [n.op_type for n in optimized.graph.node] == [n.op_type for n in model.graph.node]
    onnx.checker.check_model(optimized, full_check=True)
    assert_same_function(model, optimized)


def test_qdq_weights_stay_quantized():
    """A QDQ model's weight is int8 behind a DequantizeLinear, the form onnxruntime fuses
    into QLinearConv: constant folding wrote it as a float weight, four times the bytes."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.int8(0), "z"),
               numpy_helper.from_array(rng.integers(-127, 127, (6, 4, 3, 3), dtype=np.int8), "wq"),
               numpy_helper.from_array(np.float32(0.01), "ws")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "z"], ["w"]),
             helper.make_node("Conv", ["xd", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    optimized, _ = optimize(model)
    assert op_counts(optimized) == op_counts(model)
    kept = {t.name: t.data_type for t in optimized.graph.initializer}
    assert kept["wq"] == TensorProto.INT8
    assert_same_function(model, optimized)


def test_float16_model_folds_within_float16_rounding():
    model = model_from_text(CONV_BN.replace("float[", "float16["))
    optimized, _ = optimize(model)
    assert "BatchNormalization" not in op_counts(optimized)
    assert optimized.graph.initializer[0].data_type == TensorProto.FLOAT16
    assert_same_function(model, optimized)


REPVGG_BLOCK_FP16 = """
<ir_version: 8, opset_import: ["" : 17]>
g (float16[1,8,6,6] x, float16[8,8,3,3] W3, float16[8] B3, float16[8,8,1,1] W1, float16[8] B1,
   float16[8] gamma, float16[8] beta, float16[8] mean, float16[8] var) => (float16[1,8,6,6] y) {
  a = Conv<pads=[1,1,1,1]>(x, W3, B3)
  b = Conv(x, W1, B1)
  n = BatchNormalization(x, gamma, beta, mean, var)
  s = Add(a, b)
  y = Add(s, n)
}
"""


def test_float16_repvgg_block_merges_into_one_cast_of_the_float64_kernel():
    """3x3 + 1x1 + identity BN in float16, merged in two folds: the kernel written is the
    float64 sum rounded once per fold, as the transforms promise, and the function holds."""
    model = model_from_text(REPVGG_BLOCK_FP16)
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    optimized, _ = optimize(model)
    assert op_counts(optimized) == {"Conv": 1}
    first = weights["W3"].copy()
    first[:, :, 1, 1] += weights["W1"][:, :, 0, 0]
    scale = weights["gamma"] / np.sqrt(weights["var"] + float(np.float32(1e-5)))  # the attribute is a float32
    want = first.astype(np.float16).astype(np.float64)  # the first fold's result, stored
    want[np.arange(8), np.arange(8), 1, 1] += scale.astype(np.float64)
    conv = optimized.graph.node[0]
    kernel = numpy_helper.to_array(next(t for t in optimized.graph.initializer if t.name == conv.input[1]))
    assert kernel.dtype == np.float16
    assert kernel.tobytes() == want.astype(np.float16).tobytes()
    assert_same_function(model, optimized)


def test_external_data_is_kept_when_the_input_had_it(tmp_path):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    wide = CONV_BN.replace("float[6", "float[64").replace("float[1,6,8,8] y", "float[1,64,8,8] y")
    onnx.save(model_from_text(wide), str(source), save_as_external_data=True, location="in.onnx.data",
              size_threshold=0)
    result = onnxfold("optimize", source, target)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.onnx.data").exists()
    loaded = onnx.load(str(target))
    assert_same_function(onnx.load(str(source)), loaded)
    inline = onnxfold("optimize", source, tmp_path / "inline.onnx", "--no-external-data")
    assert inline.returncode == 0 and not (tmp_path / "inline.onnx.data").exists()


def test_external_data_size_threshold_keeps_small_tensors_inline(tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save(conv_bn_model(), str(source))  # weights of 24 to 864 bytes
    for threshold, expect_outside in (("1K", set()), ("100", {864}), ("0", {24, 864})):
        target = tmp_path / f"out{threshold}.onnx"
        result = onnxfold("optimize", source, target, "--external-data", "--external-data-size-threshold", threshold)
        assert result.returncode == 0, result.stderr
        saved = onnx.load(str(target), load_external_data=False)
        outside = {int(next(e.value for e in t.external_data if e.key == "length"))
                   for t in saved.graph.initializer if t.data_location == TensorProto.EXTERNAL}
        assert outside == expect_outside, threshold
        assert (tmp_path / f"out{threshold}.onnx.data").exists() == bool(expect_outside)
        assert_same_function(onnx.load(str(source)), onnx.load(str(target)))
    bad = onnxfold("optimize", source, tmp_path / "bad.onnx", "--external-data-size-threshold", "lots")
    assert bad.returncode == 2 and "is not a size" in bad.stderr and not (tmp_path / "bad.onnx").exists()


def test_checker_complaints_warn_but_do_not_stop(tmp_path):
    """Models the checker rejects often still run (custom ops, old exporters): warn, go on."""
    model = conv_bn_model()
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.attribute.append(helper.make_attribute("exporter_hint", 1))  # the checker rejects it
    source, target = tmp_path / "odd.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source))
    result = onnxfold("optimize", source, target)
    assert result.returncode == 0, result.stderr
    assert "onnxfold: warning:" in result.stderr and "checker rejects" in result.stderr
    assert "BatchNormalization" not in op_counts(onnx.load(str(target)))


def test_batch_optimizes_a_folder_and_reports_the_bad_model(tmp_path):
    folder, out = tmp_path / "models", tmp_path / "out"
    folder.mkdir(), out.mkdir()
    onnx.save(conv_bn_model(), str(folder / "good.onnx"))
    onnx.save(conv_bn_model(opset=13), str(folder / "also_good.onnx"))
    (folder / "broken.onnx").write_bytes(b"\x00\x01 not a model")
    result = onnxfold("optimize", folder, "--out-dir", out, "-j", "2", "--json", tmp_path / "batch.json")
    assert result.returncode == 2, result.stdout + result.stderr
    assert (out / "good.onnx").exists() and (out / "also_good.onnx").exists()
    assert not (out / "broken.onnx").exists()
    assert "2 of 3 optimized, 1 failed" in result.stdout
    assert "broken.onnx" in result.stderr
    statuses = {r["source"].rsplit("/", 1)[-1]: r["status"] for r in json.loads((tmp_path / "batch.json").read_text())}
    assert statuses == {"also_good.onnx": "ok", "broken.onnx": "error", "good.onnx": "ok"}


def test_python_api_takes_a_path_and_rule_selection(tmp_path):
    source = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(source))
    optimized, report = optimize(source, skip=["fold-bn-into-conv"])
    assert "BatchNormalization" in op_counts(optimized)
    assert "fold-bn-into-conv" not in report.rules


def test_usage_errors_exit_2_without_traceback():
    wrong = subprocess.run([sys.executable, "-m", "onnxfold", "optimize", "only-one.onnx"],
                           capture_output=True, text=True)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr


def test_rules_apply_inside_subgraphs_with_weights_from_the_outer_graph():
    """Conv -> BN inside an If branch, its weights captured from the main graph."""
    outer = conv_bn_model()
    inner_nodes = [node for node in outer.graph.node if node.op_type != "Relu"]
    inner_nodes[-1].output[0] = "t"
    then_branch = helper.make_graph(inner_nodes, "then", [],
                                    [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 6, 8, 8])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["fallback"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 6, 8, 8])])
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["unused"]),
         helper.make_node("If", ["flag"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
              helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])],
        [*outer.graph.initializer, numpy_helper.from_array(np.ones((1, 6, 8, 8), np.float32), "fallback")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    optimized, report = optimize(model)
    onnx.checker.check_model(optimized, full_check=True)
    assert report.fired() == {"fold-bn-into-conv": 1}
    branch = next(a.g for n in optimized.graph.node if n.op_type == "If" for a in n.attribute if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["Conv"]
    for flag in (True, False):
        feeds = {"x": np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32), "flag": np.array(flag)}
        assert_same_function(model, optimized, feeds=feeds)


def model_with_every_kind_of_field():
    """A model using the protobuf fields a streamed save must not lose or reorder wrongly."""
    model = conv_bn_model()
    onnx.helper.set_model_props(model, {"author": "someone"})
    model.graph.doc_string = "graph doc"
    graph = model.graph
    graph.initializer.append(helper.make_tensor("as_floats", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))
    graph.initializer.append(numpy_helper.from_array(np.arange(6, dtype=np.float16).reshape(2, 3), "half"))
    graph.initializer.append(numpy_helper.from_array(np.ones((300, 100), np.float32), "big"))  # over 64 KiB
    graph.initializer.append(helper.make_tensor("int4s", TensorProto.INT4, [5], [1, -2, 3, -4, 5]))
    graph.initializer.append(helper.make_tensor("raw_int4s", TensorProto.INT4, [5], b"\x21\x43\x05", raw=True))
    graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([5.0], np.float32), "sparse"),
        numpy_helper.from_array(np.array([1], np.int64), "sparse_indices"), [4]))
    model.functions.append(helper.make_function("custom", "Twice", ["a"], ["b"],
                                                [helper.make_node("Add", ["a", "a"], ["b"])],
                                                [helper.make_opsetid("", 17)]))
    return model


def test_saving_in_pieces_gives_back_the_same_model(tmp_path):
    from onnxfold.modelio import encoded_size, save_model

    model = model_with_every_kind_of_field()
    save_model(model, tmp_path / "out.onnx", external_data=False)
    assert onnx.load(str(tmp_path / "out.onnx")) == model
    assert encoded_size(model) == model.ByteSize() == (tmp_path / "out.onnx").stat().st_size


def test_weight_sizes_are_read_from_shapes_without_copying():
    from onnxfold.modelio import payload_bytes

    for tensor in model_with_every_kind_of_field().graph.initializer:
        expected = len(tensor.raw_data) if tensor.HasField("raw_data") else tensor.ByteSize()
        assert payload_bytes(tensor) == expected, tensor.name


def test_folds_stop_at_casts_in_mixed_precision_graphs():
    """A float32 BN after a float16 conv is not folded across the Cast: the folded weights
    would be rounded to float16, which the original never did."""
    model = model_from_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float16[1,4,8,8] x, float16[6,4,3,3] W, float[6] gamma, float[6] beta, float[6] mean, float[6] var)
  => (float[1,6,8,8] y) {
  c = Conv<pads=[1,1,1,1]>(x, W)
  c32 = Cast<to=1>(c)
  y = BatchNormalization(c32, gamma, beta, mean, var)
}""")
    optimized, report = optimize(model)
    assert op_counts(optimized) == op_counts(model)
    assert not report.rewrites
    assert_same_function(model, optimized)


def test_weights_a_later_fold_used_up_are_freed_at_once(monkeypatch):
    """A RepVGG block's conv+BN folds make weights that the branch merges then consume:
    those are freed as soon as they are used up (not when Python's cycle collector runs),
    and nothing the output still needs is."""
    import onnxfold.engine

    released = []
    real = onnxfold.engine.release_values
    monkeypatch.setattr(onnxfold.engine, "release_values", lambda t: (released.append(t.name), real(t)))
    model = model_from_text(REPVGG_BLOCK)
    optimized, report = optimize(model)
    assert [r.rule for r in report.rewrites].count("fold-bn-into-conv") == 2
    assert len(released) >= 2, released  # at least the two folded conv weights
    assert not set(released) & {t.name for t in optimized.graph.initializer}
    assert_same_function(model, optimized)
