"""drop_unused_nodes and sort_nodes (graph.py) do what graph-surgeon's cleanup() and
toposort() do, node for node and in the same order, on every sample model's graph."""

from __future__ import annotations

import random
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxfold.graph import drop_unused_nodes, holds_graphs, sort_nodes

from .helpers import model_from_text

SAMPLES = sorted((Path(__file__).parents[1] / "sample_models").glob("*.onnx"))


def _shuffled_graph(path, seed):
    """The model's graph with its nodes in a random order, plus two dead nodes."""
    graph = gs.import_onnx(onnx.load(path))
    random.Random(seed).shuffle(graph.nodes)
    source = graph.nodes[0].outputs[0]
    dead = gs.Variable("dead_a", dtype=source.dtype)
    graph.nodes.append(gs.Node("Neg", "dead_neg", inputs=[source], outputs=[dead]))
    graph.nodes.insert(0, gs.Node("Relu", "dead_relu", inputs=[dead], outputs=[gs.Variable("dead_b")]))
    return graph


@pytest.mark.parametrize("path", SAMPLES, ids=[p.stem for p in SAMPLES])
def test_same_nodes_in_the_same_order_as_graph_surgeon(path):
    ours, theirs = _shuffled_graph(path, 0), _shuffled_graph(path, 0)
    assert not holds_graphs(ours)  # else both take graph-surgeon's walks
    sort_nodes(drop_unused_nodes(ours))
    theirs.cleanup().toposort()
    assert [n.name for n in ours.nodes] == [n.name for n in theirs.nodes]
    assert "dead_neg" not in [n.name for n in ours.nodes]


def test_a_cycle_is_refused():
    graph = gs.import_onnx(model_from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) { a = Relu(x)
      y = Neg(a) }"""))
    relu, neg = graph.nodes
    relu.inputs[0] = neg.outputs[0]  # y = Neg(Relu(y))
    with pytest.raises(ValueError, match="cycle"):
        sort_nodes(graph)


def test_a_graph_with_a_branch_takes_graph_surgeons_walks():
    graph = gs.import_onnx(model_from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y) {
      unused = Neg(x)
      y = If(c) <then_branch = t () => (float[2] a) { a = Relu(x) }, else_branch = e () => (float[2] b) { b = Neg(x) }>
    }""", data=["x", "c"]))
    assert holds_graphs(graph)
    sort_nodes(drop_unused_nodes(graph))
    assert [n.op for n in graph.nodes] == ["If"]
