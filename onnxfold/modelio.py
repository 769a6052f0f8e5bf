"""Loading and saving models: clear errors on bad input, atomic writes, external data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import OnnxfoldError

# protobuf refuses to serialize a message of 2 GiB or more; stay well below it.
PROTOBUF_LIMIT = 2**31 - 2**24


def load_model(path) -> onnx.ModelProto:
    """Read an ONNX model with its external data, or raise OnnxfoldError naming the problem."""
    return read_model(path)[0]


def read_model(path):
    """(model with its external data loaded, whether the file kept weights outside)."""
    path = Path(path)
    if not path.exists():
        raise OnnxfoldError("no such file", path)
    if not path.is_file():
        raise OnnxfoldError("not a file", path)
    if path.stat().st_size == 0:
        raise OnnxfoldError("the file is empty", path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise OnnxfoldError(f"not a readable ONNX model ({_first_line(error)})", path) from None
    if not model.opset_import or not model.HasField("graph"):
        raise OnnxfoldError("not an ONNX model (no graph or no opset import)", path)
    external = uses_external_data(model)
    if external:
        _load_external_data(model, path)
    return model, external


def checker_complaint(model: onnx.ModelProto, path) -> str | None:
    """What onnx.checker says against the model, if anything (the model may still run)."""
    try:
        if tensor_bytes(model) > PROTOBUF_LIMIT:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError, OSError) as error:
        return _first_line(error)
    return None


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(model))


def save_model(model: onnx.ModelProto, path, external_data: bool | None = None) -> None:
    """Write `model` to `path` atomically: a reader never sees a half-written file.

    `external_data=None` stores weights in `<name>.data` beside the model only where the
    model would not fit in one protobuf. Note: saving with external data moves the
    tensor bytes out of `model`.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxfoldError("the output folder does not exist", folder)
    if not os.access(folder, os.W_OK):
        raise OnnxfoldError("the output folder is not writable", folder)
    if external_data is None:
        external_data = tensor_bytes(model) > PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.") as scratch:
        staged = Path(scratch) / path.name
        data_name = path.name + ".data"
        try:
            onnx.save_model(model, str(staged), save_as_external_data=external_data,
                            all_tensors_to_one_file=True, location=data_name,
                            size_threshold=1024)
        except (OSError, ValueError) as error:
            raise OnnxfoldError(f"could not write the model ({_first_line(error)})", path) from None
        if (Path(scratch) / data_name).exists():  # tensors under 1 KiB stay inline
            os.replace(Path(scratch) / data_name, folder / data_name)
        os.replace(staged, path)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data held in the model (initializers and Constant nodes)."""
    return sum(len(t.raw_data) or t.ByteSize() for t in _all_tensors(model))


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        raise OnnxfoldError(f"cannot read its external data ({_first_line(error)})", path) from None


def _all_tensors(model: onnx.ModelProto):
    return onnx.external_data_helper._get_all_tensors(model)


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def write_text(path, text: str) -> None:
    """Write a text file atomically (reports, JSON)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxfoldError("the output folder does not exist", folder)
    try:
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f".{path.name}.", delete=False,
                                         encoding="utf-8") as handle:
            handle.write(text)
        os.replace(handle.name, path)
    except OSError as error:
        raise OnnxfoldError(f"could not write ({_first_line(error)})", path) from None
