"""Clean-ups that merge what is computed or stored twice.

Two weights of the same type, shape and bytes are one; two nodes of the same op, domain
and attributes on the same values in the same order compute the same, unless they draw
random numbers (or hold a subgraph, which this does not compare). Both are found by
hashing, in one pass over the graph: a weight's bytes are hashed only when another
weight has its type, shape and sampled bytes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from .graph import is_constant, is_standard
from .constfold import is_random
from .normalize import Cleanup, _bypass, redirect
from .scopes import graph_and_bodies
from .weights import constant_values, sampled_bytes

_SAMPLES = 64  # elements read to tell weights of one shape apart before hashing them all


def merge_duplicate_weights(graph, names) -> int:
    """Each group of equal weights read in this scope becomes its first weight."""
    groups = {}
    for weight in _mergeable_weights(graph):
        groups.setdefault((str(weight.dtype), tuple(weight.shape)), []).append(weight)
    count = 0
    for same_shape in groups.values():
        if len(same_shape) < 2:
            continue
        for same_bytes in _by_bytes(same_shape):
            keep = same_bytes[0]
            for duplicate in same_bytes[1:]:
                for consumer in list(duplicate.outputs):
                    for index, tensor in enumerate(consumer.inputs):
                        if tensor is duplicate:
                            consumer.inputs[index] = keep
                count += 1
    return count


def _mergeable_weights(graph) -> list:
    """The weights some node of this scope reads, none of them read outside this scope or
    a scope nested in it (so the one kept is visible to every reader), nor a graph input
    or output (those keep their names)."""
    inner = {id(node) for scope in graph_and_bodies(graph) for node in scope.nodes}
    boundary = {id(t) for t in [*graph.inputs, *graph.outputs]}
    seen, weights = set(), []
    for node in graph.nodes:
        for tensor in node.inputs:
            if not is_constant(tensor) or id(tensor) in seen or id(tensor) in boundary:
                continue
            seen.add(id(tensor))
            if all(id(reader) in inner for reader in tensor.outputs):
                weights.append(tensor)
    return weights


def _by_bytes(weights) -> list:
    """Groups of weights (one dtype and shape) whose bytes are equal, in graph order."""
    sampled = {}
    for weight in weights:
        sampled.setdefault(sampled_bytes(weight, _SAMPLES), []).append(weight)
    groups = []
    for candidates in sampled.values():
        if len(candidates) < 2:
            continue
        hashed = {}
        for weight in candidates:
            hashed.setdefault(hashlib.blake2b(_raw(weight), digest_size=16).digest(), []).append(weight)
        for same in hashed.values():
            # A hash match is checked byte for byte: merging is exact, never probable.
            first = _raw(same[0])
            equal = [w for w in same if np.array_equal(_raw(w), first)]
            if len(equal) > 1:
                groups.append(equal)
    return groups


def _raw(weight) -> np.ndarray:
    """The weight's bytes as a flat uint8 array (-0.0 and 0.0, or two NaNs, differ)."""
    return np.ascontiguousarray(constant_values(weight)).reshape(-1).view(np.uint8)


def merge_common_subexpressions(graph, names) -> int:
    """Each node that repeats an earlier one's op, attributes and inputs gives way to it."""
    first_of = {}
    count = 0
    for node in list(graph.nodes):
        if not node.outputs:
            continue  # bypassed earlier in this pass
        key = _node_key(node)
        if key is None:
            continue
        first = first_of.setdefault(key, node)
        if first is not node:
            count += _merge(graph, node, first)
    return count


def _node_key(node):
    """What the node computes, hashable; None for a node never merged."""
    if not is_standard(node) or is_random(node):
        return None
    attrs = tuple((name, _attribute_key(value)) for name, value in sorted(node.attrs.items()))
    if any(key is None for _, key in attrs):
        return None
    # An omitted optional input or output is an empty name, never a value.
    inputs = tuple(id(t) if t.name else None for t in node.inputs)
    outputs = tuple(bool(t.name) for t in node.outputs)
    return node.op, node.domain or "", attrs, inputs, outputs


def _attribute_key(value):
    """A value standing for the attribute's exactly (repr keeps -0.0 apart from 0.0);
    None for a subgraph or anything not compared."""
    if isinstance(value, float):
        return "float", repr(value)
    if isinstance(value, (bool, int, str, bytes)):
        return type(value).__name__, value
    if isinstance(value, (list, tuple)):
        items = tuple(_attribute_key(item) for item in value)
        return None if None in items else ("list", items)
    if isinstance(value, gs.Constant):
        data = constant_values(value)
        return "tensor", str(data.dtype), data.shape, _raw(value).tobytes()
    return None


def _merge(graph, duplicate, kept) -> int:
    """Readers of `duplicate`'s outputs read `kept`'s instead; a graph output keeps its name."""
    if len(duplicate.outputs) == 1:
        return _bypass(graph, duplicate, kept.outputs[0])
    if any(t in graph.outputs for t in duplicate.outputs):
        return 0
    for value, replacement in zip(duplicate.outputs, kept.outputs):
        redirect(value, replacement)
    duplicate.inputs.clear()
    duplicate.outputs.clear()
    return 1


STEPS = [
    Cleanup("duplicate-weights", "weights of the same type, shape and bytes become one",
            merge_duplicate_weights),
    Cleanup("common-subexpressions", "nodes repeating another's op, attributes and inputs are merged",
            merge_common_subexpressions),
]
