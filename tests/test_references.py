"""Opening a model with its large weights left in the file (modelio.open_model).

The CLI reads every model this way; these tests hold it to onnx.load: the same model once
the references are read, the same optimized output, and the same file when saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfold import optimize
from onnxfold.modelio import load_model, open_model, save_model
from onnxfold.references import INLINE_LIMIT, is_reference, loaded

from .helpers import assert_same_function
from .test_cli import onnxfold
from .test_reliability import model_with_every_kind_of_field

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
TRAIN_GRAPHS = [e["file"] for e in json.loads((SAMPLES / "manifest.json").read_text()) if e["variant"] != "oracle"]


def model_with_large_weights():
    """Every kind of field, plus large weights a reference can and cannot stand for."""
    model = model_with_every_kind_of_field()
    rng = np.random.default_rng(0)
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(rng.normal(size=(50, 60)).astype(np.float16), "half_big"))
    graph.initializer.append(numpy_helper.from_array(np.arange(1000, dtype=np.int64), "int_big"))
    graph.initializer.append(helper.make_tensor("floats_big", TensorProto.FLOAT, [2000], list(range(2000))))
    graph.initializer.append(helper.make_tensor("bf16_big", TensorProto.BFLOAT16, [3000], b"\x01\x02" * 3000,
                                                raw=True))
    return model


def same_model(a, b) -> bool:
    """Equal, but for whether a tensor says its data is inline (onnx.load of external data
    says it; a model saved inline does not)."""
    for model in (a, b):
        for tensor in onnx.external_data_helper._get_all_tensors(model):
            if tensor.data_location == TensorProto.DEFAULT:
                tensor.ClearField("data_location")
    return a == b


def test_opening_leaves_plain_large_weights_in_the_file(tmp_path):
    path = tmp_path / "model.onnx"
    model = model_with_large_weights()
    onnx.save(model, str(path))
    opened, external = open_model(path)
    assert not external
    referenced = {t.name for t in opened.graph.initializer if is_reference(t)}
    # bf16 is not read by numpy as it is; float_data is not raw bytes: both are read in.
    assert referenced == {"big", "half_big", "int_big"}
    assert all(len(t.SerializeToString()) < INLINE_LIMIT for t in opened.graph.initializer if is_reference(t))
    assert loaded(opened) == onnx.load(str(path))


@pytest.mark.parametrize("external_data", [False, True])
def test_saving_an_opened_model_copies_its_weights_from_the_file(tmp_path, external_data):
    source, target = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(model_with_large_weights(), str(source))
    opened, _ = open_model(source)
    save_model(opened, target, external_data=external_data)
    assert same_model(onnx.load(str(target)), onnx.load(str(source)))
    assert (tmp_path / "out.onnx.data").exists() == external_data


def test_external_data_weights_become_references(tmp_path):
    source, target = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(model_with_large_weights(), str(source), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    opened, external = open_model(source)
    assert external
    assert {t.name for t in opened.graph.initializer if is_reference(t)} >= {"big", "half_big", "int_big"}
    assert same_model(loaded(opened), onnx.load(str(source)))
    save_model(opened, target)
    assert same_model(onnx.load(str(target)), onnx.load(str(source)))


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    source = folder / "model.onnx"
    model = model_with_large_weights()
    onnx.save(model, str(source), save_as_external_data=True, location="weights.bin", size_threshold=0)
    (folder / "weights.bin").rename(tmp_path / "weights.bin")
    saved = onnx.load(str(source), load_external_data=False)
    for tensor in saved.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save(saved, str(source))
    result = onnxfold("optimize", source, tmp_path / "out.onnx")
    assert result.returncode == 2 and "external data" in result.stderr, result.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("file_name", TRAIN_GRAPHS[::5])
def test_opened_sample_models_optimize_as_loaded_ones(file_name):
    """The CLI's way to read (references) and the library's (whole model) agree exactly."""
    opened, _ = open_model(SAMPLES / file_name)
    from_file, _ = optimize(opened)
    in_memory, _ = optimize(load_model(SAMPLES / file_name))
    assert loaded(from_file) == in_memory


def test_optimizing_a_model_in_place_reads_its_weights_before_replacing_it(tmp_path):
    conv_bn = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])],
        [numpy_helper.from_array(np.random.default_rng(1).normal(size=(32, 32, 3, 3)).astype(np.float32), "W"),
         *[numpy_helper.from_array(np.full(32, v, np.float32), n)
           for n, v in (("gamma", 1.5), ("beta", 0.1), ("mean", -0.2), ("var", 2.0))]])
    model = helper.make_model(conv_bn, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    result = onnxfold("optimize", path, path, "--force")
    assert result.returncode == 0, result.stderr
    replaced = onnx.load(str(path))
    assert [n.op_type for n in replaced.graph.node] == ["Conv"]
    assert_same_function(model, replaced)


def test_unusual_encodings_read_as_onnx_reads_them(tmp_path):
    """Encodings onnx.save never writes but protobuf accepts: a graph given in two pieces
    (protobuf merges them) and a weight whose bytes are given twice (the last counts)."""
    from onnxfold import wire

    model = model_with_large_weights()
    big = onnx.TensorProto()
    big.CopyFrom(next(t for t in model.graph.initializer if t.name == "big"))
    big.name = "big2"  # another weight: a model may not define one name twice
    size = len(big.raw_data)
    twice = big.SerializeToString() + wire.field_header(9, size) + b"\x01" * size  # raw_data again
    graph = onnx.GraphProto()
    graph.initializer.add().ParseFromString(twice)
    encoded = model.SerializeToString() + wire.field_header(7, graph.ByteSize()) + graph.SerializeToString()
    path = tmp_path / "odd.onnx"
    path.write_bytes(encoded)
    expected = onnx.load(str(path))
    assert len(expected.graph.initializer) == len(model.graph.initializer) + 1
    assert same_model(loaded(open_model(path)[0]), expected)
    # The graph alone, then the opset imports: fields in an order onnx.save does not use.
    path.write_bytes(wire.field_header(7, graph.ByteSize()) + graph.SerializeToString() + b"".join(
        wire.field_header(8, o.ByteSize()) + o.SerializeToString() for o in model.opset_import))
    assert same_model(loaded(open_model(path)[0]), onnx.load(str(path)))
