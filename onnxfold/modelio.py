"""Loading and saving models: clear errors on bad input, atomic writes, external data."""

from __future__ import annotations

import errno
import mmap
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from . import wire
from .errors import OnnxfoldError
from .text import first_line
from .validate import validate_model
from .references import (INLINE_LIMIT, all_tensors, copy_reference, dense_tensors, forget_basepaths,
                         is_reference, load_external_data, point_to, refer_to_external_data, scan_model,
                         shape_bytes)

# protobuf refuses to serialize a message of 2 GiB or more; stay well below it.
PROTOBUF_LIMIT = 2**31 - 2**24


def load_model(path) -> onnx.ModelProto:
    """Read an ONNX model with its external data, or raise OnnxfoldError naming the problem."""
    return read_model(path)[0]


def read_model(path):
    """(model with its external data loaded, the external data files it read)."""
    path = _readable_file(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise OnnxfoldError(f"not a readable ONNX model ({first_line(error)})", path) from None
    forget_basepaths(model)
    return model, _with_external_data(model, path, load_external_data)


def open_model(path):
    """(model, the external data files it refers to), the model's large weights left in
    their files as references (see references.py): the cheap way to read a large model."""
    path = _readable_file(path)
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            model = scan_model(buffer, path)
    except (wire.Malformed, DecodeError, ValueError, OSError):
        return read_model(path)  # the whole-file reader reads it, or says what is wrong
    return model, _with_external_data(model, path, refer_to_external_data)


def _readable_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise OnnxfoldError("no such file", path)
    if not path.is_file():
        raise OnnxfoldError("not a file", path)
    if path.stat().st_size == 0:
        raise OnnxfoldError("the file is empty", path)
    return path


def _with_external_data(model, path, read_external) -> set:
    """Check the model is one, read or refer to its external data, check its structure
    (validate.py); the external data files it named."""
    if not model.opset_import or not model.HasField("graph"):
        raise OnnxfoldError("not an ONNX model (no graph or no opset import)", path)
    external = {path.parent / entry.value for t in all_tensors(model)
                if t.data_location == onnx.TensorProto.EXTERNAL and not is_reference(t)
                for entry in t.external_data if entry.key == "location"}
    if any("\0" in str(file) for file in external):  # no file name holds one; os calls raise
        raise OnnxfoldError("an external data location contains a NUL byte", path)
    if external:
        try:
            read_external(model, path.parent)
        except (OSError, ValueError, onnx.checker.ValidationError) as error:
            raise OnnxfoldError(f"cannot read its external data ({first_line(error)})", path) from None
    try:
        validate_model(model)
    except OnnxfoldError as error:
        raise OnnxfoldError(str(error), path) from None
    return external


def checker_complaint(model: onnx.ModelProto) -> str | None:
    """What onnx.checker says against the model, if anything (the model may still run).

    Large weights are checked for their type and shape only, as graph inputs: checking
    their bytes would copy the whole model.
    """
    return _checker_says(without_large_weights(model))


def complaints(model: onnx.ModelProto) -> dict:
    """{judge: complaint} for what the ONNX checker and onnxruntime say against the model,
    both asked about one copy of it with large weights as typed inputs: onnxruntime then
    builds the graph, not the weights."""
    skeleton = without_large_weights(model)
    found = {"the ONNX checker": _checker_says(skeleton), "onnxruntime": _runtime_says(skeleton)}
    return {judge: complaint for judge, complaint in found.items() if complaint}


def _checker_says(skeleton) -> str | None:
    try:
        onnx.checker.check_model(skeleton)
    except (onnx.checker.ValidationError, ValueError, OSError) as error:
        return first_line(error)
    return None


def _runtime_says(skeleton) -> str | None:
    import onnxruntime as ort  # here: the optimizer needs it for this check alone

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(skeleton.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types for every refusal
        return first_line(error)
    return None


def validity_complaint(model: onnx.ModelProto) -> str | None:
    """What the ONNX checker, or strict shape inference, says against the model, if anything:
    a model with a complaint may still run, but one that makes onnxfold fail is bad input."""
    complaint = checker_complaint(model)
    if complaint:
        return complaint
    try:
        onnx.shape_inference.infer_shapes(without_large_weights(model), strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as error:
        return first_line(error)
    return None


def without_large_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large weights turned into typed graph inputs: cheap to copy,
    check and run shape inference on."""
    skeleton = copy_without(model, "initializer")
    graph = skeleton.graph
    declared = {info.name for info in model.graph.input}
    for weight in model.graph.initializer:
        if payload_bytes(weight) <= INLINE_LIMIT and not is_reference(weight):
            graph.initializer.append(weight)
        elif weight.name not in declared:
            _add_typed_input(graph, weight)
    return skeleton


def attribute_value(node: onnx.NodeProto, name: str):
    """A node proto's attribute value, or None where the node does not set it."""
    found = next((a for a in node.attribute if a.name == name), None)
    return None if found is None else onnx.helper.get_attribute_value(found)


def _add_typed_input(graph: onnx.GraphProto, weight: onnx.TensorProto) -> None:
    """A graph input of the weight's name, element type and shape (what
    onnx.helper.make_tensor_value_info writes, without its checks and copies)."""
    info = graph.input.add()
    info.name = weight.name
    kind = info.type.tensor_type
    kind.elem_type = weight.data_type
    kind.shape.SetInParent()  # a scalar's shape is there, with no dims
    for size in weight.dims:
        kind.shape.dim.add().dim_value = size


def save_model(model: onnx.ModelProto, path, external_data: bool | None = None, size_threshold=1024) -> None:
    """Write `model` to `path` atomically: a reader never sees a half-written file.

    `external_data=None` stores weights in `<name>.data` beside the model only where the
    model would not fit in one protobuf; tensors under `size_threshold` bytes stay inline.
    Note: saving with external data moves the tensor bytes out of `model`.
    """
    path = Path(path)
    check_destination(path)
    too_big = tensor_bytes(model) > PROTOBUF_LIMIT
    if too_big and external_data is False:
        raise OnnxfoldError("the model is over 2 GiB, the most one protobuf file can hold; "
                            "save it with external data (drop --no-external-data)", path)
    external_data = too_big if external_data is None else external_data
    data_name = path.name + ".data"
    if external_data:
        check_destination(path.with_name(data_name))
    try:
        with _scratch_beside(path) as scratch:
            staged, staged_data = scratch / path.name, scratch / data_name
            if external_data:
                with open(staged_data, "wb") as data:
                    move_weights_out(model, data, data_name, size_threshold)
            with open(staged, "wb") as handle:
                write_in_pieces(model, handle)
            if external_data and staged_data.stat().st_size:
                os.replace(staged_data, path.with_name(data_name))
            os.replace(staged, path)
    except (OSError, ValueError) as error:
        raise OnnxfoldError(f"could not write the model ({first_line(error)})", path) from None


def move_weights_out(model: onnx.ModelProto, data, data_name: str, size_threshold: int) -> None:
    """Write the bytes of every tensor of `size_threshold` bytes or more to the open file
    `data`, one after another, and point the tensor at them (ONNX external data)."""
    for tensor in dense_tensors(model):
        size = payload_bytes(tensor)
        if size < size_threshold:
            continue
        offset = data.tell()
        if is_reference(tensor):
            copy_reference(tensor, data)
        elif tensor.HasField("raw_data") and tensor.data_location != onnx.TensorProto.EXTERNAL:
            data.write(tensor.raw_data)
            tensor.ClearField("raw_data")
        else:
            continue  # typed fields (float_data, ...) stay inline, as with onnx.save
        point_to(tensor, location=data_name, offset=offset, length=size)


def write_in_pieces(model: onnx.ModelProto, handle) -> None:
    """Write the model's protobuf encoding with its weights encoded one at a time.

    onnx.save encodes the whole model in memory first (and measures it by encoding it once
    more): two extra copies of a large model. A message's encoding is the concatenation of
    its fields' encodings, in any order, so the graph's initializers can follow the rest of
    the graph one by one; parsing the file gives back the same model. Referenced weights
    are copied from their files.
    """
    head, graph = _without_weights(model)
    sizes = [_encoded_tensor_size(weight) for weight in model.graph.initializer]
    weights_size = sum(wire.field_size(wire.GRAPH_INITIALIZER, size) for size in sizes)
    handle.write(head.SerializeToString())
    handle.write(wire.field_header(wire.MODEL_GRAPH, graph.ByteSize() + weights_size))
    handle.write(graph.SerializeToString())
    for weight, size in zip(model.graph.initializer, sizes):
        handle.write(wire.field_header(wire.GRAPH_INITIALIZER, size))
        if is_reference(weight):
            shell = _shell(weight)
            handle.write(shell.SerializeToString())
            handle.write(wire.field_header(wire.TENSOR_RAW_DATA, payload_bytes(weight)))
            copy_reference(weight, handle)
        else:
            handle.write(weight.SerializeToString())


def encoded_size(model: onnx.ModelProto) -> int:
    """The size of the model's encoding as saved without external data (model.ByteSize()
    where it holds its weights), without encoding the weights."""
    head, graph = _without_weights(model)
    weights_size = sum(wire.field_size(wire.GRAPH_INITIALIZER, _encoded_tensor_size(w)) for w in model.graph.initializer)
    return head.ByteSize() + wire.field_size(wire.MODEL_GRAPH, graph.ByteSize() + weights_size)


def _without_weights(model):
    """(the model without its graph, the graph without its initializers): small messages."""
    head, graph = onnx.ModelProto(), onnx.GraphProto()
    copy_fields(model, head, but=("graph",))
    copy_fields(model.graph, graph, but=("initializer",))
    return head, graph


def _encoded_tensor_size(tensor: onnx.TensorProto) -> int:
    if is_reference(tensor) or (tensor.HasField("raw_data") and payload_bytes(tensor) >= 1 << 16):
        return _shell(tensor).ByteSize() + wire.field_size(wire.TENSOR_RAW_DATA, payload_bytes(tensor))
    return tensor.ByteSize()  # encoding a small tensor is cheaper than copying its fields


def _shell(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor without its bytes, nor the reference to them."""
    shell = onnx.TensorProto()
    skipped = ("raw_data", "external_data", "data_location") if is_reference(tensor) else ("raw_data",)
    copy_fields(tensor, shell, but=skipped)
    return shell


def copy_without(model: onnx.ModelProto, graph_field: str) -> onnx.ModelProto:
    """A copy of the model whose graph lacks one field (to be filled in anew)."""
    copy = onnx.ModelProto()
    copy_fields(model, copy, but=("graph",))
    copy_fields(model.graph, copy.graph, but=(graph_field,))
    return copy


def copy_fields(source, target, but: tuple) -> None:
    """Copy every field set in `source` but those named into the empty message `target`.

    The skipped fields are never read: reading a bytes field copies it.
    """
    for field in source.DESCRIPTOR.fields:
        if field.name in but:
            continue
        if field.is_repeated:
            values = getattr(source, field.name)
            if values:
                getattr(target, field.name).extend(values)
        elif source.HasField(field.name):
            if field.message_type is not None:
                getattr(target, field.name).CopyFrom(getattr(source, field.name))
            else:
                setattr(target, field.name, getattr(source, field.name))


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data held in the model (initializers and Constant nodes)."""
    return sum(payload_bytes(t) for t in dense_tensors(model))


def payload_bytes(tensor: onnx.TensorProto) -> int:
    """The size of a tensor's data, from its shape where it is raw bytes.

    Not len(tensor.raw_data): reading the field copies the bytes, which on a model of
    hundreds of megabytes costs as much as loading it.
    """
    if not tensor.HasField("raw_data") and not is_reference(tensor):
        return tensor.ByteSize()
    return shape_bytes(tensor)


def write_text(path, text: str) -> None:
    """Write a text file (reports, JSON) atomically; a device or FIFO that is there already
    (/dev/stdout, /dev/null, a pipe) is written into, never replaced."""
    path = Path(path)
    check_destination(path, text=True)
    try:
        if path.exists() and not path.is_file():
            _write_into(path, text)
            return
        with _scratch_beside(path) as scratch:
            (scratch / path.name).write_text(text, encoding="utf-8")
            os.replace(scratch / path.name, path)
    except OSError as error:
        raise OnnxfoldError(f"could not write ({first_line(error)})", path) from None


def _write_into(path: Path, text: str) -> None:
    # Non-blocking open: a FIFO nobody reads is an error, not a hang.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ENXIO:
            raise OnnxfoldError("no process is reading from this FIFO", path) from None
        raise
    os.set_blocking(fd, True)
    with open(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def check_destination(path, text=False) -> None:
    """Refuse, before anything is written, a path that save_model (or, with `text`,
    write_text) could not write or must not replace: a missing or read-only folder, a name
    too long, a folder, a device or FIFO (replacing /dev/null would destroy it). A text
    report may go into a character device or FIFO, which write_text writes into."""
    path = Path(path)
    folder = _folder(path)
    require_folder(folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OnnxfoldError("the output folder is not writable", folder)
    limit = _name_max(folder)
    if len(os.fsencode(path.name)) > limit:
        raise OnnxfoldError(f"the file name is longer than the {limit} bytes the file system allows", path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise OnnxfoldError(f"cannot use it as an output ({first_line(error)})", path) from None
    if stat.S_ISDIR(mode):
        raise OnnxfoldError("is a folder, not a file name", path)
    if not stat.S_ISREG(mode) and not (text and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode))):
        raise OnnxfoldError("is a device, FIFO or socket, not a regular file; refusing to replace it", path)


@contextmanager
def _scratch_beside(path: Path):
    """A temporary folder beside `path` (same file system: os.replace is atomic), removed
    afterwards with whatever is left in it, also on Ctrl-C or SIGTERM (see cli.py)."""
    # '.NAME.' + 8 random characters, NAME cut so that the whole is a legal file name.
    room = _name_max(_folder(path)) - len("..") - 8
    prefix = "." + os.fsdecode(os.fsencode(path.name)[:room]) + "."
    with tempfile.TemporaryDirectory(dir=_folder(path), prefix=prefix) as scratch:
        yield Path(scratch)


def require_folder(folder: Path) -> None:
    """Refuse an output folder that is missing, or that is a file."""
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise OnnxfoldError(f"the output folder {problem}", folder)


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


@contextmanager
def made_folder(folder: Path):
    """Create an output folder and its missing parents, as `mkdir -p` would; yields the
    folders it created (none when it exists). They are removed again, if still empty, when
    the body fails or is interrupted, so that a refused run leaves nothing behind. A path
    that is (or lies under) a file, or that cannot be created, is refused before anything
    is created, naming the folder."""
    folder = Path(folder)
    missing = _missing_folders(folder)
    created = []
    try:
        for path in missing:
            try:
                path.mkdir()
            except FileExistsError:  # made meanwhile by someone else: fine if it is a folder
                require_folder(path)
                continue
            except OSError as error:
                raise OnnxfoldError(f"cannot create the output folder ({first_line(error)})", folder) from None
            created.append(path)
        yield created
    except BaseException:
        for path in reversed(created):
            try:
                path.rmdir()
            except OSError:  # not empty: outputs were written into it
                break
        raise


def _missing_folders(folder: Path) -> list:
    """The folders to create for `folder`, outermost first; refuses a path under a file or
    an existing parent that is not writable."""
    missing, path = [], folder
    while not path.exists() and path != path.parent:
        if path.is_symlink():
            raise OnnxfoldError(f"cannot create the output folder: {path} is a broken symbolic link", folder)
        missing.append(path)
        path = path.parent
    if not missing:
        require_folder(folder)
    elif not path.is_dir():
        raise OnnxfoldError(f"cannot create the output folder: {path} is a file, not a folder", folder)
    elif not os.access(path, os.W_OK | os.X_OK):
        raise OnnxfoldError(f"cannot create the output folder: {path} is not writable", folder)
    return list(reversed(missing))
