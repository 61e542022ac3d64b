"""The Streamlit app, page by page, with streamlit.testing.v1.AppTest.

Each page script runs on its own (AppTest.from_file) against temporary SQVAE_CHECKPOINTS /
SQVAE_RUNS directories holding tiny bundles made here. The Train tests launch real training
subprocesses (20 steps, K=16, d=16) and stop a long one.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = ROOT / "app" / "pages_"

pytest.importorskip("streamlit.testing.v1")
from streamlit.testing.v1 import AppTest  # noqa: E402

from sqvae_core import rundir  # noqa: E402
from sqvae_core.config import ModelConfig  # noqa: E402
from sqvae_core.kinds import KINDS  # noqa: E402
from sqvae_core.models import build_model  # noqa: E402

TIMEOUT = 60
SHIPPED = ROOT / "sqvae_core" / "datasets_shipped"


def make_bundle(path: Path, kind: str = "gaussian_1", seed: int = 0, state: str = "finished", **status):
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = ModelConfig(kind=kind, codebook_size=16, code_dim=16, num_rb=1)
    model = build_model(cfg)
    rundir.save_weights(path / "model.safetensors", model.state_dict())
    (path / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "dataset": "fashion-mnist"}))
    rows = [{"step": s, "loss": 100.0 - s, "mse": 50.0 - s / 2, "perplexity": 5 + s / 10, "entropy": 2 - s / 100,
             "sigma2_q": 10 / (1 + s), "sigma2_x": 0.1, "temperature": 1.0} for s in range(10, 60, 10)]
    rows.append({"step": 50, "val_mse": 40.0, "val_perplexity": 7.5, "val_dead_codes": 3, "val_entropy": 1.2})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "status.json").write_text(json.dumps({"state": state, "step": 50, "error": None, **status}))
    return model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("app")
    ck, runs = base / "checkpoints", base / "runs"
    model = make_bundle(ck / "tiny")
    make_bundle(ck / "tiny_vq", kind="vq", seed=1)
    # a prior for the tiny bundle: class-conditional, so the class selector shows
    from sqvae_core.prior import GatedPixelCNN, PriorConfig, save_prior
    prior = GatedPixelCNN(PriorConfig(num_codes=16, height=7, width=7, hidden=8, layers=2, num_classes=10))
    save_prior(prior, ck / "tiny" / "prior.safetensors")
    make_bundle(ck / "tiny_vmf", kind="vmf", seed=2)
    (ck / "tiny_vmf" / "config.json").write_text(json.dumps(
        {"model": json.loads((ck / "tiny_vmf" / "config.json").read_text())["model"], "dataset": "fashion-mnist-cat8"}))
    make_bundle(ck / "tiny_vae", kind="vae", seed=3)
    broken = ck / "zz_broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model": model.cfg.to_dict(), "dataset": "fashion-mnist"}))
    (broken / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 8)
    runs.mkdir()
    make_bundle(runs / "crashed", state="running", pid=2 ** 22 + 12345)          # process long gone
    make_bundle(runs / "failed-run", state="failed", error="non-finite loss: loss became nan at step 7")
    old = {k: os.environ.get(k) for k in ("SQVAE_CHECKPOINTS", "SQVAE_RUNS", "SQVAE_APP_UMAP", "SQVAE_OFFLINE",
                                          "SQVAE_APP_EVAL_IMAGES", "SQVAE_MAX_JOBS", "SQVAE_DATA")}
    os.environ.update(SQVAE_CHECKPOINTS=str(ck), SQVAE_RUNS=str(runs), SQVAE_APP_UMAP="0", SQVAE_OFFLINE="1",
                      SQVAE_APP_EVAL_IMAGES="200", SQVAE_MAX_JOBS="1",
                      # the small Fashion-MNIST subset shipped in the package: trainings start faster
                      SQVAE_DATA=str(SHIPPED))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny ops; a busy 2-core box hates OpenMP oversubscription
    yield {"ck": ck, "runs": runs, "base": base}
    torch.set_num_threads(threads)
    jm = _jm(runs)
    if jm is not None:
        jm.shutdown(grace=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _jm(runs: Path):
    from app import cache
    try:
        return cache._job_manager(str(runs.resolve()), 1)
    except Exception:
        return None


def app(page: str, **kw) -> AppTest:
    at = AppTest.from_file(str(PAGES / f"{page}.py"), default_timeout=TIMEOUT)
    for k, v in kw.items():
        at.session_state[k] = v
    at.run()
    if page == "explore":
        at.run()      # Explore's first run is the progressive first paint (header + map); see below
    return at


def ok(at: AppTest):
    assert not at.exception, [e.value for e in at.exception]


def md(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


MEDIA: dict[str, bytes] = {}        # every image / download a page sent, by media file id


@pytest.fixture(scope="module", autouse=True)
def capture_media():
    """AppTest keeps media in a storage that is dropped after each run: keep a copy of each file."""
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
    original = MemoryMediaFileStorage.load_and_get_id

    def load(self, path_or_data, mimetype, kind, filename=None):
        file_id = original(self, path_or_data, mimetype, kind, filename)
        MEDIA[file_id] = self._files_by_id[file_id].content
        return file_id

    MemoryMediaFileStorage.load_and_get_id = load
    yield
    MemoryMediaFileStorage.load_and_get_id = original


def media(url: str) -> bytes:
    return MEDIA[Path(url).stem]


def images(at: AppTest) -> list[np.ndarray]:
    """Every picture on the page, decoded: uint8 (H, W) or (H, W, 3)."""
    from PIL import Image
    return [np.asarray(Image.open(io.BytesIO(media(img.url)))) for el in at.get("image") for img in el.proto.imgs]


def cells(grid: np.ndarray, rows: int, cols: int, size: int = 28, pad: int = 2) -> np.ndarray:
    """The (rows, cols, size, size) images in [0, 1] of an app.images.image_grid (scale 1, grey)."""
    assert grid.shape[:2] == (rows * (size + pad) + pad, cols * (size + pad) + pad), grid.shape
    return np.stack([np.stack([grid[pad + r * (size + pad):pad + r * (size + pad) + size,
                                    pad + c * (size + pad):pad + c * (size + pad) + size] for c in range(cols)])
                     for r in range(rows)]) / 255.0


def chart(at: AppTest, key: str | None = None, index: int = 0) -> dict:
    """A Plotly chart's figure as sent (its JSON spec), by widget key or position."""
    charts = at.get("plotly_chart")
    if key is not None:
        charts = [c for c in charts if key in c.proto.id]
    return json.loads(charts[index].proto.spec)


def parse_card(body: str) -> dict:
    """The model card (one HTML block of label/value tiles) as {label: value}."""
    from html.parser import HTMLParser

    class Card(HTMLParser):
        def __init__(self):
            super().__init__()
            self.cls, self.texts = None, []

        def handle_starttag(self, tag, attrs):
            self.cls = dict(attrs).get("class")

        def handle_data(self, data):
            if self.cls in ("sq-label", "sq-value"):
                self.texts.append(data)

    parser = Card()
    parser.feed(body)
    return dict(zip(parser.texts[::2], parser.texts[1::2]))


def card_of(at: AppTest) -> dict:
    return next((parse_card(m.proto.body) for m in at.get("html") if 'class="sq-card"' in m.proto.body), {})


def plotly_count(at: AppTest) -> int:
    return len(at.get("plotly_chart"))


def tiny(env, name: str = "tiny"):
    """The bundle as the app loads it, and the first test images the app shows."""
    from sqvae_core.data import load_dataset
    b = rundir.load_bundle(env["ck"] / name)
    data = load_dataset("fashion-mnist", "test", str(SHIPPED), download=False, image_size=28, channels=1)
    return b.model, data.images[:200]


def wait_state(run_dir: Path, states, timeout: float) -> dict:
    t0 = time.time()
    st = {}
    while time.time() - t0 < timeout:
        try:
            st = json.loads((run_dir / "status.json").read_text())
            if st.get("state") in states:
                return st
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
    raise AssertionError(f"{run_dir.name}: state {st.get('state')!r} after {timeout}s, wanted {states}\n{log[-2000:]}")


# ------------------------------------------------------------------------- entry point
def test_main_entrypoint_navigation(env):
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=TIMEOUT).run()
    ok(at)
    assert any(t.value == "Explore" for t in at.title)
    assert at.toggle(key="demo_mode").value is False


# ----------------------------------------------------------------------------- Explore
def test_explore_head_card_and_map_show_the_quick_evaluation(env):
    from sqvae_core.evaluate import evaluate_model
    model, x = tiny(env)
    ev = evaluate_model(model, x)
    at = app("explore")
    ok(at)
    assert at.selectbox(key="bundle").value == "checkpoints/tiny"      # the only Gaussian SQ-VAE
    card = card_of(at)
    assert card["Kind"] == "gaussian_1" and card["K (codes)"] == "16" and card["Steps"] == "50"
    assert math.isclose(float(card["Test MSE"]), ev["mse"], rel_tol=1e-3)
    assert int(card["Dead codes"]) == ev["dead_codes"]
    spec = chart(at, "map_chart")
    assert spec["layout"]["title"]["text"] == "Codebook map (PCA)"          # UMAP is off in the tests
    live = [c[0] for t in spec["data"] if t["name"] == "codes" for c in t["customdata"]]
    dead = [c[0] for t in spec["data"] if t["name"].startswith("dead") for c in t["customdata"]]
    assert sorted(live + dead) == list(range(16))
    assert dead == [c for c in range(16) if ev["usage"][c] == 0]


def test_model_card_says_what_precision_the_run_trained_in(env):
    """config.json's precision (train.py), bf16 asked for but not native (amp_fallback), and for runs
    from before the key, what train.amp says (missing: fp32)."""
    path = env["ck"] / "tiny" / "config.json"
    saved = path.read_text()
    doc = json.loads(saved)
    try:
        assert card_of(app("explore"))["Precision"] == "fp32"                 # no key, no train.amp
        path.write_text(json.dumps({**doc, "train": {"amp": True}}))
        assert card_of(app("explore"))["Precision"] == "bf16 autocast (convolutions; quantizer and loss fp32)"
        path.write_text(json.dumps({**doc, "precision": "fp32", "amp_fallback": "this CPU has no native bf16"}))
        at = app("explore")
        ok(at)
        assert card_of(at)["Precision"] == "fp32 (bf16 asked for, not native)"
        assert any("this CPU has no native bf16" in c.value for c in at.caption)
    finally:
        path.write_text(saved)


def test_explore_progressive_first_paint(env):
    """A session's first run sends the header and the codebook map only; the browser's fragment
    timer then asks for the full page (AppTest does not run timers: the second run stands in)."""
    at = AppTest.from_file(str(PAGES / "explore.py"), default_timeout=TIMEOUT).run()
    ok(at)
    assert card_of(at)["Kind"] == "gaussian_1" and plotly_count(at) == 1
    assert not at.tabs and not at.get("image")
    at.run()
    ok(at)
    assert [t.label for t in at.tabs] == ["Reconstructions", "Codebook usage", "Neighbor-k", "Interpolate",
                                          "Edit codes", "Code gallery", "Prior samples", "Metrics"]


def test_tab_reconstructions_shows_test_images_over_the_models_reconstructions(env):
    model, x = tiny(env)
    at = app("explore")
    ok(at)
    top, bottom = cells(images(at)[0], 2, 16)
    assert np.abs(top - x[:16, 0].numpy()).max() <= 0.5 / 255 + 1e-6
    assert np.abs(bottom - model.reconstruct(x[:16])[:, 0].numpy()).max() <= 0.5 / 255 + 1e-6


def test_tab_codebook_usage_counts_every_position_of_every_image(env):
    from sqvae_core.evaluate import evaluate_model
    model, x = tiny(env)
    ev = evaluate_model(model, x)
    at = app("explore", explore_tab="Codebook usage")
    ok(at)
    bars = {t["name"].split(" ")[0]: t for t in chart(at, "usage_chart")["data"]}
    assert sum(bars["used"]["y"]) == 200 * 7 * 7
    assert sorted(int(c) for c in bars["used"]["x"]) == [c for c in range(16) if ev["usage"][c] > 0]
    assert len(bars.get("dead", {"x": []})["x"]) == ev["dead_codes"]
    assert list(bars["used"]["y"]) == sorted(bars["used"]["y"], reverse=True)


def test_tab_neighbor_k_third_row_is_the_reconstruction_for_k_1_only(env):
    at = app("explore", explore_tab="Neighbor-k", nk_k=1)
    ok(at)
    _, rec, edited = cells(images(at)[0], 3, 8)
    assert np.array_equal(rec, edited)                      # Neighbor-1 replaces each code by itself
    at.slider(key="nk_k").set_value(5).run()
    ok(at)
    _, rec5, edited5 = cells(images(at)[0], 3, 8)
    assert np.array_equal(rec, rec5) and not np.array_equal(rec5, edited5)


def test_tab_interpolate_runs_from_image_a_to_image_b(env):
    model, x = tiny(env)
    rec = model.reconstruct(x[:2])[:, 0].numpy()
    at = app("explore", explore_tab="Interpolate")
    ok(at)
    at.slider(key="interp_steps").set_value(5).run()
    ok(at)
    latent, pixel = cells(images(at)[0], 2, 5)
    for path in (latent, pixel):
        assert np.abs(path[0] - rec[0]).max() <= 1 / 255 and np.abs(path[-1] - rec[1]).max() <= 1 / 255
    assert np.abs(pixel[2] - (rec[0] + rec[1]) / 2).max() <= 1 / 255       # the cross-fade's middle


def test_tab_edit_codes_grid_is_the_images_codes_and_keeps_an_edit(env):
    from sqvae_core import explore
    model, x = tiny(env)
    codes = explore.dataset_codes(model, x[:1])[0].numpy()
    at = app("explore", explore_tab="Edit codes")
    ok(at)
    assert np.array_equal(np.array(chart(at, "grid_chart_0")["data"][0]["z"]), codes)
    at.number_input(key="edit_row").set_value(1).run()
    at.number_input(key="edit_col").set_value(5).run()
    sel = at.selectbox(key="edit_code_0_1_5")
    assert sel.options[0].startswith(f"code {codes[1, 5]} ")                 # the current code first
    sel.select_index(len(sel.options) - 1).run()
    ok(at)
    chosen = int(at.selectbox(key="edit_code_0_1_5").value)
    assert images(at)[0].shape == ((28 + 4) * 6, (3 * 30 + 2) * 6, 3)       # original, decoded, edited
    at.button(key="edit_keep").click().run()
    ok(at)
    z = np.array(chart(at, "grid_chart_0")["data"][0]["z"])
    assert z[1, 5] == chosen and (z != codes).sum() == (chosen != codes[1, 5])


def test_tab_code_gallery_shows_the_codes_usage(env):
    from sqvae_core.evaluate import evaluate_model
    model, x = tiny(env)
    usage = evaluate_model(model, x)["usage"]
    at = app("explore", explore_tab="Code gallery")
    ok(at)
    assert at.number_input(key="gallery_code").value == int(np.argmax(usage))      # the most used code first
    assert at.metric[0].value == str(max(usage))
    code = int(np.argsort(usage)[-2])
    at.number_input(key="gallery_code").set_value(code).run()
    ok(at)
    assert at.metric[0].value == str(usage[code])


def test_tab_prior_samples_one_column_per_class_and_a_new_seed_changes_them(env):
    at = app("explore", explore_tab="Prior samples")
    ok(at)
    first = cells(images(at)[0], 2, 10)                     # every class: 10 columns, 2 rows
    at.button(key="prior_regen").click().run()
    ok(at)
    assert at.session_state["prior_seed"] == 1
    assert not np.array_equal(first, cells(images(at)[0], 2, 10))


def test_results_of_other_weights_are_not_shown_as_this_models(env):
    """A run given its eval.json and prior at its best-validation weights (scripts/finish_bundles.py
    writes both beside the run) while the app loads its last weights: the Prior tab says the samples
    are not this model's, and eval.json's figures are not shown as this model's. Every shipped
    bundle's eval.json and prior belong to its weights."""
    from app import runs
    b = env["ck"] / "tiny"
    try:
        rundir.atomic_write_json(b / "prior.json", {"steps": 10, "weights_step": 40})
        at = app("explore", explore_tab="Prior samples")
        ok(at)
        assert any("step-40 weights" in w.value for w in at.warning)
        rundir.atomic_write_json(b / "eval.json", {"test_mse": 1.0, "weights_step": 40})
        assert runs.read_eval(rundir.Weights(b)) is None
        rundir.atomic_write_json(b / "eval.json", {"test_mse": 1.0})      # no weights_step: the last weights'
        assert runs.read_eval(rundir.Weights(b)).test_mse == 1.0
    finally:
        for name in ("prior.json", "eval.json"):
            (b / name).unlink(missing_ok=True)
    at = app("explore", explore_tab="Prior samples")
    ok(at)
    assert not at.warning
    shipped = [d for d in (ROOT / "checkpoints").iterdir() if (d / "eval.json").is_file()]
    assert len(shipped) >= 10
    for d in shipped:
        assert runs.read_eval(rundir.Weights(d)) is not None and runs.prior_mismatch(rundir.Weights(d)) is None, d.name


@pytest.mark.slow
def test_a_run_is_explored_at_its_last_or_its_best_validation_weights(env):
    """A run whose best-validation weights are from another step than its last ones: Explore
    offers both, and the choice loads best.safetensors (other reconstructions; the card names the
    file). eval.json counts only for the weights it was made from."""
    from app import runs
    run = env["ck"] / "tiny_best"
    try:
        make_bundle(run, seed=5)
        last = rundir.load_weights(run / "model.safetensors")[0]
        rundir.save_weights(run / "model.safetensors", last, {"step": "50"})
        best = build_model(ModelConfig(kind="gaussian_1", codebook_size=16, code_dim=16, num_rb=1)).state_dict()
        rundir.save_weights(run / "best.safetensors", best, {"step": "30", "best_by": "loss"})
        at = app("explore", bundle="checkpoints/tiny_best", explore_tab="Reconstructions")
        ok(at)
        radio = at.radio(key="weights")
        assert radio.value == "last" and radio.options == ["last (step 50)", "lowest validation loss (step 30)"]
        shown_last = images(at)[0]
        assert any("`model.safetensors`" in c.value for c in at.caption)
        radio.set_value("best").run()
        ok(at)
        assert not np.array_equal(images(at)[0], shown_last)
        assert any("`best.safetensors`" in c.value for c in at.caption)
        rundir.atomic_write_json(run / "eval.json", {"test_mse": 2.5, "weights_step": 30})
        assert runs.stored_evaluation(rundir.Weights(run, "best"), 16)["mse"] == 2.5
        assert runs.stored_evaluation(rundir.Weights(run), 16) is None
        rundir.save_weights(run / "model.safetensors", last)           # weights without a step (imported, old)
        at = app("explore", bundle="checkpoints/tiny_best")
        ok(at)
        assert at.radio(key="weights").options[0] == "last (step not recorded)"
        at = app("explore", bundle="checkpoints/tiny")       # no best.safetensors: nothing to choose
        ok(at)
        assert not at.radio
    finally:
        import shutil
        shutil.rmtree(run, ignore_errors=True)


def test_tab_metrics_plots_the_runs_metrics_jsonl(env):
    at = app("explore", explore_tab="Metrics")
    ok(at)
    loss = chart(at, "m_loss")["data"][0]
    assert loss["x"] == [10, 20, 30, 40, 50] and loss["y"] == [90.0, 80.0, 70.0, 60.0, 50.0]
    panels = {t["name"]: t for t in chart(at, "m_ppl")["data"]}
    assert panels["dead codes (val)"]["y"] == [3] and panels["dead codes (val)"]["yaxis"] == "y2"
    csv = [b for b in at.get("download_button") if b.proto.label == "Download metrics CSV"][0]
    assert len(media(csv.proto.url).decode().strip().splitlines()) == 1 + 6      # header + every row


def test_explore_bundle_switch_reruns(env):
    at = app("explore")
    at.selectbox(key="bundle").set_value("checkpoints/tiny_vq").run()
    ok(at)
    assert card_of(at)["Kind"] == "vq"


def test_explore_corrupt_bundle_is_an_error_not_a_crash(env):
    at = app("explore")
    at.selectbox(key="bundle").set_value("checkpoints/zz_broken").run()
    ok(at)
    assert at.error and not card_of(at) and not at.tabs
    at.selectbox(key="bundle").set_value("checkpoints/tiny").run()      # and the app keeps working
    ok(at)
    assert not at.error and plotly_count(at) >= 1 and card_of(at)["Kind"] == "gaussian_1"


def test_explore_no_bundles(env, tmp_path, monkeypatch):
    monkeypatch.setenv("SQVAE_CHECKPOINTS", str(tmp_path / "none"))
    monkeypatch.setenv("SQVAE_RUNS", str(tmp_path / "none_runs"))
    at = app("explore")
    ok(at)
    assert any("python -m sqvae_core train" in i.value for i in at.info)
    assert at.button(key="train_demo").label == "Train a demo model"


def test_run_query_param_opens_that_bundle_and_ignores_unknown_ones(env):
    """/?run=LABEL (a shared link, benchmarks/app_load.py) opens Explore on that bundle; a label
    that is not listed (or hostile) falls back to the first shipped bundle."""
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=TIMEOUT)
    at.query_params["run"] = "checkpoints/tiny_vq"
    at.run()
    ok(at)
    assert card_of(at)["Kind"] == "vq"
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=TIMEOUT)
    at.query_params["run"] = "../../etc"
    at.run()
    ok(at)
    assert card_of(at)["Kind"] == "gaussian_1" and at.selectbox(key="bundle").value == "checkpoints/tiny"


def test_demo_mode_query_param(env):
    at = AppTest.from_file(str(PAGES / "compare.py"), default_timeout=TIMEOUT)
    at.session_state["cmp_runs"] = ["checkpoints/tiny"]
    at.query_params["demo"] = "1"
    at.run()
    ok(at)
    assert at.toggle(key="demo_mode").value is True
    spec = chart(at, "cmp_chart")
    assert spec["layout"]["paper_bgcolor"] == "#000" and spec["layout"]["colorway"][0] == "#00e5ff"


def _zip_dir(src: Path, folder: str = "mybundle/", extra: dict | None = None) -> bytes:
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(src.iterdir()):
            if f.is_file():
                z.write(f, folder + f.name)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def test_sidebar_upload_of_a_bundle_zip(env):
    """The sidebar uploader unpacks a valid .zip into RUNS/uploads/ (only the bundle's files, no
    path escapes) and the new bundle shows in the list; garbage gets "Upload refused" and the page
    stays up."""
    uploads = env["runs"] / "uploads"
    before = set(uploads.iterdir()) if uploads.is_dir() else set()
    at = app("explore")
    ok(at)
    data = _zip_dir(env["ck"] / "tiny", extra={"../../escape.py": "print('pwned')"})
    at.sidebar.file_uploader[0].set_value(("my bundle.zip", data, "application/zip")).run()
    ok(at)
    assert any("Uploaded as `runs/uploads/my_bundle-" in s.value for s in at.success), [s.value for s in at.success]
    new = set(uploads.iterdir()) - before
    assert len(new) == 1
    dest = new.pop()
    assert (dest / "model.safetensors").is_file() and not (env["base"] / "escape.py").exists()
    assert not list(env["base"].rglob("escape.py"))
    at.run()
    assert f"runs/uploads/{dest.name}" in at.selectbox(key="bundle").options
    at.selectbox(key="bundle").set_value(f"runs/uploads/{dest.name}").run()
    ok(at)
    assert card_of(at)["Kind"] == "gaussian_1"

    at2 = app("explore")
    at2.sidebar.file_uploader[0].set_value(("junk.zip", b"PK\x03\x04 not really a zip", "application/zip")).run()
    ok(at2)
    assert any("Upload refused" in e.value and "not a valid .zip" in e.value for e in at2.error), \
        [e.value for e in at2.error]
    assert set(uploads.iterdir()) - before == {dest}        # nothing left behind by the refused one
    assert plotly_count(at2) >= 1                            # the page is still there


def test_sidebar_import_of_an_official_checkpoint_and_its_yaml(env, tmp_path):
    """The second sidebar uploader takes the official trainer's pair (checkpoint + YAML) and imports it
    like `sqvae import-official` into RUNS/uploads/; one file waits for the other; a pickle is refused
    without being run and leaves nothing behind."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_import_official import official_yaml, our_equivalent, write_official
    from test_prior import _Evil                       # unpickling it would create the marker file
    ckpt, yaml_path = write_official(tmp_path, our_equivalent("FashionMNIST", "gaussian_1", 16, 8, 1),
                                     official_yaml("FashionMNIST", "gaussian_1", 16, 8, 1))
    uploads = env["runs"] / "uploads"

    def listing():
        return set(uploads.iterdir()) if uploads.is_dir() else set()
    before = listing()
    pair = [("best.pt", ckpt.read_bytes(), "application/octet-stream"),
            ("fmnist g1.yaml", yaml_path.read_bytes(), "application/x-yaml")]
    at = app("explore")
    importer = at.sidebar.file_uploader(key="official_upload")
    importer.set_value(pair[:1]).run()
    ok(at)
    assert any("Add exactly two files" in i.value for i in at.info) and listing() == before
    at.sidebar.file_uploader(key="official_upload").set_value(pair).run()
    ok(at)
    assert any("Imported as `runs/uploads/fmnist_g1-" in s.value for s in at.success), [e.value for e in at.error]
    new = listing() - before
    assert len(new) == 1
    dest = new.pop()
    doc = rundir.read_json(dest / "config.json", "config.json")
    assert doc["source"] == "official" and doc["official"]["checkpoint"] == "best.pt"
    assert rundir.load_bundle(dest).model_cfg.codebook_size == 16

    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save({"x": _Evil(str(marker))}, evil)
    at2 = app("explore")
    at2.sidebar.file_uploader(key="official_upload").set_value(
        [("evil.pt", evil.getvalue(), "application/octet-stream"), pair[1]]).run()
    ok(at2)
    assert any("Import refused" in e.value and "weights_only=True" in e.value for e in at2.error), \
        [e.value for e in at2.error]
    assert not marker.exists() and listing() - before == {dest}
    assert not [p for p in uploads.iterdir() if p.name.startswith(".")]       # no temp dir left


def test_hostile_run_labels_are_refused(env):
    from app import runs
    for bad in ("runs/../etc", "runs/a/../../b", "elsewhere/x", "runs/.hidden", "checkpoints/a b"):
        with pytest.raises(ValueError):
            runs.resolve_label(bad)
    assert runs.resolve_label("checkpoints/tiny").path == env["ck"] / "tiny"


# ------------------------------------------------------------------------------ Train
def test_train_page_lists_failed_and_interrupted_runs(env):
    at = app("train", watch="failed-run")
    ok(at)
    assert any("loss became nan at step 7" in e.value for e in at.error)
    at.selectbox(key="watch").set_value("crashed").run()
    ok(at)
    assert "interrupted" in md(at)
    assert at.button(key="resume_crashed").label == "Resume"


def start_training(at: AppTest, name: str, steps: int, compile_: str = "auto", amp: bool = False):
    """Fill the Train page's form for a tiny gaussian_1 (K=16, d=16, 1 block) and submit it."""
    at.selectbox(key="f_kind").set_value("gaussian_1")
    at.selectbox(key="f_compile").set_value(compile_)
    at.checkbox(key="f_amp").set_value(amp)
    at.text_input(key="f_name").set_value(name)
    for key, value in (("f_k", 16), ("f_d", 16), ("f_steps", steps), ("f_num_rb", 1), ("f_val_max_images", 200)):
        at.number_input(key=key).set_value(value)
    [b for b in at.button if b.label == "Start training"][0].click().run()
    ok(at)


@pytest.mark.slow
def test_train_start_runs_a_real_subprocess_to_finished(env):
    at = app("train")
    ok(at)
    start_training(at, "tiny-live", 20, amp=True)
    assert any("tiny-live" in s.value for s in at.success)
    run = env["runs"] / "tiny-live"
    st = wait_state(run, ("finished", "failed"), 80)
    assert st["state"] == "finished", st
    from sqvae_core.device import cpu_has_native_bf16      # the form's bf16 box: --amp, or fp32 and why
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["amp"] is cpu_has_native_bf16() and ("amp_fallback" in config) is not cpu_has_native_bf16()
    at.run()
    ok(at)
    assert "finished" in md(at)
    assert plotly_count(at) >= 4                        # live curves from metrics.jsonl
    reg = json.loads((env["runs"] / ".sqvae_jobs.json").read_text())
    assert "tiny-live" in reg["jobs"]


@pytest.mark.slow
def test_train_stop_long_run_and_queue(env):
    at = app("train")
    start_training(at, "long-run", 1_000_000, compile_="off")   # auto would compile first: this test stops it
    run = env["runs"] / "long-run"
    wait_state(run, ("running",), 60)
    assert json.loads((run / "config.json").read_text())["train"]["compile"] is False   # the form's "off"
    # a second job waits in the persisted queue (cap 1) and can be removed from it
    jm = _jm(env["runs"])
    assert jm.submit("waiting", {"model": "vq", "steps": 10}) == "queued"
    assert [q["name"] for q in json.loads((env["runs"] / ".sqvae_jobs.json").read_text())["queue"]] == ["waiting"]
    assert jm.job_state("waiting")["state"] == "queued"
    assert jm.stop("waiting") == "dequeued"
    at.run()
    assert at.selectbox(key="watch").value == "long-run"
    at.button(key="stop_long-run").click().run()
    ok(at)
    st = wait_state(run, ("stopped", "failed", "finished"), 60)
    assert st["state"] == "stopped", st
    t0 = time.time()
    while jm.is_running("long-run") and time.time() - t0 < 20:      # the pump thread reaps the child
        time.sleep(0.3)                                 # (1.5 s was too short on a loaded 2-core box)
    assert not jm.is_running("long-run")
    pid = st["pid"]
    with pytest.raises(ProcessLookupError):             # reaped: no zombie left behind
        os.kill(pid, 0)
    at.run()
    ok(at)
    step = st["step"]
    at.button(key="resume_long-run").click().run()       # --resume from the checkpoint
    ok(at)
    t0 = time.time()
    while time.time() - t0 < 60:
        st2 = json.loads((run / "status.json").read_text())
        if st2["state"] == "running" and st2["pid"] != pid:
            break
        time.sleep(0.5)
    assert st2["state"] == "running" and st2["pid"] != pid, st2
    assert "--resume" in (run / "train.log").read_text()
    assert jm.stop("long-run") == "stopping"
    st3 = wait_state(run, ("stopped", "failed", "finished"), 60)
    assert st3["state"] == "stopped" and st3["step"] >= step, (st3, step)
    t0 = time.time()
    while jm.is_running("long-run") and time.time() - t0 < 20:      # reaped by the pump thread
        time.sleep(0.3)
    assert not jm.is_running("long-run")


# ---------------------------------------------------------------------------- Compare
def test_compare_curves_table_and_metric_switch(env):
    at = app("compare", cmp_runs=["checkpoints/tiny", "checkpoints/tiny_vq"])
    ok(at)
    assert plotly_count(at) == 1
    assert len(at.dataframe) == 1
    assert at.selectbox(key="cmp_metric").value == "val_perplexity"
    at.selectbox(key="cmp_metric").set_value("loss").run()
    ok(at)
    assert at.selectbox(key="cmp_metric").value == "loss"


def test_compare_sweep_validation_and_race_enqueue(env):
    at = app("compare", compare_tab="Sweep")
    ok(at)
    at.text_area(key="sw_grid").set_value("lr=0.001,fast")
    [b for b in at.button if b.label == "Start sweep"][0].click().run()
    ok(at)
    assert [e.value for e in at.error] == ["Sweep: --grid lr: 'fast' is not a number"]
    at.text_area(key="sw_grid").set_value("model=vq,gaussian_1\nlr=-0.1")
    [b for b in at.button if b.label == "Start sweep"][0].click().run()
    assert any("learning rate must be a positive number" in e.value for e in at.error)
    assert not list(env["runs"].glob("sweep-*"))           # refused before any process started
    # the collapse race: three jobs, one running and two queued on a CPU (cap 1); then cleaned up
    at.session_state["compare_tab"] = "Collapse race"
    at.run()
    at.number_input(key="race_steps").set_value(3)
    at.button(key="race_start").click().run()
    ok(at)
    jm = _jm(env["runs"])
    stamp = at.session_state["race"]
    names = [f"race-{stamp}-{k}" for k in ("gaussian_1", "vq", "fsq")]   # the default: SQ-VAE, VQ-VAE, FSQ
    states = [jm.job_state(n)["state"] for n in names]
    assert states.count("queued") == 2, states
    assert len([m for m in at.metric]) == 3
    assert [jm.stop(n) for n in names[1:]] == ["dequeued", "dequeued"]
    jm.stop(names[0])
    t0 = time.time()
    while jm.is_running(names[0]) and time.time() - t0 < 60:
        time.sleep(0.5)
    assert not jm.is_running(names[0])


def test_race_takes_the_kinds_chosen_and_offers_all_kinds(env, monkeypatch):
    # an earlier race started in the same second, of another kind: the new race must get its own stamp
    # (CI once merged the two, as a race's stamp was only checked against the new kinds' directories)
    make_bundle(env["runs"] / "race-20260101-000000-gaussian_1")
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")
    at = app("compare", compare_tab="Collapse race")
    ok(at)
    assert at.multiselect(key="race_kinds").value == ["gaussian_1", "vq", "fsq"]
    at.button(key="race_all").click().run()
    ok(at)
    every = at.multiselect(key="race_kinds").value
    assert {"fsq", "lfq", "simvq", "vq_rotation", "gaussian_1", "vmf"} <= set(every) and "vae" not in every
    at.multiselect(key="race_kinds").set_value(["simvq", "lfq"])
    at.number_input(key="race_steps").set_value(3)
    at.button(key="race_start").click().run()
    ok(at)
    jm = _jm(env["runs"])
    stamp = at.session_state["race"]
    assert stamp == "20260101-000000-2"
    names = [f"race-{stamp}-{k}" for k in ("lfq", "simvq")]      # catalogue order, whatever the pick order
    assert [jm.job_state(n)["state"] for n in names].count("queued") == 1
    assert [m.label for m in at.metric] == ["LFQ (lookup-free quantization)", "SimVQ"]
    assert jm.stop(names[1]) == "dequeued"
    jm.stop(names[0])
    t0 = time.time()
    while jm.is_running(names[0]) and time.time() - t0 < 60:
        time.sleep(0.5)
    assert not jm.is_running(names[0])
    at.multiselect(key="race_kinds").set_value([])
    at.button(key="race_start").click().run()
    assert any("at least one kind" in e.value for e in at.error)


def make_sweep(out: Path) -> None:
    """A sweep directory as `sqvae sweep` leaves it: sweep.json and one run directory per trial."""
    trials = []
    for i, (lr, model, state, val) in enumerate([(0.001, "gaussian_1", "finished", 40.0), (0.002, "vq", "stopped", 90.0),
                                                 (0.004, "vq", "running", None)]):
        name = f"t{i:03d}_lr-{lr}_model-{model}"
        make_bundle(out / name, kind=model, seed=i, state="stopped" if state == "stopped" else "finished")
        rows = [json.loads(ln) for ln in (out / name / "metrics.jsonl").read_text().splitlines()]
        if val is None:
            rows = [r for r in rows if "val_mse" not in r]
        else:
            rows[-1]["val_mse"] = val
        (out / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        trials.append({"name": name, "params": {"lr": lr, "model": model}, "state": state, "node": f"{i}a" * 28,
                       "metrics": {"step": 50, "val_mse": val, "val_perplexity": 7.5} if val else None,
                       "error": "stopped by the asha scheduler at step 50" if state == "stopped" else None,
                       "failures": 0})
    doc = {"spec": {"grid": {"lr": [0.001, 0.002, 0.004], "model": ["gaussian_1", "vq"]}, "search": "random",
                    "scheduler": "asha", "metric": "val_mse", "mode": "min"},
           "state": "finished", "pid": None, "trials": trials}
    (out / "sweep.json").write_text(json.dumps(doc))


def test_sweep_resume_command_is_the_same_sweep(tmp_path):
    """Compare's Resume rebuilds the command from sweep.json's spec: the same sweep (identity), so
    `sqvae sweep` continues it instead of refusing it as another one."""
    from dataclasses import asdict

    from app import sweeps
    from sqvae_core.cli import build_parser
    from sqvae_core.sweep import SweepSpec
    argv = ["sweep", "--out", str(tmp_path / "s"), "--grid", "lr=0.0005,0.002", "--grid", "model=vq,gaussian_1",
            "--scheduler", "asha", "--grace", "2", "--samples", "2", "--steps", "40", "--no-arelbo", "--no-compile",
            "--data-dir", str(tmp_path), "--max-concurrent", "3"]
    spec = SweepSpec.from_args(build_parser().parse_args(argv)).validate()
    doc_spec = json.loads(json.dumps(asdict(spec)))
    again = SweepSpec.from_args(build_parser().parse_args(sweeps.spec_argv(doc_spec, tmp_path / "s")[3:]))
    assert again.identity() == spec.identity() and again.max_concurrent == 3


def test_compare_sweep_tab_shows_a_sweep_directory(env):
    make_sweep(env["runs"] / "sw-demo")
    at = app("compare", compare_tab="Sweep", sw_pick="sw-demo")
    ok(at)
    assert not at.error, [e.value for e in at.error]
    assert at.selectbox(key="sw_pick").value == "sw-demo"
    (table,) = at.dataframe
    df = table.value
    assert list(df["trial"]) == ["t000_lr-0.001_model-gaussian_1", "t001_lr-0.002_model-vq", "t002_lr-0.004_model-vq"]
    assert list(df["state"]) == ["finished", "stopped", "running"]
    assert list(df["lr"]) == [0.001, 0.002, 0.004] and list(df["node"])[0] == "0a" * 4
    assert list(df["val_mse"])[:2] == [40.0, 90.0]
    assert df["explore"][0] == "./?run=runs/sw-demo/t000_lr-0.001_model-gaussian_1"
    assert "asha" in df["note"][1]
    # every trial is a run the other pages list (runs/<sweep>/<trial>)
    from app import runs as app_runs
    assert {r.label for r in app_runs.list_bundles(("runs",))} >= {f"runs/sw-demo/{n}" for n in df["trial"]}
    par = chart(at, "sw_parallel")
    assert [d["label"] for d in par["data"][0]["dimensions"]] == ["lr", "model", "val_mse"]
    curves = chart(at, "sw_curves")
    assert [t["name"] for t in curves["data"]] == ["t000_lr-0.001_model-gaussian_1",
                                                   "t001_lr-0.002_model-vq (stopped)"]
    assert curves["data"][1]["line"]["dash"] == "dash"
    at.selectbox(key="sw_view_metric").set_value("val_perplexity").run()
    ok(at)
    assert chart(at, "sw_parallel")["data"][0]["dimensions"][-1]["label"] == "val_perplexity"
    assert not [b for b in at.button if b.label == "Stop sweep"]          # not running: nothing to stop


@pytest.mark.parametrize("label", ["checkpoints/tiny_vmf", "checkpoints/tiny_vae"])
def test_explore_other_model_families(env, label):
    at = app("explore", bundle=label)
    ok(at)
    assert not at.error, [e.value for e in at.error]
    for tab in ("Codebook usage", "Neighbor-k", "Interpolate", "Edit codes", "Code gallery", "Metrics"):
        at.session_state["explore_tab"] = tab
        at.run()
        ok(at)
        assert not at.error, (tab, [e.value for e in at.error])
    if label.endswith("vae"):
        assert any("continuous VAE has no codebook" in i.value for i in at.info)


@pytest.mark.parametrize("kind", ["fsq", "simvq"])
def test_explore_every_tab_of_a_modern_kind(env, kind):
    """FSQ and SimVQ bundles: every Explore tab works on their effective codebook (FSQ's projected grid
    of levels, SimVQ's transformed codebook), and the card names the kind by its catalogue label."""
    run = env["ck"] / f"tiny_{kind}"
    try:
        make_bundle(run, kind=kind, seed=6)
        at = app("explore", bundle=f"checkpoints/tiny_{kind}")
        ok(at)
        assert not at.error, [e.value for e in at.error]
        assert any(KINDS[kind].label in c.value for c in at.caption)
        for tab in ("Codebook usage", "Neighbor-k", "Interpolate", "Edit codes", "Code gallery", "Metrics"):
            at.session_state["explore_tab"] = tab
            at.run()
            ok(at)
            assert not at.error, (tab, [e.value for e in at.error])
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_read_only_dashboard_draws_no_control_and_its_functions_refuse(env, monkeypatch, tmp_path):
    """SQVAE_READ_ONLY=1: Train live shows runs but no start form, one-click runs, Stop or Resume; the
    race no start; the sidebar no uploader; and JobManager and the upload path refuse by themselves."""
    from app import settings, ui
    from app.jobs import JobManager
    monkeypatch.setenv("SQVAE_READ_ONLY", "1")
    at = app("train", watch="crashed")          # an interrupted run: Resume would be offered
    ok(at)
    labels = {b.label for b in at.button}
    assert not labels & {"Start training", "Stop", "Resume", "SQ-VAE (Gaussian I)", "FSQ"}, labels
    assert any("Read-only dashboard" in i.value for i in at.info)
    assert len(at.sidebar.file_uploader) == 0 and any("Read-only" in c.value for c in at.sidebar.caption)
    at = app("compare", compare_tab="Collapse race")
    ok(at)
    assert not {"Start the race", "All kinds"} & {b.label for b in at.button}
    make_sweep(tmp_path / "sw")
    at = app("compare", compare_tab="Sweep")
    ok(at)
    assert not {"Start sweep", "Stop sweep", "Resume sweep"} & {b.label for b in at.button}
    from app import sweeps
    for action in (lambda: sweeps.start(tmp_path / "sw2", {"lr": [0.001]}, {}), lambda: sweeps.stop(tmp_path / "sw"),
                   lambda: sweeps.resume(tmp_path / "sw")):
        with pytest.raises(settings.ReadOnlyError, match="sweep"):
            action()
    jm = JobManager(tmp_path / "runs", 1, start_thread=False)
    for action in (lambda: jm.submit("x", {"model": "vq"}), lambda: jm.start_demo("fsq"),
                   lambda: jm.resume("crashed"), lambda: jm.stop("crashed")):
        with pytest.raises(settings.ReadOnlyError, match=r"read-only \(SQVAE_READ_ONLY=1\)"):
            action()
    assert not (tmp_path / "runs" / "x").exists()
    with pytest.raises(settings.ReadOnlyError, match="uploading a bundle"):
        settings.refuse_if_read_only("uploading a bundle")
    monkeypatch.setenv("SQVAE_READ_ONLY", "0")
    assert not settings.read_only() and ui.settings.read_only() is False
    at = app("train")
    ok(at)
    assert {"Start training", "FSQ"} <= {b.label for b in at.button}


def test_jobs_are_stopped_when_the_app_exits(tmp_path):
    """A JobManager's atexit handler SIGTERMs its running trainings: they end "stopped", no orphans.
    The trainings run under nice 10 (SQVAE_JOB_NICE)."""
    runs = tmp_path / "runs"
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
from app.jobs import JobManager
jm = JobManager({str(runs)!r}, 1)
jm.submit("orphan", {{"model": "gaussian_1", "codebook_size": 16, "code_dim": 16, "num_rb": 1, "steps": 10**6,
                      "val_max_images": 100, "compile": "off"}})
t0 = time.time()
while time.time() - t0 < 60:
    try:
        if json.loads(open({str(runs / "orphan" / "status.json")!r}).read())["state"] == "running":
            break
    except (OSError, ValueError):
        pass
    time.sleep(0.3)
pid = jm.job_state("orphan")["pid"]
stat = open(f"/proc/{{pid}}/stat").read()
print("nice", stat[stat.rindex(")") + 2:].split()[16], "threads", stat[stat.rindex(")") + 2:].split()[17])
print(pid)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, SQVAE_OFFLINE="1"))
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[-1])
    assert "nice 10 " in out.stdout, out.stdout      # trainings run niced: the pages keep the CPU first
    st = json.loads((runs / "orphan" / "status.json").read_text())
    assert st["state"] == "stopped", st
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.slow
def test_every_shipped_bundle_opens_in_explore(monkeypatch, tmp_path):
    """Issue 7: each bundle in checkpoints/ opens from /?run=checkpoints/NAME with its model card,
    its codebook map (none for the continuous VAE) and its reconstructions, and no error; the
    colour bundle's pictures are RGB, the grey ones' grey."""
    shipped = ROOT / "checkpoints"
    names = sorted(p.name for p in shipped.iterdir() if (p / "config.json").is_file())
    assert len(names) == 12 and {"fsq", "simvq"} <= set(names), names
    monkeypatch.setenv("SQVAE_CHECKPOINTS", str(shipped))
    monkeypatch.setenv("SQVAE_RUNS", str(tmp_path / "runs"))
    for name in names:
        at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=TIMEOUT)
        at.query_params["run"] = f"checkpoints/{name}"
        at.run()
        at.run()                 # the progressive first paint, then the full page
        ok(at)
        assert not at.error, (name, [e.value for e in at.error])
        kind = json.loads((shipped / name / "config.json").read_text())["model"]["kind"]
        assert card_of(at)["Kind"] == kind, name
        assert plotly_count(at) == (0 if kind == "vae" else 1), name
        assert len(at.get("image")) >= 1, name
        channels = json.loads((shipped / name / "config.json").read_text())["model"]["image_channels"]
        assert all((img.ndim == 3 and img.shape[2] == 3) == (channels == 3) for img in images(at)), name


FIRST_PAINT = """
import json, sys
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=60)
at.query_params["run"] = sys.argv[2]
at.run()
assert not at.exception, [e.value for e in at.exception]
spec = json.loads(at.get("plotly_chart")[0].proto.spec)
print(json.dumps({"torch": "torch" in sys.modules, "tabs": len(at.tabs), "charts": len(at.get("plotly_chart")),
                  "title": spec["layout"]["title"]["text"], "data": spec["data"],
                  "card": [h.proto.body for h in at.get("html") if "sq-card" in h.proto.body]}))
"""


def test_first_paint_comes_from_the_bundles_files_before_torch_is_imported(tmp_path):
    """Explore's first run on a shipped bundle draws its card (eval.json) and its UMAP map
    (umap.json, coloured by eval.json's usage) without importing torch; the map is the one the
    model itself gets from sqvae_core.explore.cached_codebook_map."""
    import shutil
    from sqvae_core import explore
    ck = tmp_path / "checkpoints"
    shutil.copytree(ROOT / "checkpoints" / "gaussian_4", ck / "gaussian_4")
    env = dict(os.environ, SQVAE_CHECKPOINTS=str(ck), SQVAE_RUNS=str(tmp_path / "runs"), SQVAE_APP_UMAP="1")
    out = subprocess.run([sys.executable, "-c", FIRST_PAINT, str(PAGES / "explore.py"), "checkpoints/gaussian_4"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] is False and got["tabs"] == 0 and got["charts"] == 1
    assert got["title"] == "Codebook map (UMAP)"
    stored = json.loads((ck / "gaussian_4" / "eval.json").read_text())
    painted = {c[0]: (x, y) for t in got["data"] for c, x, y in zip(t["customdata"], t["x"], t["y"])}
    dead = [c[0] for t in got["data"] if t["name"].startswith("dead") for c in t["customdata"]]
    assert dead == [c for c, u in enumerate(stored["usage"]) if u == 0] and len(dead) == stored["dead_codes"]
    model = rundir.load_bundle(ck / "gaussian_4").model
    own = explore.cached_codebook_map(ck / "gaussian_4", model, torch.tensor(stored["usage"]), method="umap")
    assert all(painted[p["code"]] == (p["x"], p["y"]) for p in own) and len(painted) == len(own) == 256
    card = parse_card(got["card"][0])
    assert math.isclose(float(card["Test MSE"]), stored["test_mse"], rel_tol=1e-3) and int(card["Dead codes"]) == stored["dead_codes"]


def test_explore_opens_on_the_best_gaussian_sq_vae_bundle(tmp_path, monkeypatch):
    """Rule: the shipped Gaussian SQ-VAE (I-IV) with the lowest test MSE in eval.json; without one,
    the first shipped bundle; checked on made-up bundles, then on the shipped ones' eval.json."""
    from app import runs
    for name, kind, mse in (("a_fixed", "fixed_var", 5.0), ("b_vq", "vq", 1.0), ("g1", "gaussian_1", 9.0),
                            ("g4", "gaussian_4", 8.0), ("g2", "gaussian_2", None)):
        d = tmp_path / "ck" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model": {"kind": kind, "codebook_size": 4}}))
        if mse is not None:
            (d / "eval.json").write_text(json.dumps({"test_mse": mse}))
    monkeypatch.setenv("SQVAE_CHECKPOINTS", str(tmp_path / "ck"))
    monkeypatch.setenv("SQVAE_RUNS", str(tmp_path / "runs"))
    assert runs.default_label(runs.list_bundles()) == "checkpoints/g4"
    (tmp_path / "ck" / "g4" / "eval.json").unlink()
    assert runs.default_label(runs.list_bundles()) == "checkpoints/g1"
    monkeypatch.setenv("SQVAE_CHECKPOINTS", str(ROOT / "checkpoints"))
    shipped = {d.name: json.loads((d / "eval.json").read_text()) for d in (ROOT / "checkpoints").iterdir()
               if (d / "eval.json").is_file()}
    best = min((e["test_mse"], name) for name, e in shipped.items() if e["kind"].startswith("gaussian_"))[1]
    assert runs.default_label(runs.list_bundles()) == f"checkpoints/{best}"


def test_app_preset_choices_are_the_trainers_presets():
    from app.settings import PRESET_CHOICES
    from sqvae_core.train import PRESETS
    assert set(PRESET_CHOICES) == set(PRESETS) | {"none"}


def test_stored_results_count_unless_the_weights_are_newer(tmp_path, monkeypatch):
    """eval.json and umap.json are used unless the weights were written after them; a fresh clone
    writes a bundle's files a moment apart in any order (eval.json before model.safetensors), which
    must not hide them."""
    import shutil
    from app import runs
    monkeypatch.setenv("SQVAE_APP_UMAP", "1")
    b = tmp_path / "gaussian_4"
    shutil.copytree(ROOT / "checkpoints" / "gaussian_4", b)
    t = b.joinpath("eval.json").stat().st_mtime
    for name in ("eval.json", "umap.json"):
        os.utime(b / name, (t, t))
    os.utime(b / "model.safetensors", (t + 0.01, t + 0.01))          # the clone case
    view = runs.first_view(b)
    stored = json.loads((b / "eval.json").read_text())
    assert view["evaluation"]["dead_codes"] == stored["dead_codes"] and len(view["points"]) == 256
    os.utime(b / "model.safetensors", (t + 60, t + 60))               # retrained after the evaluation
    assert runs.read_eval(rundir.Weights(b)) is None and runs.first_view(b) is None


def test_train_options_become_a_command_line_with_the_compile_switch():
    """The form's options become one argv list: numbers and strings as flag values, the one
    switch `compile` as --compile / --no-compile / nothing (auto); anything else is refused."""
    from app.jobs import train_argv
    argv = train_argv(Path("runs/x"), {"model": "vq", "steps": 30000, "lr": 0.001, "compile": "off"}, python="py")
    assert argv == ["py", "-m", "sqvae_core", "train", "--out", "runs/x", "--model", "vq", "--steps", "30000",
                    "--lr", "0.001", "--no-compile", "--quiet"]
    assert "--compile" in train_argv(Path("r"), {"compile": "on"}) and \
        not any("compile" in a for a in train_argv(Path("r"), {"compile": "auto"}))
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        train_argv(Path("r"), {"compile": "yes"})
    assert train_argv(Path("r"), {"amp": True}, python="py")[-2:] == ["--amp", "--quiet"]
    assert "--amp" not in train_argv(Path("r"), {"amp": False})
    with pytest.raises(ValueError, match="amp must be true or false"):
        train_argv(Path("r"), {"amp": "on"})
    with pytest.raises(ValueError, match="unknown training option"):
        train_argv(Path("r"), {"turbo": 1})
