"""The steering-vectors export, run by the REAL steering-vectors library (its own transformers<5 venv), gives the
logits of dpn-lens's hook edit on SmolLM2-135M-Instruct, unsteered, steered and shift, within 1e-3
(scripts/check_steering_vectors.py; skipped only when that venv cannot be built, e.g. offline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_steering_vectors.py"
SKIP_EXIT = 77


@pytest.mark.slow
def test_steering_vectors_library_reproduces_the_hook_edit(tmp_path):
    # The venv goes to the default place, $DPN_LENS_CACHE/runtimes/steering-vectors: built once, then reused.
    result = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, timeout=1800)
    print(result.stdout)
    if result.returncode == SKIP_EXIT:
        reason = next(line for line in result.stdout.splitlines() if line.startswith("SKIP:"))
        pytest.skip(reason.removeprefix("SKIP:").strip())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout
