"""`benchmarks/bench_cards.py` cannot rot: it runs on the tiny model and prints both of its ratios."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cards.py"


def test_the_cards_benchmark_runs_on_the_tiny_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data" / "capability" / "wikitext2_test"
    data.mkdir(parents=True)
    (data / "test.txt").write_text("you are calm . hello world what would you do ?\n" * 200, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("bench_cards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "cards.json"
    results = module.main(["--model", "tiny", "--dtype", "float32", "--n-pairs", "60", "--data-dir", str(tmp_path / "data"),
                           "--batch-size", "4", "--memory-windows", "4", "--memory-neurons", "10", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "x locate (target <= 2x)" in printed and "flat = about 1" in printed
    speed = results["cards_vs_locate"]
    assert speed["cards"] == speed["selected_neurons"] > 0 and speed["cards_over_locate"] > 0
    assert results["memory"]["large"]["sequences_seen"] == 4 * results["memory"]["small"]["sequences_seen"] == 16
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
