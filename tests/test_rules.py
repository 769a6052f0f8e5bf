"""Every rule file's examples (it must fire) and counterexamples (it must not), in onnxruntime."""

from __future__ import annotations

import onnx
import pytest

import onnxfold.engine
from onnxfold import optimize
from onnxfold.ruleset import load_rules

from .helpers import assert_same_function, model_from_text

RULES = load_rules()


def _cases(kind):
    for rule in RULES:
        for index, case in enumerate(getattr(rule, kind)):
            yield pytest.param(rule, case, id=f"{rule.name}-{index}")


@pytest.fixture(autouse=True)
def no_duplicate_tensors_after_any_rewrite(monkeypatch):
    """After every rewrite, no two distinct values of the graph share a name (graph-surgeon
    raises if they do): a rule that made one would write a model whose wiring is ambiguous."""
    apply_plan = onnxfold.engine.apply_plan

    def checked(graph, plan, names):
        change = apply_plan(graph, plan, names)
        graph.tensors(check_duplicates=True)
        return change

    monkeypatch.setattr(onnxfold.engine, "apply_plan", checked)


def test_every_rule_has_examples_and_counterexamples():
    for rule in RULES:
        assert rule.examples, f"{rule.name} has no example"
        assert rule.counterexamples, f"{rule.name} has no counterexample (a case it must not fire on)"


@pytest.mark.parametrize("rule, case", list(_cases("examples")))
def test_example_fires_and_keeps_the_function(rule, case):
    model = model_from_text(case["model"], case.get("data"))
    optimized, report = optimize(model, only=[rule.name])
    assert report.fired().get(rule.name, 0) >= 1, report.render(explain=True)
    assert report.after["nodes"] < report.before["nodes"]
    onnx.checker.check_model(optimized, full_check=True)
    assert_same_function(model, optimized)


@pytest.mark.parametrize("rule, case", list(_cases("counterexamples")))
def test_counterexample_is_left_alone_with_its_reason(rule, case):
    model = model_from_text(case["model"], case.get("data"))
    optimized, report = optimize(model, only=[rule.name])
    assert rule.name not in report.fired(), f"{rule.name} fired on a trap"
    reasons = [m.reason for m in report.misses if m.rule == rule.name]
    assert any(case["reason"] in reason for reason in reasons), reasons
    assert_same_function(model, optimized)
