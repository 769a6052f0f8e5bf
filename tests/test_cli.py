"""The command line end to end: real files, a subprocess, exit codes, JSON, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import onnx
import pytest

from .helpers import assert_same_function, model_from_text

CONV_BN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4,8,8] x, float[6,4,3,3] W, float[6] gamma, float[6] beta, float[6] mean, float[6] var) => (float[1,6,8,8] y) {
  c = Conv<pads=[1,1,1,1]>(x, W)
  b = BatchNormalization(c, gamma, beta, mean, var)
  y = Relu(b)
}
"""


def onnxfold(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxfold", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(model_from_text(CONV_BN), str(path))
    return path


def test_optimize_writes_a_smaller_model_and_a_json_report(model_file, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    before = digest(model_file)
    result = onnxfold("optimize", model_file, out, "--json", report)
    assert result.returncode == 0, result.stderr
    assert "BatchNormalization" in result.stdout and "fold-bn-into-conv x1" in result.stdout
    optimized = onnx.load(str(out))
    onnx.checker.check_model(optimized, full_check=True)
    assert [n.op_type for n in optimized.graph.node] == ["Conv", "Relu"]
    assert_same_function(onnx.load(str(model_file)), optimized)
    data = json.loads(report.read_text())
    assert data["before"]["nodes"] == 3 and data["after"]["nodes"] == 2
    # the text model's nodes are unnamed: onnxfold names them op_index
    assert data["rewrites"] == [{"rule": "fold-bn-into-conv", "replaced": ["Conv_0", "BatchNormalization_1"],
                                 "produced": ["Conv_0"]}]
    assert digest(model_file) == before, "the input was modified"


def test_output_is_deterministic(model_file, tmp_path):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert onnxfold("optimize", model_file, first).returncode == 0
    assert onnxfold("optimize", model_file, second).returncode == 0
    assert first.read_bytes() == second.read_bytes()


def test_only_and_skip_select_rules(model_file, tmp_path):
    out = tmp_path / "out.onnx"
    skipped = onnxfold("optimize", model_file, out, "--skip", "fold-bn-into-conv")
    assert skipped.returncode == 0
    assert "BatchNormalization" in [n.op_type for n in onnx.load(str(out)).graph.node]
    only = onnxfold("optimize", model_file, out, "--only", "fold-bn-into-conv")
    assert only.returncode == 0
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(str(out)).graph.node]


def test_explain_says_why_a_trap_was_left(tmp_path):
    text = CONV_BN.replace("c = Conv<pads=[1,1,1,1]>(x, W)\n  b = BatchNormalization(c, gamma, beta, mean, var)",
                           "c = BatchNormalization(x, gamma4, beta4, mean4, var4)\n  b = Conv<pads=[1,1,1,1]>(c, W)")
    text = text.replace("float[6] gamma, float[6] beta, float[6] mean, float[6] var",
                        "float[4] gamma4, float[4] beta4, float[4] mean4, float[4] var4")
    source = tmp_path / "bn_conv.onnx"
    onnx.save(model_from_text(text), str(source))
    result = onnxfold("optimize", source, tmp_path / "out.onnx", "--explain")
    assert result.returncode == 0, result.stderr
    assert "fold-bn-into-next-conv" in result.stdout and "pads its input" in result.stdout


def test_same_input_and_output_is_refused_without_force(model_file):
    before = digest(model_file)
    refused = onnxfold("optimize", model_file, model_file)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert digest(model_file) == before
    forced = onnxfold("optimize", model_file, model_file, "--force")
    assert forced.returncode == 0


def _bad_inputs(tmp_path, model_file):
    """(name, source path, expected text in the error) for each kind of bad input."""
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_file.read_bytes()[:200])
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    external = tmp_path / "external.onnx"
    onnx.save(onnx.load(str(model_file)), str(external), save_as_external_data=True,
              location="external.onnx.data", size_threshold=0)
    (tmp_path / "external.onnx.data").unlink()
    return [
        ("missing", tmp_path / "nothing.onnx", "no such file"),
        ("empty", empty, "empty"),
        ("not onnx", text, "not"),
        ("truncated", truncated, "not"),
        ("folder", folder, "not a file"),
        ("missing external data", external, "external data"),
    ]


def test_bad_input_gives_one_line_naming_the_file(tmp_path, model_file):
    for name, source, expected in _bad_inputs(tmp_path, model_file):
        out = tmp_path / "out.onnx"
        result = onnxfold("optimize", source, out)
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxfold: error:"), (name, result.stderr)
        assert str(source) in lines[0] and expected in lines[0], (name, lines[0])
        assert not out.exists(), name
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")], name


def test_missing_output_folder_is_an_error(model_file, tmp_path):
    result = onnxfold("optimize", model_file, tmp_path / "nowhere" / "out.onnx")
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def locked(tmp_path):
    """A folder nobody can write into, root included: read-only by mode, and immutable
    (chattr +i) when running as root, whom the mode does not stop."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    immutable = os.geteuid() == 0
    if immutable and subprocess.run(["chattr", "+i", folder], capture_output=True).returncode:
        folder.chmod(0o700)
        pytest.skip("running as root and chattr +i is not available here")
    try:
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", folder], check=True)
        folder.chmod(0o700)


def test_read_only_output_folder_is_an_error(model_file, locked):
    assert not os.access(locked, os.W_OK)
    result = onnxfold("optimize", model_file, locked / "out.onnx")
    assert result.returncode == 2 and "not writable" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(locked) in result.stderr
    assert not any(locked.iterdir())


def test_output_folder_that_is_a_file_is_an_error(model_file, tmp_path):
    # Holds for root too: no permission lets a file be a folder.
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    result = onnxfold("optimize", model_file, not_a_folder / "out.onnx")
    assert result.returncode == 2 and str(not_a_folder) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not_a_folder.read_text() == ""


def test_unknown_rule_name_is_an_error(model_file, tmp_path):
    result = onnxfold("optimize", model_file, tmp_path / "out.onnx", "--only", "fold-everything")
    assert result.returncode == 2 and "unknown rule 'fold-everything'" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_malformed_user_rule_names_file_and_rule(model_file, tmp_path):
    rules = tmp_path / "my_rules"
    rules.mkdir()
    (rules / "broken.toml").write_text(
        'summary = "x"\npattern = "y = Relu(x)"\nwhen = ["no_such_check(x)"]\nresult = "y = Relu(x)"\n')
    result = onnxfold("optimize", model_file, tmp_path / "out.onnx", "--rules", rules)
    assert result.returncode == 2
    assert "broken.toml" in result.stderr and "unknown predicate 'no_such_check'" in result.stderr


def test_rules_lists_and_shows_rules():
    listing = onnxfold("rules")
    assert listing.returncode == 0
    assert "fold-bn-into-conv " in listing.stdout and "merge-conv-branches " in listing.stdout
    shown = onnxfold("rules", "merge-conv-branches")
    assert shown.returncode == 0 and "pattern:" in shown.stdout and "kernels_align(a, b)" in shown.stdout
    unknown = onnxfold("rules", "nope")
    assert unknown.returncode == 2 and "unknown rule" in unknown.stderr


WRONG_RULE = '''
summary = "deliberately wrong: drops a Relu after a Conv"
pattern = """
c = Conv(x, W, B)
y = Relu(c)
"""
when = ["constant(W, B)"]
result = "y = Conv(x, W, B, like=c)"

[[examples]]
model = ""
[[counterexamples]]
model = ""
reason = ""
'''


def test_optimize_verify_blames_the_rule_that_broke_parity(model_file, tmp_path):
    rules = tmp_path / "my_rules"
    rules.mkdir()
    (rules / "drop-relu.toml").write_text(WRONG_RULE)
    out = tmp_path / "out.onnx"
    failed = onnxfold("optimize", model_file, out, "--rules", rules, "--verify")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "FAILED" in failed.stdout and "drop-relu" in failed.stdout
    assert not out.exists()
    kept = onnxfold("optimize", model_file, out, "--rules", rules, "--verify", "--keep-failed")
    assert kept.returncode == 1 and out.exists()
    passed = onnxfold("optimize", model_file, out, "--verify")
    assert passed.returncode == 0 and "parity in onnxruntime: passed" in passed.stdout


def test_verify_passes_fails_and_rejects_mismatched_signatures(model_file, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "verify.json"
    assert onnxfold("optimize", model_file, out).returncode == 0
    passed = onnxfold("verify", model_file, out, "--iterations", "3", "--json", report)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    data = json.loads(report.read_text())
    cpu = data["providers"][0]
    assert cpu["name"] == "cpu" and cpu["outputs"][0]["name"] == "y"
    assert cpu["latency"]["optimized"]["median_ms"] > 0

    corrupted = onnx.load(str(out))
    weight = next(t for t in corrupted.graph.initializer if len(t.dims) == 4)
    values = onnx.numpy_helper.to_array(weight).copy()
    values *= 1.5  # every output channel changes, so the Relu cannot hide it
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(corrupted, str(broken))
    failed = onnxfold("verify", model_file, broken, "--no-latency")
    assert failed.returncode == 1 and "y" in failed.stdout

    renamed = onnx.load(str(out))
    renamed.graph.output[0].name = "z"
    renamed.graph.node[-1].output[0] = "z"
    other = tmp_path / "renamed.onnx"
    onnx.save(renamed, str(other))
    mismatched = onnxfold("verify", model_file, other, "--no-latency")
    assert mismatched.returncode == 2 and "'y'" in mismatched.stderr


# ---------------------------------------------------------------- in-process: what the CLI prints

from onnxfold import cli  # noqa: E402
from onnxfold.jobs import BAD_INPUT, OK, JobResult  # noqa: E402


def test_latency_progress_is_shown_once_timing_runs_long(monkeypatch, capsys):
    """verify calls back with its progress; the CLI's callback writes it on stderr, in
    place, only once the runs take longer than PROGRESS_AFTER_S."""
    def runs(progress, total=3):
        for done in range(total + 1):
            progress("cpu", done, total)

    monkeypatch.setattr(cli, "PROGRESS_AFTER_S", 3600.0)
    runs(cli._LatencyProgress())
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cli, "PROGRESS_AFTER_S", 0.0)
    runs(cli._LatencyProgress())
    err = capsys.readouterr().err
    assert err.startswith("\rlatency on cpu: 1/3 runs") and err.endswith("\rlatency on cpu: 3/3 runs\n")


def test_batch_table_columns_line_up_with_short_names():
    """The model column was as wide as the longest file name, not counting its header:
    with names shorter than 'model' every header after it stood out of line."""
    results = [JobResult("a", "out/a", BAD_INPUT, "bad"), JobResult("b", "out/b", OK)]
    header, first, second, summary = cli._batch_table(results).splitlines()
    assert header.index("status") == first.index(BAD_INPUT) == second.index(OK)
    assert summary == "1 of 2 optimized, 1 failed"
