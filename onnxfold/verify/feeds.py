"""The inputs both models run on: random data of each input's dtype and shape, or the
user's own arrays from .npy/.npz files."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from ..errors import OnnxfoldError
from ..text import first_line
from .models import dim_label, dims_text, dtype_name, np_dtype
from .ranges import graph_ranges
from .report import InputInfo
from .settings import DEFAULT_INPUT_RANGE

# Random integer inputs the graph does not bound (ranges.py) are drawn from [0, 8): small
# and non-negative, because integer inputs are mostly indices, sizes or flags.
INT_RANGE = (0, 8)
# The most random data verify makes, all inputs and samples together. A huge declared dim
# (or --shape, or --samples) would otherwise fail in numpy (MemoryError), or have the
# system's out-of-memory killer end the process.
MAX_FEED_BYTES = 4 * 2**30


def input_specs(orig_inputs, shapes) -> dict:
    """{name: (dtype, elem_type, dims, given shape)} with the original's dims (the optimized
    model must take every shape it does: models.narrowed_inputs); the given shapes are
    checked when the feeds are made."""
    unknown = [n for n in shapes if n not in orig_inputs]
    if unknown:
        raise OnnxfoldError(f"shape given for unknown input '{unknown[0]}'; inputs: "
                            + ", ".join(orig_inputs))
    return {name: (np_dtype(elem_type), elem_type, dims, shapes.get(name))
            for name, (elem_type, dims) in orig_inputs.items()}


def make_feeds(specs, settings, notes, model=None) -> tuple:
    """(feeds: one {name: array} per sample, [InputInfo]): the user's data when given,
    else `settings.samples` random sets, each input in the range random_ranges picks;
    `model` (the original ModelProto) bounds integer inputs."""
    unknown = [n for n in settings.input_ranges if n not in specs]
    if unknown:
        raise OnnxfoldError(f"input range given for unknown input '{unknown[0]}'; inputs: " + ", ".join(specs))
    if settings.inputs is None:
        return _random_feeds(specs, settings.samples, settings.seed, random_ranges(specs, settings, model), notes)
    feeds, infos = _user_feeds(settings.inputs, specs, notes)
    if settings.input_ranges:
        notes.append(f"inputs come from files, so the input ranges given ({', '.join(settings.input_ranges)}) "
                     "are not used")
    if settings.samples != 1:
        notes.append(f"inputs come from files, so 1 sample is used (not {settings.samples})")
    return feeds, infos


def _shapes(specs, notes) -> dict:
    """{input name: the concrete shape to feed it}: the user's, else static dims, named
    dims as another input's --shape gives them, and batch 1."""
    given = {name: _check_given_shape(name, dims, tuple(shape), "--shape")
             for name, (_, _, dims, shape) in specs.items() if shape is not None}
    named = _named_sizes(specs, given)
    return {name: given[name] if name in given else _shape_for(name, dims, named, notes)
            for name, (_, _, dims, _) in specs.items()}


def _named_sizes(specs, given) -> dict:
    """{dim name: size} from the given shapes. A named dim is one size in every input that
    names it: feeding one input T=5 and another T=1 would let onnxruntime broadcast the 1,
    and a model wrong on T elements would pass."""
    sizes, where = {}, {}
    for name, shape in given.items():
        dims = specs[name][2] or []
        for dim, size in zip(dims, shape):
            if not isinstance(dim, str):
                continue
            if sizes.get(dim, size) != size:
                raise OnnxfoldError(f"--shape gives dim '{dim}' as {sizes[dim]} for input '{where[dim]}' "
                                    f"and {size} for input '{name}': a named dim takes one size")
            sizes[dim], where[dim] = size, name
    return sizes


def _shape_for(name, dims, named, notes):
    """The concrete shape to feed `name`, which has no --shape: static dims, the sizes
    `named` gives named dims, and batch 1."""
    if dims is None:
        raise OnnxfoldError(f"input '{name}' has no shape in the model; give its shape (--shape)")
    shape = []
    for index, dim in enumerate(dims):
        if isinstance(dim, int):
            shape.append(dim)
            continue
        if dim in named:
            shape.append(named[dim])
            continue
        label = dim_label(dim)
        if index != 0:
            raise OnnxfoldError(f"input '{name}' {dims_text(dims)}: dim {index} ({label}) is "
                                "dynamic and no shape was given for it (--shape)")
        notes.append(f"input '{name}': dynamic batch dim 0 ({label}) set to 1; "
                     "give a shape (--shape) to use another size")
        shape.append(1)
    return tuple(shape)


def _check_given_shape(name, dims, shape, source):
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        raise OnnxfoldError(f"{source} for input '{name}' must be non-negative integers, "
                            f"got {shape}")
    if dims is None:
        return tuple(int(d) for d in shape)
    if len(shape) != len(dims):
        raise OnnxfoldError(f"{source} for input '{name}' has {len(shape)} dims "
                            f"{list(shape)}, the model's has {len(dims)} {dims_text(dims)}")
    for index, (dim, size) in enumerate(zip(dims, shape)):
        if isinstance(dim, int) and dim != size:
            raise OnnxfoldError(f"{source} for input '{name}' gives dim {index} as {size}, "
                                f"the model fixes it at {dim} {dims_text(dims)}")
    return tuple(int(d) for d in shape)


def _random_feeds(specs, samples, seed, ranges, notes):
    shapes = _shapes(specs, notes)
    for name, (dtype, elem_type, _, _) in specs.items():
        if dtype is None:
            raise OnnxfoldError(f"input '{name}' has dtype {dtype_name(elem_type)}, for which "
                                "verify cannot make random data; give the data (--inputs)")
    _check_sizes(shapes, specs, samples)
    rng = np.random.default_rng(seed)
    try:
        feeds = [{name: random_array(rng, shapes[name], spec[0], ranges[name][0])
                  for name, spec in specs.items()} for _ in range(samples)]
    except MemoryError:  # under MAX_FEED_BYTES, but more than this machine has
        raise OnnxfoldError(f"not enough memory for {samples} sample(s) of random inputs; "
                            "use fewer samples (--samples) or smaller shapes (--shape)") from None
    infos = [InputInfo(name, spec[0].name, list(shapes[name]), "random", *_shown(*ranges[name]))
             for name, spec in specs.items()]
    return feeds, infos


def _check_sizes(shapes, specs, samples):
    """Refuse random inputs over MAX_FEED_BYTES before any is made: one input alone (named),
    or all samples of all inputs."""
    limit = f"over the {MAX_FEED_BYTES // 2**30} GiB of random data verify makes"
    sizes = {name: math.prod(shape) * specs[name][0].itemsize for name, shape in shapes.items()}
    for name, size in sizes.items():
        if size > MAX_FEED_BYTES:
            raise OnnxfoldError(f"input '{name}' {dims_text(shapes[name])} {specs[name][0]} would take "
                                f"{size / 2**30:.1f} GiB, {limit}")
    total = samples * sum(sizes.values())
    if total > MAX_FEED_BYTES:
        raise OnnxfoldError(f"the inputs of {samples} sample(s) would take {total / 2**30:.1f} GiB, {limit}; "
                            "use fewer samples (--samples) or smaller shapes (--shape)")


def random_ranges(specs, settings, model=None) -> dict:
    """{input name: ((low, high) or None for bools, why)}: the user's range for that input,
    else the float range for floats; for integers, the range the graph gives (ranges.py),
    else INT_RANGE. `why` is None for the defaults."""
    ints = [name for name, spec in specs.items() if spec[0] is not None and spec[0].kind in "iu"]
    bounded = graph_ranges(model, ints) if model is not None else {}
    chosen = {}
    for name, (dtype, elem_type, _, _) in specs.items():
        kind = dtype.kind if dtype is not None else None
        if name in settings.input_ranges:
            chosen[name] = (_given_range(name, settings.input_ranges[name], dtype, elem_type), "--input-range")
        elif kind == "f":
            chosen[name] = (settings.input_range, None)
        elif name in bounded:  # an int8 index into a larger table still takes only int8 values
            high = min(bounded[name].high, int(np.iinfo(dtype).max) + 1)
            chosen[name] = ((bounded[name].low, high), bounded[name].reason)
        else:
            chosen[name] = (INT_RANGE if kind in ("i", "u") else None, None)
    return chosen


def _given_range(name, pair, dtype, elem_type):
    """A user's range for input `name`, checked against its dtype."""
    if dtype is None or dtype.kind == "b":
        raise OnnxfoldError(f"input '{name}' has dtype {dtype_name(elem_type)}: an input range does not apply")
    if dtype.kind == "f":
        return pair
    low, high = pair
    if not (low.is_integer() and high.is_integer()):
        raise OnnxfoldError(f"input '{name}' is {dtype}: its range takes integers, got {low:g},{high:g}")
    info = np.iinfo(dtype)
    if low < info.min or high - 1 > info.max:
        raise OnnxfoldError(f"input range [{low:g}, {high:g}) of input '{name}' is beyond {dtype} "
                            f"[{info.min}, {info.max}]")
    return int(low), int(high)


def _shown(value_range, why) -> tuple:
    """InputInfo's range and range_reason."""
    return (None if value_range is None else list(value_range)), why


def random_array(rng, shape, dtype, value_range=None):
    """Random data of `dtype`: floats uniform in value_range (default DEFAULT_INPUT_RANGE),
    ints in [low, high) of value_range (default INT_RANGE), bools 50/50. Always an ndarray,
    0-d for shape (): onnxruntime refuses a numpy scalar (numpy.bool) as a feed."""
    return np.asarray(_random_values(rng, shape, np.dtype(dtype), value_range))


def _random_values(rng, shape, dtype, value_range):
    if dtype.kind == "f":
        value_range = value_range or DEFAULT_INPUT_RANGE
        largest = float(np.finfo(dtype).max)
        if max(abs(value_range[0]), abs(value_range[1])) > largest:
            raise OnnxfoldError(f"input range {list(value_range)} is beyond {dtype} (largest {largest:.4g}): "
                                "the inputs would be infinite")
        return rng.uniform(value_range[0], value_range[1], size=shape).astype(dtype)
    if dtype.kind in "iu":
        low, high = value_range or INT_RANGE
        return rng.integers(low, high, size=shape, dtype=dtype)
    if dtype.kind == "b":
        return rng.random(size=shape) < 0.5
    raise OnnxfoldError(f"cannot make random data of dtype {dtype}")


def _user_feeds(inputs, specs, notes):
    arrays = _load_arrays(inputs, specs)
    missing = [n for n in specs if n not in arrays]
    extra = [n for n in arrays if n not in specs]
    if missing or extra:
        parts = ([f"no data for input(s) {', '.join(missing)}"] if missing else []) + \
                ([f"data for unknown input(s) {', '.join(extra)}"] if extra else [])
        raise OnnxfoldError("; ".join(parts) + f" (model inputs: {', '.join(specs)})")
    feed, infos = {}, []
    for name, (dtype, elem_type, dims, given) in specs.items():
        array = _as_input(name, arrays[name], dtype, elem_type, notes)
        shape = _check_given_shape(name, dims, array.shape, "the data")
        if given is not None and tuple(given) != shape:
            raise OnnxfoldError(f"input '{name}': --shape {list(given)} disagrees with the data's "
                                f"shape {list(shape)}")
        feed[name] = array
        infos.append(InputInfo(name, array.dtype.name, list(shape), "file", None))
    return [feed], infos


def _load_arrays(inputs, specs):
    """{name: array} from a .npz path (or a .npy path for a one-input model) or a dict of
    .npy paths / arrays."""
    if isinstance(inputs, dict):
        return {name: value if isinstance(value, np.ndarray) else _load_npy(value)
                for name, value in inputs.items()}
    data = _np_load(inputs)
    if isinstance(data, np.ndarray):
        if len(specs) != 1:
            raise OnnxfoldError("a single array needs a one-input model; use an .npz keyed by "
                                "input name", inputs)
        return {next(iter(specs)): data}
    with data:  # an .npz reads each array when asked for it: the errors come here
        try:
            return {name: data[name] for name in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, MemoryError) as error:
            raise OnnxfoldError(f"not a readable .npz file ({first_line(error)})", inputs) from None


def _load_npy(path):
    data = _np_load(path)
    if not isinstance(data, np.ndarray):
        raise OnnxfoldError("expected one array (.npy), found an archive (.npz)", path)
    return data


def _np_load(path):
    path = Path(path)
    if not path.is_file():
        raise OnnxfoldError("no such file", path)
    try:
        # allow_pickle=False: an input file must not be able to run code.
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, MemoryError) as error:
        raise OnnxfoldError(f"not a readable .npy/.npz file ({first_line(error)})", path) from None


def _as_input(name, array, dtype, elem_type, notes):
    array = np.asarray(array)
    if dtype is None or array.dtype == dtype:
        return array
    # Casting within a kind (float64 -> float32, int32 -> int64) or up from ints/bools is what
    # the user meant; float -> int would silently truncate, so it is refused.
    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise OnnxfoldError(f"input '{name}': the data is {array.dtype}, the model expects "
                            f"{dtype_name(elem_type)}")
    notes.append(f"input '{name}': data cast from {array.dtype} to {dtype}")
    return array.astype(dtype)
