"""Property-based fuzzing: random valid graphs of the ops the rules touch keep their function.

A hypothesis strategy grows an ONNX graph (opset 17, float32) one motif at a time. Each
motif picks existing values of compatible shape and builds on them, so that parallel
branches on one input (the ones the branch rules merge) occur often, next to the traps
that must be left alone: misaligned branches, BN before a padded conv, a [C] constant
that broadcasts along the width, runtime weights, shared weights, values used twice or
that are graph outputs. Weights come from a numpy generator seeded by one drawn integer,
so every structural choice shrinks and the numbers stay reproducible.

Every example must come out valid (full checker), with no more nodes, the same graph
inputs and outputs, the same function in onnxruntime, and the input model untouched.

`make fuzz` runs 5000 examples (ONNXFOLD_FUZZ_EXAMPLES); CI runs 300, derandomized.
`make fuzz SEED=123` (ONNXFOLD_FUZZ_SEED) draws other graphs, from that seed.
The run fails too when rules fire on too few graphs, or some main rule never fires.
"""

from __future__ import annotations

import os
import re
from collections import Counter

import numpy as np
import onnx
from hypothesis import HealthCheck, assume, given, note, seed, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxfold import optimize

from .graph_builder import GraphBuilder
from .helpers import assert_same_function

OPSET = 17
EXAMPLES = int(os.environ.get("ONNXFOLD_FUZZ_EXAMPLES", 300))
# `make fuzz SEED=123`: a seeded random run explores graphs other than the derandomized
# default's, which are the same on every run.
SEED = int(os.environ["ONNXFOLD_FUZZ_SEED"]) if os.environ.get("ONNXFOLD_FUZZ_SEED") else None
# An optimizer that did nothing must not pass. On the default run rules fire on 73% of the
# graphs, and each rule below 14 to 127 times; the bounds leave room for other seeds.
MIN_FIRING_RATE = 0.6
MUST_FIRE = {"fold-bn-into-conv", "merge-conv-branches", "absorb-identity-branch",
             "absorb-bn-branch-sub", "fold-mul-into-conv", "fold-bn-into-avgpool",
             "merge-reshape-chain", "fold-matmul-chain", "fold-bn-into-matmul"}


def conv_extent(length, kernel, stride, dilation, begin, end):
    """Output length of a conv (or, with dilation 1, a pool) along one axis."""
    return (length + begin + end - dilation * (kernel - 1) - 1) // stride + 1


def same_pads(kernel, dilation):
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


class RandomGraph(GraphBuilder):
    """Grows one graph; every choice is drawn from hypothesis, every number from a seed."""

    def __init__(self, draw, seed):
        super().__init__(seed)
        self.draw = draw
        self.inputs = []  # names of data graph inputs
        self.input_infos = {}
        self.shapes = {}  # value name -> shape
        self.values = []  # data values, in creation order
        self.uses = Counter()
        self.optional_outputs = []  # values that may be made graph outputs
        self.output_types = {}  # element types of outputs that are not float
        self.pool = {}  # weight shape -> names, for sharing

    # --- drawing ---------------------------------------------------------------------------

    def chance(self, p):
        """True with probability p; shrinks to False."""
        return self.draw(st.integers(0, 99)) >= round(100 * (1 - p))

    def pick(self, options):
        return self.draw(st.sampled_from(list(options)))

    # --- values and weights -------------------------------------------------------------------

    def data_input(self, shape, prefix):
        name = self.fresh(prefix)
        self.inputs.append(name)
        self.input_infos[name] = helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
        self.shapes[name] = list(shape)
        return name

    def new_value(self, shape, prefix="v", data=True):
        name = self.fresh(prefix)
        self.shapes[name] = [int(s) for s in shape]
        if data:
            self.values.append(name)
        return name

    def array(self, shape, kind="normal", scale=1.0):
        shape = tuple(int(s) for s in shape)
        if kind == "var":
            values = self.rng.uniform(0.5, 2.0, size=shape)
        elif kind == "zero":
            values = np.zeros(shape)
        elif kind == "one":
            values = np.ones(shape)
        else:
            values = self.rng.normal(size=shape) * scale
        return values.astype(np.float32)

    def constant(self, values, prefix="w", as_node=None):
        """A stored constant: an initializer, or now and then a Constant node."""
        name = self.fresh(prefix)
        if as_node is None:
            as_node = self.chance(0.05)
        if as_node:
            self.add_node("Constant", [], [name], value=numpy_helper.from_array(values, name))
        else:
            self.initializer(name, values)
        self.shapes[name] = list(values.shape)
        return name

    def weight(self, shape, kind="normal", scale=1.0, share=True, runtime_p=0.0):
        """A weight of this shape: sometimes one already used elsewhere, sometimes a graph input.

        share=False: a fresh weight that no other node will use either.
        """
        key = (tuple(shape), kind)
        if share and key in self.pool and self.chance(0.2):
            return self.pick(self.pool[key])
        if runtime_p and self.chance(runtime_p):
            return self.data_input(shape, prefix="rt")
        name = self.constant(self.array(shape, kind, scale))
        if share:
            self.pool.setdefault(key, []).append(name)
        return name

    def int64(self, values):
        return self.constant(np.asarray(values, dtype=np.int64), prefix="shape", as_node=self.chance(0.2))

    def node(self, op, inputs, shape, extra_outputs=(), **attrs):
        out = self.new_value(shape)
        for name in inputs:
            if name:
                self.uses[name] += 1
        self.add_node(op, inputs, [out, *extra_outputs], **attrs)
        return out

    def values_of_rank(self, *ranks):
        return [v for v in self.values if len(self.shapes[v]) in ranks]

    def choose(self, *ranks):
        """An existing value of one of these ranks; the latest one half the time."""
        candidates = self.values_of_rank(*ranks)
        if not candidates:
            return None
        if self.chance(0.65):
            return candidates[-1]
        return self.pick(candidates)

    # --- feature maps ---------------------------------------------------------------------

    def draw_channels(self, channels):
        """Output channels and group for a conv reading `channels` channels."""
        out = self.pick([channels, 4, 2, 6, 3])
        groups = [1]
        if channels % 2 == 0 and out % 2 == 0 and channels > 1:
            groups.append(2)
        if channels > 1:
            groups.append("depthwise")
        group = self.pick(groups) if self.chance(0.4) else 1
        if group == "depthwise":
            group, out = channels, channels * self.pick([1, 2])
        return out, group

    def draw_pads(self, spatial, kernel, strides, dilations):
        mode = self.pick(["same", "valid", "random", "auto"]) if self.chance(0.6) else "same"
        if mode == "auto" and self.chance(0.5):
            # onnxruntime supports SAME_* only undilated
            modes = ["SAME_UPPER", "SAME_LOWER", "VALID"] if max(dilations) == 1 else ["VALID"]
            return {"auto_pad": self.pick(modes)}
        if mode == "auto":
            mode = "random"
        begins, ends = [], []
        for length, k, s, d in zip(spatial, kernel, strides, dilations):
            if mode == "same":
                b, e = same_pads(k, d)
            elif mode == "valid":
                b, e = 0, 0
            else:
                b, e = self.draw(st.integers(0, 2)), self.draw(st.integers(0, 2))
            if conv_extent(length, k, s, d, b, e) < 1:
                b, e = same_pads(k, d)
            begins.append(b)
            ends.append(e)
        return {"pads": begins + ends}

    def draw_geometry(self, shape, out=None, group=None, pointwise=False):
        _, channels, height, width = shape
        if out is None:
            out, group = self.draw_channels(channels)
        if pointwise:
            return {"out": out, "group": group, "kernel": [1, 1], "strides": [1, 1],
                    "dilations": [1, 1], "pads": [0, 0, 0, 0]}
        kernel = [self.pick([1, 3, 5]), self.pick([1, 3, 5])] if self.chance(0.7) else [3, 3]
        strides = [1, 1]
        if self.chance(0.25):
            strides = [2 if height >= 4 else 1, 2 if width >= 4 else 1]
            if self.chance(0.2):
                strides[self.draw(st.integers(0, 1))] = 1
        dilations = [2, 2] if self.chance(0.15) else [1, 1]
        if self.chance(0.05):
            dilations = [1, 2] if self.chance(0.5) else [2, 1]
        geometry = {"out": out, "group": group, "kernel": kernel, "strides": strides, "dilations": dilations}
        geometry.update(self.draw_pads([height, width], kernel, strides, dilations))
        return geometry

    def conv_shape(self, shape, geometry):
        n, _, height, width = shape
        spatial = []
        for axis, length in enumerate((height, width)):
            k, s, d = geometry["kernel"][axis], geometry["strides"][axis], geometry["dilations"][axis]
            mode = geometry.get("auto_pad")
            if mode in ("SAME_UPPER", "SAME_LOWER"):
                spatial.append(-(-length // s))
            elif mode == "VALID":
                spatial.append(conv_extent(length, k, s, d, 0, 0))
            else:
                pads = geometry["pads"]
                spatial.append(conv_extent(length, k, s, d, pads[axis], pads[axis + 2]))
        return [n, geometry["out"], *spatial]

    def conv(self, x, geometry=None, bias=None, weight=None):
        shape = self.shapes[x]
        geometry = geometry or self.draw_geometry(shape)
        out_shape = self.conv_shape(shape, geometry)
        if out_shape[2] < 1 or out_shape[3] < 1:  # e.g. VALID with a big dilated kernel
            geometry = dict(geometry, pads=[0, 0, 0, 0], dilations=[1, 1], kernel=[1, 1])
            geometry.pop("auto_pad", None)
            out_shape = self.conv_shape(shape, geometry)
        group = geometry["group"]
        w_shape = [geometry["out"], shape[1] // group, *geometry["kernel"]]
        fan_in = int(np.prod(w_shape[1:]))
        if weight is None:
            weight = self.weight(w_shape, scale=1 / np.sqrt(fan_in), runtime_p=0.03)
        inputs = [x, weight]
        if bias if bias is not None else self.chance(0.5):
            inputs.append(self.weight([geometry["out"]], scale=0.5))
        attrs = {}
        if group != 1 or self.chance(0.1):
            attrs["group"] = group
        if geometry["strides"] != [1, 1] or self.chance(0.1):
            attrs["strides"] = geometry["strides"]
        if geometry["dilations"] != [1, 1] or self.chance(0.1):
            attrs["dilations"] = geometry["dilations"]
        if "auto_pad" in geometry:
            attrs["auto_pad"] = geometry["auto_pad"]
        elif any(geometry["pads"]) or self.chance(0.1):
            attrs["pads"] = geometry["pads"]
        if self.chance(0.1):
            attrs["kernel_shape"] = geometry["kernel"]
        return self.node("Conv", inputs, out_shape, **attrs)

    def bn(self, x, allow_training=True):
        shape = self.shapes[x]
        channels = shape[1]
        # onnxruntime (1.32, graph optimizations off) lets a training-mode BN overwrite its
        # mean input in place, so a weight shared with it reads differently: never share one.
        training = allow_training and self.chance(0.05)
        params = [self.weight([channels], share=not training),
                  self.weight([channels], scale=0.5, share=not training),
                  self.weight([channels], scale=0.5, share=not training),
                  self.weight([channels], kind="var", share=not training)]
        attrs = {}
        if self.chance(0.5):
            attrs["epsilon"] = self.pick([1e-5, 1e-3, 0.1, 1e-6])
        extra = ()
        if training:
            attrs["training_mode"] = 1
            if self.chance(0.7):
                extra = (self.new_value([channels], "rm", data=False), self.new_value([channels], "rv", data=False))
                self.optional_outputs.extend(extra)
        elif self.chance(0.05):
            attrs["training_mode"] = 0
        return self.node("BatchNormalization", [x, *params], shape, extra_outputs=extra, **attrs)

    def pool_shape(self, shape, kernel, strides, pads):
        n, c, height, width = shape
        return [n, c] + [(length + pads[a] + pads[a + 2] - kernel[a]) // strides[a] + 1
                         for a, length in enumerate((height, width))]

    def avgpool(self, x, kernel=None, strides=None, pads=None, count_include_pad=None):
        shape = self.shapes[x]
        if kernel is None:
            kernel = [self.pick([3, 1, 2, 5]), self.pick([3, 1, 2, 5])] if self.chance(0.4) else [3, 3]
            kernel = [min(k, length) for k, length in zip(kernel, shape[2:])]
        if strides is None:
            strides = [2, 2] if self.chance(0.3) else [1, 1]
        if pads is None:
            if self.chance(0.5):
                pads = [(k - 1) // 2 for k in kernel] + [k // 2 for k in kernel]
            else:
                pads = [0, 0, 0, 0]
            if self.chance(0.2):
                pads = [self.draw(st.integers(0, k - 1)) for k in kernel * 2]
        attrs = {"kernel_shape": kernel}
        if any(s != 1 for s in strides) or self.chance(0.1):
            attrs["strides"] = strides
        if any(pads) or self.chance(0.1):
            attrs["pads"] = pads
        if count_include_pad is None and self.chance(0.6):
            count_include_pad = self.pick([1, 0])
        if count_include_pad is not None:
            attrs["count_include_pad"] = count_include_pad
        if strides == [1, 1] and self.chance(0.05):
            attrs["ceil_mode"] = 1
        return self.node("AveragePool", [x], self.pool_shape(shape, kernel, strides, pads), **attrs)

    def channel_constant(self, x, op):
        """The other operand of Add/Sub/Mul on a feature map: mostly per channel, some traps."""
        n, c, height, width = self.shapes[x]
        layout = self.pick(["1C11", "C11", "scalar", "one", "1C11", "C11", "C", "C", "111W", "HW", "1CHW",
                            "runtime", "expand"])
        if layout == "runtime":
            return self.data_input([1, c, 1, 1], prefix="rt")
        shapes = {"1C11": [1, c, 1, 1], "C11": [c, 1, 1], "scalar": [], "one": [1],
                  "C": [c] if width == c else [width], "111W": [1, 1, 1, width],
                  "HW": [height, width], "1CHW": [1, c, height, width], "expand": [2, c, 1, 1]}
        shape = shapes[layout]
        if layout == "expand" and n != 1:
            shape = [c, 1, 1]
        kind = "var" if op == "Div" else "normal"  # divisors in [0.5, 2]
        if self.chance(0.15):
            kind = "zero" if op in ("Add", "Sub") else "one"
        return self.weight(shape, kind=kind, share=False)

    def elementwise(self, x, op=None):
        op = op or self.pick(["Mul", "Add", "Sub", "Div"])
        other = self.channel_constant(x, op)
        shape = list(np.broadcast_shapes(tuple(self.shapes[x]), tuple(self.shapes[other])))
        inputs = [x, other] if op in ("Sub", "Div") or self.chance(0.5) else [other, x]
        if op == "Div":
            inputs = [x, other]
        elif op == "Sub" and self.chance(0.3):
            inputs = [other, x]
        return self.node(op, inputs, shape)

    # --- motifs on feature maps -------------------------------------------------------------

    def m_conv(self, x):
        return self.conv(x)

    def m_conv_bn(self, x):
        return self.bn(self.conv(x))

    def m_bn(self, x):
        return self.bn(x)

    def m_bn_conv(self, x):
        shape = self.shapes[x]
        geometry = self.draw_geometry(shape)
        if self.chance(0.6):
            geometry.pop("auto_pad", None)
            geometry["pads"] = [0, 0, 0, 0]
            if self.conv_shape(shape, geometry)[2] < 1 or self.conv_shape(shape, geometry)[3] < 1:
                geometry.update(kernel=[1, 1], dilations=[1, 1])
        return self.conv(self.bn(x, allow_training=False), geometry)

    def m_conv_elementwise(self, x):
        source = self.conv(x) if self.chance(0.8) else x
        return self.elementwise(source, self.pick(["Add", "Mul", "Add", "Mul", "Sub", "Div"]))

    def m_pool(self, x):
        if self.chance(0.5):
            out, _ = self.draw_channels(self.shapes[x][1])
            x = self.conv(x, self.draw_geometry(self.shapes[x], out=out, group=1, pointwise=True))
        return self.avgpool(x)

    def m_sequential(self, x):
        shape = self.shapes[x]
        ungrouped = not self.chance(0.15)
        if self.chance(0.5):  # 1x1 -> KxK
            out, group = self.draw_channels(shape[1])
            first = self.conv(x, self.draw_geometry(shape, out=out, group=1, pointwise=True))
            second_shape = self.shapes[first]
            geometry = self.draw_geometry(second_shape) if not ungrouped else \
                self.draw_geometry(second_shape, out=self.draw_channels(out)[0], group=1)
            return self.conv(first, geometry)
        geometry = self.draw_geometry(shape) if not ungrouped else \
            self.draw_geometry(shape, out=self.draw_channels(shape[1])[0], group=1)
        first = self.conv(x, geometry)
        out = self.pick([self.shapes[first][1], 2, 4, 8])
        return self.conv(first, self.draw_geometry(self.shapes[first], out=out, group=1, pointwise=True))

    def family_geometries(self, shape, count, same_shape=False):
        """`count` conv geometries on one input whose outputs can be summed; mostly aligned.

        With `same_shape`, the outputs mostly have the input's shape (for identity branches).
        """
        out, group = self.draw_channels(shape[1])
        strides = [1, 1]
        if self.chance(0.25) and min(shape[2:]) >= 4:
            strides = [2, 2]
        dilations = [2, 2] if self.chance(0.15) else [1, 1]
        delta = [self.pick([0, 0, 0, 1]) for _ in range(4)]
        if same_shape and not self.chance(0.15):
            out, strides, delta = shape[1], [1, 1], [0, 0, 0, 0]
            if group not in (1, 2, shape[1]) or shape[1] % group:
                group = 1
        mode = self.pick(["aligned", "aligned", "aligned", "random"])
        geometries = []
        for index in range(count):
            kernel = [self.pick([3, 1, 5]), self.pick([3, 1, 5])]
            if index == 0 and self.chance(0.5):
                kernel = [3, 3]
            pads = [same_pads(k, d)[0] for k, d in zip(kernel, dilations)]
            pads += [same_pads(k, d)[1] for k, d in zip(kernel, dilations)]
            pads = [p + e for p, e in zip(pads, delta)]
            geometry = {"out": out, "group": group, "kernel": kernel, "strides": list(strides),
                        "dilations": list(dilations), "pads": pads}
            if index > 0 and group == 1 and self.chance(0.3):
                divisors = [g for g in (2, 3, shape[1]) if g > 1 and shape[1] % g == 0 and out % g == 0]
                if divisors:
                    geometry["group"] = self.pick(divisors)
            if mode == "random" and index > 0:
                if self.chance(0.5):
                    geometry["pads"] = [self.draw(st.integers(0, 3)) for _ in range(4)]
                if self.chance(0.3):
                    geometry["strides"] = [self.pick([1, 2]), self.pick([1, 2])]
                if self.chance(0.3):
                    geometry["dilations"] = [self.pick([1, 2]), self.pick([1, 2])]
                if self.chance(0.2) and group == 1 and shape[1] % 2 == 0 and out % 2 == 0:
                    geometry["group"] = 2
            if self.chance(0.05):  # the same pads, implied: rules want them explicit
                if not any(geometry["pads"]):
                    geometry["auto_pad"] = "VALID"
                elif geometry["strides"] == [1, 1] and geometry["dilations"] == [1, 1] and \
                        all(k % 2 for k in geometry["kernel"]) and delta == [0, 0, 0, 0]:
                    geometry["auto_pad"] = self.pick(["SAME_UPPER", "SAME_LOWER"])
            geometries.append(geometry)
        target = self.conv_shape(shape, geometries[0])
        kept = [g for g in geometries if self.conv_shape(shape, g) == target]
        return kept, target, delta, strides

    def m_branches(self, x):
        """Two or three convs of x (and maybe x, BN(x), AvgPool(x)) summed: the branch rules."""
        shape = self.shapes[x]
        count = self.pick([2, 3, 1])
        special = self.pick(["none", "identity", "bn", "avgpool"])
        geometries, target, delta, strides = self.family_geometries(shape, count, same_shape=special != "none")
        if min(target[2:]) < 1:
            return self.conv(x)
        terms, previous = [], None
        for geometry in geometries:
            if previous and self.chance(0.08):  # the same conv weight twice
                term = self.conv(x, previous[0], weight=previous[1])
            else:
                term = self.conv(x, geometry)
                previous = (geometry, self.nodes[-1].input[1])
            roll = self.draw(st.integers(0, 19))
            if roll < 5:
                term = self.bn(term, allow_training=False)
            elif roll < 7:
                term = self.elementwise(term, "Mul")
            elif roll == 7:
                term = self.node("Relu", [term], self.shapes[term])
            terms.append(term)
        if target == shape and special != "none":
            terms.append(x if special == "identity" else self.bn(x, allow_training=False) if special == "bn"
                         else self.avgpool(x, kernel=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                                           count_include_pad=self.pick([1, 1, 0])))
        elif target[1] == shape[1] and special == "avgpool":
            kernel = [self.pick([3, 1, 5]), self.pick([3, 1, 5])]
            pads = [(k - 1) // 2 + e for k, e in zip(kernel * 2, delta)]
            if all(p < k for p, k in zip(pads, kernel * 2)):
                pool_shape = self.pool_shape(shape, kernel, strides, pads)
                if pool_shape == target:
                    terms.append(self.avgpool(x, kernel=kernel, strides=list(strides), pads=pads,
                                              count_include_pad=self.pick([1, 1, 0])))
        terms = [terms[0]] + list(self.draw(st.permutations(terms[1:])))
        if len(terms) == 3 and self.chance(0.1):  # one three-input Sum
            return self.node("Sum", terms, target)
        total = terms[0]
        for term in terms[1:]:
            if self.chance(0.3):
                total = self.node("Sub", [total, term] if self.chance(0.7) else [term, total], target)
            elif self.chance(0.1):
                total = self.node("Sum", [total, term] if self.chance(0.5) else [term, total], target)
            else:
                total = self.node("Add", [total, term] if self.chance(0.5) else [term, total], target)
        return total

    def m_residual(self, x):
        """x + Conv(x) (then maybe through BN): the identity and BN branches."""
        shape = self.shapes[x]
        geometry = self.draw_geometry(shape, *self.draw_channels(shape[1]))
        geometry.update(out=shape[1], strides=[1, 1])
        if geometry["group"] not in (1, 2, shape[1]) or shape[1] % geometry["group"]:
            geometry["group"] = 1
        if "auto_pad" not in geometry or self.chance(0.5):
            geometry.pop("auto_pad", None)
            geometry["pads"] = [p for pair in zip(*[same_pads(k, d) for k, d in
                                                    zip(geometry["kernel"], geometry["dilations"])])
                                for p in pair]
        branch = self.conv(x, geometry)
        if self.conv_shape(shape, geometry) != shape or self.shapes[branch] != shape:
            return branch
        other = self.bn(x, allow_training=False) if self.chance(0.4) else x
        if self.chance(0.25):
            return self.node("Sub", [branch, other], shape)
        return self.node("Add", [branch, other] if self.chance(0.5) else [other, branch], shape)

    def m_pool_bn(self, x):
        if self.chance(0.5):  # alone: the cost guard keeps it (a depthwise kernel where none was)
            return self.bn(self.avgpool(x, count_include_pad=self.pick([1, 1, 0, None])), allow_training=False)
        # DBB's depthwise pooled branch, summed with the 3x3 conv it merges into
        shape = self.shapes[x]
        pooled = self.bn(self.avgpool(x, kernel=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                                      count_include_pad=self.pick([1, 1, 0])), allow_training=False)
        group = self.pick([1, shape[1]])
        conv = self.conv(x, {"out": shape[1], "group": group, "kernel": [3, 3], "strides": [1, 1],
                             "dilations": [1, 1], "pads": [1, 1, 1, 1]})
        return self.node("Add", [conv, pooled] if self.chance(0.5) else [pooled, conv], shape)

    def m_convtranspose_bn(self, x):
        """ConvTranspose (any group, stride, pads) then BN."""
        n, channels, height, width = self.shapes[x]
        group = self.pick([1, channels]) if self.chance(0.3) else 1
        out = self.pick([2, 3, 4]) * group if group > 1 else self.pick([3, 2, 4, 6])
        kernel = [self.pick([3, 1, 2]), self.pick([3, 1, 2])]
        strides = [self.pick([1, 2]), self.pick([1, 2])] if self.chance(0.5) else [1, 1]
        pads = [self.draw(st.integers(0, k - 1)) for k in kernel * 2] if self.chance(0.4) else [0, 0, 0, 0]
        spatial = [(length - 1) * s - pads[a] - pads[a + 2] + k
                   for a, (length, s, k) in enumerate(zip((height, width), strides, kernel))]
        if min(spatial) < 1:
            pads, spatial = [0, 0, 0, 0], [(length - 1) * s + k for length, s, k in zip((height, width), strides, kernel)]
        inputs = [x, self.weight([channels, out // group, *kernel], scale=1 / np.sqrt(channels))]
        if self.chance(0.5):
            inputs.append(self.weight([out], scale=0.5))
        attrs = {"strides": strides} if strides != [1, 1] else {}
        if any(pads):
            attrs["pads"] = pads
        if group > 1:
            attrs["group"] = group
        y = self.node("ConvTranspose", inputs, [n, out, *spatial], **attrs)
        return self.bn(y) if self.chance(0.85) else y

    def m_repmixer(self, x):
        """FastViT's RepMixer: x + ls * (BN(depthwise conv(x)) - BN(x))."""
        n, channels, height, width = self.shapes[x]
        kernel = self.pick([3, 5, 1])
        geometry = {"out": channels, "group": channels if self.chance(0.8) else 1, "kernel": [kernel, kernel],
                    "strides": [1, 1], "dilations": [1, 1], "pads": [(kernel - 1) // 2] * 4}
        mixer = self.conv(x, geometry)
        if self.chance(0.7):
            mixer = self.bn(mixer, allow_training=False)
        mixed = self.node("Sub", [mixer, self.bn(x, allow_training=False)], self.shapes[x])
        if self.chance(0.7):
            mixed = self.elementwise(mixed, "Mul")
            if self.shapes[mixed] != self.shapes[x]:
                return mixed
        return self.node("Add", [x, mixed] if self.chance(0.5) else [mixed, x], self.shapes[x])

    def m_unary(self, x):
        op = self.pick(["Relu", "Identity", "Dropout"])
        if op != "Dropout":
            return self.node(op, [x], self.shapes[x])
        # inference Dropout is the identity; its mask, if used, keeps it
        inputs = [x, self.constant(np.asarray(0.5, dtype=np.float32))] if self.chance(0.3) else [x]
        extra = ()
        if self.chance(0.2):
            extra = (self.new_value(self.shapes[x], "mask", data=False),)
            self.optional_outputs.extend(extra)
        out = self.node("Dropout", inputs, self.shapes[x], extra_outputs=extra)
        if extra:
            self.output_types[extra[0]] = TensorProto.BOOL
        return out

    def m_combine(self, x):
        """Two existing values of one shape, added, subtracted or multiplied."""
        partners = [v for v in self.values if self.shapes[v] == self.shapes[x]]
        other = self.pick(partners)
        op = self.pick(["Add", "Sub", "Mul"])
        return self.node(op, [x, other], self.shapes[x])

    def m_concat(self, x):
        shape = self.shapes[x]
        partners = [v for v in self.values
                    if len(self.shapes[v]) == 4 and self.shapes[v][2:] == shape[2:] and self.shapes[v][0] == shape[0]]
        other = self.pick(partners)
        if other == x and self.chance(0.7):
            out, group = self.draw_channels(shape[1])
            other = self.conv(x, self.draw_geometry(shape, out, group, pointwise=True))
        return self.node("Concat", [x, other], [shape[0], shape[1] + self.shapes[other][1], *shape[2:]], axis=1)

    def m_flatten(self, x):
        n, c, height, width = self.shapes[x]
        if self.chance(0.7):
            target, shape = [n, -1], [n, c * height * width]
        else:
            target, shape = [n * c, -1], [n * c, height * width]
        return self.node("Reshape", [x, self.int64(target)], shape)

    # --- motifs on matrices ----------------------------------------------------------------

    def matmul(self, v, columns=None, bias=None):
        shape = self.shapes[v]
        columns = columns or self.pick([4, 3, 5, 2, 8])
        if self.chance(0.08):  # a stacked weight [1, K, N]: broadcasts, is not a matrix
            weight = self.weight([1, shape[-1], columns], scale=1 / np.sqrt(shape[-1]))
            out_shape = [*([1] if len(shape) == 2 else shape[:-2]), shape[-2], columns]
        else:
            weight = self.weight([shape[-1], columns], scale=1 / np.sqrt(shape[-1]), runtime_p=0.03)
            out_shape = [*shape[:-1], columns]
        out = self.node("MatMul", [v, weight], out_shape)
        if bias if bias is not None else self.chance(0.6):
            layouts = ["N", "1N", "scalar", "MN", "11N", "runtime"]
            layout = self.pick(layouts)
            if layout == "runtime":
                c = self.data_input([columns], prefix="rt")
            else:
                c_shape = {"N": [columns], "1N": [1, columns], "scalar": [], "MN": [*shape[:-1], columns],
                           "11N": [1, 1, columns]}[layout]
                c = self.weight(c_shape, scale=0.5, share=False)
            out_shape = list(np.broadcast_shapes(tuple(self.shapes[out]), tuple(self.shapes[c])))
            out = self.node("Add", [out, c] if self.chance(0.5) else [c, out], out_shape)
        return out

    def gemm(self, v, columns=None):
        rows, inner = self.shapes[v]
        attrs = {}
        if self.chance(0.2):
            attrs["transA"] = 1
            rows, inner = inner, rows
        trans_b = self.chance(0.4)
        if trans_b:
            attrs["transB"] = 1
        if self.chance(0.3):
            attrs["alpha"] = self.pick([0.5, 2.0, -1.0])
        if self.chance(0.3):
            attrs["beta"] = self.pick([0.5, 2.0, 0.0])
        columns = columns or self.pick([4, 3, 5, 2, 8])
        b_shape = [columns, inner] if trans_b else [inner, columns]
        inputs = [v, self.weight(b_shape, scale=1 / np.sqrt(inner), runtime_p=0.03)]
        layout = self.pick(["N", "none", "1N", "MN", "M1", "scalar"])
        if layout != "none":
            c_shape = {"N": [columns], "1N": [1, columns], "MN": [rows, columns], "M1": [rows, 1],
                       "scalar": []}[layout]
            inputs.append(self.weight(c_shape, scale=0.5, share=False))
        return self.node("Gemm", inputs, [rows, columns], **attrs)

    def m_matmul(self, v):
        return self.matmul(v)

    def m_gemm(self, v):
        return self.gemm(v) if len(self.shapes[v]) == 2 else self.matmul(v)

    def m_linear_bn(self, v):
        if len(self.shapes[v]) == 2 and self.chance(0.5):
            return self.bn(self.gemm(v))
        return self.bn(self.matmul(v, bias=self.chance(0.7)))

    def m_reshape_bn(self, v):
        """BatchNorm1d after a Linear on 3-D input, as PyTorch exports it."""
        if len(self.shapes[v]) != 3:
            v = self.m_matrix_reshape(v)
        out = self.matmul(v, bias=self.chance(0.8))
        out_shape = self.shapes[out]
        if self.chance(0.8):
            target, new_shape = [-1, out_shape[-1]], [int(np.prod(out_shape[:-1])), out_shape[-1]]
        else:
            target, new_shape = [out_shape[0], -1], [out_shape[0], int(np.prod(out_shape[1:]))]
        return self.bn(self.node("Reshape", [out, self.int64(target)], new_shape))

    def m_chain(self, v):
        if len(self.shapes[v]) == 2 and self.chance(0.5):
            return self.gemm(self.gemm(v))
        return self.matmul(self.matmul(v, bias=self.chance(0.8)), bias=self.chance(0.8))

    def m_matrix_bn(self, v):
        return self.bn(v)

    def m_matrix_unary(self, v):
        return self.m_unary(v)

    def m_matrix_combine(self, v):
        partners = [w for w in self.values if self.shapes[w] == self.shapes[v]]
        return self.node(self.pick(["Add", "Sub", "Mul"]), [v, self.pick(partners)], self.shapes[v])

    def m_matrix_concat(self, v):
        shape = self.shapes[v]
        partners = [w for w in self.values if len(self.shapes[w]) == len(shape) and self.shapes[w][:-1] == shape[:-1]]
        other = self.pick(partners)
        return self.node("Concat", [v, other], [*shape[:-1], shape[-1] + self.shapes[other][-1]], axis=-1)

    def m_reshape_chain(self, v):
        """Reshape -> BN -> Reshape back (BatchNorm1d on 3-D input), or two Reshapes."""
        shape = self.shapes[v]
        if len(shape) == 2:
            v = self.m_matrix_reshape(v)
            shape = self.shapes[v]
        if self.chance(0.15):  # the second shape copies a dimension (0): not a fixed shape
            flat = self.node("Reshape", [v, self.int64([shape[0], -1])], [shape[0], shape[1] * shape[2]])
            return self.node("Reshape", [flat, self.int64([0, shape[1], shape[2]])], shape)
        flat = self.node("Reshape", [v, self.int64([-1, shape[-1]])], [shape[0] * shape[1], shape[-1]])
        if self.chance(0.6):
            flat = self.bn(flat, allow_training=False)
        target = [shape[0], shape[1], -1] if self.chance(0.3) else shape
        return self.node("Reshape", [flat, self.int64(target)], shape)

    def m_matrix_reshape(self, v):
        shape = self.shapes[v]
        if len(shape) == 3:
            return self.node("Reshape", [v, self.int64([-1, shape[-1]])], [shape[0] * shape[1], shape[-1]])
        rows, columns = shape
        return self.node("Reshape", [v, self.int64([1, rows, columns])], [1, rows, columns])

    # Motifs by weight; the productive ones first (hypothesis starts with, and shrinks to, the first).
    FEATURE_MOTIFS = (["m_branches"] * 5 + ["m_residual", "m_conv_bn", "m_bn_conv", "m_conv_elementwise",
                                            "m_sequential", "m_pool", "m_pool_bn"] * 2
                      + ["m_repmixer", "m_convtranspose_bn", "m_conv", "m_bn", "m_unary", "m_combine",
                         "m_concat", "m_flatten"])
    MATRIX_MOTIFS = (["m_linear_bn", "m_chain"] * 3 + ["m_reshape_bn"] * 2
                     + ["m_reshape_chain", "m_matmul", "m_gemm", "m_matrix_bn", "m_matrix_unary",
                        "m_matrix_combine", "m_matrix_concat", "m_matrix_reshape"])

    def step(self):
        feature = self.values_of_rank(4)
        matrix = self.values_of_rank(2, 3)
        if feature and (not matrix or self.chance(0.7)):
            x = self.choose(4)
            motif = self.pick(self.FEATURE_MOTIFS)
        else:
            x = self.choose(2, 3)
            motif = self.pick(self.MATRIX_MOTIFS)
        getattr(self, motif)(x)

    # --- the model --------------------------------------------------------------------------

    def model(self):
        produced = [v for v in self.values if v not in self.inputs]
        outputs = [v for v in produced if self.uses[v] == 0]
        outputs += [v for v in produced if self.uses[v] and self.chance(0.04)]
        outputs += [v for v in self.optional_outputs if self.chance(0.5)]
        outputs = sorted(set(outputs), key=lambda v: int(re.sub(r"\D", "", v)))
        used_inputs = [name for name in self.inputs if self.uses[name]]
        return self.graph_model(
            "fuzz", [self.input_infos[name] for name in used_inputs],
            [helper.make_tensor_value_info(v, self.output_types.get(v, TensorProto.FLOAT), self.shapes[v])
             for v in outputs], OPSET)


@st.composite
def models(draw):
    """A random valid float32 opset-17 graph built from the ops onnxfold's rules touch."""
    builder = RandomGraph(draw, draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["image", "image", "matrix", "both"]))
    if kind in ("image", "both"):
        channels = draw(st.sampled_from([4, 2, 3, 6, 1]))
        height = draw(st.integers(3, 10))
        width = channels if draw(st.integers(0, 3)) == 0 and channels >= 3 else draw(st.integers(3, 10))
        builder.data_input([draw(st.sampled_from([1, 1, 1, 2])), channels, height, width], prefix="x")
        builder.values.append(builder.inputs[-1])
    if kind in ("matrix", "both"):
        if draw(st.booleans()):
            builder.data_input([draw(st.integers(1, 4)), draw(st.integers(2, 6))], prefix="m")
        else:
            builder.data_input([draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 6))],
                               prefix="t")
        builder.values.append(builder.inputs[-1])
    for _ in range(draw(st.integers(1, 6))):
        builder.step()
    model = builder.model()
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        note(f"invalid model: {error}")
        assume(False)
    return model


def _names(values):
    return [v.name for v in values]


def check_optimize(model):
    """Everything `optimize` promises, on one model; returns the report."""
    before = model.SerializeToString()
    optimized, report = optimize(model)
    assert model.SerializeToString() == before, "optimize modified its input model"
    onnx.checker.check_model(optimized, full_check=True)
    assert len(optimized.graph.node) <= len(model.graph.node), "the graph grew"
    assert _names(optimized.graph.input) == _names(model.graph.input), "graph inputs changed"
    assert _names(optimized.graph.output) == _names(model.graph.output), "graph outputs changed"
    assert_same_function(model, optimized)
    return report


def test_optimize_keeps_the_function():
    """Every graph keeps its function, and the rules fire on a good share of them: an
    optimizer that did nothing must not pass."""
    fired_per_graph, fired = [], Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(models())
    def check(model):
        note(onnx.printer.to_text(model))
        report = check_optimize(model)
        fired_per_graph.append(bool(report.rewrites))
        fired.update(report.fired())

    (check if SEED is None else seed(SEED)(check))()
    graphs = len(fired_per_graph)
    assert graphs >= EXAMPLES, f"only {graphs} graphs were built and checked"
    rate = sum(fired_per_graph) / graphs
    assert rate >= MIN_FIRING_RATE, f"rules fired on only {rate:.0%} of {graphs} graphs"
    if graphs >= 300:  # smaller runs may miss a rule by chance
        assert set(fired) >= MUST_FIRE, f"never fired: {sorted(MUST_FIRE - set(fired))}"
