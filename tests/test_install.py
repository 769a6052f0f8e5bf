"""A built, installed onnxfold (not the source tree) finds its shipped rules."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_installed_wheel_finds_its_rules_outside_the_source_tree(tmp_path):
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir), str(ROOT)], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("onnxfold-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    # A bare interpreter that sees the installed copy and the dependencies, not the
    # source tree (no editable-install hooks, run from an unrelated folder).
    dependencies = sysconfig.get_paths()["purelib"]
    env = {"PYTHONPATH": f"{site}:{dependencies}", "PATH": "/usr/bin:/bin"}
    script = ("import onnxfold, onnxfold.ruleset as r; "
              "print(onnxfold.__file__); print(r.builtin_rules_dir()); print(len(r.load_rules()))")
    result = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    module_file, rules_dir, count = result.stdout.split()
    assert module_file.startswith(str(site)) and rules_dir.startswith(str(site))
    shipped = len(list((ROOT / "rules").glob("*.toml")))
    assert int(count) == shipped and shipped > 0
    assert (site / "bin" / "onnxfold").exists()
