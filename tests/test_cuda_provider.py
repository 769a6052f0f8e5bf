"""verify's CUDA reporting against the real onnxruntime-gpu wheel, not a monkeypatched one.

Opt-in: `make cuda-check` builds .venv-gpu with onnxruntime-gpu in place of onnxruntime
(without the CUDA and cuDNN libraries) and runs this file with ONNXFOLD_CUDA_CHECK=1.
Elsewhere it is skipped unless the installed onnxruntime has a CUDA provider.

That wheel lists CUDAExecutionProvider as available on any machine; where CUDA cannot
run (no GPU, or its libraries missing) its sessions quietly come out on the CPU. verify
must then report cuda unavailable, with the reason, next to the CPU parity, and exit 0;
where CUDA can run, it must report CUDA parity.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import onnxruntime as ort
import pytest

from .test_cli import onnxfold

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
ORIGINAL, FOLDED = SAMPLES / "repvgg_net.ts_preserve.onnx", SAMPLES / "repvgg_net.oracle.onnx"
GPU_WHEEL = "CUDAExecutionProvider" in ort.get_available_providers()

pytestmark = pytest.mark.skipif(
    not GPU_WHEEL and os.environ.get("ONNXFOLD_CUDA_CHECK") != "1",
    reason="needs onnxruntime-gpu in place of onnxruntime: run `make cuda-check`")


def cuda_blocker():
    """Why CUDA cannot run here, or None when it can: found apart from verify's code, from
    the CUDA provider's library (does it load?) and the GPU device nodes."""
    capi = Path(ort.__file__).parent / "capi"
    library = next(capi.glob("*onnxruntime_providers_cuda.*"), None)
    if library is None:
        return "no CUDA provider library"
    try:
        ctypes.CDLL(str(library))
    except OSError as error:
        return str(error).splitlines()[0]
    if not list(Path("/dev").glob("nvidia[0-9]*")):
        return "no GPU"
    return None


def verify(tmp_path, providers=None):
    report = tmp_path / "verify.json"
    chosen = ["--providers", providers] if providers else []
    result = onnxfold("verify", ORIGINAL, FOLDED, *chosen, "--warmup", "1", "--iterations", "3",
                      "--json", report)
    data = json.loads(report.read_text()) if report.exists() else None
    return result, data, {p["name"]: p for p in data["providers"]} if data else {}


def test_the_gpu_wheel_is_installed():
    # Under `make cuda-check` a CPU-only onnxruntime must fail here, not skip the rest.
    assert GPU_WHEEL, f"onnxruntime {ort.__version__} has no CUDAExecutionProvider"


def test_cpu_and_cuda_are_each_reported_for_what_they_are(tmp_path):
    result, data, by_name = verify(tmp_path, "cpu,cuda")
    # README: exit 0 when parity passed on every provider that ran.
    assert result.returncode == 0, result.stdout + result.stderr
    cpu, cuda = by_name["cpu"], by_name["cuda"]
    assert cpu["status"] == "ran" and cpu["passed"] is True and cpu["outputs"]
    assert "parity on cpu (CPUExecutionProvider): PASS" in result.stdout
    blocker = cuda_blocker()
    if blocker is None:
        assert cuda["status"] == "ran" and cuda["passed"] is True and cuda["outputs"], cuda
        assert cuda["latency"]["optimized"]["median_ms"] > 0
        assert "parity on cuda (CUDAExecutionProvider): PASS" in result.stdout
        return
    # No CPU numbers under cuda, and the reason says what happened and why.
    assert cuda["status"] == "unavailable", (blocker, cuda)
    assert cuda["outputs"] == [] and cuda["passed"] is None and cuda["latency"] is None
    assert "instead of CUDAExecutionProvider" in cuda["reason"]
    if blocker != "no GPU":
        assert blocker in cuda["reason"], (blocker, cuda["reason"])
    assert "parity on cuda (CUDAExecutionProvider): UNAVAILABLE" in result.stdout
    assert f"reason: {cuda['reason']}" in result.stdout
    assert any("cuda was requested but is unavailable" in w for w in data["warnings"])
    assert data["passed"] is True


def test_cuda_alone_that_cannot_run_fails_the_check(tmp_path):
    if cuda_blocker() is None:
        pytest.skip("CUDA runs here: nothing to report unavailable")
    result, data, by_name = verify(tmp_path, "cuda")
    # Nothing was verified: the report fails (verify's docs), exit code 1.
    assert result.returncode == 1, result.stdout + result.stderr
    assert by_name["cuda"]["status"] == "unavailable" and data["passed"] is False
    assert any("nothing was verified" in w for w in data["warnings"])


def test_by_default_cuda_is_left_out_where_its_libraries_are_missing(tmp_path):
    result, data, by_name = verify(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    blocker = cuda_blocker()
    if blocker in (None, "no GPU"):  # the library loads: try it, and say if it fell back
        assert list(by_name) == ["cpu", "cuda"]
    else:  # not asked for, so no warning that it was asked for and is missing
        assert list(by_name) == ["cpu"] and data["warnings"] == [], data
