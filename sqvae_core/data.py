"""Image data sets for SQ-VAE Explorer: uint8 pixels, converted to float batch by batch.

Supported names (see :data:`DATASETS`)::

    fashion-mnist        Fashion-MNIST, (1, 28, 28), 10 labels
    mnist                MNIST, (1, 28, 28), 10 labels
    cifar10              CIFAR-10, (3, 32, 32), 10 labels
    fashion-mnist-cat8   Fashion-MNIST quantised to 8 grey levels: images = floor(p / 32) / 7
    folder:PATH          every image under PATH; sub-folders are classes (sorted names)

Splits: ``"test"`` is the official test set; ``"val"`` is a fixed-seed random subset of
the official training set (``val_size`` images, or a fraction if a float; an int is
capped at 10% of the training set, which matters for small training sets such as the
shipped subset); ``"train"`` is the rest.  Folder data sets get a fixed-seed 80/10/10
train/val/test split instead.  Splits depend only on ``seed`` (default 0).

Where the files are looked for, in order (MNIST-style data sets; CIFAR-10 likewise with
``cifar-10-batches-py/``)::

    1. the data_dir argument, then $SQVAE_DATA -- the folder holding the files, or a
       parent holding <name>/
    2. /usr/share/datasets/<name>   (Debian: apt-get install dataset-fashion-mnist)
    3. $XDG_CACHE_HOME/sqvae/<name> or ~/.cache/sqvae/<name>; if missing and
       download=True, downloaded there from :data:`SOURCES` with md5 verification
    4. fashion-mnist(-cat8) only, if allow_subset=True: a small subset shipped in
       sqvae_core/datasets_shipped/fashion-mnist (warns that it is a subset)

If none is found, :class:`DatasetNotFoundError` lists every place looked.
Parsed files are cached in-process, so repeated loads are cheap; the returned tensors
are fresh copies the caller may modify.

Memory: a split is held as its uint8 pixels (:class:`ImageData` ``pixels``), a quarter of float32;
batches become float32 as they are drawn (``ImageData.batch``), so memory grows with the batch,
not with the data set. A folder is decoded once, in parallel (a thread per CPU), into a memory-mapped
.npy under $XDG_CACHE_HOME/sqvae/folders (or ~/.cache/...), keyed by its files' paths, sizes and
mtimes, the image size, channels and crop: later loads map that file in (no decode, no copy).
Unless given, a folder's channels and size are read from its images (:func:`folder_shape`).

Only torch and numpy (and the standard library) are imported at module import; Pillow is
imported when a folder data set is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import logging
import os
import pickle
import shutil
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ImageData",
    "DatasetNotFoundError",
    "ChecksumError",
    "DATASETS",
    "SOURCES",
    "dataset_shape",
    "folder_shape",
    "FolderShape",
    "load_dataset",
    "iterate_batches",
    "to_float",
]

log = logging.getLogger(__name__)

from .kinds import DATASETS  # noqa: E402  (the catalogue's names; plus "folder:PATH")
SPLITS = ("train", "val", "test")

#: Environment variable naming a data directory (checked after the data_dir argument).
ENV_VAR = "SQVAE_DATA"
#: System-wide data roots; each is searched for ``<name>/`` (Debian's dataset-* packages).
SYSTEM_DIRS: tuple[str, ...] = ("/usr/share/datasets",)
#: Root of the subsets shipped inside the package (``<root>/fashion-mnist/``).
SHIPPED_DIR = Path(__file__).resolve().parent / "datasets_shipped"
#: Seconds before a download attempt gives up.
DOWNLOAD_TIMEOUT = 30.0

_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

#: Download table: base data set -> list of (url, file name, md5 as published).
#: Tests monkeypatch this (and :func:`_fetch`).
SOURCES: dict[str, list[tuple[str, str, str]]] = {
    "fashion-mnist": [
        (_FMNIST_URL + "train-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        (_FMNIST_URL + "train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        (_FMNIST_URL + "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        (_FMNIST_URL + "t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
    ],
    "mnist": [
        (_MNIST_URL + "train-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        (_MNIST_URL + "train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        (_MNIST_URL + "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        (_MNIST_URL + "t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    ],
    "cifar10": [
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    ],
}

CLASS_NAMES = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(i) for i in range(10)),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"),
}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: A folder data set may hold, in this file, the one-line command that recreates it (generated data:
#: scripts/make_colour_shapes.py writes one). Training stores it in config.json as "data_rebuild".
REBUILD_FILE = ".sqvae_rebuild"

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@functools.lru_cache(maxsize=16)
def _float_table(levels: int | None, device: str = "cpu") -> torch.Tensor:
    """The float32 value of each of the 256 pixel values, made once with the expressions that
    converted whole arrays before (numpy, one correctly rounded float32 division each):
        p / 255                        images
        floor(p·L / 256) / (L − 1)     categorical data of L grey levels (cat8: (p >> 5) / 7)
    A lookup rather than arithmetic on the batch: the same bits on every device (CUDA divides
    by a scalar as a multiplication by its reciprocal, which rounds differently)."""
    p = np.arange(256, dtype=np.uint8)
    if levels:
        q = (p.astype(np.int64) * int(levels)) >> 8
        table = np.divide(q, np.float32(levels - 1), dtype=np.float32)
    else:
        table = np.divide(p, np.float32(255.0), dtype=np.float32)
    return torch.from_numpy(table).to(device)


def to_float(x: torch.Tensor, levels: int | None = None) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (a new tensor, on x's device; see _float_table);
    float input is returned as it is."""
    if x.dtype != torch.uint8:
        return x
    table = _float_table(levels, str(x.device))
    return table.index_select(0, x.reshape(-1).int()).view(x.shape)


@dataclass
class ImageData:
    """A data set split.

    ``pixels`` holds the images as stored, (N, C, H, W): uint8 as read (a read-only memory map of
    the decoded cache for folder data; in memory for the IDX sets and CIFAR-10), or float32 in
    [0, 1] (data made in memory). ``batch(idx)`` gives float32 images in [0, 1] of the rows asked
    for, converted as they are drawn, so memory grows with the batch and not with the data set;
    ``images`` converts the whole split (a fresh float32 tensor: fine for small data, 4x the pixels'
    memory)."""

    pixels: torch.Tensor          # uint8 (N, C, H, W), or float32 in [0, 1]
    labels: torch.Tensor | None   # int64 (N,)
    name: str                     # data set name as given
    split: str                    # "train" | "val" | "test"
    source: str                   # where it was read from
    num_labels: int | None        # number of classes, None if unlabeled
    levels: int | None            # grey levels for categorical data (8 for cat8), else None
    class_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)

    def batch(self, idx) -> torch.Tensor:
        """float32 images of rows idx (a slice, or a tensor / array of indices), a new tensor."""
        return to_float(self.pixels[idx], self.levels).contiguous()

    @property
    def images(self) -> torch.Tensor:
        """The whole split as float32 in [0, 1] (a new tensor each time)."""
        return self.batch(slice(None))

    def float_batches(self, batch_size: int):
        """The split in order as float32 batches of batch_size (the last may be smaller)."""
        for i in range(0, len(self), batch_size):
            yield self.batch(slice(i, i + batch_size))

    def head(self, n: int) -> "ImageData":
        """The first n images (views, no copy)."""
        return replace(self, pixels=self.pixels[:n], labels=self.labels[:n] if self.labels is not None else None)

    def variance(self) -> float:
        """Var of all pixel values as float32 (unbiased), as float(self.images.var()) gave it but without
        the float copy: for uint8, from the 256-bin histogram in float64 (exact sums), rounded to float32
        like torch's var of float32 (which accumulates in double on the CPU: equal on the data sets we ship)."""
        if self.pixels.dtype != torch.uint8:
            return float(self.pixels.var())
        counts = np.zeros(256, np.float64)
        step = max(1, (64 << 20) // max(1, int(np.prod(self.pixels.shape[1:]))))
        for i in range(0, len(self), step):
            counts += np.bincount(self.pixels[i:i + step].numpy().reshape(-1), minlength=256)
        values = _float_table(self.levels).numpy().astype(np.float64)
        n = counts.sum()
        mean = (counts * values).sum() / n
        return float(np.float32((counts * (values - mean) ** 2).sum() / (n - 1)))


class DatasetNotFoundError(FileNotFoundError):
    """No copy of the data set was found; the message lists every place looked."""


class ChecksumError(ValueError):
    """A downloaded file did not match its published md5 (the file was deleted)."""


class _DownloadFailed(OSError):
    """Network (or cache-dir) failure while downloading url; load_dataset falls through."""

    def __init__(self, url: str, error: BaseException):
        super().__init__(f"{url}: {type(error).__name__}: {error}")
        self.url = url


# --------------------------------------------------------------------------- names


def _parse_name(name: str) -> tuple[str, str | None]:
    """-> (canonical name, folder path or None)."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}")
    if name.startswith("folder:"):
        path = name[len("folder:"):]
        if not path:
            raise ValueError("folder dataset needs a path: 'folder:PATH'")
        return "folder", path
    canon = name.strip().lower().replace("_", "-")
    if canon not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, or 'folder:PATH'")
    return canon, None


def _base(canon: str) -> str:
    """The data set whose files are read ("fashion-mnist-cat8" reads fashion-mnist)."""
    return "fashion-mnist" if canon == "fashion-mnist-cat8" else canon


def dataset_shape(name: str, image_size: int | None = None,
                  channels: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of a data set's images.  image_size/channels only apply to folder: data."""
    canon, _ = _parse_name(name)
    if canon == "folder":
        c = 3 if channels is None else int(channels)
        s = 32 if image_size is None else int(image_size)
        if c not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if s <= 0:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        return (c, s, s)
    if canon == "cifar10":
        return (3, 32, 32)
    return (1, 28, 28)


# --------------------------------------------------------------------------- readers


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:  # BadGzipFile is an OSError
            raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from None
    return raw


@functools.lru_cache(maxsize=16)
def _read_idx_cached(path: str, mtime_ns: int, size: int, ndim: int) -> np.ndarray:
    p = Path(path)
    raw = _read_bytes(p)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{p}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[3] != ndim:
        raise ValueError(f"{p}: IDX file has {raw[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{p}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        what = "truncated" if len(raw) - header < expected else "has trailing bytes"
        raise ValueError(f"{p}: IDX file {what}: header says {dims} "
                         f"({expected} data bytes), found {len(raw) - header}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)  # read-only
    return arr


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX(.gz) file, cached; the result is read-only."""
    st = path.stat()
    return _read_idx_cached(str(path), st.st_mtime_ns, st.st_size, ndim)


def _existing(directory: Path, fname: str) -> Path | None:
    """The file, gzipped or not (fname ends with .gz)."""
    for cand in (directory / fname, directory / fname[: -len(".gz")]):
        if cand.is_file():
            return cand
    return None


def _load_idx_split(directory: Path, which: str) -> tuple[np.ndarray, np.ndarray]:
    img_name, lab_name = _IDX_FILES[which]
    img_path, lab_path = _existing(directory, img_name), _existing(directory, lab_name)
    if img_path is None or lab_path is None:
        raise DatasetNotFoundError(f"{directory}: missing {img_name} or {lab_name}")
    images = _read_idx(img_path, 3)
    labels = _read_idx(lab_path, 1)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected uint8 images of 28x28, "
                         f"got {images.dtype} {images.shape[1:]}")
    if labels.dtype != np.uint8 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{lab_path}: {labels.shape[0]} labels for "
                         f"{images.shape[0]} images in {img_path}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{lab_path}: label {int(labels.max())} out of range 0..9")
    return images, labels


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches contain (numpy arrays, lists, bytes)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


@functools.lru_cache(maxsize=8)
def _read_cifar_batch_cached(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, struct.error) as e:
        raise ValueError(f"{p}: not a valid CIFAR-10 batch pickle ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{p}: CIFAR-10 batch should hold a dict, got {type(obj).__name__}")
    get = lambda k: obj.get(k.encode(), obj.get(k))  # noqa: E731  (bytes or str keys)
    data, labels = get("data"), get("labels")
    if data is None or labels is None:
        raise ValueError(f"{p}: CIFAR-10 batch lacks 'data' or 'labels'")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{p}: CIFAR-10 'data' should be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"{p}: {labels.shape} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{p}: labels out of range 0..9")
    images = data.reshape(-1, 3, 32, 32)
    labels = labels.astype(np.uint8)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _load_cifar_split(directory: Path, which: str) -> tuple[np.ndarray, np.ndarray]:
    parts = []
    for fname in _CIFAR_FILES[which]:
        p = directory / fname
        st = p.stat()
        parts.append(_read_cifar_batch_cached(str(p), st.st_mtime_ns, st.st_size))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


# --------------------------------------------------------------------------- lookup


def _holds_files(base: str, directory: Path) -> tuple[bool, str]:
    """Does directory hold the data set's files? -> (ok, reason if not)."""
    if not directory.is_dir():
        return False, "no such directory"
    if base == "cifar10":
        missing = [f for w in ("train", "test") for f in _CIFAR_FILES[w] if not (directory / f).is_file()]
    else:
        missing = [f for w in ("train", "test") for f in _IDX_FILES[w] if _existing(directory, f) is None]
    if missing:
        return False, "missing " + ", ".join(missing)
    return True, ""


def _candidates(base: str, root: Path) -> list[Path]:
    """Directories under a user-given root that may hold the files."""
    if base == "cifar10":
        return [root, root / _CIFAR_DIR, root / "cifar10", root / "cifar10" / _CIFAR_DIR]
    return [root, root / base]


def _cache_dir(base: str) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "sqvae" / base


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: str | os.PathLike) -> None:
    """Download url to dest (overwriting it).  Raises OSError on network failure."""
    import urllib.request

    req = urllib.request.Request(url, headers={"User-Agent": "sqvae-explorer"})
    with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT) as resp, open(dest, "wb") as f:
        shutil.copyfileobj(resp, f, 1 << 20)


def _download_file(url: str, dest: Path, md5: str) -> None:
    """Fetch url into a temp file beside dest; rename to dest only if md5 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        log.info("downloading %s -> %s", url, dest)
        _fetch(url, tmp)
        got = _md5(Path(tmp))
        if got != md5.lower():
            raise ChecksumError(
                f"md5 mismatch for {url}: expected {md5}, got {got}; the download was "
                f"deleted (if a proxy blocks the download, fetch the file yourself and "
                f"use --data-dir or ${ENV_VAR})")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into dest, refusing absolute paths, '..' and special files."""
    import tarfile

    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith(("/", "\\")) or os.path.isabs(m.name) or ".." in parts:
                raise ValueError(f"{archive}: unsafe path in archive: {m.name!r}")
            if not (m.isfile() or m.isdir()):
                raise ValueError(f"{archive}: refusing link/special member {m.name!r}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - old Pythons
            tar.extractall(dest, members=members)


def _download(base: str, cache: Path) -> None:
    """Download base's files into cache (skipping those already there)."""
    for url, fname, md5 in SOURCES[base]:
        target = cache / fname
        if base == "cifar10":
            if _holds_files(base, cache / _CIFAR_DIR)[0]:
                continue
        elif _existing(cache, fname) is not None:
            continue
        import http.client

        try:
            _download_file(url, target, md5)
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, ...
            raise _DownloadFailed(url, e) from e
        if base == "cifar10":
            tmp_dir = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))
            try:
                _safe_extract(target, tmp_dir)
                extracted = tmp_dir / _CIFAR_DIR
                if not _holds_files(base, extracted)[0]:
                    raise ValueError(f"{url}: archive has no complete {_CIFAR_DIR}/")
                shutil.rmtree(cache / _CIFAR_DIR, ignore_errors=True)
                os.replace(extracted, cache / _CIFAR_DIR)
            finally:
                shutil.rmtree(tmp_dir, ignore_errors=True)
                target.unlink(missing_ok=True)


def _shipped_counts(directory: Path) -> tuple[int, int]:
    counts = []
    for which in ("train", "test"):
        with gzip.open(directory / _IDX_FILES[which][0], "rb") as f:
            counts.append(struct.unpack(">I", f.read(8)[4:8])[0])
    return counts[0], counts[1]


def _how_to_get(base: str) -> str:
    lines = ["How to get the data:"]
    if base == "fashion-mnist":
        lines.append("  - sudo apt-get install dataset-fashion-mnist   (installs /usr/share/datasets/fashion-mnist)")
    if base == "cifar10":
        what = f"the extracted {_CIFAR_DIR}/ folder from cifar-10-python.tar.gz"
    else:
        what = "the four *-ubyte.gz files"
    lines.append(f"  - pass --data-dir DIR (data_dir=DIR) or set {ENV_VAR}=DIR, DIR holding {what} "
                 f"(or a {base}/ sub-folder with them)")
    urls = ", ".join(u for u, _, _ in SOURCES.get(base, []))
    lines.append(f"  - or run once with network access (download=True) to download into "
                 f"{_cache_dir(base)}" + (f" from {urls}" if urls else ""))
    return "\n".join(lines)


def _locate(base: str, data_dir, download: bool, allow_subset: bool) -> tuple[Path, str, bool]:
    """-> (directory holding the files, source description, is_shipped_subset)."""
    looked: list[str] = []
    explicit_misses: list[str] = []

    def try_root(label: str, cands: list[Path]) -> Path | None:
        for c in cands:
            ok, why = _holds_files(base, c)
            if ok:
                return c
            looked.append(f"{label}: {c} ({why})")
        return None

    # (a) data_dir argument, then the environment variable
    if data_dir is not None and str(data_dir) != "":
        root = Path(data_dir).expanduser()
        found = try_root("data_dir argument", _candidates(base, root))
        if found:
            return found, str(found), False
        explicit_misses.append(f"data_dir={root}")
    else:
        looked.append("data_dir argument: not given")
    env = os.environ.get(ENV_VAR, "")
    if env:
        root = Path(env).expanduser()
        found = try_root(f"${ENV_VAR}", _candidates(base, root))
        if found:
            return found, str(found), False
        explicit_misses.append(f"{ENV_VAR}={root}")
    else:
        looked.append(f"${ENV_VAR}: not set")

    def chosen(found: Path, source: str, subset: bool):
        if explicit_misses:
            warnings.warn(f"{' and '.join(explicit_misses)} hold no {base} files; "
                          f"using {source}", stacklevel=4)
        return found, source, subset

    # (b) system-wide (Debian dataset-* packages)
    for sysroot in SYSTEM_DIRS:
        d = Path(sysroot) / base
        found = try_root("system", [d, d / _CIFAR_DIR] if base == "cifar10" else [d])
        if found:
            return chosen(found, str(found), False)

    # (c) user cache, downloading into it if allowed
    cache = _cache_dir(base)
    target = cache / _CIFAR_DIR if base == "cifar10" else cache
    if try_root("cache", [target]):
        return chosen(target, str(target), False)
    if not download:
        looked.append("download: not attempted (download=False)")
    elif base not in SOURCES:
        looked.append(f"download: no source known for {base}")
    else:
        try:
            _download(base, cache)
        except _DownloadFailed as e:  # network failure, unwritable cache, ...: fall through
            looked.append(f"download into {cache}: failed ({e})")
            log.info("download of %s failed: %s", base, e)
        else:
            ok, why = _holds_files(base, target)
            if ok:
                return chosen(target, str(target), False)
            looked.append(f"download into {cache}: incomplete ({why})")

    # (d) the small subset shipped in the package
    if base == "fashion-mnist":
        shipped = Path(SHIPPED_DIR) / base
        if not allow_subset:
            looked.append(f"shipped subset {shipped}: not used (allow_subset=False)")
        else:
            ok, why = _holds_files(base, shipped)
            if ok:
                n_train, n_test = _shipped_counts(shipped)
                source = f"shipped subset ({n_train} train / {n_test} test images)"
                warnings.warn(
                    f"Full {base} not found; falling back to the {source} that comes with "
                    f"sqvae_core. Results will not match training on the full data set.\n"
                    + "Looked in:\n  " + "\n  ".join(looked) + "\n" + _how_to_get(base),
                    stacklevel=3)
                return shipped, source, True
            looked.append(f"shipped subset {shipped}: {why}")
    else:
        looked.append(f"shipped subset: none for {base}")

    raise DatasetNotFoundError(
        f"Dataset {base!r} not found. Looked in:\n  " + "\n  ".join(looked)
        + "\n" + _how_to_get(base))


# --------------------------------------------------------------------------- folders


_SCANS: dict | None = None     # the scans made inside a one_scan() block, by folder


@contextlib.contextmanager
def one_scan():
    """Inside the block, each folder is scanned (listed and stat'ed) once: loading several splits
    of a 200,000-image folder stats its files once, not once per split (~1-3 s each). The caller
    promises the folder does not change within the block (training's resolve: train + val)."""
    global _SCANS
    outer = _SCANS
    _SCANS = {} if outer is None else outer
    try:
        yield
    finally:
        _SCANS = outer


def _scan_folder(root: Path) -> tuple[list[tuple[str, int, int, int | None]], tuple[str, ...] | None]:
    """The image files under root, in a fixed order, with their stats: [(path, size, mtime_ns,
    label)] and the class names (sub-folders holding images, sorted; None: no classes). One
    os.scandir pass plus a stat per file (200,000 files: ~1 s on an idle machine)."""
    if _SCANS is not None:
        if str(root) not in _SCANS:
            _SCANS[str(root)] = _scan_folder_now(root)
        return _SCANS[str(root)]
    return _scan_folder_now(root)


def _scan_folder_now(root: Path) -> tuple[list[tuple[str, int, int, int | None]], tuple[str, ...] | None]:
    def images_under(d: str) -> list[tuple[str, int, int]]:
        out, dirs = [], []
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return out
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                dirs.append(e.path)
            elif e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS):
                st = e.stat()
                out.append((e.path, st.st_size, st.st_mtime_ns))
        for sub in dirs:
            out.extend(images_under(sub))
        return out

    entries = sorted(os.scandir(root), key=lambda e: e.name)
    subdirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    classes = [(e.name, images_under(e.path)) for e in subdirs]
    classes = [(n, files) for n, files in classes if files]
    loose = [e for e in entries if e.is_file() and not e.name.startswith(".")
             and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    if not classes:
        return [(e.path, st.st_size, st.st_mtime_ns, None) for e in loose for st in [e.stat()]], None
    if loose:
        warnings.warn(f"folder:{root}: ignoring {len(loose)} image(s) directly in the folder; "
                      f"only images in the class sub-folders are used", stacklevel=5)
    items = [(p, size, mtime, label) for label, (_, files) in enumerate(classes) for p, size, mtime in files]
    return items, tuple(n for n, _ in classes)


def _load_image(path: Path, size: int, channels: int, crop: int | None = None) -> np.ndarray:
    """One image as uint8 (C, size, size). Without crop: the shorter side is resized to size
    (bicubic), then the centre square is kept. With crop: first the centre crop x crop pixels of
    the original, then a resize to size (bilinear), as torchvision's CenterCrop(crop) then
    Resize(size) on PIL images -- the official SQ-VAE CelebA loader (CenterCrop(140), Resize(64))."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as im:
            if crop is None:
                im.draft(mode, (size, size))  # cheap JPEG downscale, never below size
            if "A" in im.getbands() or "transparency" in im.info:
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)  # transparent -> white
            im = im.convert(mode)
            w, h = im.size
            if crop is not None:
                if min(w, h) < crop:
                    raise ValueError(f"the image is {w}x{h}, smaller than the centre crop of {crop} pixels")
                left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
                im = im.crop((left, top, left + crop, top + crop))
                if crop != size:
                    im = im.resize((size, size), Image.Resampling.BILINEAR)
            else:
                scale = size / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                if (nw, nh) != (w, h):
                    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


#: Image sizes with a net design of their own (ModelConfig.design, nets.py: 28x28 -> 7x7 codes,
#: 32x32 -> 8x8, 64x64 -> 16x16); a folder of square images of one of them is trained at that size.
NET_SIZES = (28, 32, 64)
#: Bumped when the decoded cache's layout or the decoding changes (old caches are then not used).
CACHE_VERSION = 1
#: Folders smaller than this are decoded by one thread.
PARALLEL_MIN = 1024


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _parallel_map(fn, jobs: list[tuple], workers: int) -> list:
    """[fn(*job) for job in jobs], over `workers` threads when there are several jobs. Threads, not
    processes: Pillow releases the GIL while it decodes and resizes (2 threads: ~1.8x the images/s
    of one), the workers write straight into the one memory map, and nothing is re-imported. (A
    spawned process pool re-runs the parent's __main__, which inside Streamlit is the page script.)
    The first error cancels the jobs not started and is raised."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="sqvae-decode")
    try:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) ranges: ~8 per worker (balance), at most 2,000 images each."""
    size = max(64, min(2000, -(-n // (8 * workers))))
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _stats_digest(items, **params) -> str:
    """sha256 of the files' paths, sizes, mtimes and labels and of params: the cache key."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **params}, sort_keys=True).encode())
    h.update("\n".join(f"{p}\0{size}\0{mtime}\0{label}" for p, size, mtime, label in items).encode())
    return h.hexdigest()[:32]


def _folder_cache_dir() -> Path:
    return _cache_dir("folders")


def _atomic_write(final: Path, write) -> None:
    """write(tmp_path) then fsync and rename to final (same directory): a reader sees the whole file
    or none; an error (or a kill) leaves no file under the final name. Leftover temp files of dead
    processes are removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(f".{final.name}.*.tmp"):
        try:
            pid = int(old.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)                  # alive: another process is writing it
        except ProcessLookupError:
            old.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            pass
    tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        try:
            fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)                 # the rename itself reaches the disk
            finally:
                os.close(fd)
        except OSError:
            pass
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------- folders: shape of the images
@dataclass(frozen=True)
class FolderShape:
    """What a folder's image headers say (no pixel is decoded)."""

    n: int
    grey: bool                 # every image is grey (modes L, LA, 1, I, F, or a grey palette)
    size: int | None           # the side of every image when all are S x S with S in NET_SIZES, else None
    example: tuple[int, int]   # the first image's width x height

    @property
    def channels(self) -> int:
        return 1 if self.grey else 3

    def describe(self) -> str:
        what = "grey" if self.grey else "colour"
        size = (f"{self.size}x{self.size}" if self.size else f"first {self.example[0]}x{self.example[1]}, not all one of "
                + "/".join(f"{s}x{s}" for s in NET_SIZES))
        return f"{self.n} {what} images, {size}"


def _probe_images(paths: list[str]) -> list[tuple[bool, int, int]]:
    """(grey, width, height) of each image, from its header."""
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                mode = im.mode
                grey = mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
                if mode in ("P", "PA"):
                    pal = im.getpalette() or []
                    grey = all(pal[i] == pal[i + 1] == pal[i + 2] for i in range(0, len(pal) - 2, 3))
                out.append((grey, im.size[0], im.size[1]))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {p}: {e}") from None
    return out


def folder_shape(name: str) -> FolderShape:
    """Channels and size a folder: data set's images have: grey when every image is (header modes),
    and the common side S when every image is S x S with S one the nets take (NET_SIZES). Read from
    every image's header, in parallel for large folders, and cached beside the decoded data (keyed
    by the files' stats like it), so a second call costs a scan of the folder."""
    canon, folder = _parse_name(name)
    if canon != "folder":
        raise ValueError(f"folder_shape reads folder: data sets, not {name!r}")
    root = _folder_root(folder)
    items, _ = _scan_folder(root)
    if not items:
        raise ValueError(f"folder:{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    path = _folder_cache_dir() / f"shape-{_stats_digest(items, what='shape')}.json"
    try:
        doc = json.loads(path.read_text())
        return FolderShape(doc["n"], doc["grey"], doc["size"], tuple(doc["example"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    paths = [p for p, _, _, _ in items]
    workers = _workers() if len(paths) >= PARALLEL_MIN else 1
    probes = [x for part in _parallel_map(_probe_images, [(paths[a:b],) for a, b in _chunks(len(paths), workers)],
                                          workers) for x in part]
    sides = {(w, h) for _, w, h in probes}
    (w, h), = sides if len(sides) == 1 else [(0, 0)]
    shape = FolderShape(len(probes), all(g for g, _, _ in probes), w if w == h and w in NET_SIZES else None,
                        probes[0][1:])
    try:
        _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(
            {"n": shape.n, "grey": shape.grey, "size": shape.size, "example": list(shape.example), "root": str(root)})))
    except OSError as e:      # a read-only cache: only slower next time
        log.info("could not cache the shape of %s: %s", root, e)
    return shape


# --------------------------------------------------------------- folders: the decoded cache
def _decode_into(out: np.ndarray, start: int, paths: list[str], size: int, channels: int, crop: int | None) -> int:
    """Decode paths into rows start.. of out (the cache's memory map)."""
    for i, p in enumerate(paths):
        out[start + i] = _load_image(Path(p), size, channels, crop)
    return len(paths)


def _decode_folder(paths: list[str], final: Path, size: int, channels: int, crop: int | None,
                   workers: int) -> None:
    """Decode every image into final (.npy, uint8 (N, C, size, size)), atomically (_atomic_write)."""
    def write(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), channels, size, size))
        jobs = [(out, a, paths[a:b], size, channels, crop) for a, b in _chunks(len(paths), workers)]
        _parallel_map(_decode_into, jobs, workers)
        out.flush()
        del out

    _atomic_write(final, write)


def _folder_root(folder: str) -> Path:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"folder dataset: {root} is not a directory (resolved: {root.resolve()})")
    return root.resolve()


def _split_order(n: int, seed: int) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """The fixed-seed 80/10/10 split, as the order the cache stores the images in: train, val, test,
    each in file order, so that each split is one contiguous slice of the memory map."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_test = int(round(0.1 * n))
    n_val = int(round(0.1 * n))
    parts = {"train": np.sort(perm[n_test + n_val:]), "val": np.sort(perm[n_test:n_test + n_val]),
             "test": np.sort(perm[:n_test])}
    bounds, at = {}, 0
    for split in ("train", "val", "test"):
        bounds[split] = (at, at + len(parts[split]))
        at += len(parts[split])
    return np.concatenate([parts["train"], parts["val"], parts["test"]]), bounds


def folder_rebuild_command(name: str) -> str | None:
    """The command that recreates a folder: data set (its REBUILD_FILE's first line), or None."""
    canon, folder = _parse_name(name)
    if canon != "folder":
        return None
    try:
        line = (Path(folder).expanduser() / REBUILD_FILE).read_text().strip().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return line[0].strip() if line and line[0].strip() else None


def _load_folder(name: str, path: str, split: str, image_size, channels, seed: int,
                 center_crop: int | None = None, workers: int | None = None) -> ImageData:
    root = _folder_root(path)
    if image_size is None or channels is None:
        shape = folder_shape(f"folder:{root}")
        channels = shape.channels if channels is None else channels
        image_size = (shape.size or 32) if image_size is None else image_size
    c, s, _ = dataset_shape(name, image_size, channels)
    memo_key = ("split", str(root), s, c, center_crop, seed)
    if _SCANS is not None and memo_key in _SCANS:          # another split of the same one_scan() block
        items, class_names, bounds, final = _SCANS[memo_key]
    else:
        items, class_names = _scan_folder(root)
        if not items:
            raise ValueError(f"folder:{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
        order, bounds = _split_order(len(items), seed)
        items = [items[i] for i in order]
        prefix = hashlib.sha256(json.dumps([str(root), s, c, center_crop, seed]).encode()).hexdigest()[:16]
        final = _folder_cache_dir() / f"{prefix}-{_stats_digest(items, size=s, channels=c, crop=center_crop, seed=seed)}.npy"
        if _SCANS is not None:
            _SCANS[memo_key] = items, class_names, bounds, final
    cache, prefix = final.parent, final.name.split("-")[0]
    if not final.is_file():
        log.info("decoding %d images of %s into %s", len(items), root, final)
        if workers is None:
            workers = _workers() if len(items) >= PARALLEL_MIN else 1
        _decode_folder([p for p, _, _, _ in items], final, s, c, center_crop, workers)
        for old in cache.glob(f"{prefix}-*.npy"):       # this folder's caches of older file stats
            if old != final:
                old.unlink(missing_ok=True)
    # copy-on-write map: nothing is read until used, and a caller writing into its tensor changes
    # its own private pages, never the cache file
    images = np.load(final, mmap_mode="c")
    if images.shape != (len(items), c, s, s) or images.dtype != np.uint8:
        raise ValueError(f"{final}: decoded cache holds {images.dtype} {images.shape}, expected uint8 "
                         f"{(len(items), c, s, s)}; delete it to decode again")
    a, b = bounds[split]
    labels = None
    if class_names is not None:
        labels = torch.tensor([lab for _, _, _, lab in items[a:b]], dtype=torch.int64)
    return ImageData(pixels=torch.from_numpy(images[a:b]), labels=labels, name=name, split=split, source=str(root),
                     num_labels=len(class_names) if class_names is not None else None,
                     levels=None, class_names=class_names)


# --------------------------------------------------------------------------- public


def _n_val(val_size, n_train: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float, np.integer, np.floating)):
        raise TypeError(f"val_size must be an int or a float fraction, got {val_size!r}")
    if isinstance(val_size, (float, np.floating)):
        if not 0.0 <= val_size < 1.0:
            raise ValueError(f"val_size as a float is a fraction in [0, 1), got {val_size}")
        return int(round(float(val_size) * n_train))
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    return min(int(val_size), n_train // 10)


def load_dataset(name: str, split: str = "train", data_dir: str | None = None, *,
                 download: bool = True, image_size: int | None = None,
                 channels: int | None = None, val_size: int | float = 5000, seed: int = 0,
                 allow_subset: bool = True, val_from_end: bool = False,
                 center_crop: int | None = None) -> ImageData:
    """Load a data set split (uint8 pixels; see ImageData).  See the module docstring for the details.

    image_size/channels apply to ``folder:`` data only (ignored otherwise; None: read from the
    images, see folder_shape: grey -> 1 channel, a common side of 28, 32 or 64 -> that size,
    else 3 channels, 32); so does
    ``center_crop``: crop the centre center_crop x center_crop pixels of each image, then resize
    to image_size (CelebA's official 178x218 -> 64x64: center_crop=140); every image must be at
    least that large. Without it, the shorter side is resized to image_size and the centre kept. val_size
    does not apply to ``folder:`` data (fixed 80/10/10 split). ``val_from_end=True`` makes
    "val" the last ``val_size`` images of the training file and "train" the ones before, in
    file order, as the official SQ-VAE loaders do (no 10% cap; at most half the images).
    """
    canon, folder = _parse_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if center_crop is not None:
        if canon != "folder":
            raise ValueError(f"center_crop applies to folder: datasets only, not {name!r}")
        if isinstance(center_crop, bool) or int(center_crop) != center_crop or center_crop <= 0:
            raise ValueError(f"center_crop must be a positive number of pixels, got {center_crop!r}")
        center_crop = int(center_crop)
    if canon == "folder":
        return _load_folder(name, folder, split, image_size, channels, seed, center_crop)

    base = _base(canon)
    if os.environ.get("SQVAE_OFFLINE", "") not in ("", "0"):
        download = False   # SQVAE_OFFLINE=1: never try the network (air-gapped machines, tests)
    directory, source, _subset = _locate(base, data_dir, download, allow_subset)
    loader = _load_cifar_split if base == "cifar10" else _load_idx_split
    images, labels = loader(directory, "test" if split == "test" else "train")

    idx = None
    if split != "test":
        n = images.shape[0]
        if val_from_end:
            n_val = min(int(val_size), n // 2)
            idx = np.arange(n - n_val, n) if split == "val" else np.arange(n - n_val)
        else:
            n_val = _n_val(val_size, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
            idx = np.sort(perm[:n_val] if split == "val" else perm[n_val:])
        images, labels = images[idx], labels[idx]
    else:
        images = np.array(images)             # a copy: the parsed-file cache is never exposed
    x = images.reshape(images.shape[0], *dataset_shape(canon))
    return ImageData(
        pixels=torch.from_numpy(np.ascontiguousarray(x)),   # uint8; batch() converts (cat8: levels=8)
        labels=torch.from_numpy(labels.astype(np.int64)),
        name=name, split=split, source=source, num_labels=10,
        levels=8 if canon == "fashion-mnist-cat8" else None,
        class_names=CLASS_NAMES[base])


def iterate_batches(data: ImageData, batch_size: int, *, shuffle: bool,
                    generator: torch.Generator | None = None, drop_last: bool = True):
    """Yield (images, labels) batches of a data set for one epoch, images as float32 (converted
    batch by batch: ImageData.batch).

    With shuffle, batches are gathered through one random permutation (generator, if
    given, makes it reproducible); without, they are contiguous slices.
    labels is None for unlabeled data.  drop_last drops a final short batch (so a data
    set smaller than batch_size yields nothing).
    """
    if int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    batch_size = int(batch_size)
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else None
    labels = data.labels

    def gen():
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            if order is None:
                sl = slice(start, start + batch_size)
                yield data.batch(sl), (labels[sl] if labels is not None else None)
            else:
                sel = order[start:start + batch_size]
                yield data.batch(sel), (labels[sel] if labels is not None else None)

    return gen()
