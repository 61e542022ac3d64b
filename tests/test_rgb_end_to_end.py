"""Colour data through the whole command line, at the paper preset: CIFAR-10 in its real
python-pickle batches format (32x32, official net "32") and a folder of CelebA-sized photos
centre-cropped and resized to 64x64 (official net "64", 6 blocks): train, eval, prior, explore."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sqvae_core import rundir as rd
from sqvae_core.cli import main


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("SQVAE_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SQVAE_DATA", raising=False)


def colour_images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """(n, h, w, 3) uint8: a colour gradient per image plus a bright square, channels differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        img = a * (1 - xx[..., None]) + b * yy[..., None]
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y:y + h // 3, x:x + w // 3] = rng.integers(0, 256, 3)
        out[i] = np.clip(img, 0, 255)
    return out


def write_cifar_batches(root: Path, n: int = 40) -> Path:
    """cifar-10-batches-py/ as the real archive has it: pickled dicts with bytes keys, 'data'
    uint8 (n, 3072) in channel-major order (1024 red, 1024 green, 1024 blue), 'labels' a list."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i, fname in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        imgs = colour_images(n, 32, 32, seed=i)
        batch = {b"batch_label": f"batch {i}".encode(), b"labels": [j % 10 for j in range(n)],
                 b"data": imgs.transpose(0, 3, 1, 2).reshape(n, 3072),
                 b"filenames": [f"{i}_{j}.png".encode() for j in range(n)]}
        with open(d / fname, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return d


def run(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def rgb_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB", f"{path.name} is {im.mode}, not a colour image"
        return np.asarray(im)


def assert_explores_in_colour(capsys, out: Path, tmp_path: Path, test_image: np.ndarray, grid: int):
    """Eval, prior, samples, Neighbor-k and interpolation of a colour run give colour results;
    the Neighbor-k figure starts with the test image itself, channels in order (no grey, no BGR)."""
    ev = json.loads(run(capsys, "eval", str(out), "--json"))
    assert ev["usage"] and sum(ev["usage"]) == ev["n_images"] * grid * grid
    run(capsys, "prior", "train", str(out), "--steps", "2", "--hidden", "16", "--layers", "2", "--json")
    assert (out / "prior.safetensors").is_file()
    run(capsys, "prior", "sample", str(out), "--n", "2", "--out", str(tmp_path / "samples.png"))
    assert rgb_png(tmp_path / "samples.png").shape[2] == 3
    run(capsys, "explore", str(out), "--image-index", "0", "--neighbor", "2", "--out", str(tmp_path / "nb.png"))
    nb = rgb_png(tmp_path / "nb.png")
    s = test_image.shape[0]
    first = nb[8:8 + 4 * s:4, 8:8 + 4 * s:4]          # tile 0 (pad 2, scale 4): the original
    assert np.array_equal(first, test_image)
    run(capsys, "explore", str(out), "--interpolate", "0", "1", "--steps", "3", "--out", str(tmp_path / "ip.png"))
    assert rgb_png(tmp_path / "ip.png").shape == (3 * (2 * (s + 2) + 2), 3 * (3 * (s + 2) + 2), 3)


@pytest.mark.slow
def test_cifar10_paper_preset_end_to_end(tmp_path, capsys):
    write_cifar_batches(tmp_path / "data")
    out = tmp_path / "cifar"
    run(capsys, "train", "--model", "gaussian_1", "--dataset", "cifar10", "--preset", "paper",
        "--data-dir", str(tmp_path / "data"), "--steps", "3", "--out", str(out), "--quiet")
    b = rd.load_bundle(out)
    m = b.model_cfg
    assert (m.net, m.image_channels, m.image_size, m.codebook_size, m.num_rb) == ("official", 3, 32, 512, 2)
    assert sum(p.numel() for p in b.model.parameters()) == 341_252
    assert rd.RunDir(out).status.state == "finished"
    with open(tmp_path / "data" / "cifar-10-batches-py" / "test_batch", "rb") as f:
        first = pickle.load(f, encoding="bytes")[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert_explores_in_colour(capsys, out, tmp_path, first, grid=8)
    points = json.loads(run(capsys, "explore", str(out), "--umap", "--pca", "--json"))
    assert len(points) == 512 and sum(p["usage"] for p in points) == 40 * 64


@pytest.mark.slow
def test_folder_of_celeba_sized_photos_center_cropped_to_64(tmp_path, capsys):
    folder = tmp_path / "faces"
    folder.mkdir()
    photos = colour_images(42, 218, 178, seed=7)       # CelebA's aligned size: 178 wide, 218 high
    for i, p in enumerate(photos):
        Image.fromarray(p).save(folder / f"{i:03d}.png")
    out = tmp_path / "celeba"
    run(capsys, "train", "--model", "gaussian_1", "--dataset", f"folder:{folder}", "--preset", "paper",
        "--center-crop", "140", "--steps", "2", "--out", str(out), "--quiet")
    b = rd.load_bundle(out)
    m = b.model_cfg
    assert (m.image_channels, m.image_size, m.codebook_size, m.num_rb) == (3, 64, 512, 6)
    assert sum(p.numel() for p in b.model.parameters()) == 630_532
    assert b.config["train"]["center_crop"] == 140
    from sqvae_core.data import load_dataset
    from sqvae_core.scores import bundle_split
    test_x, _, _ = bundle_split(b, "test")               # the crop travels with the run
    name = f"folder:{folder}"
    assert test_x.equal(load_dataset(name, "test", image_size=64, channels=3, center_crop=140).images)
    assert not test_x.equal(load_dataset(name, "test", image_size=64, channels=3).images)
    got = (test_x.numpy().transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    assert_explores_in_colour(capsys, out, tmp_path, got[0], grid=16)


def test_a_folder_trains_in_colour_at_32_unless_told_otherwise(tmp_path, capsys):
    """Without --channels/--image-size a folder is RGB 32x32 (data.dataset_shape), not grey 28x28."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, p in enumerate(colour_images(24, 40, 40, seed=3)):
        Image.fromarray(p).save(folder / f"{i}.png")
    tiny = ["--codebook-size", "8", "--code-dim", "8", "--num-rb", "1", "--batch-size", "8", "--steps", "1", "--quiet"]
    run(capsys, "train", "--dataset", f"folder:{folder}", "--out", str(tmp_path / "rgb"), *tiny)
    m = rd.load_bundle(tmp_path / "rgb").model_cfg
    assert (m.image_channels, m.image_size) == (3, 32)
    run(capsys, "train", "--dataset", f"folder:{folder}", "--channels", "1", "--image-size", "16",
        "--out", str(tmp_path / "grey"), *tiny)
    m = rd.load_bundle(tmp_path / "grey").model_cfg
    assert (m.image_channels, m.image_size) == (1, 16)


@pytest.mark.slow
def test_shipped_colour_bundle_without_its_generated_data(tmp_path):
    """A fresh clone has checkpoints/colour_gaussian_1 but not its data, patches cut from photos by
    a script (folder:runs/rgb/colour-photos). `explore --umap` then colours the map with the usage the
    bundle stores (eval.json) and says so; `eval`, which needs the images, fails with one line
    naming the command that regenerates them (issue 21). The real CLI, in a cwd without the data."""
    import os
    import shutil
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "checkpoints" / "colour_gaussian_1", tmp_path / "colour_gaussian_1")
    env = {**os.environ, "PYTHONPATH": str(root), "SQVAE_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "sqvae_core", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    assert not (tmp_path / "runs").exists()
    r = cli("explore", "colour_gaussian_1", "--umap", "--json")
    assert r.returncode == 0, r.stderr
    points = json.loads(r.stdout)
    stored = json.loads((tmp_path / "colour_gaussian_1" / "eval.json").read_text())["usage"]
    assert [p["usage"] for p in points] == stored and len(points) == 512
    assert [p["dead"] for p in points] == [u == 0 for u in stored]
    note = r.stderr.strip().splitlines()
    assert len(note) == 1 and "code usage from eval.json (891 test images)" in note[0], r.stderr

    rebuild = "python scripts/make_colour_photos.py runs/rgb/colour-photos --size 32"
    r = cli("eval", "colour_gaussian_1")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "runs/rgb/colour-photos is not a directory" in lines[0] and rebuild in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_a_generated_folder_tells_its_runs_how_to_rebuild_it(tmp_path):
    """make_colour_shapes.py leaves its command in the folder; a run trained on it stores that
    command in config.json, so the run's eval can name it once the folder is gone."""
    import shutil
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    data = tmp_path / "shapes"
    subprocess.run([sys.executable, str(root / "scripts" / "make_colour_shapes.py"), str(data), "--n", "40",
                    "--size", "32"], check=True, capture_output=True, timeout=120)
    command = f"python scripts/make_colour_shapes.py {data} --n 40 --size 32"
    assert (data / ".sqvae_rebuild").read_text().strip() == command
    out = tmp_path / "run"
    assert main(["train", "--model", "vq", "--dataset", f"folder:{data}", "--out", str(out), "--steps", "2",
                 "--batch-size", "8", "--codebook-size", "8", "--code-dim", "8", "--num-rb", "1", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["data_rebuild"] == command
    shutil.rmtree(data)
    with pytest.raises(Exception, match=f"rebuild it with `{command}`"):
        main(["eval", str(out), "--debug"])
