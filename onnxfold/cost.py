"""The cost guard: what a rewrite replaces against what it writes, in parameters and
multiply-adds.

Fewer nodes is a means, never the goal (DESIGN.md, "Cost"): a 1x1 conv + 2x2 average pool
is one 2x2 stride-2 conv, with the same multiply-adds but four times the weights, and
onnxruntime runs a 1x1 conv as a plain matrix product, so the fold makes DenseNet slower.
Every plan is checked here (plan.py); a rule whose rewrite raises the cost must name the
merge it is a step towards (`merge_step` in its file), which then removes the new node.
"""

from __future__ import annotations

import math

import numpy as np

from .graph import is_constant, is_present, is_static

# The ops whose multiply-adds are counted: those with a weight. Element-wise ops and
# pooling are a pass over their output, about what any replacement costs.
_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def parameters(values) -> int:
    """Elements of the distinct weight matrices and kernels among `values` (stored
    constants or computed weights).

    Vectors are left out, however they are shaped ([C], [1, C, 1, 1]): a bias or a
    per-channel scale is one operation per output element wherever it goes, and a fold
    that writes a zero bias where there was none costs nothing.
    """
    seen, total = set(), 0
    for value in values:
        if value is None or id(value) in seen or not (isinstance(value, np.ndarray) or is_constant(value)):
            continue
        seen.add(id(value))
        shape = [int(size) for size in value.shape]
        if sum(size > 1 for size in shape) >= 2:
            total += math.prod(shape)
    return total


def multiply_adds(op, shapes, output_shape):
    """Multiply-adds of one node from its input shapes (None for an absent input) and its
    output shape; 0 for an op without a weight; None where a shape is not known."""
    if op not in _WEIGHTED:
        return 0
    data, weight = (shapes + [None, None])[:2]
    if op == "MatMul":
        if not is_static(data) or not is_static(weight) or len(weight) != 2:
            return None
        return int(np.prod(data, dtype=np.int64)) * weight[1]
    if op == "Gemm":
        # M*K*N whichever operand is transposed: |A| * |B| * |Y| = (M*K*N)^2.
        if not (is_static(data) and is_static(weight) and is_static(output_shape)):
            return None
        return math.isqrt(math.prod(data) * math.prod(weight) * math.prod(output_shape))
    # Conv: each output element reads C_in/group * prod(kernel) inputs; ConvTranspose
    # spreads each input element over C_out/group * prod(kernel) outputs.
    counted = data if op == "ConvTranspose" else output_shape
    if not is_static(weight) or not weight or not is_static(counted):
        return None
    per_element = int(np.prod(weight, dtype=np.int64)) // max(weight[0], 1)
    return int(np.prod(counted, dtype=np.int64)) * per_element


def shape_of(value):
    """A graph value's or computed weight's shape, or None."""
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return list(value.shape)
    return list(value.shape) if is_present(value) and value.shape is not None else None


def compare(before, after) -> str | None:
    """None when `after` costs no more than `before`, else what it raises.

    Each is (parameters, multiply-adds or None when not known); multiply-adds are only
    compared when both are known.
    """
    (params_before, macs_before), (params_after, macs_after) = before, after
    if params_after > params_before:
        return f"raises the parameters from {params_before} to {params_after}"
    if macs_before is not None and macs_after is not None and macs_after > macs_before:
        return f"raises the multiply-adds from {macs_before} to {macs_after}"
    return None
