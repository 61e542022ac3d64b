"""A bundle uploaded as a .zip, unpacked safely into a run directory."""
from __future__ import annotations

import io
import re
import shutil
import zipfile
from pathlib import Path

from .io import (BEST, CONFIG, EVAL, MAPS, METRICS, PRIOR, PRIOR_SUMMARY, SAMPLES, SNAPSHOTS, STATUS, WEIGHTS,
                 BundleError)
from .reader import RunDir

UPLOAD_FILES = {CONFIG, METRICS, STATUS, WEIGHTS, BEST, PRIOR, PRIOR_SUMMARY, MAPS, EVAL}
MAX_UPLOAD_BYTES = 64 << 20


def import_bundle_zip(data: bytes, dest_root: str | Path, name: str) -> Path:
    """Unpack an uploaded bundle (.zip of a run directory) into dest_root/name, safely.

    Only known file names (optionally under one top folder, plus snapshots/ and samples/)
    are extracted, sizes are capped, and the result must load with `load_bundle`;
    otherwise nothing is left behind and a BundleError says why.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}", name) or ".." in name:
        raise BundleError(f"invalid bundle name {name!r}: use letters, digits, '_', '-', '.'")
    if len(data) > MAX_UPLOAD_BYTES:
        raise BundleError(f"upload too large ({len(data)} bytes, limit {MAX_UPLOAD_BYTES})")
    dest = Path(dest_root) / name
    if dest.exists():
        raise BundleError(f"a bundle named {name} already exists")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in zf.infolist() if not m.is_dir()]
    except zipfile.BadZipFile:
        raise BundleError("upload is not a valid .zip file") from None
    if sum(m.file_size for m in members) > 4 * MAX_UPLOAD_BYTES or len(members) > 2000:
        raise BundleError("upload expands to too much data")
    # the bundle's root is where config.json is: the zip's top level or one folder down
    roots = [m.filename[:-len(CONFIG)] for m in members
             if m.filename.split("/")[-1] == CONFIG and m.filename.count("/") <= 1]
    if not roots:
        raise BundleError(f"upload has no {CONFIG} at its top level or in one folder")
    strip = roots[0]
    dest.mkdir(parents=True)
    try:
        for m in members:
            if not m.filename.startswith(strip):
                continue
            rel = m.filename[len(strip):]
            parts = rel.split("/")
            ok = (rel in UPLOAD_FILES or (len(parts) == 2 and parts[0] in (SNAPSHOTS, SAMPLES)
                  and re.fullmatch(r"[A-Za-z0-9_.-]+\.(safetensors|png)", parts[1])))
            if not ok:
                continue        # anything else (paths, pickles, scripts) is ignored
            (dest / parts[0]).parent.mkdir(exist_ok=True)
            if len(parts) == 2:
                (dest / parts[0]).mkdir(exist_ok=True)
            (dest / rel).write_bytes(zf.read(m))
        RunDir(dest).load()
    except BundleError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise BundleError(f"upload could not be read ({e.__class__.__name__}: {e})") from None
    return dest
