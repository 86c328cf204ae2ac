"""`dpn-lens explore`: an offline folder that a real browser (headless system Chromium, no network) opens with
no console error; clicking a neuron opens its card, typing a token filters the table and finds neurons."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dpn_lens.cards.explorer import explorer_data, write_explorer
from dpn_lens.cli import main
from dpn_lens.run import Run


@pytest.fixture(scope="module")
def explored(tiny_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("explore") / "run"
    with pytest.MonkeyPatch.context() as patch:      # this module's cache only: later modules need the real one
        patch.setenv("DPN_LENS_CACHE", str(folder.parent / "cache"))
        assert main(["locate", "--model", str(tiny_folder), "--dtype", "float32", "--traits", "openness,E",
                     "--n-pairs", "12", "--layers", "0-2", "--q", "0.8", "--tau-d", "0.1", "--select", "attribution-t",
                     "--selection-pairs", "16", "--budget", "6", "--out", str(folder), "--no-progress"]) == 0
    data = folder.parent / "data" / "capability" / "wikitext2_test"
    data.mkdir(parents=True)
    (data / "test.txt").write_text("you are calm . hello world what would you do ?\n" * 30, encoding="utf-8")
    assert main(["explore", "--run", str(folder), "--model", str(tiny_folder), "--dtype", "float32", "--data-dir",
                 str(folder.parent / "data"), "--n-pairs", "6", "--text-windows", "8", "--k", "3"]) == 0
    return folder


def test_the_explorer_folder_is_self_contained(explored):
    folder = explored / "explorer"
    assert {p.name for p in folder.iterdir()} == {"index.html", "data.js", "plotly.min.js"}
    page = (folder / "index.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page          # nothing loaded from the network
    data = json.loads((folder / "data.js").read_text(encoding="utf-8").removeprefix("window.DPN_EXPLORER = ").rstrip(";\n"))
    run = Run.load(explored)
    assert {m["key"] for m in data["maps"]} == {f"{r}|{t}" for t in run.traits for r in ("dpn-le", "attribution-t")}
    for key, cards in data["cards"].items():
        rule, trait = key.split("|")
        neuron_map = run.maps[trait] if rule == "dpn-le" else run.rule_maps[rule][trait]
        assert len(cards) == neuron_map.n_selected()
    overlap = data["overlap"]["dpn-le"]
    assert overlap["jaccard"][0][0] == 1.0 and len(overlap["traits"]) == 2


def _chromium() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


def test_a_real_browser_opens_the_explorer_clicks_a_neuron_and_filters_by_token(explored, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra (pip install -e .[test])")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium on this machine (scripts/install.sh --test installs Debian's package)")
    shots = Path(os.environ.get("DPN_LENS_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    data = json.loads((explored / "explorer" / "data.js").read_text(encoding="utf-8")
                      .removeprefix("window.DPN_EXPLORER = ").rstrip(";\n"))
    first_key = data["maps"][0]["key"]
    token = next(card["promoted"][0][0] for card in data["cards"][first_key])
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto((explored / "explorer" / "index.html").resolve().as_uri())
            page.wait_for_selector("#neuron-table tr.row")
            rows = page.locator("#neuron-table tr.row")
            n_rows = rows.count()
            assert n_rows == len(data["cards"][first_key])
            label = rows.nth(1).get_attribute("data-label")
            rows.nth(1).click()
            page.wait_for_selector("#card-title")
            assert page.inner_text("#card-title") == label
            page.wait_for_selector("#card-hist .main-svg")                 # the card's histogram drew
            page.screenshot(path=str(shots / "explorer_card.png"), full_page=True)
            page.fill("#filter", token.strip())
            filtered = page.locator("#neuron-table tr.row")
            expected = [c["label"] for c in data["cards"][first_key]
                        if any(token.strip().lower() in p[0].lower() for p in c["promoted"])
                        or token.strip().lower() in c["label"].lower()]
            assert 0 < filtered.count() <= n_rows
            assert sorted(filtered.nth(i).get_attribute("data-label") for i in range(filtered.count())) == sorted(expected)
            page.fill("#token-search", token.strip())
            assert page.locator("#token-results div").count() >= 1
            page.screenshot(path=str(shots / "explorer_filtered.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, f"console errors: {errors}"
    assert all(url.startswith("file://") or url.startswith("data:") for url in requests), requests
    assert (shots / "explorer_card.png").stat().st_size > 10_000


def test_explorer_data_refuses_nothing_to_show(explored):
    run = Run.load(explored)
    with pytest.raises(ValueError, match="dpn-lens cards --run RUN"):
        write_explorer(run, {}, explored / "empty")
    assert explorer_data(run, {("dpn-le", "openness"): []})["maps"][0]["n"] == run.maps["openness"].n_selected()


def test_the_report_links_the_explorer_or_says_how_to_build_it(explored, tmp_path, capsys):
    assert main(["report", "--run", str(explored)]) == 0
    page = (explored / "report.html").read_text(encoding="utf-8")
    assert '<a href="explorer/index.html">' in page
    elsewhere = tmp_path / "pages" / "report.html"
    assert main(["report", "--run", str(explored), "--out", str(elsewhere)]) == 0
    href = os.path.relpath((explored / "explorer" / "index.html").resolve(), elsewhere.parent.resolve())
    assert f'<a href="{href}">' in elsewhere.read_text(encoding="utf-8")
    bare = tmp_path / "bare"
    shutil.copytree(explored, bare, ignore=shutil.ignore_patterns("explorer"))
    assert main(["report", "--run", str(bare)]) == 0
    assert f"dpn-lens explore --run {bare}" in (bare / "report.html").read_text(encoding="utf-8")


def test_the_readme_screenshot_script_runs_on_the_tiny_explorer(explored, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="playwright is a test extra (pip install -e .[test])")
    if _chromium() is None:
        pytest.skip("no Chromium on this machine (scripts/install.sh --test installs Debian's package)")
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_explorer.py"
    spec = importlib.util.spec_from_file_location("screenshot_explorer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "shot.png"
    assert module.main([str(explored / "explorer" / "index.html"), str(out), "--map", "attribution-t/openness"]) == 0
    assert out.stat().st_size > 10_000
