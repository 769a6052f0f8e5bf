"""Review of the CLI's new way to open models (references into the file): bugs found.

Each test builds a small model in tmp_path and runs `onnxfold optimize` on it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxfold import optimize
from onnxfold.modelio import load_model

from .helpers import assert_same_function
from .test_cli import onnxfold


def _conv_bn(channels=32):
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])],
        [numpy_helper.from_array(rng.normal(size=(channels, channels, 3, 3)).astype(np.float32), "W"),
         *[numpy_helper.from_array(np.full(channels, v, np.float32), n)
           for n, v in (("gamma", 1.5), ("beta", 0.1), ("mean", -0.2), ("var", 2.0))]])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _set_external_entry(model, tensor_name, key, value):
    for tensor in model.graph.initializer:
        if tensor.name == tensor_name:
            entries = {entry.key: entry for entry in tensor.external_data}
            if key in entries:
                entries[key].value = value
            else:
                tensor.external_data.add(key=key, value=value)


def optimize_and_compare(graph, tmp_path):
    """Run `onnxfold optimize` on the graph's model; it succeeds and keeps the function."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source, target = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source))
    result = onnxfold("optimize", source, target)
    assert result.returncode == 0, result.stderr
    assert_same_function(model, onnx.load(str(target)))


def test_a_basepath_entry_written_in_the_input_file_is_not_trusted(tmp_path):
    """A model file may carry any external_data keys. One naming 'basepath' is taken as
    onnxfold's own reference, so the model reads any file on the machine into its output."""
    folder = tmp_path / "model"
    folder.mkdir()
    secret = bytes(range(256)) * 32  # 8 KiB outside the model's folder
    (tmp_path / "secret.bin").write_bytes(secret)
    weight = TensorProto(name="W", data_type=TensorProto.UINT8, dims=[len(secret)],
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "secret.bin"), ("offset", "0"), ("length", str(len(secret))),
                       ("basepath", str(tmp_path))):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["W"], ["w"], to=TensorProto.FLOAT), helper.make_node("Add", ["x", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(secret)])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(secret)])], [weight])
    source, target = folder / "model.onnx", tmp_path / "out.onnx"
    source.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    result = onnxfold("optimize", source, target)
    # onnx.load finds no model/secret.bin: the model's external data is missing.
    assert result.returncode == 2, result.stderr
    assert not target.exists() or secret not in target.read_bytes()


def test_a_negative_external_data_offset_is_bad_input_not_an_internal_error(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save(_conv_bn(), str(source), save_as_external_data=True, location="weights.bin", size_threshold=0)
    saved = onnx.load(str(source), load_external_data=False)
    _set_external_entry(saved, "W", "offset", "-4")  # onnx.load: "offset must be non-negative"
    onnx.save(saved, str(source))
    result = onnxfold("optimize", source, tmp_path / "out.onnx")
    assert result.returncode == 2 and "internal error" not in result.stderr, result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_constant_subgraphs_over_large_weights_still_fold(tmp_path):
    """Transpose(W) of a large stored weight is a constant; graph-surgeon folds constant
    subgraphs in onnxruntime, which cannot read a reference (basepath, no model path)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "Wt"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    source, target = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source))
    in_memory, _ = optimize(load_model(source))
    assert [n.op_type for n in in_memory.graph.node] == ["MatMul"]  # the library folds it
    result = onnxfold("optimize", source, target)
    assert result.returncode == 0, result.stderr
    written = onnx.load(str(target))
    assert [n.op_type for n in written.graph.node] == ["MatMul"]
    assert_same_function(model, written)


def test_a_large_sparse_initializer_does_not_crash(tmp_path):
    rng = np.random.default_rng(0)
    values = numpy_helper.from_array(rng.normal(size=(3000,)).astype(np.float32), "sp")
    indices = numpy_helper.from_array(np.arange(0, 6000, 2, dtype=np.int64), "")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "sp"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6000])],
        sparse_initializer=[helper.make_sparse_tensor(values, indices, [6000])])
    optimize_and_compare(graph, tmp_path)


def test_the_outputs_data_file_does_not_replace_the_inputs_data_file(tmp_path):
    """a.onnx keeps its weights in b.onnx.data; `optimize a.onnx b.onnx` writes b.onnx.data
    over them, without --force, and a.onnx no longer loads."""
    source, target = tmp_path / "a.onnx", tmp_path / "b.onnx"
    model = _conv_bn()
    onnx.save(_conv_bn(), str(source), save_as_external_data=True, location="b.onnx.data", size_threshold=0)
    data_before = (tmp_path / "b.onnx.data").read_bytes()
    result = onnxfold("optimize", source, target)
    # README: an output whose OUT.data would replace the input's data file is refused
    # without --force, and nothing is written.
    assert result.returncode == 2 and "--force" in result.stderr, result.stderr
    assert not target.exists()
    assert (tmp_path / "b.onnx.data").read_bytes() == data_before
    assert_same_function(model, onnx.load(str(source)))


def test_a_large_weight_passed_through_identity_to_an_output_does_not_crash(tmp_path):
    """Identity(W) of a large weight used to fold to a constant; now the fold fails (see
    above) and the Identity clean-up crashes comparing a graph-surgeon node with None."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["w_out"]), helper.make_node("Relu", ["x"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [64, 64])],
        [numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), "W")])
    optimize_and_compare(graph, tmp_path)


def test_external_data_shorter_than_the_weights_shape_is_bad_input(tmp_path):
    """onnx.load accepts a `length` the shape does not fit; the output would not load."""
    source = tmp_path / "model.onnx"
    onnx.save(_conv_bn(), str(source), save_as_external_data=True, location="weights.bin", size_threshold=0)
    saved = onnx.load(str(source), load_external_data=False)
    _set_external_entry(saved, "W", "length", "100")
    onnx.save(saved, str(source))
    result = onnxfold("optimize", source, tmp_path / "out.onnx")
    assert result.returncode == 2 and "its shape needs" in result.stderr, result.stderr
    assert not (tmp_path / "out.onnx").exists()
