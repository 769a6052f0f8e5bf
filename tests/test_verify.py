"""Tests of `onnxfold.verify`: parity, signatures, inputs, tolerances, latency, CUDA reporting."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from onnxfold.errors import OnnxfoldError
from onnxfold.verify import VerifySettings, feeds, parity, verify_models

from .test_cli import onnxfold

EPS = 1e-5


# ----------------------------------------------------------------------------- models


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "W": rng.standard_normal((6, 3, 3, 3)).astype(np.float32),
        "B": rng.standard_normal(6).astype(np.float32),
        "scale": rng.uniform(0.5, 2.0, 6).astype(np.float32),
        "bias": rng.standard_normal(6).astype(np.float32),
        "mean": rng.standard_normal(6).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, 6).astype(np.float32),
    }


def _conv_model(nodes, weights, batch=1, out_type=TensorProto.FLOAT):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", out_type, [batch, 6, 8, 8])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_bn(batch=1):
    """Conv followed by BatchNormalization: the model before folding."""
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"],
                              epsilon=EPS)]
    return _conv_model(nodes, _weights(), batch)


def conv_folded(batch=1, corrupt=False):
    """The same function with BN folded into the conv weights (optionally one weight wrong)."""
    w = _weights()
    k = w["scale"] / np.sqrt(w["var"] + EPS)
    folded = {"W": (w["W"] * k[:, None, None, None]).astype(np.float32),
              "B": ((w["B"] - w["mean"]) * k + w["bias"]).astype(np.float32)}
    if corrupt:
        folded["W"][2, 1, 1, 1] += 0.5
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1])]
    return _conv_model(nodes, folded, batch)


def text_model(text):
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def add_const(values, dtype=TensorProto.FLOAT, shape=(2, 3)):
    """y = x + c with the given constant c (numpy array)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", dtype, list(shape))],
        [helper.make_tensor_value_info("y", dtype, list(shape))],
        [numpy_helper.from_array(values, "c")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def parity_only(**settings):
    """Settings that skip the latency runs, which these tests do not look at."""
    return VerifySettings(latency=False, **settings)


def cpu_output(report, name="y"):
    provider = next(p for p in report.providers if p.name == "cpu")
    return next(o for o in provider.outputs if o.name == name)


# ----------------------------------------------------------------------------- parity


def test_correct_fold_passes():
    report = verify_models(conv_bn(), conv_folded(), parity_only(samples=3))
    result = cpu_output(report)
    assert report.passed and result.passed
    assert result.mismatched == 0
    assert result.elements == 3 * 6 * 8 * 8
    assert result.max_abs_error < 1e-4
    assert result.cosine_similarity > 0.999999
    assert result.min_passing_rtol == 0.0
    assert "PASS" in report.render()


def test_corrupted_weight_fails_and_shows_the_output():
    report = verify_models(conv_bn(), conv_folded(corrupt=True), parity_only())
    result = cpu_output(report)
    assert not report.passed and not result.passed
    assert result.mismatched > 0
    assert result.max_abs_error > 1e-2
    assert 0 < result.min_passing_rtol < math.inf
    text = report.render()
    assert text.startswith("onnxfold verify: FAIL")
    row = next(line for line in text.splitlines() if line.strip().startswith("y "))
    assert row.rstrip().endswith("FAIL")
    as_dict = report.to_dict()
    assert as_dict["passed"] is False
    assert as_dict["providers"][0]["outputs"][0]["passed"] is False


def test_paths_work_and_report_them(tmp_path):
    original, optimized = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(conv_bn(), str(original))
    onnx.save(conv_folded(), str(optimized))
    report = verify_models(original, optimized, parity_only())
    assert report.passed
    assert report.to_dict()["original"] == str(original)


def test_missing_file_is_a_clean_error(tmp_path):
    with pytest.raises(OnnxfoldError, match="no such file"):
        verify_models(tmp_path / "nope.onnx", conv_folded(), parity_only())


def test_nan_in_candidate_fails():
    nan = np.zeros((2, 3), np.float32)
    nan[1, 2] = np.nan
    report = verify_models(add_const(np.zeros((2, 3), np.float32)), add_const(nan), parity_only())
    result = cpu_output(report)
    assert not report.passed
    assert result.nonfinite_mismatches == 1 and result.mismatched == 1
    assert result.min_passing_rtol is None or math.isinf(result.min_passing_rtol)
    assert report.to_dict()["providers"][0]["outputs"][0]["min_passing_rtol"] is None
    assert "NaN/Inf" in report.render()


def test_nan_in_both_at_the_same_place_is_agreement():
    nan = np.zeros((2, 3), np.float32)
    nan[0, 0] = np.nan
    report = verify_models(add_const(nan), add_const(nan.copy()), parity_only())
    assert report.passed
    assert cpu_output(report).nonfinite_mismatches == 0


def test_float16_default_tolerance_is_looser():
    shift = np.full((2, 3), 2e-3)  # relative error ~2e-3 on values near 1
    base = np.ones((2, 3))
    half = verify_models(add_const(base.astype(np.float16), TensorProto.FLOAT16),
                         add_const((base + shift).astype(np.float16), TensorProto.FLOAT16),
                         parity_only(input_range=(0.0, 0.5)))
    single = verify_models(add_const(base.astype(np.float32)),
                           add_const((base + shift).astype(np.float32)),
                           parity_only(input_range=(0.0, 0.5)))
    assert cpu_output(half).rtol == pytest.approx(1e-2)
    assert cpu_output(single).rtol == pytest.approx(1e-4)
    assert half.passed
    assert not single.passed


def test_integer_outputs_compare_exactly():
    model = text_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[4] x) => (int64[4] y) { y = Identity(x) }
    """)
    plus_one = text_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[4] x) => (int64[4] y) {
            one = Constant<value = int64[1] {1}>()
            y = Add(x, one)
        }
    """)
    report = verify_models(model, plus_one, parity_only())
    result = cpu_output(report)
    assert (result.rtol, result.atol) == (0.0, 0.0)
    assert result.mismatched == 4 and not report.passed


def test_user_tolerances_override_defaults():
    shift = np.full((2, 3), 1e-3, np.float32)
    original, optimized = add_const(np.zeros((2, 3), np.float32)), add_const(shift)
    assert not verify_models(original, optimized, parity_only()).passed
    assert verify_models(original, optimized, parity_only(atol=2e-3)).passed
    report = verify_models(original, optimized,
                           parity_only(atol=0.0, output_tolerances={"y": (None, 2e-3)}))
    assert report.passed and cpu_output(report).atol == 2e-3
    with pytest.raises(OnnxfoldError, match="unknown output 'z'"):
        verify_models(original, optimized, parity_only(output_tolerances={"z": (1e-3, 1e-3)}))


def test_global_tolerances_leave_integer_and_bool_outputs_exact():
    """--rtol/--atol loosened integer and bool outputs too: an int64 off by one and an
    inverted bool passed with --atol 1. They are for floats; --output-tol may name others."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] f, int64[4] i, bool[4] b) {{
            k = Constant<value = float {{1000.0}}>()
            scaled = Mul(x, k)
            i0 = Cast<to = 7>(scaled)
            zero = Constant<value = float {{0.0}}>()
            {body}
        }}
    """
    original = text_model(text.format(body="f = Identity(x)  i = Identity(i0)  b = Greater(x, zero)"))
    optimized = text_model(text.format(body="""
            half = Constant<value = float {0.5}>()
            one = Constant<value = int64 {1}>()
            f = Add(x, half)  i = Add(i0, one)  b = LessOrEqual(x, zero)"""))
    report = verify_models(original, optimized, parity_only(rtol=1e-4, atol=1.0))
    f, i, b = (cpu_output(report, name) for name in "fib")
    assert f.passed and (f.rtol, f.atol) == (1e-4, 1.0)
    assert not i.passed and (i.rtol, i.atol) == (0.0, 0.0) and i.mismatched == 4
    assert not b.passed and (b.rtol, b.atol) == (0.0, 0.0) and b.mismatched == 4
    assert not report.passed
    named = verify_models(original, optimized, parity_only(atol=1.0, output_tolerances={"i": (0.0, 1.0)}))
    assert cpu_output(named, "i").passed and not cpu_output(named, "b").passed


def test_min_passing_rtol_is_the_threshold():
    acc = parity.Accumulator()
    reference = np.array([1.0, 2.0, -4.0], np.float32)
    candidate = np.array([1.1, 2.0, -4.2], np.float32)
    acc.add(reference, candidate, rtol=0.0, atol=0.0)
    result = acc.result("y", np.dtype(np.float32), 0.0, 0.0, 4.0, reference)
    assert result.min_passing_rtol == pytest.approx(0.1, rel=1e-5)
    assert np.allclose(candidate, reference, rtol=result.min_passing_rtol * 1.0001, atol=0)
    assert result.max_abs_error == pytest.approx(0.2, rel=1e-5)
    assert result.mismatched == 2 and result.mismatch_fraction == pytest.approx(2 / 3)


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(hnp.arrays(np.float32, 8, elements=finite), hnp.arrays(np.float32, 8, elements=finite),
       st.floats(0, 1.0))
def test_min_passing_rtol_matches_allclose(reference, candidate, atol):
    acc = parity.Accumulator()
    acc.add(reference, candidate, rtol=0.0, atol=atol)
    needed = acc.result("y", np.dtype(np.float32), 0.0, atol, 1.0, reference).min_passing_rtol
    r, c = reference.astype(np.float64), candidate.astype(np.float64)
    if math.isinf(needed):  # some element off by more than atol where the reference is 0
        assert np.any((r == 0) & (np.abs(c - r) > atol))
    else:
        assert np.allclose(c, r, rtol=needed * (1 + 1e-9), atol=atol)
        if needed > 1e-9:  # below that, atol + rtol*|r| is lost in float64 rounding
            assert not np.allclose(c, r, rtol=needed * (1 - 1e-6), atol=atol)


def test_runtime_shape_difference_fails_that_output():
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N] x) => (float[M] y, float[N] z) {{ y = {y}  z = Relu(x) }}
    """
    report = verify_models(text_model(text.format(y="Identity(x)")),
                           text_model(text.format(y="Concat<axis = 0>(x, x)")), parity_only())
    y, z = cpu_output(report, "y"), cpu_output(report, "z")
    assert not report.passed and not y.passed and z.passed
    assert y.error == "shape [2] in optimized, [1] in original"
    assert y.error in report.render()


# ----------------------------------------------------------------------------- signatures


def test_output_dtype_difference_is_named():
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,6,8,8] x) => ({out}[1,6,8,8] y) {{ y = Cast<to = {to}>(x) }}
    """
    single = text_model(text.format(out="float", to=1))
    half = text_model(text.format(out="float16", to=10))
    with pytest.raises(OnnxfoldError) as error:
        verify_models(single, half, parity_only())
    assert ("output 'y': float32 [1,6,8,8] in original, float16 [1,6,8,8] in optimized"
            in str(error.value))


def test_name_and_shape_differences_are_named():
    renamed = text_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,6,8,8] x) => (float[1,6,8,8] out) { out = Identity(x) }
    """)
    with pytest.raises(OnnxfoldError, match="output 'y' is in original but not in optimized"):
        verify_models(conv_folded(), renamed, parity_only())
    changed = _conv_model([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])],
                          {"W": _weights()["W"]}, batch=2)
    with pytest.raises(OnnxfoldError, match=r"input 'x': float32 \[1,3,8,8\] in original, "
                                            r"float32 \[2,3,8,8\] in optimized"):
        verify_models(conv_folded(), changed, parity_only())


def test_an_input_the_optimized_model_narrows_fails(tmp_path):
    """A takes x[N,4], B only x[1,4]: verify fed both batch 1 and passed, though B refuses
    every other batch A takes. Static in A and dynamic in B is fine."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{n},4] x) => (float[{n},4] y) {{ y = Relu(x) }}
    """
    dynamic, static = text_model(text.format(n="N")), text_model(text.format(n=1))
    report = verify_models(dynamic, static, parity_only())
    assert not report.passed and report.providers == []
    assert report.disagreements == ["input 'x': the original takes [N,4], the optimized model only [1,4]: "
                                    "dim 0 ('N') is fixed at 1"]
    assert report.disagreements[0] in report.render()
    assert report.to_dict()["disagreements"] == report.disagreements
    assert verify_models(static, dynamic, parity_only()).passed
    original, optimized = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(dynamic, str(original))
    onnx.save(static, str(optimized))
    result = onnxfold("verify", original, optimized, "--no-latency", "--shape", "x:2x4")
    assert result.returncode == 1, result.stderr
    assert "dim 0 ('N') is fixed at 1" in result.stdout


def test_outputs_in_another_order_fail():
    """Same outputs, listed in another order: a caller reading them by position (as
    session.run(None, ...) returns them) would get them swapped."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => ({outputs}) {{ a = Relu(x)
                                         b = Neg(x) }}
    """
    in_order = text_model(text.format(outputs="float[2] a, float[2] b"))
    swapped = text_model(text.format(outputs="float[2] b, float[2] a"))
    report = verify_models(in_order, swapped, parity_only())
    assert not report.passed
    assert report.disagreements == ["outputs in another order: the original gives a, b; the optimized model b, a"]
    assert verify_models(in_order, in_order, parity_only()).passed


# ----------------------------------------------------------------------------- inputs


def test_dynamic_batch_defaults_to_one_with_a_note():
    report = verify_models(conv_bn(batch="N"), conv_folded(batch="N"), parity_only())
    assert report.passed
    assert report.inputs[0].shape == [1, 3, 8, 8]
    assert any("batch" in note and "'x'" in note for note in report.notes)
    chosen = verify_models(conv_bn(batch="N"), conv_folded(batch="N"),
                           parity_only(shapes={"x": (4, 3, 8, 8)}))
    assert chosen.inputs[0].shape == [4, 3, 8, 8]
    assert cpu_output(chosen).shape == [4, 6, 8, 8]
    assert not chosen.notes


def test_other_dynamic_dim_without_shape_is_an_error():
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,H,8] x) => (float[N,3,H,8] y) { y = Relu(x) }
    """
    with pytest.raises(OnnxfoldError, match=r"input 'x' .*dim 2 \('H'\)"):
        verify_models(text_model(text), text_model(text), parity_only())
    report = verify_models(text_model(text), text_model(text),
                           parity_only(shapes={"x": (2, 3, 5, 8)}))
    assert report.passed and report.inputs[0].shape == [2, 3, 5, 8]
    with pytest.raises(OnnxfoldError, match="the model fixes it at 3"):
        verify_models(text_model(text), text_model(text), parity_only(shapes={"x": (2, 4, 5, 8)}))


def test_a_named_dim_takes_one_size_in_every_input():
    """With x[T], z[T] and --shape x:5, z was fed T=1: onnxruntime broadcast it, and a model
    that adds z[0] instead of z passed."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[T] x, float[T] z) => (float[T] y) {{ {body} }}
    """
    original = text_model(text.format(body="y = Add(x, z)"))
    first_only = text_model(text.format(body="""
            i = Constant<value = int64 {0}>()
            z0 = Gather(z, i)
            y = Add(x, z0)"""))
    report = verify_models(original, original, parity_only(shapes={"x": (5,)}))
    assert [i.shape for i in report.inputs] == [[5], [5]] and not report.notes
    assert not verify_models(original, first_only, parity_only(shapes={"x": (5,)})).passed
    with pytest.raises(OnnxfoldError, match="dim 'T' as 5 for input 'x' and 4 for input 'z'"):
        verify_models(original, original, parity_only(shapes={"x": (5,), "z": (4,)}))


RELU = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) { y = Relu(x) }
"""
ABS = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) { y = Abs(x) }
"""


def test_user_npz_is_used_instead_of_random(tmp_path):
    # Relu and Abs agree only on non-negative inputs: random data in [-1, 1) tells them apart,
    # the user's all-positive data does not, so a pass proves the file was used.
    assert not verify_models(text_model(RELU), text_model(ABS), parity_only()).passed
    path = tmp_path / "data.npz"
    np.savez(path, x=np.full((2, 3), 0.5, np.float64))  # float64: cast with a note
    report = verify_models(text_model(RELU), text_model(ABS), parity_only(inputs=path, samples=4))
    assert report.passed
    assert report.to_dict()["inputs"][0]["source"] == "file"
    assert report.settings["samples"] == 1
    assert any("cast" in note for note in report.notes)


def test_user_npy_dict_and_bad_files(tmp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, np.full((2, 3), 0.25, np.float32))
    assert verify_models(text_model(RELU), text_model(ABS), parity_only(inputs={"x": npy})).passed
    wrong_key = tmp_path / "wrong.npz"
    np.savez(wrong_key, z=np.zeros((2, 3), np.float32))
    with pytest.raises(OnnxfoldError, match="no data for input.*x"):
        verify_models(text_model(RELU), text_model(ABS), parity_only(inputs=wrong_key))
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, x=np.zeros((2, 4), np.float32))
    with pytest.raises(OnnxfoldError, match="input 'x'"):
        verify_models(text_model(RELU), text_model(ABS), parity_only(inputs=wrong_shape))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not numpy")
    with pytest.raises(OnnxfoldError, match="garbage.npz"):
        verify_models(text_model(RELU), text_model(ABS), parity_only(inputs=garbage))


def test_int_and_bool_inputs_get_their_dtypes():
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x, int64[4] i, bool[4] b) => (float[4] y) {
            f = Cast<to = 1>(i)
            y = Where(b, f, x)
        }
    """
    report = verify_models(text_model(text), text_model(text), parity_only())
    assert report.passed  # onnxruntime rejects a feed of the wrong dtype
    dtypes = {i.name: i.dtype for i in report.inputs}
    assert dtypes == {"x": "float32", "i": "int64", "b": "bool"}
    rng = np.random.default_rng(0)
    ints = feeds.random_array(rng, (1000,), np.int32)
    bools = feeds.random_array(rng, (1000,), np.bool_)
    floats = feeds.random_array(rng, (1000,), np.float16, (2.0, 3.0))
    assert ints.dtype == np.int32 and ints.min() >= 0 and ints.max() < feeds.INT_RANGE[1]
    assert bools.dtype == np.bool_ and 0 < bools.sum() < 1000
    assert floats.dtype == np.float16 and floats.min() >= 2.0 and floats.max() <= 3.0


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64,
                                   np.uint8, np.uint64, np.bool_])
def test_a_scalar_input_is_a_0d_array(dtype):
    """A bool at shape () came out as a numpy.bool scalar, which onnxruntime refuses as a feed."""
    array = feeds.random_array(np.random.default_rng(0), (), dtype)
    assert isinstance(array, np.ndarray) and array.shape == () and array.dtype == dtype


def test_a_scalar_bool_input_verifies():
    model = text_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool c) => (bool y) { y = Not(c) }
    """)
    assert verify_models(model, model, parity_only()).passed


def test_random_inputs_too_large_are_refused_before_any_is_made(tmp_path, monkeypatch):
    """A huge static dim or --shape was a MemoryError (exit 3) in verify and optimize --verify."""
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{n},3] x) => (float[{n},3] y) {{ y = Relu(x) }}
    """
    huge, dynamic = text_model(text.format(n=10**12)), text_model(text.format(n="N"))
    with pytest.raises(OnnxfoldError, match=r"input 'x' \[1000000000000,3\] float32 would take 11175.9 GiB"):
        verify_models(huge, huge, parity_only())
    with pytest.raises(OnnxfoldError, match=r"input 'x' \[100000000000,3\] float32 would take 1117.6 GiB"):
        verify_models(dynamic, dynamic, parity_only(shapes={"x": (10**11, 3)}))
    path = tmp_path / "huge.onnx"
    onnx.save(huge, str(path))
    result = onnxfold("optimize", path, tmp_path / "out.onnx", "--verify")
    assert result.returncode == 2 and "input 'x' [1000000000000,3] float32" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    monkeypatch.setattr(feeds, "MAX_FEED_BYTES", 1000)  # 600 bytes a sample
    with pytest.raises(OnnxfoldError, match=r"inputs of 2 sample\(s\) would take"):
        verify_models(dynamic, dynamic, parity_only(shapes={"x": (50, 3)}, samples=2))


def test_bad_arguments_are_clean_errors():
    # Settings are checked when made, before any model is read.
    for kwargs, match in (({"providers": ["tpu"]}, "unknown provider"),
                          ({"providers": []}, "no provider given"),
                          ({"samples": 0}, "samples"),
                          ({"threads": 0}, "threads"),
                          ({"threads": 10**6}, "threads must be at most"),  # onnxruntime tried to start them all
                          ({"seed": -1}, "seed"),
                          ({"input_range": (1, -1)}, "low < high"),
                          ({"rtol": -1.0}, "rtol"),
                          ({"output_tolerances": {"y": (1e-3,)}}, "must be \\(rtol, atol\\)")):
        with pytest.raises(OnnxfoldError, match=match):
            VerifySettings(**kwargs)
    # What needs the models is checked against them.
    with pytest.raises(OnnxfoldError, match="unknown input 'nope'"):
        verify_models(conv_bn(), conv_folded(), parity_only(shapes={"nope": (1,)}))


def test_settings_keep_short_provider_names_and_survive_a_copy():
    chosen = VerifySettings(providers=["CUDAExecutionProvider", "cpu", "cuda"], input_range=[0, 2])
    assert chosen.providers == ("cuda", "cpu") and chosen.input_range == (0.0, 2.0)
    assert dataclasses.replace(chosen, latency=False).providers == ("cuda", "cpu")


# ----------------------------------------------------------------------------- latency


def test_latency_numbers_present_and_positive():
    report = verify_models(conv_bn(), conv_folded(),
                           VerifySettings(providers=["cpu"], warmup=1, iterations=3, threads=1))
    as_dict = report.to_dict()
    json.dumps(as_dict, allow_nan=False)  # strictly JSON-able
    latency = as_dict["providers"][0]["latency"]
    for side in ("original", "optimized"):
        for key in ("median_ms", "p90_ms", "mean_ms", "min_ms"):
            assert latency[side][key] > 0
    assert latency["speedup"] > 0
    assert (latency["iterations"], latency["warmup"], latency["threads"]) == (3, 1, 1)
    assert "speedup" in report.render()


def test_latency_false_skips_timing():
    report = verify_models(conv_bn(), conv_folded(), parity_only())
    assert report.to_dict()["providers"][0]["latency"] is None


def test_progress_goes_to_the_callback_and_nothing_is_printed(capfd):
    """The library printed its progress to stderr itself; now it calls back, and prints
    nothing (the CLI shows the progress: test_cli)."""
    calls = []
    verify_models(conv_bn(), conv_folded(), VerifySettings(providers=["cpu"], warmup=1, iterations=2),
                  progress=lambda *call: calls.append(call))
    assert calls == [("cpu", 0, 3), ("cpu", 1, 3), ("cpu", 2, 3), ("cpu", 3, 3)]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# ----------------------------------------------------------------------------- CUDA


def _assert_cuda_unavailable(report, reason_part):
    as_dict = report.to_dict()
    cuda = next(p for p in as_dict["providers"] if p["name"] == "cuda")
    assert cuda["status"] == "unavailable"
    assert reason_part in cuda["reason"]
    assert cuda["outputs"] == [] and cuda["latency"] is None and cuda["passed"] is None
    cpu = next(p for p in as_dict["providers"] if p["name"] == "cpu")
    assert cpu["status"] == "ran" and cpu["latency"]["original"]["median_ms"] > 0
    text = report.render()
    assert "parity on cuda (CUDAExecutionProvider): UNAVAILABLE" in text
    assert "latency on cuda" not in text
    # An unavailable provider does not fail parity by itself.
    assert report.passed and as_dict["passed"] is True
    assert any("cuda" in w for w in report.warnings)


def test_cuda_missing_from_onnxruntime_is_reported(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    report = verify_models(conv_bn(), conv_folded(),
                           VerifySettings(providers=["cpu", "cuda"], warmup=0, iterations=3))
    _assert_cuda_unavailable(report, "onnxruntime-gpu")


def test_cuda_session_falling_back_to_cpu_is_reported(monkeypatch):
    # onnxruntime claims CUDA, yet sessions come out on CPU only (as when CUDA libraries
    # are missing): no CPU numbers may appear under cuda.
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real_session = ort.InferenceSession

    def cpu_only_session(source, sess_options=None, providers=None, **kwargs):
        return real_session(source, sess_options=sess_options,
                            providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", cpu_only_session)
    report = verify_models(conv_bn(), conv_folded(),
                           VerifySettings(providers=["cpu", "cuda"], warmup=0, iterations=3))
    _assert_cuda_unavailable(report, "instead of CUDAExecutionProvider")


def test_default_providers_follow_onnxruntime(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    report = verify_models(conv_bn(), conv_folded(), parity_only())
    assert [p.name for p in report.providers] == ["cpu"]


def test_only_unavailable_providers_fail(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    report = verify_models(conv_bn(), conv_folded(), parity_only(providers=["cuda"]))
    assert not report.passed
    assert any("nothing was verified" in w for w in report.warnings)


def test_a_negative_input_dim_is_dynamic(tmp_path):
    """Some converters write dim_value -1 for a dynamic dim; verify read it as a size
    (exit 3: negative dimensions are not allowed). Dim 0 unset is a batch of 1, with a note."""
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,4] x) => (float[2,4] y) { y = Relu(x) }
    """)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = -1
    report = verify_models(model, model, parity_only())
    assert report.passed and report.inputs[0].shape == [1, 4]
    assert any("batch" in note for note in report.notes)


def test_an_npz_of_pickled_objects_is_refused_not_unpickled(tmp_path):
    """np.load reads an .npz member when asked: its refusal of a pickle came as exit 3."""
    path = tmp_path / "inputs.npz"
    np.savez(path, x=np.array([{"run": "code"}], dtype=object))
    with pytest.raises(OnnxfoldError, match="not a readable .npz file"):
        verify_models(conv_bn(), conv_folded(), parity_only(inputs=str(path)))


def test_an_input_range_beyond_the_input_type_is_refused():
    """float32 inputs drawn from [0, 1e39) were inf, with only a numpy warning."""
    with pytest.raises(OnnxfoldError, match="beyond float32"):
        verify_models(conv_bn(), conv_folded(), parity_only(input_range=(0.0, 1e39)))
