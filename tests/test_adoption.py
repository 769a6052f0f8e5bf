"""onnxfold in a pipeline: `optimize --check`, its pre-commit hook, and batch output folders."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import onnx
import pytest

from .helpers import model_from_text
from .test_cli import CONV_BN, digest, locked, onnxfold  # noqa: F401 - locked is a fixture

ROOT = Path(__file__).resolve().parent.parent

# Already optimized: no rule or clean-up applies to a lone Conv + Relu.
CONV_RELU = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,8,8] x, float[6,4,3,3] W, float[6] B) => (float[1,6,8,8] y) {
  c = Conv<pads=[1,1,1,1]>(x, W, B)
  y = Relu(c)
}
"""


def files_of(folder) -> dict:
    return {path.relative_to(folder): digest(path) for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def models(tmp_path):
    """A folder with a model onnxfold would change and one it would not."""
    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(model_from_text(CONV_BN), folder / "conv_bn.onnx")
    onnx.save(model_from_text(CONV_RELU), folder / "conv_relu.onnx")
    return folder


def test_check_says_what_would_change_exits_1_and_writes_nothing(models, tmp_path):
    before = files_of(tmp_path)
    result = onnxfold("optimize", "--check", models / "conv_bn.onnx")
    assert result.returncode == 1, result.stderr
    assert f"would change {models / 'conv_bn.onnx'}: nodes 3 -> 2; fold-bn-into-conv x1" in result.stdout
    assert files_of(tmp_path) == before


def test_check_of_an_optimized_model_exits_0(models, tmp_path):
    out = tmp_path / "out.onnx"
    assert onnxfold("optimize", models / "conv_bn.onnx", out).returncode == 0
    for model in (out, models / "conv_relu.onnx"):
        result = onnxfold("optimize", "--check", model)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"already optimized: {model}" in result.stdout


def test_check_takes_several_inputs_and_folders_and_exits_with_the_worst(models, tmp_path):
    before = files_of(tmp_path)
    result = onnxfold("optimize", "--check", models / "conv_relu.onnx", models / "conv_relu.onnx", "-j", "2")
    assert result.returncode == 0 and "0 of 2 would change" in result.stdout
    report = tmp_path / "check.json"
    result = onnxfold("optimize", "--check", models, "--json", report)
    assert result.returncode == 1 and "1 of 2 would change" in result.stdout
    jobs = json.loads(report.read_text())
    assert [(job["status"], job["would_change"], job["written"]) for job in jobs] == [
        ("would change", ["fold-bn-into-conv x1"], False), ("ok", [], False)]
    report.unlink()
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    result = onnxfold("optimize", "--check", models, bad)
    assert result.returncode == 2 and f"onnxfold: error: {bad}: " in result.stderr
    assert "1 of 3 would change, 1 failed" in result.stdout
    bad.unlink()
    assert files_of(tmp_path) == before


def test_check_refuses_options_that_write(models, tmp_path):
    for extra in (["--out-dir", tmp_path / "out"], ["--verify"], ["--keep-failed"]):
        result = onnxfold("optimize", "--check", models, *extra)
        assert result.returncode == 2 and "--check writes nothing" in result.stderr, extra
    assert not (tmp_path / "out").exists()


def test_check_counts_an_unused_weight_as_a_change(tmp_path):
    """The graph's own clean-up (dead nodes, unused weights) is a change, though no rule fires."""
    model = model_from_text(CONV_RELU)
    model.graph.initializer.append(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(
        model.graph.initializer[0]), "unused"))
    path = tmp_path / "unused.onnx"
    onnx.save(model, path)
    result = onnxfold("optimize", "--check", path)
    assert result.returncode == 1 and "removed unused nodes or weights" in result.stdout, result.stdout


def _hooks(text) -> list:
    """The hooks of a .pre-commit-hooks.yaml, read plainly: a list of flat `key: value`
    mappings, which is all that file needs (YAML itself is no dependency of onnxfold)."""
    hooks = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        item = re.fullmatch(r"(- |  )(\w+): (.*)", line)
        assert item, f"not a flat `key: value` line of a list item: {line!r}"
        if item[1] == "- ":
            hooks.append({})
        hooks[-1][item[2]] = item[3]
    return hooks


def test_the_pre_commit_hook_runs_the_check_on_onnx_files(models):
    hooks = _hooks((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert [hook["id"] for hook in hooks] == ["onnxfold-check"]
    hook = hooks[0]
    assert hook["entry"] == "onnxfold optimize --check" and hook["language"] == "python"
    files = re.compile(hook["files"])
    assert files.search("models/a.onnx") and not files.search("a.onnx.data") and not files.search("a.onnx.txt")
    # pre-commit appends the staged file names to the entry
    command, *args = shlex.split(hook["entry"])
    assert command == "onnxfold"
    assert onnxfold(*args, models / "conv_bn.onnx", models / "conv_relu.onnx").returncode == 1
    assert onnxfold(*args, models / "conv_relu.onnx").returncode == 0


def test_batch_creates_a_missing_out_dir_and_says_so(models, tmp_path):
    out = tmp_path / "new" / "optimized"
    result = onnxfold("optimize", models, "--out-dir", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == f"onnxfold: created the output folder {out}"
    assert sorted(p.name for p in out.iterdir()) == ["conv_bn.onnx", "conv_relu.onnx"]
    result = onnxfold("optimize", models, "--out-dir", out)  # there now: nothing said
    assert result.returncode == 0 and result.stderr == ""


def test_batch_refuses_an_out_dir_under_a_file_naming_it(models, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    before = files_of(tmp_path)
    result = onnxfold("optimize", models, "--out-dir", file / "sub" / "out")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"onnxfold: error: {file / 'sub' / 'out'}: cannot create the output "
                                     f"folder: {file} is a file, not a folder")
    assert files_of(tmp_path) == before


def test_batch_refuses_an_out_dir_it_cannot_create(models, locked):
    result = onnxfold("optimize", models, "--out-dir", locked / "out")
    assert result.returncode == 2 and f"onnxfold: error: {locked / 'out'}: cannot create" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any(locked.iterdir())


def test_a_refused_batch_removes_the_out_dir_it_created(models, tmp_path):
    out = tmp_path / "new" / "out"
    result = onnxfold("optimize", models, "--out-dir", out, "--json", models / "conv_bn.onnx")
    assert result.returncode == 2 and "the report would replace an input model" in result.stderr
    assert "created" not in result.stderr and not (tmp_path / "new").exists()
