"""Regressions: malformed rule files, folds that would overflow, and bugs that hid as misses."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfold import optimize
from onnxfold import predicates as predicate_module
from onnxfold.errors import CannotTell, OnnxfoldError
from onnxfold.ruleset import load_rule_file, load_rules

from .helpers import model_from_text, run

HEAD = 'summary = "s"\npattern = """\na = Relu(x)\ny = Relu(a)\n"""\n'
CONV_MUL = 'summary = "s"\npattern = """\nconv = Conv(x, W, B)\ny = Mul(conv, c)\n"""\n'


def _refusal(tmp_path, text):
    """The message loading a rule file with `text` is refused with."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(OnnxfoldError) as refused:
        load_rule_file(path)
    assert str(path) in str(refused.value)
    return str(refused.value)


def _load_within(path, seconds=20):
    """Load a rule file in a thread; fail rather than hang if the loader never returns."""
    outcome = {}

    def load():
        try:
            load_rule_file(path)
        except OnnxfoldError as error:
            outcome["error"] = str(error)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "the rule loader does not return"
    return outcome.get("error")


@pytest.mark.parametrize("pattern, cycle", [
    ("a = Relu(b)\nb = Relu(a)\ny = Add(a, b)", "a -> b -> a"),
    ("a = Relu(a)\ny = Relu(a)", "a -> a"),
    ("y = Relu(y)", "y -> y"),
])
def test_cyclic_pattern_is_refused_naming_the_cycle(tmp_path, pattern, cycle):
    path = tmp_path / "cyclic.toml"
    path.write_text(f'summary = "s"\npattern = """\n{pattern}\n"""\nresult = "y = Relu(x)"\n')
    error = _load_within(path)
    assert error and str(path) in error and "cyclic" in error and cycle in error, error


MALFORMED = {
    "when = 5": (HEAD + 'when = 5\nresult = "y = Relu(x)"\n', "'when' must be a list of strings"),
    "when = [5]": (HEAD + 'when = [5]\nresult = "y = Relu(x)"\n', "'when' must be a list of strings"),
    "compute is a string": (HEAD + 'compute = "W = negate(x, x)"\nresult = "y = Relu(x)"\n',
                            "'compute' must be a list"),
    "**x": (HEAD + 'result = "y = Relu(x, **x)"\n', "'**'"),
    "complex literal": (HEAD + 'result = "y = LeakyRelu(x, alpha=1+2j)"\n', "not a name, attribute or literal"),
    "set literal": (HEAD + 'result = "y = LeakyRelu(x, alpha={1, 2})"\n', "not a name, attribute or literal"),
    "nested list": (HEAD + 'result = "y = LeakyRelu(x, alpha=[[1]])"\n', "not a name, attribute or literal"),
    "huge int": (HEAD + 'result = "y = LeakyRelu(x, alpha=99999999999999999999)"\n', "not a name"),
    "nesting deep for unparse": (HEAD + 'result = "y = LeakyRelu(x, alpha=' + "-" * 900 + '1)"\n', "not a name"),
    "deep nesting": (HEAD + 'result = "y = LeakyRelu(x, alpha=' + "-" * 100000 + '1)"\n', "nested too deeply"),
    "name is a number": ('name = 5\n' + HEAD + 'result = "y = Relu(x)"\n', "'name'"),
    "description is a number": ('description = 5\n' + HEAD + 'result = "y = Relu(x)"\n', "'description'"),
    "misspelt key": (HEAD + 'whne = ["constant(x)"]\nresult = "y = Relu(x)"\n', "unknown key 'whne'"),
    "examples not tables": (HEAD + 'result = "y = Relu(x)"\nexamples = [5]\n', "list of tables"),
    "example without model": (HEAD + 'result = "y = Relu(x)"\n[[examples]]\ndata = ["x"]\n', "'model'"),
    "counterexample without reason": (HEAD + 'result = "y = Relu(x)"\n[[counterexamples]]\nmodel = "m"\n',
                                      "'reason'"),
    "example data not names": (HEAD + 'result = "y = Relu(x)"\n[[examples]]\nmodel = "m"\ndata = [1]\n',
                               "'data'"),
    "pattern target twice": ('summary = "s"\npattern = """\na = Relu(x)\na = Sigmoid(x)\ny = Add(a, a)\n"""\n'
                             'result = "y = Relu(x)"\n', "'a', which already has a value"),
    "compute shadows a free value": (CONV_MUL + 'compute = ["x, B2 = shift_conv(W, B, c)"]\n'
                                     'result = "y = Conv(x, W, B2)"\n', "'x', which already has a value"),
    "compute assigns nothing": (CONV_MUL + 'compute = ["shift_conv(W, B, c)"]\nresult = "y = Conv(x, W, B)"\n',
                                "names no result"),
    "predicate with a keyword": (HEAD + 'when = ["rank_is(x, rank=2)"]\nresult = "y = Relu(x)"\n', "keywords"),
    "predicate arity": (HEAD + 'when = ["rank_is(x)"]\nresult = "y = Relu(x)"\n', "rank_is(x)"),
    "transform arity": (CONV_MUL + 'compute = ["W2, B2 = shift_conv(W, B)"]\nresult = "y = Conv(x, W2, B2)"\n',
                        "shift_conv(W, B)"),
    "predicate assigns": (HEAD + 'when = ["r = constant(x)"]\nresult = "y = Relu(x)"\n', "assigns names"),
    "unknown attribute": (CONV_MUL + 'when = ["rank_is(x, conv.grup)"]\nresult = "y = Conv(x, W, B)"\n',
                          "Conv has no attribute 'grup'"),
    "unknown pattern op": ('summary = "s"\npattern = """\na = Frob(x)\ny = Relu(a)\n"""\nresult = "y = Relu(x)"\n',
                           "not an ONNX op"),
    "unknown result op": (HEAD + 'result = "y = Frob(x)"\n', "not an ONNX op"),
    "result attribute the op lacks": (HEAD + 'result = "y = Relu(x, alpha=1.0)"\n', "Relu has no attribute 'alpha'"),
    "result attribute None": (HEAD + 'result = "y = LeakyRelu(x, alpha=None)"\n', "no attribute value"),
    "result input a number": (HEAD + 'result = "y = Relu(3)"\n', "'3' in result"),
    "result input an attribute": (HEAD + 'result = "y = Relu(a.alpha)"\n', "in result"),
    "result line without output": ('summary = "s"\npattern = """\na = Relu(x)\nb = Relu(a)\ny = Relu(b)\n"""\n'
                                   'result = """\nRelu(x)\ny = Relu(x)\n"""\n', "names no output"),
    "result computes the output twice": ('summary = "s"\npattern = """\na = Relu(x)\nb = Relu(a)\ny = Relu(b)\n"""\n'
                                         'result = """\ny = Relu(x)\ny = Sigmoid(x)\n"""\n', "already has a value"),
}


@pytest.mark.parametrize("label", list(MALFORMED))
def test_malformed_rule_file_is_refused_naming_the_problem(tmp_path, label):
    text, expected = MALFORMED[label]
    message = _refusal(tmp_path, text)
    assert expected in message, message


def test_malformed_rule_file_exits_2_from_the_command_line(tmp_path):
    from click.testing import CliRunner

    from onnxfold.cli import main

    (tmp_path / "r.toml").write_text(HEAD + 'when = 5\nresult = "y = Relu(x)"\n')
    result = CliRunner().invoke(main, ["rules", "--rules", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "r.toml" in result.output and "'when' must be a list of strings" in result.output


def test_shipped_rules_still_load():
    assert len(load_rules()) >= 20


# --- folds whose weights would not be finite --------------------------------------------

def _conv_bn_model(dtype, W, gamma, var, epsilon=1e-5):
    channels = W.shape[0]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    arrays = {"W": W, "g": gamma, "b": np.zeros(channels), "mu": np.zeros(channels), "v": var}
    inits = [numpy_helper.from_array(np.asarray(a, dtype), name) for name, a in arrays.items()]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "mu", "v"], ["y"], epsilon=epsilon)]
    shape = [1, channels, 4, 4]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, shape)],
                              [helper.make_tensor_value_info("y", elem, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _diagonal(channels, value):
    W = np.zeros((channels, channels, 1, 1))
    W[range(channels), range(channels)] = value
    return W


def _assert_left_with_reason(model, dtype, expected):
    optimized, report = optimize(model)
    assert "fold-bn-into-conv" not in report.fired()
    reasons = [m.reason for m in report.misses if m.rule == "fold-bn-into-conv"]
    assert any(expected in reason for reason in reasons), reasons
    x = {"x": np.linspace(-1, 1, 64).reshape(1, 4, 4, 4).astype(dtype)}
    before, after = run(model, x)["y"], run(optimized, x)["y"]
    np.testing.assert_array_equal(np.isfinite(before), np.isfinite(after))
    return reasons


def test_float16_fold_that_overflows_is_left_with_its_reason():
    # 300 / sqrt(1e-5) = 94868 > 65504, the largest float16
    model = _conv_bn_model(np.float16, _diagonal(4, 300), np.ones(4), np.zeros(4))
    _assert_left_with_reason(model, np.float16, "folded weights overflow float16")


def test_float32_fold_that_overflows_is_left_with_its_reason():
    model = _conv_bn_model(np.float32, _diagonal(4, 3e38), np.full(4, 2.0), np.full(4, 1 - 1e-5))
    _assert_left_with_reason(model, np.float32, "folded weights overflow float32")


def test_zero_variance_without_epsilon_is_left_with_its_reason():
    rng = np.random.default_rng(0)
    model = _conv_bn_model(np.float32, rng.normal(size=(4, 4, 1, 1)), np.ones(4), np.zeros(4), epsilon=0.0)
    _assert_left_with_reason(model, np.float32, "not finite")


def test_float16_fold_within_range_still_fires():
    model = _conv_bn_model(np.float16, _diagonal(4, 3), np.ones(4), np.ones(4))
    _, report = optimize(model)
    assert report.fired().get("fold-bn-into-conv") == 1


# --- "cannot tell" is explicit; other errors are bugs --------------------------------------

CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,8,8] x, float[6,4,3,3] W, float[6] gamma, float[6] beta, float[6] mean, float[6] var) => (float[1,6,6,6] y) {
  c = Conv(x, W)
  y = BatchNormalization(c, gamma, beta, mean, var)
}
"""


def test_a_predicate_that_hits_a_bug_raises_instead_of_missing(monkeypatch):
    def broken(bn_output):
        return None + 1

    monkeypatch.setitem(predicate_module.PREDICATES, "bn_inference", broken)
    with pytest.raises(TypeError):
        optimize(model_from_text(CONV_BN), only=["fold-bn-into-conv"])


def test_a_transform_that_hits_a_bug_raises_instead_of_missing(monkeypatch):
    from onnxfold import transforms

    def broken(*args):
        raise IndexError("a bug")

    monkeypatch.setitem(transforms.TRANSFORMS, "fold_bn_into_conv", broken)
    with pytest.raises(IndexError):
        optimize(model_from_text(CONV_BN), only=["fold-bn-into-conv"])


def _user_rule(tmp_path, text):
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "user-scale.toml").write_text(text)
    return folder


def _conv_mul_model(scale_shape):
    """Conv then Mul by a graph input `c` (a runtime value) of the given shape (None: unknown)."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["conv"]), helper.make_node("Mul", ["conv", "c"], ["y"])]
    weight = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "W")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3]),
              helper.make_tensor_value_info("c", TensorProto.FLOAT, scale_shape)]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_unknown_shape_gives_a_reason_and_does_not_fire(tmp_path):
    # A user rule without constant(c): per_channel meets a value of unknown shape.
    folder = _user_rule(tmp_path, CONV_MUL + 'when = ["per_channel(c, conv)"]\n'
                                  'compute = ["W2, B2 = scale_conv(W, B, c)"]\nresult = "y = Conv(x, W2, B2)"\n')
    model = _conv_mul_model(None)
    optimized, report = optimize(model, rule_dirs=[folder], only=["user-scale"])
    assert not report.fired()
    reasons = [m.reason for m in report.misses if m.rule == "user-scale"]
    assert reasons == ["per_channel cannot tell: the shape of 'c' is not known"], reasons
    assert [n.op_type for n in optimized.graph.node] == ["Conv", "Mul"]


def test_a_value_that_is_not_a_constant_gives_a_reason_and_does_not_fire(tmp_path):
    folder = _user_rule(tmp_path, CONV_MUL + 'when = ["per_channel(c, conv)"]\n'
                                  'compute = ["W2, B2 = scale_conv(W, B, c)"]\nresult = "y = Conv(x, W2, B2)"\n')
    optimized, report = optimize(_conv_mul_model([1, 4, 1, 1]), rule_dirs=[folder], only=["user-scale"])
    assert not report.fired()
    reasons = [m.reason for m in report.misses if m.rule == "user-scale"]
    assert reasons == ["the arithmetic cannot be done: 'c' is not a constant"], reasons


def test_a_compute_line_naming_too_few_values_is_a_rule_file_error(tmp_path):
    folder = _user_rule(tmp_path, CONV_MUL + 'compute = ["W2 = shift_conv(W, B, c)"]\n'
                                  'result = "y = Conv(x, W2, B)"\n')
    model = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,3,3] x) => (float[1,4,3,3] y)
<float[4,4,1,1] W = {1,0,0,0, 0,1,0,0, 0,0,1,0, 0,0,0,1}, float[4] B = {1,2,3,4}, float[1,4,1,1] c = {1,2,3,4}> {
  conv = Conv(x, W, B)
  y = Mul(conv, c)
}
""")
    with pytest.raises(OnnxfoldError, match="shift_conv returns 2 values, 'W2 = shift_conv"):
        optimize(model, rule_dirs=[folder], only=["user-scale"])


def test_unknown_conv_weight_shape_is_cannot_tell():
    import onnx_graphsurgeon as gs

    weight = gs.Variable("W", dtype=np.float32, shape=None)
    out = gs.Variable("y", dtype=np.float32)
    gs.Node("Conv", "conv", attrs={"kernel_shape": [1, 1]}, inputs=[gs.Variable("x"), weight], outputs=[out])
    with pytest.raises(CannotTell, match="shape of 'W' is not known"):
        predicate_module.unit_kernel(out)


def test_a_rules_path_that_is_a_file_is_named_so(tmp_path):
    file = tmp_path / "rules.toml"
    file.write_text("")
    with pytest.raises(OnnxfoldError, match="the rules folder is a file, not a folder of rule files"):
        load_rules([file])
