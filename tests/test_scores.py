"""The prior and explore command lines, and the Table 2 scores, on a trained run."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from sqvae_core import rundir as rd
from sqvae_core.prior import PriorConfig, GatedPixelCNN, save_prior

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None, timeout=600):
    import os
    return subprocess.run([sys.executable, "-m", "sqvae_core", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def run_with_prior(tmp_path_factory):
    """The shipped gaussian_1 bundle with its prior refitted here for 300 steps."""
    run = tmp_path_factory.mktemp("p") / "run"
    shutil.copytree(ROOT / "checkpoints" / "gaussian_1", run)
    for f in ("prior.safetensors", "prior.json"):
        (run / f).unlink()
    r = cli("prior", "train", run, "--steps", "300", "--max-images", "4000", "--json")
    assert r.returncode == 0, r.stderr
    return run, json.loads(r.stdout)


@pytest.mark.slow
def test_prior_beats_unigram_and_uniform_on_test_codes(run_with_prior):
    run, summary = run_with_prior
    print(f"PRIOR: {summary['nll_bits_per_code']:.3f} bits/code, unigram {summary['unigram_bits']:.3f}, "
          f"uniform {summary['uniform_bits']:.3f}")
    assert summary["nll_bits_per_code"] < summary["unigram_bits"] < summary["uniform_bits"]
    assert (run / "prior.safetensors").is_file() and (run / "prior.json").is_file()


@pytest.mark.slow
def test_prior_sample_writes_png_and_json(run_with_prior, tmp_path):
    run, _ = run_with_prior
    out = tmp_path / "s.png"
    r = cli("prior", "sample", run, "--n", "16", "--out", out, "--seed", "3", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["n"] == 16 and res["nll_bits_per_code"] > 0
    img = Image.open(out)
    assert img.size == (8 * 30 + 2, 2 * 30 + 2)   # 8 x 2 tiles of 28 px + 2 px padding
    r2 = cli("prior", "sample", run, "--n", "16", "--out", tmp_path / "t.png", "--seed", "4", "--label", "2")
    assert r2.returncode == 0
    assert out.read_bytes() != (tmp_path / "t.png").read_bytes()


@pytest.mark.slow
def test_prior_train_says_where_its_plateau_fit_stopped(tmp_path):
    """The default fit stops on a validation plateau (or its cap); one stdout line says where and
    why, and prior.json records it with the fit's settings. Bad settings are refused by name."""
    run = tmp_path / "run"
    shutil.copytree(ROOT / "checkpoints" / "gaussian_1", run)
    r = cli("prior", "train", run, "--max-steps", "60", "--eval-every", "20", "--patience", "2",
            "--max-images", "1000", "--hidden", "8", "--layers", "2", "--no-compile", "--no-bf16", "--ema", "0.99")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    m = re.match(r"prior fit stopped at step (\d+) \((plateau|max_steps): .*; kept step (\d+), val NLL", first)
    assert m, first
    doc = json.loads((run / "prior.json").read_text())
    assert {"steps", "best_step", "best_val_nll_bits", "stop_reason", "fit", "message", "history"} <= set(doc)
    assert (doc["steps"], doc["stop_reason"], doc["best_step"]) == (int(m[1]), m[2], int(m[3]))
    assert doc["message"] == first and doc["fit"]["steps"] is None and doc["fit"]["compile"] is False
    assert doc["fit"]["bf16"] is False and doc["precision"] == "fp32" and doc["fit"]["ema"] == 0.99
    assert first.endswith("s, fp32, weights averaged (EMA 0.99)")
    assert doc["fit"]["patience"] == 2 and doc["fit"]["eval_every"] == 20 and doc["fit"]["max_steps"] == 60
    assert doc["best_val_nll_bits"] == min(row["val_nll_bits"] for row in doc["history"])
    r = cli("prior", "train", run, "--patience", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "patience must be in [1, 10000], got 0" in r.stderr
    r = cli("prior", "train", run, "--ema", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "ema must be in [0, 1), got 1.0" in r.stderr


@pytest.mark.slow
def test_prior_errors_are_clear(run_with_prior, trained_run, tmp_path):
    run, _ = run_with_prior
    # a run directory without a model
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("prior", "sample", empty, "--out", tmp_path / "x.png")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "config.json not found" in r.stderr
    # a prior whose K does not match the model's
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    save_prior(GatedPixelCNN(PriorConfig(num_codes=7, height=7, width=7, hidden=8, layers=2)), bad / "prior.safetensors")
    r = cli("prior", "sample", bad, "--out", tmp_path / "x.png")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "7" in r.stderr and "256" in r.stderr
    r = cli("prior", "sample", trained_run, "--out", tmp_path / "x.png")
    assert r.returncode != 0 and "prior train" in r.stderr
    r = cli("prior", "sample", run, "--n", "4", "--out", tmp_path / "x.jpg")
    assert r.returncode != 0 and ".png" in r.stderr


@pytest.mark.slow
def test_explore_cli_umap_neighbor_interpolate(trained_run, tmp_path):
    r = cli("explore", trained_run, "--umap", "--json", "--max-images", "500")
    assert r.returncode == 0, r.stderr
    points = json.loads(r.stdout)
    assert len(points) == 32 and {"code", "x", "y", "usage", "dead"} <= set(points[0])
    assert sum(p["usage"] for p in points) == 500 * 49
    assert all(p["dead"] == (p["usage"] == 0) for p in points)
    assert (trained_run / "umap.json").is_file()
    out = tmp_path / "nb.png"
    r = cli("explore", trained_run, "--image-index", "5", "--neighbor", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size[0] > Image.open(out).size[1]          # original | recon | edit
    out = tmp_path / "int.png"
    r = cli("explore", trained_run, "--interpolate", "1", "2", "--steps", "5", "--out", out)
    assert r.returncode == 0, r.stderr
    r = cli("explore", trained_run, "--image-index", "5", "--neighbor", "999", "--out", out)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    r = cli("explore", trained_run, "--neighbor", "3", "--out", out)
    assert r.returncode != 0 and "--image-index" in r.stderr


def test_score_table_columns(run_with_prior, monkeypatch):
    from sqvae_core.scores import score_run
    from sqvae_core.prior import GatedPixelCNN
    from sqvae_core.scores import bundle_split
    run, _ = run_with_prior
    asked = []
    real_sample = GatedPixelCNN.sample
    monkeypatch.setattr(GatedPixelCNN, "sample", lambda self, n, **kw: asked.append(kw["labels"]) or
                        real_sample(self, n, **kw))
    b = rd.load_bundle(run)
    res = score_run(b, n=300, n_gen=300)       # the shipped feature classifier
    # generation FD: two rounds of 300 samples, sample i drawn with test image i's class
    assert res["n_gen_images"] == 300 and len(asked) == 2
    assert res["fd_generation"] == pytest.approx(sum(res["fd_generation_rounds"]) / 2)
    test_y = bundle_split(b, "test", None, 300)[1]
    assert all(torch.equal(a.cpu(), torch.as_tensor(test_y).long()) for a in asked)
    for key in ("rfd", "fd_generation", "fd_neighbor_3", "fd_neighbor_5", "fd_neighbor_10", "fd_interpolation"):
        assert res[key] >= 0, key
    # reconstructions are closer to the data than Neighbor-10 edits
    assert res["rfd"] < res["fd_neighbor_10"]
    print("SCORES:", {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})
