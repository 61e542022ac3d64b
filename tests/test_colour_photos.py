"""scripts/make_colour_photos.py: the shipped colour bundle's data, rebuilt from the photographs
inside the scikit-image and scikit-learn wheels. Small and fast: two photos at 16x16."""
import csv
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from sqvae_core.data import REBUILD_FILE, folder_rebuild_command, load_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_colour_photos.py"
ARGS = ["--size", "16", "--photos", "chelsea,china"]     # one photo from each wheel
_spec = importlib.util.spec_from_file_location("make_colour_photos", SCRIPT)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def make(out: Path) -> None:
    """The script's command line, in this process (no second torch import on a busy machine)."""
    script.main([str(out), *ARGS])


def digest(folder: Path) -> str:
    """Every file's name and bytes; the rebuild command's path replaced by OUT."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + p.read_bytes().replace(str(folder).encode(), b"OUT"))
    return h.hexdigest()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos") / "patches"
    make(out)
    return out


def test_same_arguments_write_the_same_bytes(folder, tmp_path):
    make(tmp_path / "again")
    assert digest(tmp_path / "again") == digest(folder)


def test_the_product_reads_the_folder_in_the_scripts_split(folder, tmp_path, monkeypatch):
    """load_dataset's own 80/10/10 split of the folder gives each split exactly the patches the
    manifest assigns to it, and the folder tells runs how to rebuild it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rows = list(csv.DictReader(open(folder / "patches.csv")))
    assert len(rows) == len(list(folder.glob("patch_*.png")))
    assert {r["photo"] for r in rows} == {"chelsea", "china"}
    n = len(rows)
    for split in ("train", "val", "test"):
        want = [r["file"] for r in rows if r["split"] == split]
        assert len(want) == (n - 2 * round(0.1 * n) if split == "train" else round(0.1 * n))
        data = load_dataset(f"folder:{folder}", split, image_size=16)
        assert data.shape == (len(want), 3, 16, 16)
        pixels = np.stack([np.asarray(Image.open(folder / f)).transpose(2, 0, 1) for f in want])
        assert np.array_equal(data.pixels.numpy(), pixels), split
    command = f"python scripts/make_colour_photos.py {folder} {' '.join(ARGS)}"
    assert (folder / REBUILD_FILE).read_text().strip() == command
    assert folder_rebuild_command(f"folder:{folder}") == command


def test_no_test_patch_shares_a_pixel_with_a_training_patch(folder):
    """Regions are held out, not patches: on the fine-scale photo, every test (and val) patch's
    footprint is disjoint from every training patch's."""
    size = 16
    boxes = {}
    for r in csv.DictReader(open(folder / "patches.csv")):
        f = 1 if r["scale"] == "fine" else 2
        y, x = int(r["y"]) * f, int(r["x"]) * f
        boxes.setdefault((r["photo"], r["split"]), []).append((y, x, y + size * f, x + size * f))
    for photo in ("chelsea", "china"):
        train = np.array(boxes[(photo, "train")])
        for split in ("val", "test"):
            held = np.array(boxes[(photo, split)])
            assert len(held) > 0
            overlap = ((held[:, None, 0] < train[None, :, 2]) & (train[None, :, 0] < held[:, None, 2])
                       & (held[:, None, 1] < train[None, :, 3]) & (train[None, :, 1] < held[:, None, 3]))
            assert not overlap.any(), (photo, split)
