"""First useful paint of Explore vs a one-chart Streamlit+Plotly page, in the same headless browser.

    python benchmarks/first_paint.py [--rounds 15] [--cold 3] [--checkpoints DIR] [--app app/main.py]

Warm: starts two servers on localhost (`streamlit run app/main.py` on the shipped checkpoints, and
a page with a title and one 4-point Plotly line), then loads them alternately in Debian's
/usr/bin/chromium (Playwright), each time in a fresh session. Cold (--cold N): N rounds, each on
two freshly started servers loaded once (the first visit after a start: imports, model load and
everything the first script run does), alternating which goes first. Prints medians of:

  paint   when the first Plotly chart's SVG has a non-empty box on screen, by the page's own
          clock (performance.now() from navigation start; a requestAnimationFrame loop checks
          every frame): what the user sees
  waited  the wall time until Playwright's `wait_for(state="visible")` returns. Playwright polls
          with growing pauses (0, 20, 50, 100, 100, 500, 500 ... ms), so a page that paints after
          ~0.3 s is seen up to 0.5 s late: this column overstates slower pages

and the ratio Explore / baseline of each (target for `paint`: <= 1.5). Also the milestones of a
typical Explore load (title, chart element, card) by the same clock. Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
PLOT = "[data-testid='stPlotlyChart'] .js-plotly-plot .main-svg"
BASELINE_PAGE = '''
import plotly.graph_objects as go
import streamlit as st
st.set_page_config(layout="wide")
st.title("Baseline")
st.plotly_chart(go.Figure(go.Scatter(x=[1, 2, 3, 4], y=[1, 3, 2, 4])))
'''
# Runs in every page before its own scripts: stamps milestones with the page's clock.
PAINT_PROBE = """
window.__paint = {};
const marks = {title: "h1", chart: "[data-testid='stPlotlyChart']", card: ".sq-card"};
new MutationObserver(() => {
  for (const [k, s] of Object.entries(marks))
    if (!(k in window.__paint) && document.querySelector(s)) window.__paint[k] = performance.now();
}).observe(document, {subtree: true, childList: true});
(function frame() {
  const el = document.querySelector("%s");
  if (el) { const r = el.getBoundingClientRect(); if (r.width > 0 && r.height > 0) window.__paint.plot = performance.now(); }
  if (!("plot" in window.__paint)) requestAnimationFrame(frame);
})();
""" % PLOT.replace('"', '\\"')


def start_server(script: Path, env: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(script), "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"streamlit did not start for {script}")


def first_paint(page, url: str) -> tuple[float, float, dict]:
    """(paint seconds by the page's clock, seconds until Playwright saw it, milestones in ms)."""
    page.goto("about:blank")
    t = time.perf_counter()
    page.goto(url, wait_until="commit")
    page.locator(PLOT).first.wait_for(state="visible", timeout=60_000)
    waited = time.perf_counter() - t
    page.wait_for_function("() => 'plot' in window.__paint", timeout=10_000)
    marks = page.evaluate("window.__paint")
    return marks["plot"] / 1000, waited, marks


def stop(servers: dict) -> None:
    for proc, _ in servers.values():
        proc.terminate()
        proc.wait(timeout=30)


def cold_rounds(browser, pages: dict, env: dict, rounds: int) -> dict:
    """Paint seconds of the first visit after a fresh start of each server, `rounds` times."""
    res = {name: [] for name in pages}
    for i in range(rounds):
        servers = {name: start_server(script, env) for name, script in pages.items()}
        try:
            order = list(servers)[::1 if i % 2 == 0 else -1]          # alternate which goes first
            for name in order:
                ctx = browser.new_context(viewport={"width": 1440, "height": 1500})
                ctx.add_init_script(PAINT_PROBE)
                paint = first_paint(ctx.new_page(), servers[name][1] + "/")[0]
                ctx.close()
                res[name].append(paint)
                print(f"  cold round {i + 1} {name:<8} paint {paint:.2f} s", flush=True)
        finally:
            stop(servers)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15, help="warm rounds (0: none)")
    ap.add_argument("--cold", type=int, default=0, help="cold rounds, each on freshly started servers")
    ap.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    ap.add_argument("--app", default=str(ROOT / "app" / "main.py"), help="the app's entry script")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="sqvae_paint_"))
    (tmp / "baseline.py").write_text(BASELINE_PAGE)
    env = {**os.environ, "SQVAE_CHECKPOINTS": args.checkpoints, "SQVAE_RUNS": str(tmp / "runs"), "SQVAE_OFFLINE": "1"}
    pages = {"baseline": tmp / "baseline.py", "explore": Path(args.app)}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROME_ARGS)
        if args.cold:
            cold = cold_rounds(browser, pages, env, args.cold)
            med = {n: statistics.median(v) for n, v in cold.items()}
            print(f"cold, median of {args.cold} rounds on fresh servers: explore {med['explore']:.2f} s, "
                  f"baseline {med['baseline']:.2f} s, ratio {med['explore'] / med['baseline']:.2f} (target <= 1.5)")
        if args.rounds:
            warm_rounds(browser, pages, env, args.rounds)
        browser.close()
    return 0


def warm_rounds(browser, pages: dict, env: dict, rounds: int) -> None:
    servers = {name: start_server(script, env) for name, script in pages.items()}
    res = {name: {"paint": [], "waited": []} for name in servers}
    typical = {}
    try:
        ctx = browser.new_context(viewport={"width": 1440, "height": 1500})
        ctx.add_init_script(PAINT_PROBE)
        page = ctx.new_page()
        for name, (_, url) in servers.items():      # first load of each server, not counted
            first = first_paint(page, url + "/")
            print(f"first {name:<8} paint {first[0]:.2f} s, Playwright saw it after {first[1]:.2f} s")
        for _ in range(rounds):                     # alternate, so drifts hit both alike
            for name, (_, url) in servers.items():
                paint, waited, marks = first_paint(page, url + "/")
                res[name]["paint"].append(paint)
                res[name]["waited"].append(waited)
                typical[name] = marks
        ctx.close()
    finally:
        stop(servers)
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in res.items()}
    print(f"warm, median of {rounds} alternating loads (fresh session each):")
    for name in servers:
        print(f"  {name:<8} paint {med[name]['paint']:.3f} s   Playwright saw it after {med[name]['waited']:.3f} s")
    print(f"  ratio explore/baseline: paint {med['explore']['paint'] / med['baseline']['paint']:.2f} (target <= 1.5), "
          f"Playwright-observed {med['explore']['waited'] / med['baseline']['waited']:.2f}")
    for name, marks in typical.items():
        print(f"  last {name} load, ms from navigation start: "
              + ", ".join(f"{k} {v:.0f}" for k, v in sorted(marks.items(), key=lambda kv: kv[1])))


if __name__ == "__main__":
    sys.exit(main())
