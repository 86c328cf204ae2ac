"""Screenshot of the neuron explorer, as in README: headless system Chromium, no network.

    python scripts/screenshot_explorer.py runs/demo/explorer/index.html figures/explorer.png \
        --map attribution-t/extraversion --token alone --neuron L18.N425

Opens the page from disk, picks the map, types the token into "neurons that promote", opens the
neuron's card from the results and saves a 1400 x 1000 screenshot. Exits non-zero on any console error.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", help="the explorer's index.html (dpn-lens explore --run RUN writes RUN/explorer/index.html)")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--map", default=None, help="RULE/TRAIT of the map to show, e.g. attribution-t/extraversion")
    parser.add_argument("--token", default=None, help="token typed into 'neurons that promote'")
    parser.add_argument("--neuron", default=None, help="neuron whose card opens, e.g. L18.N425 (None: the first row)")
    parser.add_argument("--filter", default=None, help="text typed into the table's filter box, e.g. a token")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    browser_path = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                        None)
    if browser_path is None:
        sys.exit("no Chromium found; install Debian's chromium (scripts/install.sh --test does)")
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(Path(args.page).resolve().as_uri())
            page.wait_for_selector("#neuron-table tr.row")
            if args.map:
                page.select_option("#map-select", args.map.replace("/", "|"))
            if args.token:
                page.fill("#token-search", args.token)
            if args.neuron and args.token:
                page.locator("#token-results div", has_text=args.neuron).first.click()
            elif args.neuron:
                page.locator(f"#neuron-table tr.row[data-label='{args.neuron}']").click()
            else:
                page.locator("#neuron-table tr.row").first.click()
            page.wait_for_selector("#card-hist .main-svg")
            if args.filter:
                page.fill("#filter", args.filter)
            page.screenshot(path=args.out)
        finally:
            browser.close()
    if errors:
        sys.exit(f"console errors: {errors}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
