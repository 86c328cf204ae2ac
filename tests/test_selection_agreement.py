"""Split-half agreement of an attribution rule's selection (`effect.reliability`, `dpn-lens study selection`):
would two runs that draw different selection pairs edit the same neurons?"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from dpn_lens import collect_statistics, embedded_contrastive_set, locate
from dpn_lens.cli import main
from dpn_lens.effect.reliability import agreement_of_halves, chance_jaccard, half_sizes, selection_agreement
from dpn_lens.effect.rules import rule_scores, select_top


@pytest.fixture(scope="module")
def base(tiny_model):
    return locate(collect_statistics(tiny_model, embedded_contrastive_set("openness", 40)), layers=[1, 2, 3], tau_d=0.0)


def test_chance_jaccard_equals_the_mean_over_every_pair_of_k_subsets():
    for k, n in [(1, 4), (2, 5), (3, 6), (2, 3)]:
        subsets = [set(s) for s in itertools.combinations(range(n), k)]
        exact = sum(len(a & b) / len(a | b) for a in subsets for b in subsets) / len(subsets) ** 2
        assert chance_jaccard(k, n) == pytest.approx(exact, abs=1e-12)


def test_identical_halves_agree_fully_and_a_halfs_top_set_is_the_rules_selection(base):
    per_pair = torch.randn(6, len(base.stat_layers), base.d_mlp, generator=torch.Generator().manual_seed(0))
    rho, jaccard, candidates, sign, held = agreement_of_halves(base, "attribution-t", per_pair, per_pair.clone(), 7)
    assert rho == pytest.approx(1.0) and jaccard == 1.0 and sign == 1.0
    assert held == pytest.approx(float(rule_scores(base, "attribution-t", per_pair).flatten().topk(7).values.mean()))
    assert candidates == int((base.steering_value != 0).sum())
    # the set compared is what effect_map would keep at that budget
    scores = rule_scores(base, "attribution-t", per_pair)
    assert sum(len(i) for i in select_top(scores, list(base.stat_layers), 7).values()) == 7


def test_halves_agree_when_pairs_share_an_effect_and_at_chance_when_they_do_not(tiny_model, base):
    generator = torch.Generator().manual_seed(1)
    shape = (64, len(base.stat_layers), base.d_mlp)
    noise = torch.randn(*shape, generator=generator)
    signal = torch.zeros(shape[1:])
    signal.view(-1)[torch.randperm(signal.numel(), generator=generator)[:10]] = 3.0   # 10 neurons with a real effect
    pairs = [None] * 64                                  # only counted: the attributions are given
    shared = selection_agreement(tiny_model, base, "attribution-t", pairs, budget=10, splits=6,
                                 per_pair=noise + signal[None])
    pure = selection_agreement(tiny_model, base, "attribution-t", pairs, budget=10, splits=6, per_pair=noise)
    assert [row.pairs_per_half for row in shared] == half_sizes(64) == [32, 16, 8, 4]
    assert shared[0].jaccard > 0.8 and shared[0].jaccard > shared[-1].jaccard
    assert shared[0].replicated_sign == 1.0 and shared[0].replicated_score > 3
    for row in pure:     # two noise halves share what two random 10-sets share (chance ~0.04 here)
        assert abs(row.jaccard - row.jaccard_chance) < 0.1 and abs(row.spearman) < 0.15
        assert abs(row.replicated_sign - 0.5) < 0.2 and abs(row.replicated_score) < 0.6


def test_selection_agreement_refuses_what_cannot_be_split(tiny_model, base):
    with pytest.raises(ValueError, match="reads no selection pairs"):
        selection_agreement(tiny_model, base, "write-layer", [None] * 16)
    with pytest.raises(ValueError, match="7 selection pairs .* cannot be split into two halves of at least 4"):
        selection_agreement(tiny_model, base, "attribution-t", [None] * 7)
    with pytest.raises(ValueError, match="needs 40 selection pairs"):
        selection_agreement(tiny_model, base, "attribution-t", [None] * 16, sizes=[20])
    with pytest.raises(ValueError, match="per_pair holds 3 pairs"):
        selection_agreement(tiny_model, base, "attribution-t", [None] * 16,
                            per_pair=torch.zeros(3, len(base.stat_layers), base.d_mlp))


def test_study_selection_writes_its_table_and_figure_from_a_run_folder(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPN_LENS_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["locate", "--model", str(tiny_folder), "--dtype", "float32", "--traits", "openness",
                 "--n-pairs", "12", "--layers", "0-2", "--q", "0.8", "--tau-d", "0.1", "--out", str(run),
                 "--no-progress"]) == 0
    # The tiny random model answers almost every persona alike (its pairs are dropped as identical), so
    # the pairs are given; the gradients, splits and files are the real ones.
    from dpn_lens.evaluation.preference import PreferencePair

    drawn = []
    monkeypatch.setattr("dpn_lens.effect.pairs.selection_pairs", lambda model, trait, n_pairs, seed, log: drawn.append(
        (n_pairs, seed)) or [PreferencePair(f"question {i} ?", f"a party {i} .", f"a book {i} .") for i in range(n_pairs)])
    out = tmp_path / "selection"
    assert main(["study", "selection", "--run", str(run), "--model", str(tiny_folder), "--dtype", "float32",
                 "--selection-pairs", "16", "--seed", "3", "--rules", "attribution-t,attribution", "--splits", "2",
                 "--no-png", "--out", str(out)]) == 0
    record = json.loads((out / "selection_agreement_summary.json").read_text())
    assert {row["rule"] for row in record["rows"]} == {"attribution-t", "attribution"}
    assert drawn == [(16, 3)] and record["n_pairs"] == 16
    assert sorted({row["pairs_per_half"] for row in record["rows"]}) == [4, 8]
    assert (out / "selection_agreement.csv").exists() and (out / "selection_agreement.html").exists()
    with pytest.raises(SystemExit):
        main(["study", "selection", "--run", str(run), "--rules", "write", "--out", str(out)])
    capsys.readouterr()
    assert main(["study", "selection", "--run", str(run), "--model", str(tiny_folder), "--selection-pairs", "6",
                 "--out", str(out)]) != 0
    assert "--selection-pairs must be at least 8" in capsys.readouterr().err
