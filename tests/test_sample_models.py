"""Every shipped sample model, as PyTorch's exporters really produce them.

For each train-time export: the output is valid, computes the same function as the input
(onnxruntime, graph optimizations off, 1e-5 relative), no BatchNormalization is left where
the model has no trap, and the graph has no more nodes than the re-parameterized oracle
after the same clean-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from onnxfold import optimize

from .helpers import assert_same_function, op_counts, random_feeds

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
MANIFEST = json.loads((SAMPLES / "manifest.json").read_text())
TRAIN_GRAPHS = [entry for entry in MANIFEST if entry["variant"] != "oracle"]


@pytest.fixture(scope="module")
def oracle_nodes():
    cache = {}

    def count(file_name):
        if file_name not in cache:
            optimized, _ = optimize(SAMPLES / file_name)
            cache[file_name] = len(optimized.graph.node)
        return cache[file_name]

    return count


@pytest.mark.parametrize("entry", TRAIN_GRAPHS, ids=[e["file"] for e in TRAIN_GRAPHS])
def test_sample_model(entry, oracle_nodes):
    original = onnx.load(str(SAMPLES / entry["file"]))
    optimized, report = optimize(original)
    onnx.checker.check_model(optimized, full_check=True)
    assert [i.name for i in optimized.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in optimized.graph.output] == [o.name for o in original.graph.output]
    feeds = random_feeds(original)
    assert_same_function(original, optimized, feeds=feeds)
    if not entry.get("traps"):
        assert "BatchNormalization" not in op_counts(optimized), report.render(explain=True)
    if entry.get("oracle"):
        assert len(optimized.graph.node) <= oracle_nodes(entry["oracle"]), report.render(explain=True)
        oracle = onnx.load(str(SAMPLES / entry["oracle"]))
        assert_same_function(oracle, optimized, rtol=1e-4, feeds=feeds)


def test_every_trap_is_explained():
    """Where a sample keeps a BatchNormalization or Add, a rule says why it did not apply.

    Entries with rule "-" ("no rule's pattern matches ...") explain nothing. A rule whose
    pattern ends below the node reports at that later node (BN before a padded Conv is
    reported at the Conv), and a node left only because its neighbour was left (an Add of
    a leftover) counts through that neighbour. Every leftover must reach a rule's reason.
    """
    for entry in TRAIN_GRAPHS:
        if not entry.get("traps"):
            continue
        optimized, report = optimize(SAMPLES / entry["file"])
        nodes = {n.name: n for n in optimized.graph.node}
        left = {name for name, n in nodes.items() if n.op_type in ("BatchNormalization", "Add")}
        reasons = {m.node: m.reason for m in report.misses if m.rule != "-"}
        assert all(len(reason) > 20 for reason in reasons.values()), reasons
        explained = {name for name in left if name in reasons
                     or any(name_feeds(nodes[name], nodes[c]) for c in reasons if c in nodes)}
        while True:
            more = {name for name in left - explained
                    if any(name_feeds(nodes[name], nodes[e]) or name_feeds(nodes[e], nodes[name])
                           for e in explained)}
            if not more:
                break
            explained |= more
        assert left <= explained, (entry["file"], left - explained, report.render(explain=True))


def name_feeds(producer, consumer):
    return any(output in consumer.input for output in producer.output)
