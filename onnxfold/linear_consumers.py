"""BN -> moves and means -> every consuming Linear: the one fold rule files cannot say.

DESIGN.md algebra 12. A BatchNormalization is x*s + t per channel (axis 1). Reshapes and
transposes only move elements, and a mean over other axes averages each channel apart
(its weights sum to 1, so mean(x*s + t) = mean(x)*s + t): through all of them every
element keeps its channel, and where a Linear contracts that axis the BN folds into its
rows: W' = diag(s).W, b' = b + t.W (Gemm: alpha and beta honoured).

A rule's pattern is a tree rooted at one node, and every value it removes must be used
only inside it; a pre-norm BN before attention feeds q, k and v (three roots), so no
pattern can match "all consumers". This pass walks forward from each BN instead, with
the same named predicates and transforms the rules use, and folds it only when every
path ends in a Linear that contracts the channel; otherwise it records why not, for
--explain. One fold removes the BN and changes only constants, so the loop that runs it
with the rules (optimize.py) still ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .errors import CannotTell
from .graph import attributes, is_constant, is_present, is_standard
from .plan import Miss
from .predicates import PREDICATES
from .transforms import fold_bn_into_next_gemm
from .weights import constant_values

RULE = "fold-bn-into-linear-consumers"
SUMMARY = ("BatchNormalization -> (Reshape | Flatten | Transpose | ReduceMean | GlobalAveragePool)* -> "
           "every consumer a Linear  =>  the Linears with rows *s, bias + t.W")
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


@dataclass
class _Fold:
    """A Linear reached from the BN: the node, its weight, and where its bias goes."""
    node: gs.Node
    weight: gs.Tensor
    bias: gs.Tensor | None  # a Gemm's C, or the constant of the Add after a MatMul
    bias_node: gs.Node | None  # the node reading `bias` (the Gemm or that Add)


class _Refused(Exception):
    """Why the BN stays; the message is what --explain shows."""


def fold_bn_into_linear_consumers(graph, engine) -> int:
    """Fold every BN whose consumers are all Linears; record a Miss for the others."""
    outputs = {id(t) for t in graph.outputs}
    folded = 0
    for node in list(graph.nodes):
        if node.op != "BatchNormalization" or not is_standard(node) or not node.outputs:
            continue
        try:
            sites = _linear_sites(node, outputs, engine.own_nodes)
            new = [_folded_weights(node, site) for site in sites]
        except (_Refused, CannotTell) as why:
            engine.misses[(RULE, node.name)] = Miss(RULE, node.name, str(why), (node.outputs[0].name,))
            continue
        for site, weights in zip(sites, new):
            _rewire(site, weights, engine.names)
        _bypass(node)
        engine.removed.add(node)
        engine.misses.pop((RULE, node.name), None)
        engine.rewrites.append(_rewrite(node, sites))
        folded += 1
    return folded


def _rewrite(node, sites):
    from .engine import Rewrite  # the engine imports the modules this one does
    return Rewrite(RULE, [node.name], [site.node.name for site in sites])


# --- where the BN's channel goes -------------------------------------------------------

def _linear_sites(bn, graph_outputs, own_nodes) -> list:
    """Every Linear the BN output reaches through moves and means, each contracting the channel."""
    _holds("bn_inference", bn.outputs[0])
    _holds("constant", *bn.inputs[1:5])
    channels = _shape(bn.inputs[1])[0]
    # Each value on the way, the channel's axis in it, and its shape (carried along, since
    # shape inference may not have reached past a node the clean-ups simplified).
    todo, sites = [(bn.outputs[0], 1, _shape(bn.inputs[0]))], []
    while todo:
        value, axis, shape = todo.pop()
        if id(value) in graph_outputs:
            raise _Refused(f"'{value.name}' is a graph output: it must keep the BN")
        for consumer in value.outputs:
            if consumer not in own_nodes:
                raise _Refused(f"'{value.name}' is read inside a nested graph (by '{consumer.name}')")
            if consumer.op == "MatMul" or consumer.op == "Gemm":
                sites.append(_linear_site(consumer, value, axis, shape, channels, graph_outputs))
            elif _moves(consumer) and consumer.inputs[0] is value:
                todo.append((consumer.outputs[0], *_moved(consumer, axis, shape, channels)))
            else:
                raise _Refused(f"'{value.name}' is also read by '{consumer.name}' ({consumer.op}), "
                               "not a Linear nor a move")
    if not sites:
        raise _Refused("no Linear reads the BN output")
    return sites


def _moves(node) -> bool:
    return is_standard(node) and node.op in {*_RESHAPES, "Transpose", "ReduceMean", "GlobalAveragePool",
                                            "Identity"}


def _moved(node, axis, shape, channels) -> tuple:
    """The channel's axis in the node's output and that output's shape, or _Refused when
    the node splits, merges or averages the channel."""
    if node.op == "Identity":
        return axis, shape
    if node.op == "Transpose":
        perm = list(node.attrs.get("perm", range(len(shape) - 1, -1, -1)))
        return perm.index(axis), tuple(shape[p] for p in perm)
    if node.op == "GlobalAveragePool":
        if axis != 1:
            raise _Refused(f"'{node.name}' averages axes 2 and up, which hold the BN's channel")
        return axis, shape[:2] + (1,) * (len(shape) - 2)
    if node.op == "ReduceMean":
        return _mean_axis(node, axis, shape)
    return _reshaped_axis(node, axis, shape, channels)


def _reshaped_axis(node, axis, before, channels) -> tuple:
    """Elements keep their order: the channel survives where the same number of elements
    precede an axis of `channels` elements in the output as preceded it in the input."""
    after = _shape(node.outputs[0])
    leading = _elements(before[:axis])
    for out_axis, size in enumerate(after):
        if size == channels and _elements(after[:out_axis]) == leading:
            return out_axis, after
    raise _Refused(f"'{node.name}' ({node.op} {list(before)} -> {list(after)}) splits the BN's channel axis "
                   "or merges it with another")


def _mean_axis(node, axis, shape) -> tuple:
    rank = len(shape)
    attrs = node.attrs
    if len(node.inputs) > 1 and is_present(node.inputs[1]):  # opset 18: axes as an input
        if not is_constant(node.inputs[1]):
            raise _Refused(f"'{node.name}' takes its axes at run time")
        axes = constant_values(node.inputs[1]).reshape(-1).tolist()
    else:
        axes = list(attrs.get("axes", []))
    if not axes and attrs.get("noop_with_empty_axes", 0):
        return axis, shape
    reduced = {a % rank for a in axes} if axes else set(range(rank))
    if axis in reduced:
        raise _Refused(f"'{node.name}' averages over the BN's channel axis")
    if attrs.get("keepdims", 1):
        return axis, tuple(1 if a in reduced else size for a, size in enumerate(shape))
    kept = tuple(size for a, size in enumerate(shape) if a not in reduced)
    return axis - sum(a < axis for a in reduced), kept


def _linear_site(node, value, axis, shape, channels, graph_outputs) -> _Fold:
    """`node` reads the BN's channel on the axis it contracts, with stored weights."""
    if node.inputs[0] is not value or value in node.inputs[1:]:
        raise _Refused(f"'{node.name}' reads the BN output as its weight, not as its input")
    weight = node.inputs[1]
    _holds("constant", weight)
    rank = len(shape)
    if node.op == "Gemm":
        contracted = 0 if attributes(node)["transA"] else 1
        bias = node.inputs[2] if len(node.inputs) > 2 and is_present(node.inputs[2]) else None
        _holds("constant", bias)
        site = _Fold(node, weight, bias, node)
    else:
        _holds("weight_rank_is", weight, 2)
        contracted = rank - 1
        site = _matmul_site(node, weight, rank, graph_outputs)
    if axis != contracted:
        raise _Refused(f"the BN's channel reaches axis {axis} of '{node.name}', which contracts axis {contracted}")
    if shape[axis] != channels:  # a broadcast 1-channel BN: s and t are not per feature
        raise _Refused(f"'{node.name}' contracts {shape[axis]} features, the BN has {channels}")
    return site


def _matmul_site(node, weight, rank, graph_outputs) -> _Fold:
    """A MatMul takes the BN shift in the constant of the Add after it, or becomes a Gemm.

    The Add must be the MatMul's only reader: the product alone lacks the shift after the fold.
    """
    product = node.outputs[0]
    users = product.outputs
    if len(users) == 1 and users[0].op == "Add" and is_standard(users[0]) and id(product) not in graph_outputs:
        add = users[0]
        bias = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
        if is_constant(bias) and PREDICATES["per_feature"](bias, weight) is None:
            return _Fold(node, weight, bias, add)
    if rank != 2:
        raise _Refused(f"'{node.name}' has no bias Add to take the BN shift (rank {rank}, so no Gemm)")
    return _Fold(node, weight, None, None)


def _holds(name, *args) -> None:
    reason = PREDICATES[name](*args)
    if reason:
        raise _Refused(reason)


def _shape(value) -> tuple:
    """Sizes as numbers, dynamic ones by their names (a batch dim 'N'); CannotTell where one
    is not known at all."""
    shape = value.shape if is_present(value) else None
    if shape is None or not all(isinstance(d, (int, np.integer)) or (isinstance(d, str) and d) for d in shape):
        raise CannotTell(f"the shape of '{value.name}' is not known")
    return tuple(d if isinstance(d, str) else int(d) for d in shape)


def _elements(dims) -> tuple:
    """How many elements `dims` hold: the product of the numbers, and the named sizes."""
    return math.prod(d for d in dims if isinstance(d, int)), sorted(d for d in dims if isinstance(d, str))


# --- the arithmetic and the rewiring -----------------------------------------------------

def _folded_weights(bn, site) -> tuple:
    """(weight, bias) in the weight's type, or _Refused when they mix types or overflow."""
    dtype = np.dtype(site.weight.dtype)
    stats = [constant_values(t) for t in bn.inputs[1:5]]
    bias = None if site.bias is None else constant_values(site.bias)
    if dtype.kind != "f" or any(a.dtype != dtype for a in [*stats, *([bias] if bias is not None else [])]):
        raise _Refused(f"the BN and '{site.node.name}' mix element types or are not floating point")
    attrs = attributes(site.node) if site.node.op == "Gemm" else {"alpha": 1.0, "beta": 1.0, "transB": 0}
    epsilon = attributes(bn)["epsilon"]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        weight, bias = fold_bn_into_next_gemm(constant_values(site.weight), _float(bias), *map(_float, stats),
                                              epsilon, attrs["alpha"], attrs["beta"], attrs["transB"])
        cast = weight.astype(dtype), np.asarray(bias).astype(dtype)
    if not all(np.isfinite(a).all() for a in cast):
        raise _Refused(f"folded weights of '{site.node.name}' are not finite in {dtype.name}")
    return cast


def _float(array):
    return None if array is None else array.astype(np.float64)


def _rewire(site, weights, names) -> None:
    """New constants (a weight may be shared); a bias-free 2-D MatMul becomes a Gemm."""
    weight, bias = weights
    node = site.node
    node.inputs[1] = gs.Constant(names.fresh(f"{node.name}_W"), weight)
    bias_constant = gs.Constant(names.fresh(f"{node.name}_C"), bias)
    if site.bias_node is None:  # a MatMul on 2-D: the same product, with the shift as bias
        node.op = "Gemm"
        node.inputs.append(bias_constant)
        return
    if site.bias_node is node:  # a Gemm: beta is folded into C
        if len(node.inputs) > 2:
            node.inputs[2] = bias_constant
        else:
            node.inputs.append(bias_constant)
        node.attrs["beta"] = 1.0
        return
    add = site.bias_node
    index = next(i for i, tensor in enumerate(add.inputs) if tensor is site.bias)
    add.inputs[index] = bias_constant


def _bypass(bn) -> None:
    """The BN's consumers read its input instead; the BN is disconnected."""
    source, output = bn.inputs[0], bn.outputs[0]
    for consumer in list(output.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is output:
                consumer.inputs[index] = source
    bn.inputs.clear()
    bn.outputs.clear()
