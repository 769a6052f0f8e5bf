"""The engine's parts: planning changes nothing, a miss names its values, rules run by
benefit, and one name source names everything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxfold import optimize
from onnxfold.engine import Engine, NodeSet
from onnxfold.errors import OnnxfoldError
from onnxfold.graph import use_numpy_types
from onnxfold.names import NameSource, name_nodes
from onnxfold.pattern import matches_at
from onnxfold.plan import Miss, Plan, plan_rewrite
from onnxfold.ruleset import builtin_rules_dir, load_rule_file, load_rules

from .helpers import assert_same_function, model_from_text

CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,8,8] x, float[6,4,3,3] W, float[6] B, float[6] gamma, float[6] beta, float[6] mean, float[6] var)
  => (float[1,6,8,8] y) {
  c = Conv<pads=[1,1,1,1]>(x, W, B)
  y = BatchNormalization(c, gamma, beta, mean, var)
}"""

CONV_BN_TRAINING = CONV_BN.replace("BatchNormalization(", "BatchNormalization<training_mode=1>(").replace(
    "opset_import: [\"\" : 17]", "opset_import: [\"\" : 15]")

FOLD_BN_INTO_CONV = (builtin_rules_dir() / "fold-bn-into-conv.toml").read_text()


def _graph(text, named=True):
    graph = gs.import_onnx(model_from_text(text))
    use_numpy_types(graph)
    if named:
        name_nodes(graph, NameSource([graph]))
    return graph


def _snapshot(graph) -> bytes:
    """Everything a rewrite could change: nodes, wiring, attributes and weight values."""
    return gs.export_onnx(graph.copy()).SerializeToString()


def _plans_at_root(graph, rule_name):
    rule = next(rule for rule in load_rules() if rule.name == rule_name)
    root = next(node for node in graph.nodes if node.op == rule.root.function)
    own = NodeSet(graph.nodes)
    return [plan_rewrite(rule, match, own, graph.outputs) for match in matches_at(rule, root)]


@pytest.mark.parametrize("text, kind", [(CONV_BN, Plan), (CONV_BN_TRAINING, Miss)])
def test_planning_leaves_the_graph_as_it_was(text, kind):
    graph = _graph(text)
    before = _snapshot(graph)
    outcomes = _plans_at_root(graph, "fold-bn-into-conv")
    assert [type(outcome) for outcome in outcomes] == [kind]
    assert _snapshot(graph) == before


def test_a_miss_names_the_values_its_condition_is_about():
    (miss,) = _plans_at_root(_graph(CONV_BN_TRAINING), "fold-bn-into-conv")
    assert miss.rule == "fold-bn-into-conv" and miss.node == "BatchNormalization_1"
    assert "training mode" in miss.reason
    assert miss.values == ("y",)  # bn_inference(y): the BatchNormalization's output


def test_the_report_json_keeps_a_miss_and_adds_its_values():
    text = CONV_BN.replace("=> (float[1,6,8,8] y)", "=> (float[1,6,8,8] y, float[1,6,8,8] c)")
    _, report = optimize(model_from_text(text), only=["fold-bn-into-conv"])
    entries = [m for m in report.to_dict()["not_applied"] if m["rule"] == "fold-bn-into-conv"]
    assert entries == [{"rule": "fold-bn-into-conv", "node": "BatchNormalization_1",
                        "reason": "'c' is a graph output and would disappear", "values": ("c",)}]
    assert "BatchNormalization_1: fold-bn-into-conv: 'c' is a graph output and would disappear  (values: c)" \
        in report.render(explain=True).splitlines()[-1]


def _user_rule(folder: Path, name, benefit=None) -> Path:
    """fold-bn-into-conv under another name, so two rules fire at one BatchNormalization."""
    header = f'name = "{name}"\n' + ("" if benefit is None else f"benefit = {benefit}\n")
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(header + FOLD_BN_INTO_CONV)
    return folder


@pytest.mark.parametrize("name, benefit, first", [
    ("aaa-copy", None, "aaa-copy"),  # same benefit (2 pattern lines): the name decides
    ("zzz-copy", None, "fold-bn-into-conv"),
    ("zzz-copy", 3, "zzz-copy"),  # a higher benefit goes first
    ("aaa-copy", 1, "fold-bn-into-conv"),
])
def test_rules_rooted_at_one_op_run_by_benefit_then_name(tmp_path, name, benefit, first):
    folder = _user_rule(tmp_path / "rules", name, benefit)
    _, report = optimize(model_from_text(CONV_BN), rule_dirs=[folder])
    assert [r.rule for r in report.rewrites] == [first]


def test_benefit_defaults_to_the_pattern_size():
    rules = {rule.name: rule for rule in load_rules()}
    assert rules["fold-bn-into-conv"].benefit == 2
    assert rules["fold-bn-through-reshape"].benefit == len(rules["fold-bn-through-reshape"].pattern)


@pytest.mark.parametrize("value", ["true", "-1", "1.5", '"high"'])
def test_a_benefit_that_is_not_a_whole_number_is_refused(tmp_path, value):
    path = tmp_path / "bad.toml"
    path.write_text(f"benefit = {value}\n" + FOLD_BN_INTO_CONV)
    with pytest.raises(OnnxfoldError, match="'benefit' must be a whole number"):
        load_rule_file(path)


def test_names_given_to_nodes_are_not_given_again():
    """Unnamed nodes are named from the one source, so a later fresh name (a new weight,
    an inlined branch's node) never repeats one."""
    graph = _graph(CONV_BN, named=False)
    names = NameSource([graph])
    name_nodes(graph, names)
    given = [node.name for node in graph.nodes]
    assert given == ["Conv_0", "BatchNormalization_1"]
    assert names.fresh("Conv_0") == "Conv_0_1"


def test_a_duplicate_node_name_is_renamed_after_its_position():
    graph = _graph(CONV_BN)
    graph.nodes[0].name = graph.nodes[1].name = "block"
    name_nodes(graph, NameSource([graph]))
    assert [node.name for node in graph.nodes] == ["block", "block_1"]


_CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,5,5] x, float[2,2,3,3] W, float[2] gamma, float[2] beta, float[2] mean, float[2] var) => (float[1,2,3,3] y) {
  c = Conv(x, W)
  y = BatchNormalization(c, gamma, beta, mean, var)
}
"""


_BN_STATS = [np.full(2, value, dtype=np.float32) for value in (1.5, 0.25, 0.5, 2.0)]


def test_nodes_made_after_a_cleanup_are_still_rewritten():
    """The engine outlives graph.cleanup() (rules and clean-ups take turns). A node made
    after the nodes a rewrite removed were freed may get one of their ids: it must still
    count as a live node of this graph. With sets of ids it was skipped, at random."""
    import gc

    rules = [load_rule_file(builtin_rules_dir() / "fold-bn-into-conv.toml")]
    graph = _graph(_CONV_BN)
    engine = Engine(graph, rules, NameSource([graph]))
    for round_ in range(30):
        engine.run()
        graph.cleanup()
        assert [node.op for node in graph.nodes] == ["Conv"], round_
        gc.collect()  # frees the removed nodes: their ids are up for reuse
        conv = graph.nodes[-1]
        stats = [gs.Constant(f"s{round_}_{k}", value) for k, value in enumerate(_BN_STATS)]
        out = gs.Variable(f"y{round_}", dtype=conv.outputs[0].dtype, shape=conv.outputs[0].shape)
        graph.nodes.append(gs.Node("BatchNormalization", f"bn{round_}", inputs=[conv.outputs[0], *stats],
                                   outputs=[out]))
        graph.outputs = [out]
    assert len(engine.rewrites) == 30


def test_rules_fire_in_an_inlined_constant_if_branch():
    """Nodes a clean-up brings into the graph (an If's taken branch) are the graph's own."""
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,5,5] x, float[2,2,3,3] W, float[2] gamma, float[2] beta, float[2] mean, float[2] var) => (float[1,2,3,3] y) {
  cond = Constant<value=bool {1}>()
  y = If(cond) <then_branch = t () => (float[1,2,3,3] yt) {
      c = Conv(x, W)
      yt = BatchNormalization(c, gamma, beta, mean, var)
    }, else_branch = e () => (float[1,2,3,3] ye) {
      ye = Conv(x, W)
    }>
}
"""
    model = model_from_text(text)
    optimized, report = optimize(model)
    assert [node.op_type for node in optimized.graph.node] == ["Conv"], report.render(explain=True)
    assert_same_function(model, optimized)


def test_a_rule_file_is_parsed_once_until_it_changes(tmp_path):
    folder = _user_rule(tmp_path / "rules", "my-copy")
    path = folder / "my-copy.toml"
    first = load_rule_file(path)
    assert load_rule_file(path) is first  # unchanged: the parsed rule is reused
    path.write_text(f'name = "my-copy"\nbenefit = 7\n' + FOLD_BN_INTO_CONV)
    edited = load_rule_file(path)
    assert edited is not first and edited.benefit == 7
