"""Grows one ONNX graph node by node: the fuzzer's random graphs and the benchmark's
synthetic networks (bench/synth.py) are both built on it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphBuilder:
    """Collects nodes and initializers; hands out unique names; numbers come from a seed."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.initializers = [], []
        self.count = 0

    def fresh(self, prefix: str) -> str:
        """A name no other value or node of the graph has (prefixes end in a letter)."""
        self.count += 1
        return f"{prefix}{self.count}"

    def initializer(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def add_node(self, op: str, inputs, outputs, **attrs) -> None:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=self.fresh(op), **attrs))

    def graph_model(self, name: str, inputs: list, outputs: list, opset: int, **fields) -> onnx.ModelProto:
        """The model of the graph so far (IR version 8), its inputs and outputs ValueInfoProtos."""
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8, **fields)
