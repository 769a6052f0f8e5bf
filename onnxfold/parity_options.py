"""`verify` and `optimize --verify` take the same parity options: the click options, and
their reading into VerifySettings."""

from __future__ import annotations

import functools

import click

from .errors import OnnxfoldError
from .modelio import open_model

PARITY_OPTIONS = [
    click.option("--rtol", type=float, help="Relative tolerance of float outputs (default by output dtype; "
                                            "integer and bool outputs stay exact)."),
    click.option("--atol", type=float, help="Absolute tolerance of float outputs (default by output dtype; "
                                            "integer and bool outputs stay exact)."),
    click.option("--output-tol", multiple=True, metavar="NAME:RTOL[:ATOL]",
                 help="Tolerance for one output, of any dtype; repeatable. Read from the right, so NAME may hold "
                      "':' (Identity:0:1e-3). Where the text also reads as NAME:RTOL:ATOL, the "
                      "reading whose NAME is an output of the model is taken."),
    click.option("--samples", type=int, default=1, show_default=True, help="Random input sets to compare."),
    click.option("--input-range", "input_range", multiple=True, metavar="[NAME:]LOW,HIGH",
                 help="Range [LOW, HIGH) of random inputs. LOW,HIGH: every float input (default -1,1). "
                      "NAME:LOW,HIGH: that input, of any number type (integers take integer bounds); "
                      "repeatable. Integer inputs default to what the graph says (indices into a "
                      "Gather's table: [0, its size); cast to float: 0 or 1), else [0, 8)."),
    click.option("--shape", "shapes", multiple=True, metavar="NAME:DxDxD",
                 help="Shape of an input with dynamic dimensions; repeatable."),
    click.option("--inputs", "input_files", multiple=True, metavar="FILE.npz | NAME=FILE.npy",
                 help="Your own input data instead of random inputs."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs."),
]


def parity_options(command):
    """The options that say how parity is checked, for `verify` and `optimize --verify`
    alike; the command gets them, as given, in one argument `parity` (see parity_settings)."""

    @functools.wraps(command)
    def wrapper(*args, rtol, atol, output_tol, samples, input_range, shapes, input_files, seed, **kwargs):
        parity = {"rtol": rtol, "atol": atol, "output_tol": output_tol, "samples": samples,
                  "input_range": input_range, "shapes": shapes, "input_files": input_files, "seed": seed}
        return command(*args, parity=parity, **kwargs)

    for option in reversed(PARITY_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def parity_settings(parity, models, **more):
    """The VerifySettings of the parity options, plus `more` (verify's own options);
    `models`: the paths whose outputs an --output-tol may name."""
    from .verify import VerifySettings  # onnxruntime is loaded only when parity is checked

    return VerifySettings(
        rtol=parity["rtol"], atol=parity["atol"],
        output_tolerances=_output_tolerances(parity["output_tol"], _output_names(models)),
        samples=parity["samples"], **_input_ranges(parity["input_range"]),
        shapes=_shapes(parity["shapes"]), inputs=_input_files(parity["input_files"]), seed=parity["seed"],
        **more)


def _output_names(paths):
    """A function giving the graph outputs of the models at `paths`, read when first asked.
    A model that cannot be read is skipped: the command reports it where it reads it."""

    @functools.cache
    def names() -> set:
        found = set()
        for path in paths:
            try:
                found |= {output.name for output in open_model(path)[0].graph.output}
            except OnnxfoldError:
                continue
        return found

    return names


def _input_ranges(items) -> dict:
    """VerifySettings' input_range (LOW,HIGH: for floats) and input_ranges (NAME:LOW,HIGH,
    read from the right like --shape, so NAME may hold ':') from --input-range items."""
    shared, named = [], {}
    for item in items:
        name, colon, pair = item.rpartition(":")
        if colon and not name:
            raise OnnxfoldError(f"--input-range takes [NAME:]LOW,HIGH, not '{item}'")
        if name:
            named[name] = _pair(pair, item)
        else:
            shared.append(_pair(pair, item))
    if len(shared) > 1:
        raise OnnxfoldError("--input-range LOW,HIGH (for every float input) is given twice; "
                            "use NAME:LOW,HIGH for one input")
    return {"input_range": shared[0] if shared else None, "input_ranges": named}


def _pair(text, item):
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise OnnxfoldError(f"--input-range takes [NAME:]LOW,HIGH, not '{item}'") from None
    return low, high


def _shapes(items):
    shapes = {}
    for item in items:
        name, _, dims = item.rpartition(":")
        try:
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise OnnxfoldError(f"--shape takes NAME:1x3x224x224, not '{item}'") from None
        if not name:
            raise OnnxfoldError(f"--shape takes NAME:1x3x224x224, not '{item}'")
    return shapes or None


def _output_tolerances(items, output_names):
    """{name: (rtol, atol)} from NAME:RTOL[:ATOL] items; `output_names()` gives the model's
    outputs, asked only where an item reads both ways ('Identity:0:1e-3')."""
    tolerances = {}
    for item in items:
        readings = _tolerance_readings(item)
        if not readings:
            raise OnnxfoldError(f"--output-tol takes NAME:RTOL[:ATOL], not '{item}'")
        if len(readings) == 2:
            named = [reading for reading in readings if reading[0] in output_names()]
            if len(named) == 2:
                raise OnnxfoldError(f"--output-tol '{item}' may be for output '{named[0][0]}' or "
                                    f"'{named[1][0]}'; add :ATOL to make it NAME:RTOL:ATOL")
            readings = named or readings  # no output named: verify reports the NAME:RTOL:ATOL reading
        name, rtol, atol = readings[0]
        tolerances[name] = (rtol, atol)
    return tolerances or None


def _tolerance_readings(item) -> list:
    """The (name, rtol, atol) that NAME:RTOL[:ATOL] can mean, read from the right since a
    name may hold ':'; the NAME:RTOL:ATOL reading first."""
    parts = item.split(":")
    readings = []
    for count in (2, 1):
        name, numbers = ":".join(parts[:-count]), parts[-count:]
        try:
            values = [float(number) for number in numbers]
        except ValueError:
            continue
        if name and len(parts) > count:
            readings.append((name, values[0], values[1] if count == 2 else None))
    return readings


def _input_files(items):
    if not items:
        return None
    if len(items) == 1 and "=" not in items[0]:
        return items[0]
    files = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise OnnxfoldError(f"--inputs takes one FILE.npz or NAME=FILE.npy per input, not '{item}'")
        files[name] = path
    return files
