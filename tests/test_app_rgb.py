"""The app on colour bundles: every Explore tool shows 3-channel images, at 32x32 (8x8 code grid,
CIFAR-10's net) and 64x64 (16x16 grid, CelebA's), and Train live and Compare read colour runs.

Tiny bundles (K=16, d=16, 1 block) over a folder of colour images made here; pages run with
streamlit.testing.v1.AppTest as in test_app.py, whose image helpers are reused."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("streamlit.testing.v1")
from streamlit.testing.v1 import AppTest  # noqa: E402

from sqvae_core import rundir  # noqa: E402
from sqvae_core.config import ModelConfig  # noqa: E402
from sqvae_core.models import build_model  # noqa: E402
from test_app import PAGES, TIMEOUT, app, capture_media, chart, images, ok  # noqa: E402,F401

GRIDS = {"rgb32": 8, "rgb64": 16}       # bundle -> code grid side


def colour_folder(path: Path, n: int = 40, size: int = 64) -> Path:
    """Colour images whose channels differ everywhere: red rises left to right, blue top to bottom."""
    from PIL import Image
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    for i in range(n):
        img = np.stack([xx, np.full_like(xx, rng.uniform(0.3, 0.7)), yy], -1)
        y, x = rng.integers(0, size // 2, 2)
        img[y:y + size // 4, x:x + size // 4] = rng.uniform(0, 1, 3)
        Image.fromarray((img * 255).astype(np.uint8)).save(path / f"{i:03d}.png")
    return path


def make_rgb_bundle(path: Path, size: int, dataset: str, seed: int = 0):
    path.mkdir(parents=True)
    torch.manual_seed(seed)
    cfg = ModelConfig(kind="gaussian_1", codebook_size=16, code_dim=16, num_rb=1, image_channels=3, image_size=size)
    model = build_model(cfg)
    rundir.save_weights(path / "model.safetensors", model.state_dict())
    (path / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "dataset": dataset}))
    rows = [{"step": s, "loss": 900.0 - s, "mse": 60.0 - s / 10, "perplexity": 4 + s / 100, "entropy": 2.0,
             "sigma2_q": 10 / (1 + s), "sigma2_x": 0.1, "temperature": 1.0} for s in range(10, 60, 10)]
    rows.append({"step": 50, "val_mse": 55.0, "val_perplexity": 6.0, "val_dead_codes": 4, "val_entropy": 1.5})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "status.json").write_text(json.dumps({"state": "finished", "step": 50, "error": None}))
    return model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("app_rgb")
    ck, runs = base / "checkpoints", base / "runs"
    dataset = f"folder:{colour_folder(base / 'colour')}"
    from sqvae_core.prior import GatedPixelCNN, PriorConfig, save_prior
    for name, grid in GRIDS.items():
        make_rgb_bundle(ck / name, grid * 4, dataset)
        prior = GatedPixelCNN(PriorConfig(num_codes=16, height=grid, width=grid, hidden=8, layers=2))
        save_prior(prior, ck / name / "prior.safetensors")
    runs.mkdir()
    shutil.copytree(ck / "rgb32", runs / "colour-run")
    keys = ("SQVAE_CHECKPOINTS", "SQVAE_RUNS", "SQVAE_APP_UMAP", "SQVAE_OFFLINE", "SQVAE_APP_EVAL_IMAGES")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(SQVAE_CHECKPOINTS=str(ck), SQVAE_RUNS=str(runs), SQVAE_APP_UMAP="0", SQVAE_OFFLINE="1",
                      SQVAE_APP_EVAL_IMAGES="40")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"ck": ck, "runs": runs, "dataset": dataset}
    torch.set_num_threads(threads)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def colour(img: np.ndarray) -> np.ndarray:
    assert img.ndim == 3 and img.shape[2] == 3, f"a grey image {img.shape} where a colour one belongs"
    return img


def tile(grid: np.ndarray, row: int, col: int, size: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    s, p = size * scale, pad * scale
    return grid[p + row * (s + p):p + row * (s + p) + s:scale, p + col * (s + p):p + col * (s + p) + s:scale]


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_every_explore_tool_shows_colour_images(env, name):
    from sqvae_core.data import load_dataset
    size = GRIDS[name] * 4
    x = load_dataset(env["dataset"], "test", image_size=size, channels=3).images
    first = (x[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)

    at = app("explore", bundle=f"checkpoints/{name}")
    ok(at)
    rec = colour(images(at)[0])
    assert np.array_equal(tile(rec, 0, 0, size), first)          # the test image itself, channels in order
    for tab in ("Neighbor-k", "Interpolate", "Code gallery", "Prior samples"):
        at.session_state["explore_tab"] = tab
        at.run()
        ok(at)
        assert not at.error, (tab, [e.value for e in at.error])
        shown = images(at)
        assert shown, tab
        for img in shown:
            colour(img)
        if tab == "Neighbor-k":
            assert np.array_equal(tile(shown[0], 0, 0, size), first)

    at.session_state["explore_tab"] = "Edit codes"
    at.run()
    ok(at)
    assert np.array(chart(at, "grid_chart_0")["data"][0]["z"]).shape == (GRIDS[name],) * 2
    edit = colour(images(at)[0])                                  # original · decoded · edited, scale 6
    assert edit.shape == ((size + 4) * 6, (3 * (size + 2) + 2) * 6, 3)
    assert np.array_equal(tile(edit, 0, 0, size, scale=6), first)
    from sqvae_core import explore
    model = rundir.load_bundle(env["ck"] / name).model
    row = col = GRIDS[name] // 2                                  # the page's default cell
    t, b, left, r = explore.cell_pixel_box(model, row, col)
    decoded = tile(edit, 0, 1, size, scale=6).astype(int)
    red = (decoded[..., 0] > 240) & (decoded[..., 1] < 40) & (decoded[..., 2] < 40)
    assert red[t, left:r].all() and red[b - 1, left:r].all() and red[t:b, left].all() and red[t:b, r - 1].all()
    assert 0 < t and b < size                                     # the box is inside the image, not the frame


def test_train_live_and_compare_read_a_colour_run(env):
    at = app("train", watch="colour-run")
    ok(at)
    assert not at.error, [e.value for e in at.error]
    loss = [c for c in at.get("plotly_chart") if "loss" in c.proto.spec]
    assert loss and [900.0 - s for s in range(10, 60, 10)] == json.loads(loss[0].proto.spec)["data"][0]["y"]
    at = app("compare", cmp_runs=["checkpoints/rgb32", "checkpoints/rgb64", "runs/colour-run"])
    ok(at)
    assert not at.error, [e.value for e in at.error]
    assert len(at.dataframe[0].value) == 3


def test_explore_opens_on_the_best_gaussian_sq_vae_of_the_main_data_set(tmp_path, monkeypatch):
    """A colour bundle's lower MSE (another data set, another scale) does not make it the landing bundle."""
    from app import runs
    for name, ds, mse in (("a_colour", "folder:colour", 1.0), ("g1", "fashion-mnist", 9.0),
                          ("g4", "fashion-mnist", 8.0)):
        d = tmp_path / "ck" / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model": {"kind": "gaussian_1", "codebook_size": 4}, "dataset": ds}))
        (d / "eval.json").write_text(json.dumps({"test_mse": mse}))
    monkeypatch.setenv("SQVAE_CHECKPOINTS", str(tmp_path / "ck"))
    monkeypatch.setenv("SQVAE_RUNS", str(tmp_path / "runs"))
    assert runs.default_label(runs.list_bundles()) == "checkpoints/g4"
    shutil.rmtree(tmp_path / "ck" / "g1")               # one against one: the first listed data set
    shutil.rmtree(tmp_path / "ck" / "g4")
    assert runs.default_label(runs.list_bundles()) == "checkpoints/a_colour"


@pytest.mark.slow
def test_train_form_starts_a_colour_folder_run(env):
    """Dataset "folder" with a path and an image size under Advanced trains an RGB run of that size."""
    from test_app import _jm, wait_state
    at = app("train")
    ok(at)
    at.selectbox(key="f_dataset").set_value("folder")
    at.selectbox(key="f_kind").set_value("gaussian_1")
    at.text_input(key="f_name").set_value("colour-form")
    at.text_input(key="f_folder").set_value(env["dataset"][len("folder:"):])
    for key, value in (("f_k", 16), ("f_d", 16), ("f_steps", 3), ("f_num_rb", 1), ("f_batch", 8),
                       ("f_val_max_images", 16), ("f_image_size", 16)):
        at.number_input(key=key).set_value(value)
    [b for b in at.button if b.label == "Start training"][0].click().run()
    ok(at)
    assert any("colour-form" in s.value for s in at.success), [e.value for e in at.error]
    try:
        st = wait_state(env["runs"] / "colour-form", ("finished", "failed"), 90)
        assert st["state"] == "finished", st
    finally:
        jm = _jm(env["runs"])
        if jm is not None:
            jm.shutdown(grace=10)
    m = rundir.load_bundle(env["runs"] / "colour-form").model_cfg
    assert (m.image_channels, m.image_size) == (3, 16)
    at = app("train")
    at.selectbox(key="f_dataset").set_value("folder")
    [b for b in at.button if b.label == "Start training"][0].click().run()
    assert any("give the image folder's path" in e.value for e in at.error)
