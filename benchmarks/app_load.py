"""Load: N concurrent browser sessions exploring the shipped bundles while one training runs.

    python benchmarks/app_load.py [--sessions 5] [--seconds 60] [--bound-mb 2500]

Starts `streamlit run app/main.py` on localhost with the shipped checkpoints and a fresh runs
directory, starts one demo training there (niced like the app's own jobs), then has N headless
Chromium pages (Debian's /usr/bin/chromium via Playwright) each open Explore on a different
bundle and cycle through its tabs for the given time. Prints the server's peak RSS (sampled from /proc every 0.2 s),
the number of page loads, the time from a tab click until its content is visible (median, p95,
max, and actions over 30 s) and any exception shown in a page or logged by the server; exits 1
if there was an exception or the peak RSS exceeded --bound-mb. Traffic stays on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.jobs import job_nice  # noqa: E402

CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
# what a tab shows once its rerun is done (tabs are lazy: a panel is empty until then)
CONTENT = ("[role='tabpanel']:not([hidden]) :is([data-testid='stImage'], [data-testid='stPlotlyChart'], "
           "[data-testid='stAlert'], [data-testid='stJson'])")
TABS = ["Reconstructions", "Codebook usage", "Neighbor-k", "Interpolate", "Edit codes", "Code gallery",
        "Prior samples"]


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and its children (the server and anything it spawned), in MB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            todo += [int(c) for c in children]
        except OSError:
            pass
    return total / 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--bound-mb", type=float, default=2500)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="sqvae_load_"))
    env = {**os.environ, "SQVAE_RUNS": str(tmp / "runs"), "SQVAE_CHECKPOINTS": str(ROOT / "checkpoints"),
           "SQVAE_OFFLINE": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.headless", "true",
                               "--server.port", str(port), "--server.address", "127.0.0.1",
                               "--server.fileWatcherType", "none"], cwd=ROOT, env=env,
                              stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    nice = ["nice", "-n", str(job_nice())] if job_nice() and shutil.which("nice") else []   # as the app's jobs
    trainer = subprocess.Popen(nice + [sys.executable, "-m", "sqvae_core", "train", "--model", "gaussian_1", "--preset",
                                       "demo", "--out", str(tmp / "runs" / "load-train"), "--quiet"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    peak, stop, loads, errors, waits, timeouts = [0.0], threading.Event(), [0], [], [], [0]

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_mb(server.pid))
            time.sleep(0.2)

    try:
        for _ in range(200):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        threading.Thread(target=sample, daemon=True).start()
        bundles = sorted(p.name for p in (ROOT / "checkpoints").iterdir() if (p / "config.json").is_file())
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROME_ARGS)
            pages = [browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                     for _ in range(args.sessions)]
            def open_bundle(i, page, step):
                name = bundles[(i + step // len(TABS)) % len(bundles)]
                page.goto(f"{url}/?run=checkpoints/{name}", wait_until="domcontentloaded")   # Explore is the app root
                page.get_by_role("tab", name="Edit codes").wait_for(state="visible", timeout=90_000)
                loads[0] += 1

            for i, page in enumerate(pages):
                page.goto(f"{url}/", wait_until="domcontentloaded")
            t_end = time.time() + args.seconds
            step = 0
            while time.time() < t_end:
                for i, page in enumerate(pages):
                    try:
                        if step % len(TABS) == 0:    # a new page load on another bundle now and then
                            open_bundle(i, page, step)
                        t0 = time.perf_counter()       # click -> the tab's content is on screen
                        page.get_by_role("tab", name=TABS[step % len(TABS)]).click(timeout=30_000)
                        page.locator(CONTENT).first.wait_for(state="visible", timeout=30_000)
                        waits.append(time.perf_counter() - t0)
                        if page.locator("[data-testid='stException']").count():
                            errors.append(f"session {i}: {page.locator('[data-testid=stException]').first.inner_text()[:200]}")
                    except Exception as e:   # a slow page is not an app error; record and go on
                        timeouts[0] += 1
                        print(f"session {i} step {step}: {e.__class__.__name__}: {str(e).splitlines()[0][:120]}",
                              file=sys.stderr)
                step += 1
                time.sleep(0.5)
            browser.close()
    finally:
        stop.set()
        for p in (trainer, server):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
    text = log.read_text(errors="replace")
    if "Traceback" in text:
        errors.append("server log: " + text[text.index("Traceback"):][:400])
    print(f"{args.sessions} sessions x {args.seconds:.0f} s while one training ran (nice {job_nice()}): {step} rounds, "
          f"{loads[0]} bundle switches, server peak RSS {peak[0]:.0f} MB (bound {args.bound_mb:.0f} MB), "
          f"{len(errors)} exceptions")
    if waits:
        q = statistics.quantiles(waits, n=20) if len(waits) > 1 else waits * 19
        print(f"tab click -> content visible: {len(waits)} clicks, median {statistics.median(waits):.2f} s, "
              f"p95 {q[18]:.2f} s, max {max(waits):.2f} s; {timeouts[0]} actions over 30 s")
    for e in errors:
        print("  ", e)
    return 0 if not errors and peak[0] <= args.bound_mb else 1


if __name__ == "__main__":
    sys.exit(main())
