"""A real llama.cpp, given the control vector that `dpn-lens export --format gguf` writes, shifts next-token
log-probs as dpn-lens's hook edit does (same weights as an F32 GGUF, same token ids; see
scripts/check_llama_cpp.py for what is compared and why the tolerances)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_llama_cpp.py"
SKIP_EXIT = 77


@pytest.mark.slow
def test_exported_control_vector_steers_llama_cpp_like_the_hook_edit(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=900)
    print(result.stdout, result.stderr[-4000:], sep="\n")
    if result.returncode == SKIP_EXIT:
        reasons = [line for line in result.stdout.splitlines() if line.startswith("SKIP:")]
        pytest.skip(reasons[-1] if reasons else "llama.cpp is not available here")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "PASS" in result.stdout.splitlines()[-1]
