"""Regressions: malformed rule files, folds that would overflow, and bugs that hid as misses."""

from __future__ import annotations

import threading

import pytest

from onnxfold.errors import OnnxfoldError
from onnxfold.ruleset import load_rule_file, load_rules

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
