"""Tests for sqvae_core.data (no network: every download goes to file:// URLs)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sqvae_core import data as D

SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
SHIPPED = D.SHIPPED_DIR / "fashion-mnist"
FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
SUBSET_SOURCE = "shipped subset (3000 train / 1000 test images)"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real cache, no $SQVAE_DATA, no network: downloads point at a missing file."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("SQVAE_DATA", raising=False)
    for base, entries in list(D.SOURCES.items()):
        monkeypatch.setitem(D.SOURCES, base, [
            ((tmp_path / "no-network" / f).as_uri(), f, md5) for _, f, md5 in entries])


@pytest.fixture
def no_system(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "SYSTEM_DIRS", (str(tmp_path / "no-system"),))


def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += arr.tobytes()
    path.write_bytes(gzip.compress(raw, mtime=0) if compress else raw)


def make_idx_dataset(root: Path, n_train: int = 1000, n_test: int = 200) -> Path:
    """Synthetic MNIST-style files; image i has pixel (0,0)=i%256, (0,1)=i//256, and
    rows 1.. hold all 256 grey values."""
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = np.zeros((n, 28, 28), np.uint8)
        imgs[:, 1:, :] = (np.arange(27 * 28) % 256).reshape(27, 28)
        imgs[:, 0, 0] = np.arange(n) % 256
        imgs[:, 0, 1] = np.arange(n) // 256
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", imgs)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def ids(d: D.ImageData) -> np.ndarray:
    px = np.rint(d.images[:, 0, 0, :2].numpy() * 255).astype(np.int64)
    return px[:, 0] + 256 * px[:, 1]


# ------------------------------------------------------------------ real data


@pytest.mark.skipif(not SYSTEM_FMNIST.is_dir(),
                    reason=f"{SYSTEM_FMNIST} missing (apt-get install dataset-fashion-mnist)")
@pytest.mark.slow
def test_fashion_mnist_from_system_dir():
    raw_test = D._read_idx(SYSTEM_FMNIST / "t10k-images-idx3-ubyte.gz", 3)
    sizes = {"train": 55000, "val": 5000, "test": 10000}
    for split, n in sizes.items():
        d = D.load_dataset("fashion-mnist", split, download=False)
        assert len(d) == n and d.split == split and d.name == "fashion-mnist"
        assert d.images.shape == (n, 1, 28, 28) and d.images.dtype == torch.float32
        assert d.images.is_contiguous()
        assert 0.0 <= d.images.min().item() and d.images.max().item() == 1.0
        assert d.labels.dtype == torch.int64 and d.labels.shape == (n,)
        assert set(d.labels.unique().tolist()) == set(range(10))
        assert d.source == str(SYSTEM_FMNIST) and d.num_labels == 10 and d.levels is None
    assert torch.equal(d.images[:3, 0], torch.from_numpy(raw_test[:3].astype(np.float32)) / 255)
    # repeated loads come from the in-process cache and can't be corrupted by callers
    d.images.zero_()
    again = D.load_dataset("fashion-mnist", "test", download=False)
    assert again.images.max().item() == 1.0


# ------------------------------------------------------------------ splits


def test_val_train_disjoint_and_deterministic(tmp_path):
    root = make_idx_dataset(tmp_path / "syn")
    tr = D.load_dataset("mnist", "train", str(root), val_size=60)
    va = D.load_dataset("mnist", "val", str(root), val_size=60)
    te = D.load_dataset("mnist", "test", str(root))
    assert (len(tr), len(va), len(te)) == (940, 60, 200)
    a, b = ids(tr), ids(va)
    assert not set(a) & set(b) and sorted(set(a) | set(b)) == list(range(1000))
    assert torch.equal(tr.labels, torch.from_numpy(a % 10))
    assert np.array_equal(ids(te), np.arange(200))
    assert np.array_equal(ids(D.load_dataset("mnist", "val", str(root), val_size=60)), b)
    assert not np.array_equal(ids(D.load_dataset("mnist", "val", str(root), val_size=60, seed=1)), b)
    # int val_size is capped at 10% of train; a float is a fraction
    assert len(D.load_dataset("mnist", "val", str(root))) == 100
    assert len(D.load_dataset("mnist", "val", str(root), val_size=0.25)) == 250
    assert len(D.load_dataset("mnist", "train", str(root), val_size=0)) == 1000
    with pytest.raises(ValueError):
        D.load_dataset("mnist", "val", str(root), val_size=1.5)


def test_cat8_levels(tmp_path):
    root = make_idx_dataset(tmp_path / "syn", n_train=50, n_test=20)
    d = D.load_dataset("fashion-mnist-cat8", "test", str(root))
    raw = D._read_idx(root / "t10k-images-idx3-ubyte.gz", 3).astype(np.int64)
    expect = torch.from_numpy(np.floor(raw * 8 / 256).astype(np.float32)) / 7.0
    assert torch.equal(d.images[:, 0], expect)
    assert d.levels == 8 and d.num_labels == 10 and d.name == "fashion-mnist-cat8"
    # on real Fashion-MNIST images (the shipped subset, always present)
    real = D.load_dataset("fashion-mnist-cat8", "test", str(SHIPPED))
    plain = D.load_dataset("fashion-mnist", "test", str(SHIPPED))
    vals = real.images.unique()
    assert vals.numel() == 8 and torch.allclose(vals, torch.arange(8) / 7.0)
    for i, y, x in [(0, 14, 14), (1, 10, 5), (7, 20, 20), (999, 3, 27)]:
        p = round(plain.images[i, 0, y, x].item() * 255)
        assert real.images[i, 0, y, x].item() == pytest.approx((p * 8 // 256) / 7.0, abs=1e-7)
    assert torch.equal(real.labels, plain.labels)


# ------------------------------------------------------------------ lookup


def test_env_var_override(tmp_path, monkeypatch):
    parent = tmp_path / "env"
    shutil.copytree(SHIPPED, parent / "fashion-mnist")
    monkeypatch.setenv("SQVAE_DATA", str(parent))
    d = D.load_dataset("fashion-mnist", "test")
    assert d.source == str(parent / "fashion-mnist") and len(d) == 1000
    monkeypatch.setenv("SQVAE_DATA", str(parent / "fashion-mnist"))  # the folder itself
    assert D.load_dataset("fashion-mnist", "test").source == str(parent / "fashion-mnist")
    # the data_dir argument wins over the env var
    other = make_idx_dataset(tmp_path / "arg", n_train=30, n_test=10)
    assert D.load_dataset("fashion-mnist", "test", str(other)).source == str(other)


def test_shipped_subset_fallback(no_system):
    with pytest.warns(UserWarning, match="subset") as rec:
        d = D.load_dataset("fashion-mnist", "train", download=False)
    assert "apt-get install dataset-fashion-mnist" in str(rec[0].message)
    assert d.source == SUBSET_SOURCE
    assert len(d) == 2700  # val is capped at 10% of the 3000 training images
    with pytest.warns(UserWarning):
        assert len(D.load_dataset("fashion-mnist", "val", download=False)) == 300
    with pytest.warns(UserWarning):
        t = D.load_dataset("fashion-mnist-cat8", "test", download=False)
    assert len(t) == 1000 and t.source == SUBSET_SOURCE and t.levels == 8
    with pytest.raises(D.DatasetNotFoundError, match="allow_subset=False"):
        D.load_dataset("fashion-mnist", "test", download=False, allow_subset=False)
    # the shipped files are the first 3000/1000 of the real ones and stay small
    assert sum((SHIPPED / f).stat().st_size for f in FILES) < 2_000_000
    if SYSTEM_FMNIST.is_dir():
        full = D._read_idx(SYSTEM_FMNIST / "t10k-labels-idx1-ubyte.gz", 1)
        sub = D._read_idx(SHIPPED / "t10k-labels-idx1-ubyte.gz", 1)
        assert np.array_equal(full[:1000], sub)


def _file_sources(src: Path, bad: str | None = None):
    out = []
    for f in FILES:
        md5 = hashlib.md5((src / f).read_bytes()).hexdigest()
        out.append(((src / f).as_uri(), f, "0" * 32 if f == bad else md5))
    return out


def test_download_with_md5(tmp_path, monkeypatch, no_system):
    src = SYSTEM_FMNIST if SYSTEM_FMNIST.is_dir() else SHIPPED
    cache = tmp_path / "xdg-cache" / "sqvae" / "fashion-mnist"
    monkeypatch.setitem(D.SOURCES, "fashion-mnist", _file_sources(src, bad="t10k-images-idx3-ubyte.gz"))
    with pytest.raises(D.ChecksumError, match="md5 mismatch.*t10k-images") as e:
        D.load_dataset("fashion-mnist", "test")
    assert "deleted" in str(e.value)
    assert not (cache / "t10k-images-idx3-ubyte.gz").exists()
    assert not list(cache.glob(".*part"))

    monkeypatch.setitem(D.SOURCES, "fashion-mnist", _file_sources(src))
    d = D.load_dataset("fashion-mnist", "test", allow_subset=False)
    assert d.source == str(cache) and len(d) == (10000 if src == SYSTEM_FMNIST else 1000)
    assert sorted(p.name for p in cache.iterdir()) == sorted(FILES)
    # once cached, no download is needed
    monkeypatch.setitem(D.SOURCES, "fashion-mnist", [])
    assert D.load_dataset("fashion-mnist", "test", download=False).source == str(cache)


def test_network_failure_falls_back_to_subset(no_system):
    with pytest.warns(UserWarning, match="subset") as rec:
        d = D.load_dataset("fashion-mnist", "test")
    assert d.source == SUBSET_SOURCE
    assert "download into" in str(rec[0].message) and "failed" in str(rec[0].message)


def test_partial_download_failure_names_failing_url(tmp_path, monkeypatch, no_system):
    sources = _file_sources(SHIPPED)
    missing = (tmp_path / "gone" / FILES[1]).as_uri()
    sources[1] = (missing, FILES[1], sources[1][2])
    monkeypatch.setitem(D.SOURCES, "fashion-mnist", sources)
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load_dataset("fashion-mnist", "test", allow_subset=False)
    assert f"failed ({missing}: URLError" in str(e.value)
    # the file that did arrive was verified and kept; no temp files are left behind
    cache = tmp_path / "xdg-cache" / "sqvae" / "fashion-mnist"
    assert sorted(p.name for p in cache.iterdir()) == [FILES[0]]


def test_not_found_message_lists_every_place(tmp_path, monkeypatch):
    sysroot, env, dd = tmp_path / "sys", tmp_path / "env", tmp_path / "dd"
    monkeypatch.setattr(D, "SYSTEM_DIRS", (str(sysroot),))
    monkeypatch.setenv("SQVAE_DATA", str(env))
    with pytest.raises(D.DatasetNotFoundError) as e:
        D.load_dataset("mnist", "train", str(dd))
    msg = str(e.value)
    cache = tmp_path / "xdg-cache" / "sqvae" / "mnist"
    for place in (dd, dd / "mnist", env, env / "mnist", sysroot / "mnist", cache,
                  "$SQVAE_DATA", D.SOURCES["mnist"][0][0], "URLError", "shipped subset"):
        assert str(place) in msg, place
    assert "--data-dir" in msg and "network" in msg
    assert isinstance(e.value, FileNotFoundError)
    monkeypatch.delenv("SQVAE_DATA")
    with pytest.raises(D.DatasetNotFoundError, match=r"(?s)SQVAE_DATA: not set.*download=False"):
        D.load_dataset("mnist", "test", download=False)


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match="fashion-mnist, mnist, cifar10, fashion-mnist-cat8"):
        D.load_dataset("imagenet")
    with pytest.raises(ValueError, match="train, val, test"):
        D.load_dataset("mnist", "validation")
    assert D.dataset_shape("fashion-mnist") == (1, 28, 28)
    assert D.dataset_shape("fashion-mnist-cat8") == (1, 28, 28)
    assert D.dataset_shape("cifar10") == (3, 32, 32)
    assert D.dataset_shape("folder:/x") == (3, 32, 32)
    assert D.dataset_shape("folder:/x", image_size=64, channels=1) == (1, 64, 64)


def test_corrupt_idx_names_file(tmp_path):
    root = make_idx_dataset(tmp_path / "bad", n_train=50, n_test=20)
    f = root / "t10k-images-idx3-ubyte.gz"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])  # truncated gzip
    with pytest.raises(ValueError, match=f"{f}.*truncated"):
        D.load_dataset("mnist", "test", str(root))
    raw = gzip.decompress(good)
    f.write_bytes(gzip.compress(raw[:-10]))  # valid gzip, truncated data
    with pytest.raises(ValueError, match=f"{f}.*truncated"):
        D.load_dataset("mnist", "test", str(root))
    f.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))  # wrong number of dims
    with pytest.raises(ValueError, match=str(f)):
        D.load_dataset("mnist", "test", str(root))
    f.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match=f"{f}.*magic"):
        D.load_dataset("mnist", "test", str(root))


# ------------------------------------------------------------------ folder: and CIFAR


def test_folder_dataset(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for cls, colour in (("cats", (200, 30, 30)), ("dogs", (30, 30, 200))):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (20 + 7 * i, 30), colour).save(root / cls / f"{i}.png")
    # wide image: left quarter red, middle half green, right quarter blue
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16] = (255, 0, 0)
    wide[:, 16:48] = (0, 255, 0)
    wide[:, 48:] = (0, 0, 255)
    Image.fromarray(wide).save(root / "dogs" / "wide.bmp")
    Image.new("L", (8, 8), 99).save(root / "dogs" / "small.jpg")
    (root / "dogs" / "notes.txt").write_text("not an image")

    name = f"folder:{root}"
    parts = {s: D.load_dataset(name, s, image_size=16, seed=3) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [10, 1, 1]
    for d in parts.values():
        assert d.images.shape[1:] == (3, 16, 16) and d.images.dtype == torch.float32
        assert d.num_labels == 2 and d.class_names == ("cats", "dogs") and d.source == str(root)
        assert d.labels.dtype == torch.int64
    all_labels = torch.cat([parts[s].labels for s in parts]).sort().values
    assert all_labels.tolist() == [0] * 5 + [1] * 7

    # one split of a known folder: where the wide image landed, it was centre-cropped
    full = torch.cat([parts[s].images for s in parts])
    green = (full[:, 1] > 0.9) & (full[:, 0] < 0.1) & (full[:, 2] < 0.1)
    assert green.flatten(1).all(1).sum().item() == 1  # exactly the wide image, all green
    assert D.load_dataset(name, "train", image_size=16, seed=3).images.equal(parts["train"].images)

    grey = D.load_dataset(name, "test", image_size=8, channels=1, seed=3)
    assert grey.images.shape == (1, 1, 8, 8)

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (10, 10), (i * 50, 0, 0)).save(flat / f"{i}.webp")
    d = D.load_dataset(f"folder:{flat}", "train", image_size=4)
    assert d.labels is None and d.num_labels is None and len(d) == 3

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image"):
        D.load_dataset(f"folder:{empty}")
    with pytest.raises(D.DatasetNotFoundError):
        D.load_dataset(f"folder:{tmp_path / 'missing'}")
    (flat / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="broken.png"):
        D.load_dataset(f"folder:{flat}", image_size=4)


def write_cifar(root: Path, n: int = 20) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, fname in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, 0] = i  # red channel, pixel (0, 0) = batch number
        data[:, 1024] = 200  # green channel, pixel (0, 0)
        batch = {b"batch_label": b"synthetic", b"data": data,
                 b"labels": [(j + i) % 10 for j in range(n)],
                 b"filenames": [b"x.png"] * n}
        with open(d / fname, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return d


def test_cifar_pickles(tmp_path):
    d = write_cifar(tmp_path / "c")
    tr = D.load_dataset("cifar10", "train", str(tmp_path / "c"), val_size=10)
    te = D.load_dataset("cifar10", "test", str(d))
    assert tr.images.shape == (90, 3, 32, 32) and te.images.shape == (20, 3, 32, 32)
    assert tr.images.dtype == torch.float32 and tr.labels.dtype == torch.int64
    assert torch.all(te.images[:, 0, 0, 0] == 5 / 255) and torch.all(te.images[:, 1, 0, 0] == 200 / 255)
    assert te.labels.tolist() == [(j + 5) % 10 for j in range(20)]
    assert te.source == str(d) and te.num_labels == 10 and te.class_names[0] == "airplane"

    (d / "test_batch").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ValueError, match="test_batch.*dict"):
        D.load_dataset("cifar10", "test", str(d))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="test_batch.*refusing"):
        D.load_dataset("cifar10", "test", str(d))
    assert not (tmp_path / "pwned").exists()


def test_cifar_download_and_safe_extract(tmp_path, monkeypatch, no_system):
    write_cifar(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(D.SOURCES, "cifar10", [(archive.as_uri(), "cifar-10-python.tar.gz", md5)])
    d = D.load_dataset("cifar10", "test")
    cache = tmp_path / "xdg-cache" / "sqvae" / "cifar10"
    assert d.source == str(cache / "cifar-10-batches-py") and len(d) == 20
    assert not (cache / "cifar-10-python.tar.gz").exists()

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ValueError, match="unsafe"):
        D._safe_extract(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


# ------------------------------------------------------------------ batches, imports


def test_iterate_batches():
    n = 103
    d = D.ImageData(pixels=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1),
                    labels=torch.arange(n), name="t", split="train", source="mem",
                    num_labels=None, levels=None)
    seen = []
    for x, y in D.iterate_batches(d, 10, shuffle=True, drop_last=False,
                                  generator=torch.Generator().manual_seed(0)):
        assert torch.equal(x.flatten().long(), y)
        seen.append(y)
    allidx = torch.cat(seen)
    assert sorted(allidx.tolist()) == list(range(n))
    assert not torch.equal(allidx, torch.arange(n))
    sizes = [len(y) for _, y in D.iterate_batches(d, 10, shuffle=True)]
    assert sizes == [10] * 10
    dropped = torch.cat([y for _, y in D.iterate_batches(d, 10, shuffle=True)])
    assert dropped.unique().numel() == 100
    plain = torch.cat([y for _, y in D.iterate_batches(d, 50, shuffle=False, drop_last=False)])
    assert torch.equal(plain, torch.arange(n))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = [y for _, y in D.iterate_batches(d, 7, shuffle=True, generator=g1)]
    b = [y for _, y in D.iterate_batches(d, 7, shuffle=True, generator=g2)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError):
        D.iterate_batches(d, 0, shuffle=False)


def test_import_is_light():
    """Module-level imports of data.py are stdlib, numpy and torch only (Pillow is lazy)."""
    import ast

    tree = ast.parse(Path(D.__file__).read_text())
    top = set()
    for node in tree.body:  # statements run at import time (functions' bodies excluded)
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []:
            if isinstance(sub, ast.Import):
                top.update(a.name.split(".")[0] for a in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.level == 0:
                top.add(sub.module.split(".")[0])
    heavy = {m for m in top if m not in sys.stdlib_module_names} - {"numpy", "torch"}
    assert not heavy, heavy
    assert {"numpy", "torch"} <= top and "PIL" not in top


def test_folder_center_crop_then_resize_as_the_official_celeba_loader(tmp_path):
    """--center-crop 140 on CelebA-sized 178x218 images keeps the centre 140x140 only (torchvision's
    CenterCrop(140) then Resize(64)); without it the shorter side is resized and more is kept."""
    from PIL import Image

    root = tmp_path / "faces"
    root.mkdir()
    img = np.zeros((218, 178, 3), np.uint8)
    img[...] = (255, 0, 0)                                  # red outside the centre 140x140
    img[39:179, 19:159] = (0, 255, 0)                        # CenterCrop(140): top 39, left 19
    img[39:179, 19:89, 2] = 255                              # left half of the crop cyan
    for i in range(10):
        Image.fromarray(img).save(root / f"{i}.png")
    name = f"folder:{root}"
    x = D.load_dataset(name, "train", image_size=64, center_crop=140).images
    assert x.shape[1:] == (3, 64, 64)
    assert (x[:, 0] == 0).all()                              # no red margin survives the crop
    assert torch.allclose(x[0, 2, :, :31], torch.ones(64, 31)) and (x[0, 2, :, 33:] == 0).all()
    full = D.load_dataset(name, "train", image_size=64).images
    assert (full[:, 0] > 0.5).any()                          # default: the red sides are kept
    assert (D.load_dataset(name, "train", image_size=140, center_crop=140).images[0, 1] == 1).all()

    Image.new("RGB", (100, 120)).save(root / "small.png")
    with pytest.raises(ValueError, match=r"small.png.*100x120, smaller than the centre crop of 140"):
        D.load_dataset(name, "train", image_size=64, center_crop=140)
    with pytest.raises(ValueError, match="folder: datasets only"):
        D.load_dataset("cifar10", "test", center_crop=28)
    with pytest.raises(ValueError, match="positive number of pixels"):
        D.load_dataset(name, center_crop=0)


def test_folder_shape_reads_grey_and_a_common_net_size_from_the_headers(tmp_path):
    from PIL import Image

    def folder(name, specs):
        root = tmp_path / name
        root.mkdir()
        for i, (mode, w, h) in enumerate(specs):
            Image.new(mode, (w, h), 128 if mode == "L" else (10, 200, 30)).save(root / f"{i}.png")
        return f"folder:{root}"

    grey28 = folder("grey28", [("L", 28, 28)] * 5)
    s = D.folder_shape(grey28)
    assert (s.n, s.grey, s.channels, s.size) == (5, True, 1, 28)
    d = D.load_dataset(grey28, "train")                        # load_dataset reads the same when not told
    assert d.shape[1:] == (1, 28, 28)
    assert D.load_dataset(grey28, "train", channels=3, image_size=32).shape[1:] == (3, 32, 32)
    mixed = D.folder_shape(folder("mixed", [("L", 28, 28)] * 3 + [("RGB", 28, 28)]))
    assert (mixed.channels, mixed.size) == (3, 28)             # one colour image: RGB
    odd = D.folder_shape(folder("odd", [("L", 40, 40)] * 3))
    assert (odd.channels, odd.size) == (1, None)               # 40 is no net's size: resized (to 32)
    assert D.load_dataset(f"folder:{tmp_path / 'odd'}", "train").shape[1:] == (1, 32, 32)
    ragged = D.folder_shape(folder("ragged", [("L", 28, 28), ("L", 32, 32)]))
    assert ragged.size is None and "first 28x28, not all one of 28x28/32x32/64x64" in ragged.describe()


# ------------------------------------------------------------------ uint8 pixels, the folder cache


def test_batches_become_exactly_the_floats_of_the_old_whole_array_conversion(tmp_path):
    """Pixels stay uint8 and each batch is converted as drawn: to the same float32 bits the whole
    array conversion (numpy, before) gave, for images (p/255) and cat8 ((p >> 5)/7)."""
    p = np.arange(256, dtype=np.uint8)
    old_images = np.divide(p, np.float32(255.0), dtype=np.float32)
    old_cat8 = np.divide(np.right_shift(p, 5), np.float32(7.0), dtype=np.float32)
    x = torch.from_numpy(p).view(4, 1, 8, 8)
    assert D.to_float(x).dtype == torch.float32 and D.to_float(x).shape == (4, 1, 8, 8)
    assert np.array_equal(D.to_float(x).numpy().ravel().view(np.uint32), old_images.view(np.uint32))
    assert np.array_equal(D.to_float(x, 8).numpy().ravel().view(np.uint32), old_cat8.view(np.uint32))
    root = make_idx_dataset(tmp_path / "syn", n_train=300, n_test=50)
    for name, old in (("mnist", old_images), ("fashion-mnist-cat8", old_cat8)):
        d = D.load_dataset(name, "train", str(root), val_size=30)
        assert d.pixels.dtype == torch.uint8 and len(d) == 270
        want = old[d.pixels.numpy()]                           # per pixel, the old float
        assert np.array_equal(d.images.numpy(), want)
        idx = torch.tensor([5, 0, 269])
        assert np.array_equal(d.batch(idx).numpy(), want[idx.numpy()])
        assert np.array_equal(torch.cat(list(d.float_batches(100))).numpy(), want)
        assert d.variance() == float(torch.from_numpy(want).var())   # the VQ data variance, unchanged


def grey_folder(root: Path, n: int = 40) -> Path:
    from PIL import Image
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12 + i % 5, 14), dtype=np.uint8), "L").save(root / f"{i:03d}.png")
    return root


def cache_files(tmp_path: Path) -> list[str]:
    folders = tmp_path / "xdg-cache" / "sqvae" / "folders"
    return sorted(p.name for p in folders.iterdir()) if folders.is_dir() else []


def test_folder_is_decoded_once_into_a_cache_keyed_by_the_files_stats(tmp_path, monkeypatch):
    root = grey_folder(tmp_path / "imgs")
    name = f"folder:{root}"
    decodes = []
    real = D._decode_folder
    monkeypatch.setattr(D, "_decode_folder", lambda *a, **k: decodes.append(1) or real(*a, **k))
    first = D.load_dataset(name, "train", image_size=8, channels=1)
    npys = [f for f in cache_files(tmp_path) if f.endswith(".npy")]
    assert len(decodes) == 1 and len(npys) == 1
    again = {s: D.load_dataset(name, s, image_size=8, channels=1) for s in ("train", "val", "test")}
    assert len(decodes) == 1                                   # every split and every later load: the cache
    assert torch.equal(again["train"].pixels, first.pixels)
    assert [len(again[s]) for s in ("train", "val", "test")] == [32, 4, 4]
    D.load_dataset(name, "train", image_size=16, channels=1)   # another size: another cache
    assert len(decodes) == 2
    target = root / "007.png"                                  # touching a file invalidates its cache
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    D.load_dataset(name, "train", image_size=8, channels=1)
    assert len(decodes) == 3
    npys_now = [f for f in cache_files(tmp_path) if f.endswith(".npy")]
    assert len(npys_now) == 2 and npys[0] not in npys_now      # the stale one is removed
    from PIL import Image
    Image.new("L", (12, 14), 3).save(target)                   # new content, new size
    D.load_dataset(name, "train", image_size=8, channels=1)
    assert len(decodes) == 4


def test_a_decode_that_dies_halfway_leaves_no_cache_file(tmp_path, monkeypatch):
    root = grey_folder(tmp_path / "imgs", n=300)
    real, calls = D._decode_into, []

    def dies_on_the_second_chunk(npy, start, paths, *a):
        calls.append(start)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-write")
        return real(npy, start, paths, *a)

    monkeypatch.setattr(D, "_decode_into", dies_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        D.load_dataset(f"folder:{root}", "train", image_size=8, channels=1, )
    assert len(calls) == 2 and cache_files(tmp_path) == []     # neither a .npy nor its temp file
    monkeypatch.setattr(D, "_decode_into", real)
    # a temp file a killed process left (its pid is gone) is swept by the next decode
    folders = tmp_path / "xdg-cache" / "sqvae" / "folders"
    d = D.load_dataset(f"folder:{root}", "test", image_size=8, channels=1)
    final = [f for f in cache_files(tmp_path) if f.endswith(".npy")][0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folders / f".{final}.{int(dead.stdout)}.tmp"
    stale.write_bytes(b"half")
    (folders / final).unlink()
    D.load_dataset(f"folder:{root}", "test", image_size=8, channels=1)
    assert not stale.exists() and cache_files(tmp_path) == [final] and len(d) == 30


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_the_cache_is_memory_mapped_not_copied(tmp_path):
    root = grey_folder(tmp_path / "imgs")
    d = D.load_dataset(f"folder:{root}", "train", image_size=8, channels=1)
    npy = [f for f in cache_files(tmp_path) if f.endswith(".npy")][0]
    assert npy in Path("/proc/self/maps").read_text()          # the file is mapped into this process
    assert d.pixels.dtype == torch.uint8 and d.pixels.shape == (32, 1, 8, 8)
    cache = np.load(tmp_path / "xdg-cache" / "sqvae" / "folders" / npy, mmap_mode="r")
    assert np.array_equal(d.pixels.numpy(), cache[:32])
    d.pixels[0].fill_(7)                                        # a caller's write stays its own
    assert np.array_equal(np.load(tmp_path / "xdg-cache" / "sqvae" / "folders" / npy)[0], cache[0])
    assert not (np.load(tmp_path / "xdg-cache" / "sqvae" / "folders" / npy)[0] == 7).all()


def test_parallel_decode_gives_the_serial_array(tmp_path):
    root = grey_folder(tmp_path / "imgs", n=70)
    paths = [p for p, _, _, _ in D._scan_folder(root)[0]]
    D._decode_folder(paths, tmp_path / "serial.npy", 16, 3, None, workers=1)
    D._decode_folder(paths, tmp_path / "parallel.npy", 16, 3, None, workers=2)
    a, b = np.load(tmp_path / "serial.npy"), np.load(tmp_path / "parallel.npy")
    assert a.shape == (70, 3, 16, 16) and np.array_equal(a, b)
    assert np.array_equal(a[3], D._load_image(Path(paths[3]), 16, 3))


def test_splits_loaded_in_one_scan_block_stat_the_folder_once(tmp_path, monkeypatch):
    root = grey_folder(tmp_path / "imgs")
    scans = []
    real = D._scan_folder_now
    monkeypatch.setattr(D, "_scan_folder_now", lambda r: scans.append(r) or real(r))
    with D.one_scan():
        D.folder_shape(f"folder:{root}")
        parts = [D.load_dataset(f"folder:{root}", s, image_size=8) for s in ("train", "val")]
    assert len(scans) == 1 and [len(p) for p in parts] == [32, 4]
    D.load_dataset(f"folder:{root}", "test", image_size=8, channels=1)   # outside the block: a fresh scan
    assert len(scans) == 2


def test_parallel_decode_never_reruns_the_callers_main_script(tmp_path, monkeypatch):
    """Inside Streamlit, sys.modules['__main__'] is the page script; a spawned worker pool would run
    it again in each worker. The decode's workers are threads of this process: nothing re-runs."""
    import types
    marker = tmp_path / "ran"
    script = tmp_path / "page.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('the page ran again')\n")
    fake = types.ModuleType("__main__")
    fake.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", fake)
    root = grey_folder(tmp_path / "imgs", n=40)
    paths = [p for p, _, _, _ in D._scan_folder(root)[0]]
    D._decode_folder(paths, tmp_path / "out.npy", 8, 1, None, workers=2)
    assert np.load(tmp_path / "out.npy").shape == (40, 1, 8, 8) and not marker.exists()
