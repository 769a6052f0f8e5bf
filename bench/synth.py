"""Synthetic train-time graphs for the benchmark, built with onnx.helper and numpy.

- `repvgg_train(width_scale)`: a RepVGG-B3-shaped network as it is exported for training
  (3x3 conv+BN, 1x1 conv+BN and BN identity branches per block): about 500 MB of float32
  weights at width_scale=1.
- `deep_chain(nodes)`: a long chain of tiny blocks (1-4 channels, 4x4 pixels) with the same
  parallel branches, for measuring how optimize() scales with the number of nodes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
from tests.graph_builder import GraphBuilder  # noqa: E402

OPSET = 17

# RepVGG-B3 (Ding et al. 2021): a=3, b=5.
B3_WIDTHS = (64, 192, 384, 768, 2560)
B3_LAYERS = (1, 4, 6, 16, 1)


class NetworkBuilder(GraphBuilder):
    """The blocks of a RepVGG-style network, weights in float32."""

    def weight(self, base, array):
        return self.initializer(self.fresh(base), np.ascontiguousarray(array, dtype=np.float32))

    def node(self, op, inputs, **attrs):
        output = self.fresh(op.lower())
        self.add_node(op, inputs, [output], **attrs)
        return output

    def conv(self, x, cin, cout, k, stride=1):
        fan_in = cin * k * k
        w = self.rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        return self.node("Conv", [x, self.weight("w", w)], kernel_shape=[k, k],
                         pads=[k // 2] * 4, strides=[stride, stride])

    def bn(self, x, channels):
        r = self.rng
        params = [r.uniform(0.5, 1.5, channels), r.uniform(-0.1, 0.1, channels),
                  r.uniform(-0.1, 0.1, channels), r.uniform(0.5, 1.5, channels)]
        names = [self.weight(p, v) for p, v in zip(("gamma", "beta", "mean", "var"), params)]
        return self.node("BatchNormalization", [x, *names], epsilon=1e-5)

    def repvgg_block(self, x, cin, cout, stride):
        """ReLU(BN(conv3x3 x) + BN(conv1x1 x) [+ BN(x)]): 7 or 8 nodes."""
        branches = [self.bn(self.conv(x, cin, cout, 3, stride), cout),
                    self.bn(self.conv(x, cin, cout, 1, stride), cout)]
        if cin == cout and stride == 1:
            branches.append(self.bn(x, cout))
        total = branches[0]
        for branch in branches[1:]:
            total = self.node("Add", [total, branch])
        return self.node("Relu", [total])

    def conv_bn_relu(self, x, cin, cout):
        return self.node("Relu", [self.bn(self.conv(x, cin, cout, 3), cout)])

    def model(self, x_shape, y, y_shape):
        return self.graph_model("bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                                [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape)], OPSET,
                                producer_name="onnxfold-bench")


def b3_widths(width_scale=1.0):
    return [max(8, int(round(w * width_scale / 8)) * 8) for w in B3_WIDTHS]


def repvgg_train(width_scale=1.0, classes=1000, seed=0) -> onnx.ModelProto:
    """A RepVGG-B3-shaped train-time graph (widths scaled by width_scale)."""
    b = NetworkBuilder(seed)
    x, cin = "x", 3
    for width, layers in zip(b3_widths(width_scale), B3_LAYERS):
        for index in range(layers):
            x = b.repvgg_block(x, cin, width, stride=2 if index == 0 else 1)
            cin = width
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    fc = b.rng.standard_normal((classes, cin), dtype=np.float32) * np.float32(0.01)
    y = b.node("Gemm", [x, b.weight("fc_w", fc), b.weight("fc_b", np.zeros(classes))], transB=1)
    return b.model(["N", 3, 224, 224], y, ["N", classes])


def repvgg_weight_bytes(width_scale=1.0) -> int:
    """float32 bytes of repvgg_train(width_scale), without building it."""
    total, cin = 0, 3
    for width, layers in zip(b3_widths(width_scale), B3_LAYERS):
        for index in range(layers):
            total += width * cin * 10 + 4 * width * 2  # 3x3 + 1x1 weights, two BNs
            if index and cin == width:
                total += 4 * width  # identity BN
            cin = width
    return 4 * (total + 1000 * cin + 1000)


def width_scale_for(megabytes: float) -> float:
    """The width multiplier whose model has about `megabytes` of weights."""
    scale = np.sqrt(megabytes * 1e6 / repvgg_weight_bytes(1.0))
    for _ in range(4):  # widths are rounded to multiples of 8: correct once or twice
        scale *= np.sqrt(megabytes * 1e6 / repvgg_weight_bytes(scale))
    return float(scale)


CHANNEL_CYCLE = (2, 4, 3, 1)


def deep_chain(nodes: int, seed=0) -> onnx.ModelProto:
    """About `nodes` nodes: units of a RepVGG block (8 nodes) then a Conv+BN+ReLU (3 nodes)."""
    b = NetworkBuilder(seed)
    x, channels, unit = "x", CHANNEL_CYCLE[0], 0
    while len(b.nodes) + 11 <= max(nodes, 11):
        following = CHANNEL_CYCLE[(unit + 1) % len(CHANNEL_CYCLE)]
        x = b.repvgg_block(x, channels, channels, stride=1)
        x = b.conv_bn_relu(x, channels, following)
        channels, unit = following, unit + 1
    return b.model([1, CHANNEL_CYCLE[0], 4, 4], x, [1, channels, 4, 4])
