"""What both runtime checks (check_llama_cpp.py, check_steering_vectors.py) share: the skip protocol, the
runtime venv in dpn-lens's cache, and the dpn-lens side's map and export through the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MODEL = "smollm2-135m-instruct"
TRAIT = "openness"
SKIP_EXIT = 77
"""Exit code of a check that cannot run here (it prints one line ``SKIP: <reason>``)."""


class Skip(Exception):
    """The check cannot run here (its runtime cannot be installed or loaded)."""


def runtime_venv(name: str) -> Path:
    """``$DPN_LENS_CACHE/runtimes/<name>`` (default ``~/.cache/dpn_lens/runtimes/<name>``)."""
    from dpn_lens.models import cache_dir

    return cache_dir() / "runtimes" / name


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def dpn_lens_cli(*args: str) -> None:
    """``python -m dpn_lens.cli ARGS`` with this interpreter; its output is shown only on failure."""
    result = subprocess.run([sys.executable, "-m", "dpn_lens.cli", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"dpn-lens {args[0]} failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")


def make_map(work: Path) -> Path:
    """A small openness map (100 pairs, layers 1-29: a GGUF control vector cannot steer layer 0; both
    checks use the same map)."""
    path = work / "run" / "maps" / f"{TRAIT}.safetensors"
    if path.exists():
        print(f"map: {path} (already there)")
        return path
    print("map: dpn-lens locate --traits openness --n-pairs 100 --layers 1-29 (about a minute)", flush=True)
    dpn_lens_cli("locate", "--model", MODEL, "--traits", TRAIT, "--n-pairs", "100", "--layers", "1-29",
                 "--dtype", "bfloat16", "--out", str(work / "run"), "--no-progress")
    return path


def export(map_path: Path, gamma: float, export_format: str, out: Path) -> Path:
    """``dpn-lens export`` of the map's increase edit at ``gamma`` in ``export_format``."""
    dpn_lens_cli("export", "--model", MODEL, "--map", str(map_path), "--gamma", f"{gamma:g}",
                 "--direction", "increase", "--format", export_format, "--out", str(out))
    return out
