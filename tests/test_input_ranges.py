"""verify's random integer inputs: the range the graph gives them (indices into an embedding
table, a 0/1 mask), the user's --input-range NAME:LOW,HIGH, and no onnxruntime log lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxfold import optimize
from onnxfold.errors import OnnxfoldError
from onnxfold.verify import VerifySettings, verify_models
from onnxfold.verify.feeds import INT_RANGE
from onnxfold.verify.ranges import graph_ranges

from .test_cli import onnxfold

# A tiny BERT-like encoder (30 token ids, 2 token types, an integer attention mask) as the
# TorchScript and the dynamo exporters write it; tests/data/make_bert_like.py made them.
DATA = Path(__file__).parent / "data"
BERT_LIKE = [DATA / "bert_like.ts.onnx", DATA / "bert_like.dynamo.onnx"]


def ranges_of(report) -> dict:
    return {info.name: (info.range, info.range_reason) for info in report.inputs}


@pytest.mark.parametrize("path", BERT_LIKE, ids=lambda p: p.name)
def test_a_bert_export_verifies_with_inputs_in_the_graphs_ranges(path):
    optimized, _ = optimize(str(path))
    report = verify_models(str(path), optimized, VerifySettings(latency=False, samples=3))
    assert report.passed
    assert ranges_of(report) == {
        "input_ids": ([0, 30], "indices into 'words.weight' (30 rows)"),
        "token_type_ids": ([0, 2], "indices into 'token_types.weight' (2 rows)"),
        "attention_mask": ([0, 2], "cast to float or bool: taken as a 0/1 mask")}
    assert "random in [0, 2): indices into 'token_types.weight' (2 rows)" in report.render()


def test_verify_and_optimize_verify_pass_on_a_bert_export_with_nothing_from_onnxruntime(tmp_path):
    source, target, report = BERT_LIKE[0], tmp_path / "out.onnx", tmp_path / "verify.json"
    result = onnxfold("optimize", source, target, "--verify")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    result = onnxfold("verify", source, target, "--no-latency", "--json", report,
                      "--input-range", "attention_mask:1,2")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    inputs = {i["name"]: i for i in json.loads(report.read_text())["inputs"]}
    assert inputs["token_type_ids"]["range"] == [0, 2]
    assert (inputs["attention_mask"]["range"], inputs["attention_mask"]["range_reason"]) == ([1, 2], "--input-range")


def test_an_index_out_of_range_is_one_line_of_onnxfold_not_onnxruntimes_log(tmp_path):
    source, target = BERT_LIKE[0], tmp_path / "out.onnx"
    result = onnxfold("optimize", source, target, "--verify", "--input-range", "token_type_ids:0,5")
    assert result.returncode == 2 and not target.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"onnxfold: error: {source}: onnxruntime failed running"), lines
    assert "--input-range NAME:LOW,HIGH" in lines[0] and "onnxruntime:" not in result.stderr


def gathers_model():
    """Integer inputs used every way that matters: indices of a Gather over a constant
    (directly, through Cast and Reshape, on axis 1 of a Constant node), a Reshape's shape,
    indices into a table that is an input, a mask cast to float, plain arithmetic."""
    node = onnx.helper.make_node
    table45 = onnx.numpy_helper.from_array(np.zeros((4, 5), np.float32))
    nodes = [
        node("Gather", ["table6", "direct"], ["a"]),
        node("Cast", ["reshaped"], ["wide"], to=onnx.TensorProto.INT64),
        node("Reshape", ["wide", "shape23"], ["grid"]),
        node("Gather", ["table6", "grid"], ["b"]),
        node("Reshape", ["runtime_table", "shaped"], ["c"]),
        node("Constant", [], ["table45"], value=table45),
        node("Gather", ["table45", "axis1"], ["d"], axis=1),
        node("Unsqueeze", ["axis1", "zero"], ["axis1_2d"]),
        node("Gather", ["table6", "axis1_2d"], ["e"]),
        node("Gather", ["runtime_table", "indices"], ["f"]),
        node("Cast", ["mask"], ["mask_float"], to=onnx.TensorProto.FLOAT),
        node("Mul", ["mask_float", "mask_float"], ["m"]),
        node("Add", ["plain", "plain"], ["p"]),
    ]
    ints = {"direct": onnx.TensorProto.INT64, "reshaped": onnx.TensorProto.INT32, "shaped": onnx.TensorProto.INT64,
            "axis1": onnx.TensorProto.INT64, "indices": onnx.TensorProto.INT64, "mask": onnx.TensorProto.INT64,
            "plain": onnx.TensorProto.INT64}
    inputs = [onnx.helper.make_tensor_value_info(name, kind, None) for name, kind in ints.items()]
    inputs.append(onnx.helper.make_tensor_value_info("runtime_table", onnx.TensorProto.FLOAT, None))
    outputs = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in "abcdefm"]
    outputs.append(onnx.helper.make_tensor_value_info("p", onnx.TensorProto.INT64, None))
    weights = [onnx.numpy_helper.from_array(np.zeros((6, 4), np.float32), "table6"),
               onnx.numpy_helper.from_array(np.array([2, 3], np.int64), "shape23"),
               onnx.numpy_helper.from_array(np.array([0], np.int64), "zero")]
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs, weights)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_the_graph_bounds_gather_indices_and_masks_only():
    found = graph_ranges(gathers_model(), ["direct", "reshaped", "shaped", "axis1", "indices", "mask", "plain"])
    assert {name: (r.low, r.high, r.reason) for name, r in found.items()} == {
        "direct": (0, 6, "indices into 'table6' (6 rows)"),
        "reshaped": (0, 6, "indices into 'table6' (6 rows)"),  # through Cast and Reshape's data
        "axis1": (0, 5, "indices into 'table45' (5 entries on axis 1)"),  # the smaller of 5 and 6
        "mask": (0, 2, "cast to float or bool: taken as a 0/1 mask")}
    # not bounded: a Reshape's shape, indices into a table that is an input, arithmetic


def test_unbounded_integers_keep_the_default_and_a_given_range_wins():
    model = text_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[64] n, int8[64] small, float[64] x, float[64] y) => (int64[64] a, int8[64] b, float[64] c) {
          a = Add(n, n)
          b = Add(small, small)
          c = Add(x, y)
        }""")
    report = verify_models(model, model, VerifySettings(latency=False, input_ranges={"small": (-3, 4), "y": (5, 6)}))
    assert ranges_of(report) == {"n": (list(INT_RANGE), None), "small": ([-3, 4], "--input-range"),
                                 "x": ([-1.0, 1.0], None), "y": ([5.0, 6.0], "--input-range")}


def text_model(text):
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("ranges, message", [
    ({"nope": (0, 1)}, "input range given for unknown input 'nope'"),
    ({"flag": (0, 1)}, "input 'flag' has dtype bool: an input range does not apply"),
    ({"small": (0, 1.5)}, "its range takes integers, got 0,1.5"),
    ({"small": (0, 300)}, "is beyond int8"),
    ({"small": (2, 2)}, "low < high"),
])
def test_bad_input_ranges_are_refused(ranges, message):
    model = text_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int8[4] small, bool[4] flag) => (int8[4] a, bool[4] b) {
          a = Add(small, small)
          b = Not(flag)
        }""")
    with pytest.raises(OnnxfoldError, match=message):
        verify_models(model, model, VerifySettings(latency=False, input_ranges=ranges))


def test_input_range_option_reads_names_from_the_right():
    from onnxfold.parity_options import _input_ranges

    assert _input_ranges(("-2,2", "ids:0,30", "a:b:1,2")) == {
        "input_range": (-2.0, 2.0), "input_ranges": {"ids": (0.0, 30.0), "a:b": (1.0, 2.0)}}
    assert _input_ranges(()) == {"input_range": None, "input_ranges": {}}
    for items, message in ((("0,1", "0,2"), "given twice"), ((":0,1",), "takes \\[NAME:\\]LOW,HIGH"),
                           (("ids:0",), "takes \\[NAME:\\]LOW,HIGH")):
        with pytest.raises(OnnxfoldError, match=message):
            _input_ranges(items)


def test_a_narrow_index_type_caps_the_tables_range():
    model = text_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int8[64] ids) => (float[64,2] y) {
          table = Constant<value = float[300,2] {%s}>()
          wide = Cast<to = 7>(ids)
          y = Gather(table, wide)
        }""" % ",".join(["1"] * 600))
    report = verify_models(model, model, VerifySettings(latency=False))
    assert report.passed and ranges_of(report)["ids"] == ([0, 128], "indices into 'table' (300 rows)")
