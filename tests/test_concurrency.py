"""Two processes at once (issue 24): converting the same GGUF into an empty cache, and filling the same
preference-pair cache, end with one valid cache entry each, never a torn file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _start(script: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _finish(processes: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
        outputs.append(out)
    return outputs


@pytest.mark.slow
def test_two_processes_converting_the_same_gguf_leave_one_complete_checkpoint(tmp_path):
    from dpn_lens.models import cached_gguf_path

    gguf = cached_gguf_path("smollm2-135m-instruct")
    if gguf is None:
        pytest.fail("the SmolLM2 GGUF is not in the cache; run `dpn-lens models install smollm2-135m-instruct`")
    cache = tmp_path / "cache"
    script = f"""
        import logging, time
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from pathlib import Path
        import dpn_lens.models as models
        convert = models._convert_gguf
        def counted(*args, **kwargs):
            print("CONVERTED", flush=True)
            return convert(*args, **kwargs)
        models._convert_gguf = counted
        target = models._converted_gguf_dir(Path({str(gguf)!r}), {{}})
        print("TARGET", target)
    """
    outputs = _finish([_start(script, {"DPN_LENS_CACHE": str(cache)}) for _ in range(2)])
    targets = {line.split(" ", 1)[1] for out in outputs for line in out.splitlines() if line.startswith("TARGET")}
    assert len(targets) == 1
    assert sum(out.count("CONVERTED") for out in outputs) == 1    # the second process waited and reused it
    target = Path(targets.pop())
    converted = sorted(p.name for p in (cache / "converted").iterdir() if not p.name.endswith(".lock"))
    assert converted == [target.name], converted             # no staging folder left behind
    from safetensors import safe_open

    with safe_open(str(target / "model.safetensors"), framework="pt") as handle:
        assert len(list(handle.keys())) > 100                  # a complete checkpoint, readable
    assert json.loads((target / "config.json").read_text())["num_hidden_layers"] == 30


def test_two_processes_filling_the_same_preference_pair_cache_leave_one_valid_file(tmp_path):
    from helpers import write_personalitybench

    data = write_personalitybench(tmp_path / "data")
    cache = tmp_path / "cache"
    script = f"""
        from dpn_lens.tiny import build_tiny_model
        from dpn_lens.evaluation.control import ControlConfig, held_out_pairs
        model = build_tiny_model({str(tmp_path / "model")!r} + str(__import__("os").getpid()), max_positions=512)
        held = held_out_pairs(model, "extraversion", ControlConfig(traits=["extraversion"], data_dir={str(data)!r},
                                                                   pairs=12, max_new_tokens=6), log=lambda m: None)
        print("PAIRS", len(held.pairs))
    """
    outputs = _finish([_start(script, {"DPN_LENS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}) for _ in range(2)])
    counts = {line for out in outputs for line in out.splitlines() if line.startswith("PAIRS")}
    assert len(counts) == 1
    files = sorted((cache / "preference_pairs").iterdir())
    assert [f.suffix for f in files] == [".json"], files        # one entry, no temporary file left
    entry = json.loads(files[0].read_text())
    assert len(entry["pairs"]) == int(counts.pop().split()[1])
