"""Hostile and unusual model files: each is read correctly or refused with one line naming
the file (exit 2), never an internal error, and a refused model writes nothing."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfold.jobs import BAD_INPUT, OK, JobOptions, optimize_file

from .helpers import assert_same_function, run

F = TensorProto.FLOAT
value = helper.make_tensor_value_info


def _model(nodes, inputs, outputs, initializers=(), opset=17, ir=8, **graph):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers), **graph),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    return model


def _relu(**graph):
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [value("x", F, [1, 4])],
                  [value("y", F, [1, 4])], [numpy_helper.from_array(np.ones(4, np.float32), "k")], **graph)


def _optimize(tmp_path, model_or_bytes, name="in.onnx"):
    source, target = tmp_path / name, tmp_path / "out.onnx"
    data = model_or_bytes if isinstance(model_or_bytes, bytes) else model_or_bytes.SerializeToString()
    source.write_bytes(data)
    result = optimize_file(source, target, JobOptions())
    return result, target


def _bn(rng, channels):
    return [numpy_helper.from_array(a.astype(np.float32), n) for n, a in
            (("g", rng.uniform(.5, 1.5, channels)), ("b", rng.normal(size=channels)),
             ("mu", rng.normal(size=channels)), ("v", rng.uniform(.5, 1.5, channels)))]


def _conv_bn_nodes(weight="W"):
    return [helper.make_node("Conv", ["x", weight], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "v"], ["y"])]


# --- sparse initializers ------------------------------------------------------------------

def test_sparse_weight_stored_as_raw_bytes_folds_with_its_values(tmp_path):
    """graph-surgeon densified raw_data sparse values as zeros: the fold wrote W' = 0."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)
    weight[np.abs(weight) < 1] = 0
    index = np.flatnonzero(weight).astype(np.int64)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(weight.ravel()[index], "W"),
                                       numpy_helper.from_array(index, "W_idx"), list(weight.shape))
    model = _model(_conv_bn_nodes(), [value("x", F, [1, 4, 8, 8])], [value("y", F, [1, 8, 8, 8])],
                   _bn(rng, 8), sparse_initializer=[sparse])
    result, target = _optimize(tmp_path, model)
    assert result.status == OK, result.error
    optimized = onnx.load(target)
    assert [n.op_type for n in optimized.graph.node] == ["Conv"]
    assert_same_function(model, optimized)


def test_sparse_weight_with_coordinate_indices_folds_with_its_values(tmp_path):
    rng = np.random.default_rng(1)
    weight = np.zeros((8, 4, 3, 3), np.float32)
    coordinates = np.array([[0, 0, 1, 1], [3, 2, 0, 2], [7, 3, 2, 0]], np.int64)  # [NNZ, rank]
    weight[tuple(coordinates.T)] = [2.0, -1.5, 0.5]
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.float32([2.0, -1.5, 0.5]), "W"),
                                       numpy_helper.from_array(coordinates, "W_idx"), list(weight.shape))
    model = _model(_conv_bn_nodes(), [value("x", F, [1, 4, 8, 8])], [value("y", F, [1, 8, 8, 8])],
                   _bn(rng, 8), sparse_initializer=[sparse])
    result, target = _optimize(tmp_path, model)
    assert result.status == OK, result.error
    assert_same_function(model, onnx.load(target))


def _sparse_add(values, indices, size=256):
    sparse = helper.make_sparse_tensor(values, indices, [size])
    return _model([helper.make_node("Add", ["x", "k"], ["y"])], [value("x", F, [size])],
                  [value("y", F, [size])], sparse_initializer=[sparse])


def _external(tensor, location, offset=0, length=None):
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset)}
    if length is not None:
        entries["length"] = str(length)
    for key, text in entries.items():
        tensor.external_data.add(key=key, value=text)
    return tensor


def test_sparse_values_in_external_data_outside_the_folder_are_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"S" * 1024)
    (tmp_path / "model").mkdir()
    values = _external(numpy_helper.from_array(np.zeros(256, np.float32), "k"), "../secret.bin", 0, 1024)
    model = _sparse_add(values, numpy_helper.from_array(np.arange(256, dtype=np.int64), "k_idx"))
    result, target = _optimize(tmp_path / "model", model)
    assert result.status == BAD_INPUT and "outside" in result.error and "in.onnx" in result.error
    assert not target.exists()


def test_sparse_indices_in_external_data_inside_the_folder_are_read(tmp_path):
    index = np.arange(0, 256, 4, dtype=np.int64)
    (tmp_path / "idx.bin").write_bytes(index.tobytes())
    values = numpy_helper.from_array(np.linspace(-1, 1, 64).astype(np.float32), "k")
    model = _sparse_add(values, _external(numpy_helper.from_array(index, "k_idx"), "idx.bin"))
    result, target = _optimize(tmp_path, model)
    assert result.status == OK, result.error
    feeds = {"x": np.ones(256, np.float32)}
    expected = np.ones(256, np.float32)
    expected[index] += np.linspace(-1, 1, 64).astype(np.float32)
    np.testing.assert_allclose(run(onnx.load(target), feeds)["y"], expected, rtol=1e-6)


# --- element types numpy lacks, non-tensor values ---------------------------------------

def test_bfloat16_conv_bn_is_left_alone_not_an_internal_error(tmp_path, capfd):
    rng = np.random.default_rng(0)

    def bf16(name, array):
        return helper.make_tensor(name, TensorProto.BFLOAT16, array.shape,
                                  array.astype(ml_dtypes.bfloat16).tobytes(), raw=True)

    weights = [bf16("W", rng.normal(size=(8, 4, 3, 3))), bf16("g", np.ones(8)), bf16("b", np.zeros(8)),
               bf16("mu", np.zeros(8)), bf16("v", np.ones(8))]
    model = _model(_conv_bn_nodes(), [value("x", TensorProto.BFLOAT16, [1, 4, 8, 8])],
                   [value("y", TensorProto.BFLOAT16, [1, 8, 8, 8])], weights, opset=22, ir=10)
    result, target = _optimize(tmp_path, model)
    assert result.status == OK, result.error
    optimized = onnx.load(target)
    onnx.checker.check_model(optimized, full_check=True)
    # Folding would compute in bfloat16 (numpy has no such floating type): left as it was,
    # and --explain says so rather than speak of integer rounding.
    assert [n.op_type for n in optimized.graph.node] == ["Conv", "BatchNormalization"]
    reasons = {m.reason for m in result.report.misses if m.rule == "fold-bn-into-conv"}
    assert reasons == {"onnxfold folds float16, float32 and float64 values, not bfloat16"}
    # Every weight as it was (equal ones, the BN's ones and zeros, are kept once: duplicate-weights).
    kept = {t.name: numpy_helper.to_array(t).tobytes() for t in optimized.graph.initializer}
    original = {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    assert kept == {name: original[name] for name in kept} and len(kept) == 3
    # graph-surgeon's "[W] Could not convert: BFLOAT16 ..." (and its hint to install
    # `colored`) is not the user's to read
    printed = capfd.readouterr()
    assert "[W]" not in printed.out + printed.err and "colored" not in printed.out + printed.err


@pytest.mark.parametrize("kind, numpy_type", [("BFLOAT16", ml_dtypes.bfloat16),
                                              ("FLOAT8E4M3FN", ml_dtypes.float8_e4m3fn)])
def test_a_constant_node_of_a_type_numpy_lacks_is_read_not_an_internal_error(tmp_path, kind, numpy_type):
    """A Constant node (not an initializer) holding bfloat16 or float8 values: releasing
    it at the end read ONNX's type number as a numpy type, exit 3."""
    raw = np.float32([1, 2, 3, 4]).astype(numpy_type).tobytes()
    constant = helper.make_tensor("w", getattr(TensorProto, kind), [4], raw, raw=True)
    model = _model([helper.make_node("Constant", [], ["w"], value=constant),
                    helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
                    helper.make_node("Add", ["x", "wf"], ["y"])],
                   [value("x", TensorProto.FLOAT, [4])], [value("y", TensorProto.FLOAT, [4])], opset=21, ir=10)
    result, target = _optimize(tmp_path, model)
    assert result.status == OK, result.error
    assert_same_function(model, onnx.load(target), feeds={"x": np.float32([0.5, -1, 2, 0])})


@pytest.mark.parametrize("kind", ["FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ",
                                  "INT4", "UINT4"])
def test_quantized_weights_of_types_numpy_lacks_keep_the_function(tmp_path, kind):
    """DequantizeLinear of a float8/int4 weight feeding Conv + BN: a valid model that
    onnxruntime runs; it crashed graph-surgeon's type handling."""
    rng = np.random.default_rng(0)
    element = getattr(TensorProto, kind)
    weight = numpy_helper.from_array(
        (rng.uniform(0, 4, size=(8, 4, 3, 3))).astype(helper.tensor_dtype_to_np_dtype(element)), "Wq")
    zero = [numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(element)), "zp")] \
        if kind.startswith(("INT", "UINT")) else []
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s"] + [z.name for z in zero], ["W"]), *_conv_bn_nodes()]
    model = _model(nodes, [value("x", F, [1, 4, 8, 8])], [value("y", F, [1, 8, 8, 8])],
                   [weight, numpy_helper.from_array(np.float32(0.5), "s"), *zero, *_bn(rng, 8)], opset=21, ir=10)
    result, target = _optimize(tmp_path, model)
    assert result.status == OK, result.error
    optimized = onnx.load(target)
    onnx.checker.check_model(optimized, full_check=True)
    assert_same_function(model, optimized)


def test_folded_float8_e4m3fnuz_constant_keeps_its_type(tmp_path):
    """graph-surgeon labels float8_e4m3fnuz arrays FLOAT8E4M3FN: a folded Cast changed type."""
    element = TensorProto.FLOAT8E4M3FNUZ
    nodes = [helper.make_node("Cast", ["k"], ["y"], to=element)]
    model = _model(nodes, [], [value("y", element, [4])],
                   [numpy_helper.from_array(np.float32([1, 2, -3, 0.5]), "k")], opset=21, ir=10)
    result, target = _optimize(tmp_path, model)
    assert result.status == OK, result.error
    optimized = onnx.load(target)
    onnx.checker.check_model(optimized, full_check=True)
    assert optimized.graph.output[0].type.tensor_type.elem_type == element


def test_optional_and_sequence_graph_values_pass_through(tmp_path):
    optional = helper.make_optional_type_proto(helper.make_tensor_type_proto(F, [1, 4]))
    sequence = helper.make_sequence_type_proto(helper.make_tensor_type_proto(F, [1, 4]))
    nodes = [helper.make_node("OptionalGetElement", ["o"], ["t"]), helper.make_node("Relu", ["t"], ["y"]),
             helper.make_node("SplitToSequence", ["t"], ["s"]), helper.make_node("Identity", ["s"], ["z"])]
    model = _model(nodes, [helper.make_value_info("o", optional)],
                   [value("y", F, [1, 4]), helper.make_value_info("z", sequence)], opset=18)
    onnx.checker.check_model(model, full_check=True)
    result, target = _optimize(tmp_path, model)
    assert result.status == OK, result.error
    optimized = onnx.load(target)
    assert optimized.graph.input[0] == model.graph.input[0]
    assert optimized.graph.output[1] == model.graph.output[1]
    feeds = {"o": np.float32([[1, -2, 3, -4]])}
    expected, actual = run(model, feeds), run(optimized, feeds)
    np.testing.assert_array_equal(actual["y"], expected["y"])
    np.testing.assert_array_equal(actual["z"], expected["z"])


# --- malformed models: exit 2, one line naming the file, nothing written ----------------

def _cycle():
    model = _relu()
    model.graph.node[0].input[0] = "y"
    return model


def _edit(change):
    model = _relu()
    change(model)
    return model


def _raw(tensor, data):
    tensor.raw_data = data


def _typed(tensor):
    tensor.ClearField("raw_data")
    tensor.float_data.extend([1.0, 2.0])


def _two_producers(model):
    model.graph.node.append(helper.make_node("Neg", ["x"], ["y"], name="neg"))


def _external_past_end(tmp_path):
    model = _relu()
    (tmp_path / "w.bin").write_bytes(b"\0" * 8)
    _external(model.graph.initializer[0], "w.bin", offset=64, length=16)
    return model


def _non_utf8():
    model = _relu()
    model.graph.node[0].op_type = "QQQQ"
    return model.SerializeToString().replace(b"QQQQ", b"\xff\xfeQQ")


def _bad_sparse_index():
    return _sparse_add(numpy_helper.from_array(np.float32([1, 2]), "k"),
                       numpy_helper.from_array(np.int64([3, 999]), "k_idx"), size=4)


def _conv_bn(change):
    """A Conv + BatchNormalization, changed into a model ONNX rejects (the engine used to
    crash on these: exit 3)."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32), "W"), *_bn(rng, 4)]
    model = _model(_conv_bn_nodes(), [value("x", F, [1, 4, 8, 8])], [value("y", F, [1, 4, 8, 8])], weights)
    change(model)
    return model


MALFORMED = {
    "BatchNormalization with three inputs": (lambda tmp: _conv_bn(lambda m: m.graph.node[1].input.__delitem__(
        slice(3, 5))), "not a valid ONNX model"),
    "BatchNormalization parameters of the wrong size": (lambda tmp: _conv_bn(lambda m: m.graph.initializer[1].CopyFrom(
        numpy_helper.from_array(np.ones(3, np.float32), "g"))), "not a valid ONNX model"),
    "Conv without a weight": (lambda tmp: _conv_bn(lambda m: m.graph.node[0].input.__delitem__(1)),
                              "not a valid ONNX model"),
    "a cycle": (lambda tmp: _cycle(), "cycle"),
    "unknown element type": (lambda tmp: _edit(lambda m: setattr(m.graph.initializer[0], "data_type", 65)),
                             "unknown element type"),
    "unknown declared type": (lambda tmp: _edit(lambda m: setattr(m.graph.input[0].type.tensor_type,
                                                                  "elem_type", 99)), "unknown element type"),
    "op type not UTF-8": (lambda tmp: _non_utf8(), "UTF-8"),
    "node without outputs": (lambda tmp: _edit(lambda m: m.graph.node.append(helper.make_node("Relu", ["x"], []))),
                             "no outputs"),
    "truncated protobuf": (lambda tmp: _relu().SerializeToString()[:-7], "not a readable ONNX model"),
    "negative dimension": (lambda tmp: _edit(lambda m: m.graph.initializer[0].dims.__setitem__(0, -4)),
                           "negative dimension"),
    "huge dimensions": (lambda tmp: _edit(lambda m: m.graph.initializer[0].dims.extend([2**40, 2**40])),
                        "its shape needs"),
    "raw data of the wrong length": (lambda tmp: _edit(lambda m: _raw(m.graph.initializer[0], b"\0" * 12)),
                                     "holds 12 bytes"),
    "typed data of the wrong length": (lambda tmp: _edit(lambda m: _typed(m.graph.initializer[0])),
                                       "holds 2 values"),
    "two nodes define one value": (lambda tmp: _edit(_two_producers), "defined twice"),
    "two initializers of one name": (lambda tmp: _edit(lambda m: m.graph.initializer.append(
        numpy_helper.from_array(np.ones(2, np.float32), "k"))), "defined twice"),
    "node input naming nothing": (lambda tmp: _edit(lambda m: m.graph.node[0].input.__setitem__(0, "ghost")),
                                  "'ghost', which nothing defines"),
    "graph output naming nothing": (lambda tmp: _edit(lambda m: setattr(m.graph.output[0], "name", "ghost")),
                                    "graph output 'ghost' names no value"),
    "external data past the end of its file": (_external_past_end, "external data"),
    "a NUL byte in an external data location": (lambda tmp: _edit(lambda m: _external(m.graph.initializer[0], "k.bin\0x")),
                                               "contains a NUL byte"),
    "sparse index out of range": (lambda tmp: _bad_sparse_index(), "sparse tensor 'k'"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_model_is_refused_in_one_line(tmp_path, case):
    build, complaint = MALFORMED[case]
    result, target = _optimize(tmp_path, build(tmp_path))
    assert result.status == BAD_INPUT, f"{case}: {result.status} {result.error}"
    assert str(tmp_path / "in.onnx") in result.error and complaint in result.error
    assert "\n" not in result.error
    assert not target.exists()


def test_a_subgraph_may_read_values_of_its_enclosing_graph(tmp_path):
    """The definedness check sees values of the enclosing graph inside If branches."""
    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "then", [], [value("r", F, [1, 4])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["n"])], "else", [], [value("n", F, [1, 4])])
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)]
    model = _model(nodes, [value("x", F, [1, 4]), value("c", TensorProto.BOOL, [])], [value("y", F, [1, 4])])
    result, target = _optimize(tmp_path, model)
    assert result.status == OK, result.error
    feeds = {"x": np.float32([[1, -2, 3, -4]]), "c": np.array(False)}
    np.testing.assert_array_equal(run(onnx.load(target), feeds)["y"], run(model, feeds)["y"])


def test_string_constants_stay_strings(tmp_path):
    """A folded string constant was written as raw bytes, which onnxruntime refuses."""
    strings = helper.make_tensor("names", TensorProto.STRING, [2], [b"a", b"b"])
    nodes = [helper.make_node("Identity", ["names"], ["s"])]
    model = _model(nodes, [value("x", F, [2])], [value("x", F, [2]), value("s", TensorProto.STRING, [2])],
                   [strings])
    result, target = _optimize(tmp_path, model)
    assert result.status == OK, result.error
    out = run(onnx.load(target), {"x": np.float32([1, 2])})
    assert list(out["s"]) == ["a", "b"]


def test_a_graph_without_nodes_passes_through(tmp_path):
    model = _model([], [value("x", F, [2])], [value("x", F, [2])])
    result, target = _optimize(tmp_path, model)
    assert result.status == OK, result.error
    np.testing.assert_array_equal(run(onnx.load(target), {"x": np.float32([1, 2])})["x"], [1, 2])
