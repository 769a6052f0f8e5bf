"""When: named conditions that rule files list under `when`.

Each predicate takes graph values (onnx-graphsurgeon tensors, or None for an omitted
optional input) and returns None when it holds, or a short reason when it does not. The
reason is what `--explain` shows the user, so it says what was found, not just "no".
Where the graph does not let a predicate decide (an unknown shape), it raises CannotTell;
anything else it raises is a bug.
"""

from __future__ import annotations

import numpy as np

from . import transforms
from .errors import CannotTell
from .graph import attributes, is_constant, is_present, producer, rank_of
from .weights import constant_values

PREDICATES: dict = {}


def predicate(function):
    """Register `function` under its own name, for rule files to list."""
    PREDICATES[function.__name__] = function
    return function


def _node(value):
    return producer(value)


def _shape(value) -> tuple:
    """The value's shape, every dimension a known number; else CannotTell."""
    shape = value.shape if is_present(value) else None
    if shape is None or not all(isinstance(size, (int, np.integer)) and size >= 0 for size in shape):
        name = value.name if is_present(value) else "an omitted input"
        raise CannotTell(f"the shape of '{name}' is not known")
    return tuple(int(size) for size in shape)


def _rank(value) -> int:
    """The value's rank; else CannotTell."""
    rank = rank_of(value)
    if rank is None:
        raise CannotTell(f"the rank of '{value.name}' is not known")
    return rank


def _weight_shape(conv_value):
    inputs = _node(conv_value).inputs
    return _shape(inputs[1] if len(inputs) > 1 else None)


def _matrix_shape(value):
    """(rows, columns) of a 2-D weight, or None for another rank."""
    shape = _shape(value)
    return shape if len(shape) == 2 else None


# --- values -------------------------------------------------------------------------------

@predicate
def constant(*values):
    """Every value is a weight stored in the model (an absent optional input is fine)."""
    for value in values:
        if is_present(value) and not is_constant(value):
            return f"'{value.name}' is computed at run time, not a stored constant"
    return None


@predicate
def rank_is(value, rank):
    """The value's rank is known and equals `rank`."""
    found = rank_of(value)
    if found != rank:
        return f"'{value.name}' has rank {found if found is not None else 'unknown'}, needs {rank}"
    return None


@predicate
def per_channel(value, conv_output):
    """A constant that broadcasts as [1, O, 1, ...] (or a scalar) on the conv's output."""
    weight = _weight_shape(conv_output)
    shape = _shape(value)
    out_rank, channels = len(weight), weight[0]
    if len(shape) > out_rank:
        return f"'{value.name}' of shape {list(shape)} has more axes than the conv output"
    aligned = (1,) * (out_rank - len(shape)) + shape
    if any(size != 1 for axis, size in enumerate(aligned) if axis != 1):
        return f"'{value.name}' of shape {list(shape)} is not per-channel: it broadcasts along other axes"
    if aligned[1] not in (1, channels):
        return f"'{value.name}' has {aligned[1]} channels, the conv has {channels}"
    return None


@predicate
def per_feature(value, weight):
    """A constant that broadcasts along the last axis only, with N = weight's columns."""
    if not is_present(value):
        return None
    shape, features = _shape(value), _shape(weight)[-1:]
    if any(size != 1 for size in shape[:-1]) or (shape and shape[-1] not in (1, *features)):
        return f"'{value.name}' of shape {list(shape)} does not broadcast along the features only"
    return None


@predicate
def weight_rank_is(weight, rank):
    """A stored weight has the given rank (MatMul weights must be plain matrices)."""
    found = len(_shape(weight))
    if found != rank:
        return f"weight '{weight.name}' has rank {found}, needs {rank}"
    return None


@predicate
def reshape_keeps_features(shape, weight):
    """Reshape to [rows, N]: the feature axis survives, so a per-column scale commutes."""
    reason = constant(shape)
    if reason:
        return reason
    target = constant_values(shape).reshape(-1).tolist()
    features = list(_shape(weight)[-1:])  # empty for a scalar weight
    if len(target) != 2 or target[-1:] != features:
        count = features[0] if features else "no"
        return f"Reshape to {target} does not keep the {count} features as axis 1 of a 2-D tensor"
    return None


# --- node attributes ------------------------------------------------------------------------

@predicate
def bn_inference(bn_output):
    """BatchNormalization in inference mode: training_mode 0 and only its first output used."""
    node = _node(bn_output)
    attrs = attributes(node)
    if attrs["training_mode"]:
        return "BatchNormalization is in training mode (training_mode=1)"
    if attrs.get("spatial", 1) != 1:
        return "BatchNormalization has spatial=0 (statistics per position, opset 7-8)"
    if any(output.name for output in node.outputs[1:]):
        return "BatchNormalization has statistics outputs: training mode (before opset 14 that is how it is said)"
    if not attrs.get("is_test", 1):
        return "BatchNormalization has is_test=0 (opset 6: training mode)"
    return None


@predicate
def explicit_padding(*conv_outputs):
    """Pads are explicit (auto_pad NOTSET or VALID): SAME_* depends on the input size."""
    for value in conv_outputs:
        mode = attributes(_node(value))["auto_pad"]
        if mode not in ("NOTSET", "VALID"):
            return f"'{_node(value).name}' uses auto_pad={mode}; its pads depend on the input size"
    return None


@predicate
def no_padding(conv_output):
    """The conv pads nothing (needed where padded zeros would miss a shift)."""
    node = _node(conv_output)
    attrs = attributes(node)
    if attrs["auto_pad"] not in ("NOTSET", "VALID") or any(attrs["pads"]):
        return f"'{node.name}' pads its input: padded zeros would not receive the BatchNormalization shift"
    return None


@predicate
def pointwise(conv_output):
    """A 1x1 conv with stride 1, no padding and one group: a per-pixel channel mix."""
    reason = unit_kernel(conv_output)
    if reason is None and any(attributes(_node(conv_output))["pads"]):
        return f"'{_node(conv_output).name}' has a stride, padding or groups"
    return reason


@predicate
def unit_kernel(conv_output):
    """A 1x1 conv with stride 1 and one group; it may pad (DBB pads the 1x1, not the KxK)."""
    node = _node(conv_output)
    attrs = attributes(node)
    if any(k != 1 for k in _weight_shape(conv_output)[2:]):
        return f"'{node.name}' is not 1x1"
    if any(s != 1 for s in attrs["strides"]) or attrs["group"] != 1:
        return f"'{node.name}' has a stride or groups"
    return None


@predicate
def fixed_reshape(shape):
    """A stored target shape with no 0 (copy-a-dimension) entries: it ignores its input's shape."""
    reason = constant(shape)
    if reason:
        return reason
    if 0 in constant_values(shape).reshape(-1).tolist():
        return f"the target shape {constant_values(shape).tolist()} copies dimensions from its input"
    return None


@predicate
def single_group(*conv_outputs):
    """Every conv has group 1 (a fold across grouped convs would densify them)."""
    for value in conv_outputs:
        group = attributes(_node(value))["group"]
        if group != 1:
            return f"'{_node(value).name}' has group={group}"
    return None


@predicate
def plain_gemm_input(gemm_output):
    """Gemm with transA=0, so it is x @ op(B) + C on the unchanged input."""
    if attributes(_node(gemm_output))["transA"]:
        return f"'{_node(gemm_output).name}' transposes its input (transA=1)"
    return None


@predicate
def gemm_input_is_2d(gemm_output):
    """Gemm needs a 2-D input; MatMul accepts more, so check the rank is known to be 2."""
    return rank_is(_node(gemm_output).inputs[0], 2)


# --- branches -----------------------------------------------------------------------------

def _geometry(node):
    attrs = attributes(node)
    return {key: list(attrs[key]) for key in ("strides", "dilations")} | {"group": attrs["group"]}


@predicate
def same_geometry(conv_a, conv_b):
    """Two convs with equal strides, dilations, group and weight layout."""
    a, b = _node(conv_a), _node(conv_b)
    for key, value in _geometry(a).items():
        if value != _geometry(b)[key]:
            return f"'{a.name}' and '{b.name}' differ in {key} ({value} vs {_geometry(b)[key]})"
    if _weight_shape(conv_a)[:2] != _weight_shape(conv_b)[:2]:
        return f"'{a.name}' and '{b.name}' have different channel counts"
    return None


@predicate
def dense_and_grouped(dense_output, grouped_output):
    """An ungrouped conv beside a grouped one of equal strides, dilations and channels."""
    dense, grouped = _node(dense_output), _node(grouped_output)
    group = attributes(grouped)["group"]
    if attributes(dense)["group"] != 1 or group == 1:
        return f"'{dense.name}' is not ungrouped beside a grouped '{grouped.name}'"
    for key in ("strides", "dilations"):
        if _geometry(dense)[key] != _geometry(grouped)[key]:
            return f"'{dense.name}' and '{grouped.name}' differ in {key}"
    dense_shape, grouped_shape = _weight_shape(dense_output), _weight_shape(grouped_output)
    if dense_shape[0] != grouped_shape[0] or dense_shape[1] != grouped_shape[1] * group:
        return f"'{dense.name}' and '{grouped.name}' have different channel counts"
    return None


def _align(kernel_a, pads_a, kernel_b, pads_b, dilations, names):
    kernels = [kernel_a, kernel_b]
    target_kernel, target_pads = transforms.merged_geometry(kernels, [pads_a, pads_b])
    for kernel, pads, name in zip(kernels, (pads_a, pads_b), names):
        if transforms.branch_offsets(kernel, pads, target_kernel, target_pads, dilations) is None:
            return (f"'{name}' (kernel {list(kernel)}, pads {list(pads)}) does not align with "
                    f"kernel {target_kernel}, pads {target_pads}: outputs would see different inputs")
    return None


@predicate
def kernels_align(conv_a, conv_b):
    """The smaller kernel sits at a whole, non-negative offset inside the larger."""
    a, b = _node(conv_a), _node(conv_b)
    attrs_a, attrs_b = attributes(a), attributes(b)
    return _align(_weight_shape(conv_a)[2:], attrs_a["pads"], _weight_shape(conv_b)[2:],
                  attrs_b["pads"], attrs_a["dilations"], (a.name, b.name))


def _channel_preserving(conv_output):
    node = _node(conv_output)
    weight = _weight_shape(conv_output)
    attrs = attributes(node)
    if weight[0] != weight[1] * attrs["group"]:
        return f"'{node.name}' maps {weight[1] * attrs['group']} channels to {weight[0]}: no identity kernel"
    return None


@predicate
def identity_fits(conv_output):
    """x itself equals a centred 1x1 kernel of this conv: stride 1, O = I, 'same' padding."""
    node = _node(conv_output)
    attrs = attributes(node)
    if any(s != 1 for s in attrs["strides"]):
        return f"'{node.name}' has stride {attrs['strides']}: x and the conv output differ in size"
    reason = _channel_preserving(conv_output)
    if reason:
        return reason
    rank = len(attrs["strides"])
    return _align(_weight_shape(conv_output)[2:], attrs["pads"], (1,) * rank, [0] * (2 * rank),
                  attrs["dilations"], (node.name, "the identity branch"))


@predicate
def avgpool_exact(pool_output):
    """AveragePool equals a conv: padded zeros counted (or none), floor mode, no dilation."""
    node = _node(pool_output)
    attrs = attributes(node)
    if attrs["auto_pad"] != "NOTSET":
        return f"'{node.name}' uses auto_pad={attrs['auto_pad']}"
    if any(attrs["pads"]) and not attrs["count_include_pad"]:
        return f"'{node.name}' pads with count_include_pad=0: border averages use fewer inputs"
    if attrs["ceil_mode"] or any(d != 1 for d in attrs["dilations"]):
        return f"'{node.name}' uses ceil_mode or dilations"
    return None


@predicate
def avgpool_fits(conv_output, pool_output):
    """The pooling window aligns with the conv: same strides, O = I, dilation 1."""
    conv, pool = _node(conv_output), _node(pool_output)
    conv_attrs, pool_attrs = attributes(conv), attributes(pool)
    if list(conv_attrs["strides"]) != list(pool_attrs["strides"]):
        return f"'{conv.name}' and '{pool.name}' have different strides"
    if any(d != 1 for d in conv_attrs["dilations"]):
        return f"'{conv.name}' is dilated; the pooling window is not"
    reason = _channel_preserving(conv_output)
    if reason:
        return reason
    return _align(_weight_shape(conv_output)[2:], conv_attrs["pads"], pool_attrs["kernel_shape"],
                  pool_attrs["pads"], conv_attrs["dilations"], (conv.name, pool.name))


# --- sequential folds ------------------------------------------------------------------------

@predicate
def bias_free_or_unpadded(first_output, second_output):
    """1x1 then KxK: exact if the 1x1 adds no bias, or the KxK pads nothing."""
    first, second = _node(first_output), _node(second_output)
    bias = first.inputs[2] if len(first.inputs) > 2 and is_present(first.inputs[2]) else None
    if bias is not None and not is_constant(bias):
        raise CannotTell(f"the bias '{bias.name}' is not a constant")
    has_bias = bias is not None and np.any(constant_values(bias))
    if has_bias and any(attributes(second)["pads"]):
        return (f"'{first.name}' adds a bias and '{second.name}' pads: "
                "padded zeros would not carry the bias")
    return None


@predicate
def not_more_flops(first_output, second_output):
    """The merged conv costs no more than the two it replaces (no densifying fold)."""
    first, second = _weight_shape(first_output), _weight_shape(second_output)
    kernel = max(int(np.prod(first[2:])), int(np.prod(second[2:])))
    merged = kernel * first[1] * second[0]
    separate = int(np.prod(first[1:])) * first[0] + int(np.prod(second[1:])) * second[0]
    if merged > separate:
        return f"merging would cost {merged} multiply-adds per pixel instead of {separate}"
    return None


def _product_cost(rows, inner, columns):
    if rows * columns > rows * inner + inner * columns:
        return f"A ({rows}x{inner}) times B ({inner}x{columns}) is a bigger matrix than the two"
    return None


@predicate
def smaller_product(A, B):
    """x @ (A @ B) costs no more than (x @ A) @ B: no low-rank pair is densified."""
    a, b = _matrix_shape(A), _matrix_shape(B)
    if a is None or b is None:
        return f"'{(B if a else A).name}' is not a matrix"
    return _product_cost(a[0], a[1], b[1])


@predicate
def smaller_gemm_product(first_output, second_output):
    """smaller_product for two Gemms, on op(B) of each (transB honoured)."""
    shapes = []
    for value in (first_output, second_output):
        node = _node(value)
        matrix = _matrix_shape(node.inputs[1])
        if matrix is None:
            return f"the weight of '{node.name}' is not a matrix"
        rows, columns = matrix
        shapes.append((columns, rows) if attributes(node)["transB"] else (rows, columns))
    return _product_cost(shapes[0][0], shapes[0][1], shapes[1][1])


# --- BatchNormalization around Linear layers -------------------------------------------------

@predicate
def flattens_to_rows(flatten_output):
    """Flatten at the last axis: [..., N] becomes [rows, N], every element in its column."""
    node = _node(flatten_output)
    rank = _rank(node.inputs[0])
    axis = node.attrs.get("axis", 1)  # the ONNX default
    if (axis + rank if axis < 0 else axis) != rank - 1:
        return f"'{node.name}' flattens at axis {axis} of a rank-{rank} tensor: the features do not stay one axis"
    return None


def _perm(transpose_output):
    node = _node(transpose_output)
    rank = _rank(node.inputs[0])
    return node, list(node.attrs.get("perm", range(rank - 1, -1, -1)))  # the ONNX default reverses


@predicate
def features_to_channels(transpose_output):
    """A Transpose that puts the last axis (a MatMul's features) on axis 1, the BN's channels."""
    node, perm = _perm(transpose_output)
    if len(perm) < 2 or perm[1] != len(perm) - 1:
        return f"'{node.name}' (perm {perm}) does not move the last axis, the features, to axis 1"
    return None


@predicate
def transposes_cancel(first_output, second_output):
    """Two Transposes that together move nothing."""
    (first, p1), (second, p2) = _perm(first_output), _perm(second_output)
    if transforms.compose_perms(p1, p2) != list(range(len(p1))):
        return f"'{first.name}' (perm {p1}) and '{second.name}' (perm {p2}) do not cancel"
    return None


# --- parallel and scaled linear maps ---------------------------------------------------------

def _op_b_shape(gemm_output):
    node = _node(gemm_output)
    matrix = _matrix_shape(node.inputs[1])
    if matrix is None:
        raise CannotTell(f"the weight of '{node.name}' is not a matrix")
    return matrix[::-1] if attributes(node)["transB"] else matrix


@predicate
def same_gemm_layout(gemm_a, gemm_b):
    """Two Gemms that read their input alike (transA) and map it to as many features."""
    a, b = _node(gemm_a), _node(gemm_b)
    if attributes(a)["transA"] != attributes(b)["transA"]:
        return f"'{a.name}' and '{b.name}' differ in transA"
    if _op_b_shape(gemm_a) != _op_b_shape(gemm_b):
        return f"'{a.name}' and '{b.name}' have weights of different shapes"
    return None


@predicate
def same_shape(A, B):
    """Two weights of one shape: their sum keeps every output shape as it was."""
    if _shape(A) != _shape(B):
        return f"'{A.name}' {list(_shape(A))} and '{B.name}' {list(_shape(B))} differ in shape"
    return None


@predicate
def feature_scale(scale, linear_output):
    """A constant scalar, or one along the output features only ([..., 1, N]) of no higher
    rank than the output: a scale of the weight's columns."""
    reason = constant(scale)
    if reason:
        return reason
    shape, output = _shape(scale), linear_output.shape
    features = output[-1] if output else None
    if output is None or not isinstance(features, (int, np.integer)):
        raise CannotTell(f"the features of '{linear_output.name}' are not known")
    if len(shape) > len(output):
        return f"'{scale.name}' has rank {len(shape)}, more than the output's {len(output)}: it broadcasts it"
    if any(size != 1 for size in shape[:-1]) or (shape and shape[-1] not in (1, features)):
        return f"'{scale.name}' of shape {list(shape)} does not scale the {features} output features only"
    return None


# --- the cost guard's merge steps (plan.py) ---------------------------------------------------

_SUMS = ("Add", "Sum")


def _below_bns(value):
    """`value`, or the output of the inference BNs it alone feeds, one after another."""
    while len(value.outputs) == 1 and value.outputs[0].op == "BatchNormalization":
        value = value.outputs[0].outputs[0]
    return value


def _above_bns(node):
    while node is not None and node.op == "BatchNormalization":
        node = _node(node.inputs[0])
    return node


def _sum_terms(top):
    """The nodes computing the terms of a tree of Adds (BNs on a term looked through)."""
    terms, todo = [], [top]
    while todo:
        for tensor in todo.pop().inputs:
            node = _above_bns(_node(tensor))
            if node is not None and node.op in _SUMS:
                todo.append(node)
            elif node is not None:
                terms.append(node)
    return terms


def _through_pointwise(value) -> list:
    """`value`, and the inputs of the 1x1 convs that compute it, one above another: a 1x1
    conv before a k x k one folds into it (fold-pointwise-into-conv)."""
    values = [value]
    node = _node(value)
    while node is not None and node.op == "Conv" and all(k == 1 for k in _weight_shape(node.outputs[0])[2:]):
        values.append(node.inputs[0])
        node = _node(node.inputs[0])
    return values


@predicate
def summed_with_conv(value, pool_output, source):
    """`value` is a term of a sum that also holds a conv of `source` (or of the input of
    the 1x1 conv computing it) whose kernel covers the pool's window, at its strides: the
    conv the pooled branch becomes then merges into that one (DBB), so making it is a step
    towards a merge that removes it."""
    return _summed_with(value, pool_output, source, lambda conv: True)


@predicate
def summed_with_aligned_conv(pool_output, pointwise_output, source):
    """summed_with_conv, for the k x k conv a 1x1 conv and its AveragePool become (k^2 times
    the 1x1's weights, so the merge must follow): the conv of `source` in the sum must also
    take explicit pads, the 1x1's group and output channels, and a window that lines up
    with the pooled one, as merge-conv-branches takes them."""
    pointwise, pool = _node(pointwise_output), attributes(_node(pool_output))
    own = attributes(pointwise)
    pads = [a + b for a, b in zip(own["pads"], pool["pads"])]

    def merges(conv):
        attrs, weight = attributes(conv), _weight_shape(conv.outputs[0])
        return (explicit_padding(conv.outputs[0]) is None and attrs["group"] == own["group"]
                and weight[0] == _weight_shape(pointwise_output)[0]
                and _align(pool["kernel_shape"], pads, weight[2:], attrs["pads"], attrs["dilations"],
                           (pointwise.name, conv.name)) is None)
    return _summed_with(pool_output, pool_output, source, merges)


def _summed_with(value, pool_output, source, merges):
    term = _below_bns(value)
    if len(term.outputs) != 1 or term.outputs[0].op not in _SUMS:
        return f"'{term.name}' is not a term of a sum"
    top = term.outputs[0]
    while len(top.outputs[0].outputs) == 1 and top.outputs[0].outputs[0].op in _SUMS:
        top = top.outputs[0].outputs[0]
    pool = attributes(_node(pool_output))
    sources = _through_pointwise(source)
    for node in _sum_terms(top):
        if node.op != "Conv" or not any(node.inputs[0] is s for s in sources):
            continue
        attrs = attributes(node)
        covers = all(k >= p for k, p in zip(attrs["kernel_shape"], pool["kernel_shape"]))
        if covers and list(attrs["strides"]) == list(pool["strides"]) and not any(d != 1 for d in attrs["dilations"]) \
                and merges(node):
            return None
    return (f"no conv of '{source.name}' in the sum '{top.outputs[0].name}' has a kernel covering "
            f"{list(pool['kernel_shape'])} at strides {list(pool['strides'])} that it would merge into")
