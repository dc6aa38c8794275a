"""Screenshot a run's report.html in headless Chromium (the picture in the README).

    python benchmarks/report_screenshot.py runs/demo --out docs/report.png

Needs Debian's chromium (/usr/bin/chromium) and the playwright package (the test extra installs it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="a folder written by compress (it holds report.html)")
    p.add_argument("--out", default="docs/report.png")
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=1500, help="the top of the page that is shown")
    p.add_argument("--browser", default="/usr/bin/chromium")
    args = p.parse_args()
    page_file = (Path(args.out_dir) / "report.html").resolve()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.browser, args=ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        page.goto(page_file.as_uri(), wait_until="load")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out, full_page=False)
        browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
