"""Small read-only helpers over the onnx-graphsurgeon IR, shared by predicates and engine."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

# ONNX defaults, filled in so rules compare attributes as the runtime sees them.
_SPATIAL_DEFAULTS = {"auto_pad": "NOTSET", "group": 1}
_DEFAULTS = {
    "BatchNormalization": {"epsilon": 1e-5, "momentum": 0.9, "training_mode": 0},
    "Gemm": {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0},
    "AveragePool": {"auto_pad": "NOTSET", "ceil_mode": 0, "count_include_pad": 0},
    "Reshape": {"allowzero": 0},
}
_WINDOWED = {"Conv", "ConvTranspose", "AveragePool"}


def producer(tensor):
    """The node that computes `tensor`, or None for inputs and constants."""
    if tensor is None or not tensor.inputs:
        return None
    return tensor.inputs[0]


def is_present(tensor) -> bool:
    """False for an omitted optional input (an empty name in ONNX)."""
    return tensor is not None and tensor.name != ""


def is_constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def constant_values(tensor) -> np.ndarray:
    return np.asarray(tensor.values)


def spatial_rank(node) -> int:
    if "kernel_shape" in node.attrs:
        return len(node.attrs["kernel_shape"])
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is not None and weight.shape is not None:
        return len(weight.shape) - 2
    raise ValueError(f"cannot tell the spatial rank of {node.op} node {node.name!r}")


def attributes(node) -> dict:
    """The node's attributes with ONNX defaults filled in."""
    filled = dict(_DEFAULTS.get(node.op, {}))
    if node.op in _WINDOWED:
        rank = spatial_rank(node)
        filled.update(_SPATIAL_DEFAULTS if node.op != "AveragePool" else {})
        filled.update(strides=[1] * rank, dilations=[1] * rank, pads=[0] * (2 * rank))
        if "kernel_shape" not in node.attrs and node.op != "AveragePool":
            filled["kernel_shape"] = list(node.inputs[1].shape[2:])
    filled.update(node.attrs)
    if filled.get("auto_pad") == "VALID":
        filled["pads"] = [0] * (2 * spatial_rank(node))
    return filled


def rank_of(tensor):
    """The tensor's rank if known (constants always are), else None."""
    if tensor is None or tensor.shape is None:
        return None
    return len(tensor.shape)
