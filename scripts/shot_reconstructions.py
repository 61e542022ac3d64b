"""Screenshot of Explore -> Reconstructions for one bundle, in the real browser.

    python scripts/shot_reconstructions.py checkpoints/colour_gaussian_1 docs/colour-reconstructions.png

Starts the app on a copy of the bundle alone (as tests/test_browser.py does: its own checkpoints/,
offline), opens `/?run=checkpoints/NAME` in headless Chromium (/usr/bin/chromium, Debian; PyPI
playwright), waits for the reconstructions and saves the visible tab panel as an optimised PNG.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_browser import CHROME_ARGS, CHROMIUM, start_server, stop_server  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("out")
    p.add_argument("--width", type=int, default=1100)
    a = p.parse_args(argv)
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    bundle = Path(a.bundle).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(bundle, tmp / "checkpoints" / bundle.name)
        env = dict(os.environ, SQVAE_CHECKPOINTS=str(tmp / "checkpoints"), SQVAE_RUNS=str(tmp / "runs"),
                   SQVAE_OFFLINE="1", PYTHONPATH=str(ROOT))
        proc, url = start_server(ROOT / "app" / "main.py", env, tmp / "app.log")
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
                page = browser.new_page(viewport={"width": a.width, "height": 1600})
                page.set_default_timeout(120_000)
                page.goto(url + f"/?run=checkpoints/{bundle.name}")
                expect(page.get_by_text("Originals (top) vs reconstructions (bottom)")).to_be_visible(timeout=180_000)
                panel = page.locator("[data-testid='stTabPanel']:visible").first
                panel.locator("[data-testid='stImage'] img").first.wait_for()
                page.wait_for_timeout(1500)
                panel.screenshot(path=str(tmp / "shot.png"))
                browser.close()
        finally:
            stop_server(proc)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Image.open(tmp / "shot.png").convert("RGB").save(a.out, optimize=True)
    print(f"wrote {a.out} ({Path(a.out).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
