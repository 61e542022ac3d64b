"""Server-side speed of the app's code edit (Explore → Edit codes), with Streamlit's AppTest.

    python benchmarks/app_speed.py [--bundle RUN_DIR] [--repeats 15]

Without --bundle a bundle of paper size (gaussian_1, K=256, d=64, 2 residual blocks, 28x28,
untrained weights) is written to a temp dir. Prints:
  * edit round trip: choosing another replacement code in the Edit codes tab and running the
    page script until the new decoded image is in the tree (AppTest reruns the WHOLE page; in the
    browser only the editor's fragment reruns, so this is an upper bound); median over repeats,
    target < 300 ms
  * the decode itself (explore.edit_code), median
  * the cold first runs of the Explore page (loads, evaluates, maps; the first run is the progressive
    first paint: header + codebook map) and a warm rerun
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_bundle(path: Path) -> Path:
    import torch
    from sqvae_core import rundir
    from sqvae_core.config import ModelConfig
    from sqvae_core.models import build_model
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = ModelConfig(kind="gaussian_1", codebook_size=256, code_dim=64, num_rb=2)
    rundir.save_weights(path / "model.safetensors", build_model(cfg).state_dict())
    (path / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "dataset": "fashion-mnist"}))
    (path / "status.json").write_text(json.dumps({"state": "finished", "step": 0, "error": None}))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="a run directory / bundle to use (default: a fresh paper-size one)")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sqvae-app-speed-"))
    if args.bundle:
        src = Path(args.bundle).resolve()
        os.environ["SQVAE_CHECKPOINTS"] = str(src.parent)
        label = f"checkpoints/{src.name}"
    else:
        make_bundle(tmp / "ck" / "paper_size")
        os.environ["SQVAE_CHECKPOINTS"] = str(tmp / "ck")
        label = "checkpoints/paper_size"
    os.environ["SQVAE_RUNS"] = str(tmp / "runs")
    os.environ.setdefault("SQVAE_APP_UMAP", "0")
    os.environ.setdefault("SQVAE_OFFLINE", "1")

    import torch
    import streamlit.testing.v1.app_test as at_mod
    import streamlit.testing.v1.local_script_runner as lsr
    from streamlit.runtime.scriptrunner.script_cache import ScriptCache
    from streamlit.testing.v1 import AppTest

    # AppTest compiles the page anew on every run (a fresh ScriptCache each time); the server
    # compiles it once and reuses the bytecode. Share one cache so reruns cost what they cost
    # in the server.
    shared = ScriptCache()
    lsr.ScriptCache = at_mod.ScriptCache = lambda: shared
    from sqvae_core import explore
    from sqvae_core.rundir import load_bundle

    page = str(ROOT / "app" / "pages_" / "explore.py")
    at = AppTest.from_file(page, default_timeout=300)
    at.session_state["bundle"] = label
    t = time.perf_counter()
    at.run()                       # progressive first paint: header + codebook map
    first = time.perf_counter() - t
    at.run()                       # the full page (in the browser a fragment timer asks for it)
    cold = time.perf_counter() - t
    assert not at.exception, [e.value for e in at.exception]
    t = time.perf_counter()
    at.run()
    warm = time.perf_counter() - t

    at.session_state["explore_tab"] = "Edit codes"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    sel = at.selectbox(key="edit_code_0_3_3")
    n_opts = len(sel.options)
    times = []
    for i in range(args.repeats):
        sel = at.selectbox(key="edit_code_0_3_3")
        sel.select_index(1 + i % (n_opts - 1))
        t = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t)
        text = [m.value for m in at.markdown if m.value.startswith("Edited cell")]
        assert text and text[0].endswith(f"**{sel.options[1 + i % (n_opts - 1)].split()[1]}**"), text
        assert not at.exception

    b = load_bundle(os.environ["SQVAE_CHECKPOINTS"] + "/" + label.split("/", 1)[1])
    grid = torch.randint(0, b.model_cfg.codebook_size, (b.model_cfg.latent_size,) * 2)
    explore.edit_code(b.model, grid, 3, 3, 1)
    dec = []
    for i in range(args.repeats):
        t = time.perf_counter()
        explore.edit_code(b.model, grid, i % 7, (3 * i) % 7, (17 * i) % b.model_cfg.codebook_size)
        dec.append(time.perf_counter() - t)

    med = 1e3 * statistics.median(times)
    print(f"bundle: {label} (K={b.model_cfg.codebook_size}, d={b.model_cfg.code_dim})")
    print(f"explore page, cold: header + map after {first:.2f} s, whole page after {cold:.2f} s; "
          f"warm rerun {1e3 * warm:.0f} ms")
    print(f"code-edit round trip (AppTest, whole page rerun): median {med:.0f} ms, "
          f"min {1e3 * min(times):.0f} ms, max {1e3 * max(times):.0f} ms over {len(times)}  "
          f"[target < 300 ms: {'OK' if med < 300 else 'MISSED'}]")
    print(f"decode only (explore.edit_code): median {1e3 * statistics.median(dec):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
