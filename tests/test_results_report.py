"""The report of the long result table (``dpn_lens.report``): every row lands in its cell, the counts are the
steering summary's, and the files are written whole, beside the table."""

from pathlib import Path

import pytest

from dpn_lens.evaluation.table import ResultRow, read_result_table, steering_summary, write_result_table
from dpn_lens.report import (RESULTS_HTML, RESULTS_MARKDOWN, format_value, grid_tables, results_markdown,
                             summary_table, write_results_report)

RUN = Path(__file__).resolve().parent.parent / "results" / "control-smollm2-135m-instruct-rules-generation"


def _cell(tables, row):
    """The text of ``row``'s cell in the grid of its metric and level (None if no table has that cell)."""
    for table in tables:
        metric = table.title.split(",")[0]
        level = table.title.split(", ")[1]
        if metric != row.metric or (level.startswith("KL") != (row.kl_level is not None)):
            continue
        if row.kl_level is not None and float(level.removeprefix("KL ")) != row.kl_level:
            continue
        column = table.header.index(f"{row.trait} {row.direction}")
        names = [line[0] for line in table.rows]
        swept = f"{row.method} γ={row.gamma:g}" if row.gamma is not None else row.method
        wanted = [n for n in names if n in (row.method, swept)]
        if wanted:
            return table.rows[names.index(wanted[0])][column]
    return None


def test_every_row_of_a_committed_run_is_in_its_cell_and_the_counts_are_the_steering_summary():
    rows = read_result_table(RUN / "results.csv")
    tables = grid_tables(rows)
    for row in rows:
        assert _cell(tables, row) == format_value(row), row
    # one table per metric and level, nothing else
    assert len(tables) == len({(r.metric, r.kl_level) for r in rows})
    for metric, level in (("preference", 0.05), ("generation", 0.05), ("generation", 0.5)):
        table = summary_table(rows, metric, level)
        expected = [s for s in steering_summary(rows, metric, level) if s.measured]
        assert [line[0] for line in table.rows] == [s.method for s in expected]
        assert [int(line[3]) for line in table.rows] == [s.as_asked for s in expected]
        assert [line[5] for line in table.rows] == [str(s.beyond_random) if s.with_random else "" for s in expected]
    assert summary_table(rows, "preference", 0.2) is None      # a level nothing was measured at


def test_a_cell_marks_a_shift_whose_interval_excludes_zero_and_shows_a_level_plainly():
    moved = ResultRow("openness", "caa", "increase", "preference", 0.03, 0.01, 0.05)
    unmoved = ResultRow("openness", "caa", "decrease", "preference", 0.01, -0.01, 0.03)
    wrong = ResultRow("openness", "caa", "decrease", "generation", -0.02, -0.03, -0.01)
    assert format_value(moved).endswith(" *") and not format_value(unmoved).endswith("*")
    assert format_value(wrong) == "-0.020 [-0.030, -0.010] *"
    assert format_value(ResultRow("openness", "caa", "increase", "mmlu_acc", 0.25)) == "0.25"
    assert format_value(None) == ""


def test_a_method_swept_over_gammas_gets_a_line_per_gamma_and_controls_come_last():
    rows = [ResultRow("openness", "persona", "both", "questionnaire_shift", 0.5, 0.2, 0.8, harness="compare"),
            ResultRow("openness", "dpn-le", "increase", "questionnaire_shift", 0.1, -0.1, 0.3, gamma=1.0,
                      harness="compare"),
            ResultRow("openness", "dpn-le", "increase", "questionnaire_shift", 0.2, 0.1, 0.3, gamma=2.0,
                      harness="compare")]
    (table,) = grid_tables(rows)
    assert [line[0] for line in table.rows] == ["dpn-le γ=1", "dpn-le γ=2", "persona"]
    assert table.title == "questionnaire_shift, fixed γ"
    for row in rows:
        assert _cell([table], row) == format_value(row)


def test_the_report_files_are_written_beside_the_table_and_an_empty_or_missing_table_is_handled(tmp_path):
    rows = read_result_table(RUN / "results.csv")
    write_result_table(rows, tmp_path / "results.csv")
    written = write_results_report(tmp_path)
    assert written == [tmp_path / RESULTS_MARKDOWN, tmp_path / RESULTS_HTML]
    markdown = (tmp_path / RESULTS_MARKDOWN).read_text(encoding="utf-8")
    assert markdown == results_markdown(rows, f"Results: {tmp_path.name}")
    assert markdown.index("## Which methods steer") < markdown.index("## Every number")
    page = (tmp_path / RESULTS_HTML).read_text(encoding="utf-8")
    assert page.count("<table>") == markdown.count("\n|---|") and 'name="generator"' in page
    assert not list(tmp_path.glob("*.tmp*"))          # written whole, then renamed
    write_result_table([], tmp_path / "empty" / "results.csv")
    assert write_results_report(tmp_path / "empty") == []
    with pytest.raises(FileNotFoundError, match="results.csv is missing"):
        write_results_report(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="empty"):
        results_markdown([])
