"""Output destinations, signals and option parsing of the command line, as attacked in
the adversarial review: devices, FIFOs, reports over models, long names, Ctrl-C, SIGTERM,
odd option values, one crashing model in a batch, optimize --verify on dynamic shapes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from onnxfold.errors import OnnxfoldError
from onnxfold.parity_options import _output_tolerances

from .helpers import model_from_text

CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,8,8] x, float[6,4,3,3] W, float[6] gamma, float[6] beta, float[6] mean, float[6] var) => (float[1,6,8,8] y) {
  c = Conv<pads=[1,1,1,1]>(x, W)
  y = BatchNormalization(c, gamma, beta, mean, var)
}
"""


def onnxfold(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxfold", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def onnxfold_patched(patch, *args):
    """onnxfold run after `patch` (Python code) has changed the package: to make it crash
    or be interrupted at a chosen point."""
    script = textwrap.dedent(patch) + "\nimport sys\nfrom onnxfold.cli import main\nsys.argv[0] = 'onnxfold'\nmain()\n"
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          preexec_fn=_as_in_a_terminal)


def _as_in_a_terminal():
    """Ctrl-C delivered as to a foreground command: a shell starts a background job (and so
    a test run started with `&`) with SIGINT ignored, which Python then keeps ignoring."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxfold: error: "), result.stderr
    return lines[0]


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(model_from_text(CONV_BN), str(path))
    return path


def is_special(path):
    mode = os.lstat(path).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def make_special(path, kind):
    if kind == "fifo":
        os.mkfifo(path)
    elif os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    else:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a null device of our own


# ---------------------------------------------------------------- destinations


@pytest.mark.parametrize("kind", ["fifo", "null device"])
def test_device_or_fifo_model_output_is_refused_not_replaced(model_file, tmp_path, kind):
    target = tmp_path / "special"
    make_special(target, kind)
    result = onnxfold("optimize", model_file, target)
    assert result.returncode == 2
    assert "not a regular file" in one_error_line(result)
    assert is_special(target), "the device or FIFO was replaced by a regular file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "special"]


def test_json_report_into_a_null_device_is_written_into(model_file, tmp_path):
    report = tmp_path / "null"
    make_special(report, "null device")
    result = onnxfold("optimize", model_file, tmp_path / "out.onnx", "--json", report, "-q")
    assert result.returncode == 0, result.stderr
    assert is_special(report)


def test_json_report_into_a_fifo_reaches_its_reader(model_file, tmp_path):
    report = tmp_path / "pipe"
    make_special(report, "fifo")
    received = []
    reader = threading.Thread(target=lambda: received.append(report.read_text()), daemon=True)
    reader.start()
    result = onnxfold("optimize", model_file, tmp_path / "out.onnx", "--json", report, "-q")
    reader.join(timeout=30)
    assert result.returncode == 0, result.stderr
    assert is_special(report)
    assert json.loads(received[0])["after"]["nodes"] == 1


def test_json_report_into_a_fifo_nobody_reads_is_an_error_not_a_hang(model_file, tmp_path):
    report = tmp_path / "pipe"
    make_special(report, "fifo")
    result = onnxfold("optimize", model_file, tmp_path / "out.onnx", "--json", report, "-q")
    assert result.returncode == 2
    assert "no process is reading" in one_error_line(result)
    assert is_special(report)


@pytest.mark.parametrize("json_name, what", [("in.onnx", "the input model"),
                                             ("in.onnx.data", "its external data"),
                                             ("out.onnx", "the output model"),
                                             ("out.onnx.data", "the output's external data")])
def test_json_report_may_not_replace_a_model_file(tmp_path, json_name, what):
    source = tmp_path / "in.onnx"
    onnx.save(model_from_text(CONV_BN), str(source), save_as_external_data=True,
              location="in.onnx.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = onnxfold("optimize", source, tmp_path / "out.onnx", "--json", tmp_path / json_name)
    assert result.returncode == 2
    assert one_error_line(result).endswith(f"the report would replace {what}")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "something was written"


def test_verify_json_may_not_replace_a_model(model_file):
    before = model_file.read_bytes()
    result = onnxfold("verify", model_file, model_file, "--no-latency", "--json", model_file)
    assert result.returncode == 2
    assert "the report would replace" in one_error_line(result)
    assert model_file.read_bytes() == before


def test_batch_json_may_not_replace_an_output(model_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = onnxfold("optimize", model_file, "--out-dir", out, "--json", out / "in.onnx")
    assert result.returncode == 2
    assert one_error_line(result).endswith("the report would replace an output model")
    assert not list(out.iterdir())


@pytest.mark.parametrize("where", ["missing folder", "a folder"])
def test_unwritable_json_is_refused_before_the_model_is_written(model_file, tmp_path, where):
    report = tmp_path / "missing" / "report.json"
    if where == "a folder":
        report = tmp_path / "report.json"
        report.mkdir()
    result = onnxfold("optimize", model_file, tmp_path / "out.onnx", "--json", report)
    assert result.returncode == 2
    one_error_line(result)
    assert not (tmp_path / "out.onnx").exists(), "exit 2 must mean nothing written"


def test_output_path_that_is_a_folder_is_bad_input(model_file, tmp_path):
    (tmp_path / "adir").mkdir()
    result = onnxfold("optimize", model_file, tmp_path / "adir")
    assert result.returncode == 2
    assert "is a folder" in one_error_line(result)
    assert not list((tmp_path / "adir").iterdir())


@pytest.mark.parametrize("length", [250, 255])
def test_longest_legal_output_names_work(model_file, tmp_path, length):
    target = tmp_path / ("x" * (length - 5) + ".onnx")
    result = onnxfold("optimize", model_file, target, "-q")
    assert result.returncode == 0, result.stderr
    assert [n.op_type for n in onnx.load(str(target)).graph.node] == ["Conv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.onnx", target.name])


def test_output_name_over_the_limit_is_bad_input(model_file, tmp_path):
    result = onnxfold("optimize", model_file, tmp_path / ("y" * 300 + ".onnx"))
    assert result.returncode == 2
    assert "longer than the 255 bytes" in one_error_line(result)
    assert [p.name for p in tmp_path.iterdir()] == ["in.onnx"]


# ---------------------------------------------------------------- signals

# Interrupt save_model half-way through the model file, by a real signal to the process.
INTERRUPT_WHILE_WRITING = """
import os, signal
import onnxfold.modelio as modelio
def write_half_then_signal(model, handle):
    handle.write(b"x" * 100000)
    handle.flush()
    os.kill(os.getpid(), signal.{name})
    handle.write(b"y" * 100000)
modelio.write_in_pieces = write_half_then_signal
"""


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_while_writing_exits_128_plus_signal_and_leaves_nothing(model_file, tmp_path, name, code):
    result = onnxfold_patched(INTERRUPT_WHILE_WRITING.replace("{name}", name),
                              "optimize", model_file, tmp_path / "out.onnx")
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stderr.strip() == "onnxfold: interrupted"
    assert [p.name for p in tmp_path.iterdir()] == ["in.onnx"], "a temporary file was left behind"


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "", "K", "1e999"])
def test_size_threshold_that_is_not_a_size_is_a_usage_error(model_file, tmp_path, value):
    result = onnxfold("optimize", model_file, tmp_path / "out.onnx", "--external-data-size-threshold", value)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "is not a size" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def colon_output_model(path):
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["Identity:0"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, [1, 8])]),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("item, rtol, atol", [("Identity:0:1e-3", 1e-3, None), ("Identity:0:1e-3:1e-5", 1e-3, 1e-5)])
def test_output_tol_names_an_output_with_colons(tmp_path, item, rtol, atol):
    model = colon_output_model(tmp_path / "m.onnx")
    result = onnxfold("verify", model, model, "--no-latency", "--output-tol", item, "--json", tmp_path / "v.json")
    assert result.returncode == 0, result.stderr
    output = json.loads((tmp_path / "v.json").read_text())["providers"][0]["outputs"][0]
    assert output["name"] == "Identity:0" and output["rtol"] == rtol
    if atol is not None:
        assert output["atol"] == atol


def test_output_tol_is_read_from_the_right_by_the_model_outputs():
    assert _output_tolerances(["y:1e-3:1e-5"], lambda: {"y"}) == {"y": (1e-3, 1e-5)}
    assert _output_tolerances(["a:0:1e-3"], lambda: {"a:0"}) == {"a:0": (1e-3, None)}
    assert _output_tolerances(["a:0:1e-3"], lambda: {"a"}) == {"a": (0.0, 1e-3)}
    assert _output_tolerances(["a:b:c:0.5"], lambda: set()) == {"a:b:c": (0.5, None)}
    with pytest.raises(OnnxfoldError, match="add :ATOL"):
        _output_tolerances(["a:0:1e-3"], lambda: {"a", "a:0"})
    for bad in ("y", "y:x", ":1e-3", "y:1:2:x"):
        with pytest.raises(OnnxfoldError, match="NAME:RTOL"):
            _output_tolerances([bad], lambda: {"y"})


# ---------------------------------------------------------------- batch and optimize --verify

# A bug in the optimizer for one model of the batch (the one whose graph is named "crash").
CRASH_ON_ONE_MODEL = """
import onnxfold.jobs as jobs
real_optimize = jobs.optimize
def optimize(model, **kwargs):
    if model.graph.name == "crash":
        raise RuntimeError("injected bug")
    return real_optimize(model, **kwargs)
jobs.optimize = optimize
"""


def test_batch_records_an_internal_error_and_goes_on(tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir(), out.mkdir()
    for name in "abc":
        model = model_from_text(CONV_BN)
        model.graph.name = "crash" if name == "b" else "g"
        onnx.save(model, str(inputs / f"{name}.onnx"))
    result = onnxfold_patched(CRASH_ON_ONE_MODEL, "optimize", inputs, "--out-dir", out, "-j", "2",
                              "--json", tmp_path / "r.json")
    assert result.returncode == 3, result.stderr
    assert "2 of 3 optimized, 1 failed" in result.stdout
    assert "internal error" in [line.split()[1] + " " + line.split()[2] for line in result.stdout.splitlines()
                                if line.startswith("b.onnx")]
    assert "onnxfold: internal error: " in result.stderr and "RuntimeError: injected bug" in result.stderr
    jobs = {Path(j["source"]).name: j for j in json.loads((tmp_path / "r.json").read_text())}
    assert [jobs[n]["status"] for n in ("a.onnx", "b.onnx", "c.onnx")] == ["ok", "internal error", "ok"]
    assert "RuntimeError: injected bug" in jobs["b.onnx"]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "c.onnx"]


DYNAMIC_CONV_BN = CONV_BN.replace("float[1,4,8,8] x", "float[N,4,H,W] x").replace("float[1,6,8,8] y",
                                                                                 "float[N,6,H,W] y")


def test_optimize_verify_takes_the_input_options_of_verify(tmp_path):
    source, target, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model_from_text(DYNAMIC_CONV_BN), str(source))
    result = onnxfold("optimize", source, target, "--verify")
    assert result.returncode == 2 and "--shape" in one_error_line(result)
    result = onnxfold("optimize", source, target, "--verify", "--shape", "x:2x4x5x7", "--samples", "2",
                      "--seed", "3", "--input-range", "0,2", "--output-tol", "y:1e-3:1e-4", "--json", report)
    assert result.returncode == 0, result.stderr
    parity = json.loads(report.read_text())["verification"]["parity"]
    assert parity["passed"] and parity["inputs"][0]["shape"] == [2, 4, 5, 7]
    assert parity["settings"]["samples"] == 2 and parity["settings"]["seed"] == 3
    assert parity["settings"]["input_range"] == [0.0, 2.0]
    assert parity["providers"][0]["outputs"][0]["rtol"] == 1e-3
    assert [n.op_type for n in onnx.load(str(target)).graph.node] == ["Conv"]


@pytest.mark.parametrize("jobs", ["0", "-3"])
def test_batch_needs_at_least_one_process(tmp_path, jobs):
    (tmp_path / "in").mkdir()
    onnx.save(model_from_text(CONV_BN), tmp_path / "in" / "m.onnx")
    result = onnxfold("optimize", tmp_path / "in", "--out-dir", tmp_path, "-j", jobs)
    assert result.returncode == 2 and "-j" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("batch", [False, True])
def test_an_output_folder_that_is_a_file_is_named_so(tmp_path, batch):
    source, file = tmp_path / "m.onnx", tmp_path / "file"
    onnx.save(model_from_text(CONV_BN), source)
    file.write_text("not a folder")
    args = [source, "--out-dir", file] if batch else [source, file / "out.onnx"]
    result = onnxfold("optimize", *args)
    assert result.returncode == 2
    assert one_error_line(result) == f"onnxfold: error: {file}: the output folder is a file, not a folder"


def test_a_closed_stdout_is_not_an_internal_error(tmp_path):
    """`onnxfold optimize A B | head`: the report meets a pipe its reader closed, after B is written."""
    source, target = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model_from_text(CONV_BN), source)
    command = f"{sys.executable} -m onnxfold optimize {source} {target} | true; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert "internal error" not in result.stderr and result.returncode == 128 + signal.SIGPIPE, result.stderr
    onnx.checker.check_model(onnx.load(target))
