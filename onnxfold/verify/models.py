"""The two models verify compares: how onnxruntime gets them, and their signatures, which
must agree before any number is compared."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import OnnxfoldError
from ..graph import dims_of
from ..modelio import load_model
from .settings import FLOAT_TOLERANCES


@dataclass
class Model:
    role: str  # "original" or "optimized"
    proto: onnx.ModelProto
    source: object  # what onnxruntime loads: a path string or serialized bytes
    label: str  # for the report
    path: str | None  # for error messages


def open_model(model, role) -> Model:
    # Paths go to onnxruntime as paths, so that it resolves external data itself and
    # large models need no re-serializing.
    if isinstance(model, onnx.ModelProto):
        return Model(role, model, model.SerializeToString(), f"<in-memory {role} model>", None)
    return Model(role, load_model(model), str(model), str(model), str(model))


def signature(model: Model) -> dict:
    """{"input": {name: (elem_type, dims)}, "output": {...}}; dims is None when the rank is
    unknown, and holds ints (static), strings (named dynamic) or None (unnamed dynamic)."""
    graph = model.proto.graph
    weights = {t.name for t in graph.initializer}
    found = {}
    for kind, values in (("input", graph.input), ("output", graph.output)):
        found[kind] = {}
        for value in values:
            if value.name in weights:  # old-style models list initializers as inputs
                continue
            if value.type.WhichOneof("value") != "tensor_type":
                raise OnnxfoldError(f"{kind} '{value.name}' of the {model.role} model is not a "
                                    "tensor; verify handles tensor inputs and outputs only",
                                    model.path)
            found[kind][value.name] = _tensor_type(value.type.tensor_type)
    return found


def _tensor_type(tensor_type):
    if not tensor_type.HasField("shape"):
        return tensor_type.elem_type, None
    return tensor_type.elem_type, dims_of(tensor_type.shape)


def check_signatures(orig, opt) -> None:
    problems = []
    for kind in ("input", "output"):
        a, b = orig[kind], opt[kind]
        problems += [f"{kind} '{n}' is in original but not in optimized" for n in a if n not in b]
        problems += [f"{kind} '{n}' is in optimized but not in original" for n in b if n not in a]
        for name in (n for n in a if n in b):
            if not _compatible(a[name], b[name]):
                problems.append(f"{kind} '{name}': {_describe(a[name])} in original, "
                                f"{_describe(b[name])} in optimized")
    if problems:
        raise OnnxfoldError("the models' signatures differ: " + "; ".join(problems))
    for name, (elem_type, _) in orig["output"].items():
        if np_dtype(elem_type) is None:
            raise OnnxfoldError(f"output '{name}' has dtype {dtype_name(elem_type)}, "
                                "which verify cannot compare")


def _compatible(a, b):
    (type_a, dims_a), (type_b, dims_b) = a, b
    if type_a != type_b:
        return False
    if dims_a is None or dims_b is None:
        return True
    if len(dims_a) != len(dims_b):
        return False
    # Only static dims must agree here: a dim dynamic on one side only is comparable (on
    # the sizes both take), and narrowed_inputs tells when the optimized side is the static one.
    return all(x == y for x, y in zip(dims_a, dims_b) if isinstance(x, int) and isinstance(y, int))


def narrowed_inputs(orig_inputs, opt_inputs) -> list:
    """One line per input the optimized model takes in fewer shapes than the original (a
    dim or rank dynamic in the original, static in the optimized). Such a model refuses
    inputs the original accepts, so it cannot stand in for it, whatever its outputs on
    the shapes both take; a dim static in the original and dynamic in the optimized is
    fine. Call after check_signatures (same names, same ranks where both are known)."""
    found = []
    for name, (_, dims_a) in orig_inputs.items():
        dims_b = opt_inputs[name][1]
        if dims_b is None:
            continue
        if dims_a is None:
            found.append(f"input '{name}': the original takes any rank, the optimized model only "
                         f"{dims_text(dims_b)}")
            continue
        fixed = [f"dim {index} ({dim_label(a)}) is fixed at {b}" for index, (a, b) in enumerate(zip(dims_a, dims_b))
                 if not isinstance(a, int) and isinstance(b, int)]
        if fixed:
            found.append(f"input '{name}': the original takes {dims_text(dims_a)}, the optimized model "
                         f"only {dims_text(dims_b)}: " + ", ".join(fixed))
    return found


def reordered_outputs(orig, opt) -> list:
    """A line when the optimized model lists the same outputs in another order: a caller
    that reads outputs by position (run(None, ...)) would get them swapped. Call after
    check_signatures (same names)."""
    names_a, names_b = list(orig["output"]), list(opt["output"])
    if names_a == names_b:
        return []
    return [f"outputs in another order: the original gives {', '.join(names_a)}; "
            f"the optimized model {', '.join(names_b)}"]


def dim_label(dim) -> str:
    return f"'{dim}'" if dim else "unnamed"


def _describe(tensor):
    elem_type, dims = tensor
    if dims is None:
        return f"{dtype_name(elem_type)} (unknown shape)"
    return f"{dtype_name(elem_type)} {dims_text(dims)}"


def dims_text(dims) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def np_dtype(elem_type):
    """The numpy dtype for an ONNX element type, or None when verify cannot handle it
    (strings, bfloat16, float8, complex...)."""
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None
    if dtype.kind in "iub" or dtype in FLOAT_TOLERANCES:
        return dtype
    return None


def dtype_name(elem_type) -> str:
    dtype = np_dtype(elem_type)
    if dtype is not None:
        return dtype.name
    try:
        return onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type {elem_type}"
