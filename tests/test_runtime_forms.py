"""Forms onnxruntime fuses (runtime_forms.py): GELU as GeluFusion knows it or the standard
Gelu op, ReduceMean over H and W as GlobalAveragePool. Exact constants only."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

from onnxfold import optimize

from .helpers import assert_same_function, model_from_text, op_counts


def _gelu_model(opset, divide="d = Div(x, s)", half="h = Mul(k, a)", product="y = Mul(x, h)",
                sqrt2="1.4142135", extra=""):
    """The dynamo exporter's GELU below opset 20: x * (0.5 * (1 + erf(x / sqrt 2)))."""
    return model_from_text(f"""
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[2,5,16] x) => (float[2,5,16] y{extra and ', float[2,5,16] z'}) <float s = {{{sqrt2}}}, float r = {{0.70710677}}, float one = {{1.0}}, float k = {{0.5}}> {{
  {divide}
  e = Erf(d)
  a = Add(e, one)
  {half}
  {product}
  {extra}
}}
""")


def _ort_ops(model):
    """The ops onnxruntime runs once it has optimized the model (its fusions done)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = ""
    session_model = onnx.load_from_string(model.SerializeToString())
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = f"{folder}/optimized.onnx"
        ort.InferenceSession(session_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return op_counts(onnx.load(options.optimized_model_filepath))


def test_dynamo_gelu_below_opset_20_becomes_the_form_onnxruntime_fuses():
    model = _gelu_model(18)
    assert "Erf" in _ort_ops(model)  # onnxruntime does not fuse the exporter's form
    optimized, report = optimize(model)
    assert report.normalized["gelu"] == 1
    assert_same_function(model, optimized)
    ops = _ort_ops(optimized)
    assert ops.get("Gelu") == 1 and "Erf" not in ops, ops


@pytest.mark.parametrize("divide", ["d = Div(x, s)", "d = Mul(x, r)", "d = Mul(r, x)"])
def test_gelu_from_opset_20_is_the_standard_op(divide):
    model = _gelu_model(20, divide=divide, half="h = Mul(a, k)")
    optimized, report = optimize(model)
    assert op_counts(optimized) == {"Gelu": 1}
    assert_same_function(model, optimized)


def test_gelu_onnxruntime_fuses_already_is_left_as_it_is():
    # TorchScript's export: (x * (1 + erf(x / sqrt 2))) * 0.5
    model = _gelu_model(17, half="h = Mul(x, a)", product="y = Mul(h, k)")
    optimized, report = optimize(model)
    assert report.normalized["gelu"] == 0
    assert op_counts(optimized) == op_counts(model)


@pytest.mark.parametrize("change", [
    dict(sqrt2="1.4142099"),  # an approximation some BERT exports use: another function
    dict(half="h = Mul(a, a)"),  # no 0.5
    dict(product="y = Mul(h, h)"),  # not times x
    dict(extra="z = Identity(a)"),  # a middle value is used elsewhere
])
def test_gelu_lookalikes_stay(change):
    model = _gelu_model(20, **change)
    optimized, report = optimize(model)
    assert "Gelu" not in op_counts(optimized)
    assert_same_function(model, optimized)


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("constants, rewritten", [("float[1]", False), ("float", True)])
def test_gelu_whose_constants_broadcast_a_scalar_keeps_the_broadcast(opset, constants, rewritten):
    """A rank-0 x times constants of shape [1] is [1]: Gelu(x), or the form with rank-0
    constants, would be rank 0. With rank-0 constants there is no broadcast to keep."""
    out = "float[1]" if constants == "float[1]" else "float"
    model = model_from_text(f"""
<ir_version: 9, opset_import: ["" : {opset}]>
g (float x) => ({out} y) <{constants} r = {{0.70710677}}, {constants} one = {{1.0}}, {constants} k = {{0.5}}> {{
  d = Mul(x, r)
  e = Erf(d)
  a = Add(e, one)
  h = Mul(k, a)
  y = Mul(x, h)
}}
""")
    optimized, report = optimize(model)
    assert report.normalized["gelu"] == int(rewritten)
    assert_same_function(model, optimized)


def _head(reduce, consumer="y = Flatten(m)", shape="float[2,8,5,5]", out="float[2,8]", opset=18):
    return model_from_text(f"""
<ir_version: 8, opset_import: ["" : {opset}]>
g ({shape} x) => ({out} y) <int64[2] axes = {{2, 3}}, int64[2] back = {{-1, 8}}, int64[1] flat = {{-1}}> {{
  {reduce}
  {consumer}
}}
""")


@pytest.mark.parametrize("reduce, consumer, out", [
    ("m = ReduceMean<keepdims=1>(x, axes)", "y = Flatten(m)", "float[2,8]"),
    ("m = ReduceMean<keepdims=1>(x, axes)", "y = Reshape(m, back)", "float[2,8]"),
    # (keepdims=0 then Flatten<axis=-1>: that Flatten keeps the shape, identity-flatten removes it)
    ("m = ReduceMean<keepdims=0>(x, axes)", "y = Reshape(m, flat)", "float[16]"),
])
def test_spatial_mean_is_global_average_pool(reduce, consumer, out):
    model = _head(reduce, consumer, out=out)
    optimized, report = optimize(model)
    assert report.normalized["global-average-pool"] == 1
    assert "GlobalAveragePool" in op_counts(optimized) and "ReduceMean" not in op_counts(optimized)
    assert_same_function(model, optimized)


def test_spatial_mean_before_opset_18_reads_its_axes_attribute():
    model = _head("m = ReduceMean<axes=[-2, -1]>(x)", opset=13)
    optimized, _ = optimize(model)
    assert "GlobalAveragePool" in op_counts(optimized)
    assert_same_function(model, optimized)




def test_other_means_stay():
    axes_12 = model_from_text("""
<ir_version: 8, opset_import: ["" : 18]>
g (float[2,8,5,5] x) => (float[2,1,1,5] y) <int64[2] axes = {1, 2}> {
  y = ReduceMean<keepdims=1>(x, axes)
}
""")
    into_gemm = model_from_text("""
<ir_version: 8, opset_import: ["" : 18]>
g (float[2,8,5,5] x, float[8,3] W) => (float[2,3] y) <int64[2] axes = {2, 3}> {
  m = ReduceMean<keepdims=0>(x, axes)
  y = MatMul(m, W)
}
""")
    for model in (axes_12, into_gemm):
        optimized, report = optimize(model)
        assert report.normalized["global-average-pool"] == 0
        assert "ReduceMean" in op_counts(optimized)


def _tanh_model(opset, cube="c = Pow(x, three)", c="0.7978846"):
    """The tanh approximation as the exporters write it."""
    return model_from_text(f"""
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[2,5,16] x) => (float[2,5,16] y) <float three = {{3.0}}, float a = {{0.044715}}, float c = {{{c}}}, float one = {{1.0}}, float k = {{0.5}}> {{
  q = Mul(x, x)
  {cube}
  t = Mul(a, c3)
  i = Add(x, t)
  s = Mul(c, i)
  h = Tanh(s)
  p = Add(h, one)
  m = Mul(x, p)
  y = Mul(m, k)
}}
""".replace("c = Pow", "c3 = Pow").replace("c = Mul(x, q)", "c3 = Mul(x, q)"))


@pytest.mark.parametrize("cube", ["c = Pow(x, three)", "c = Mul(x, q)"])
def test_tanh_gelu_from_opset_20_is_the_standard_op(cube):
    model = _tanh_model(20, cube)
    optimized, report = optimize(model)
    assert op_counts(optimized) == {"Gelu": 1}, op_counts(optimized)
    assert optimized.graph.node[0].attribute[0].s == b"tanh"
    assert_same_function(model, optimized)


@pytest.mark.parametrize("opset, c", [(18, "0.7978846"), (20, "0.8")])
def test_tanh_gelu_stays_below_opset_20_or_with_other_constants(opset, c):
    model = _tanh_model(opset, "c = Mul(x, q)", c=c)
    optimized, report = optimize(model)
    assert "Gelu" not in op_counts(optimized) and "Tanh" in op_counts(optimized)
