"""Page chrome and widgets every page uses: setup, sidebar, error guard, image grids, the card,
and widget state that survives lazy tabs."""
from __future__ import annotations

import contextlib
import html
import logging
import re
import threading
import time
from pathlib import Path

import numpy as np
import streamlit as st

from app import settings, theme
from app.images import image_grid, png_bytes

log = logging.getLogger("sqvae_app")


class _RunFlags(threading.local):
    in_entrypoint = False


RUN = _RunFlags()        # set by main.py around pg.run(): the page must not redraw the sidebar


def page_setup(title: str | None, page_title: str):
    """Top of every page: page config and sidebar when the page runs on its own (tests), the title
    (None: the page places its title itself)."""
    if not RUN.in_entrypoint:
        st.set_page_config(page_title=f"{page_title} · SQ-VAE Explorer", layout="wide")
        theme.page_style()
        sidebar_widgets()
    if title:
        st.title(title)


def sidebar_widgets():
    """Sidebar of every page: demo toggle, where the app reads runs from, bundle upload. main.py
    draws it after the page (it starts collapsed): the page's first chart comes sooner."""
    with st.sidebar:
        st.toggle("Demo mode (large type, high contrast)", key="demo_mode", on_change=_sync_demo_param)
        st.caption(f"Bundles: `{settings.checkpoints_dir()}`  \nRuns: `{settings.runs_dir()}`")
        if settings.read_only():
            st.caption(":material/visibility: Read-only dashboard: explore and compare; uploads, imports and "
                       "training controls are off (SQVAE_READ_ONLY).")
            return
        upload_bundle()
        upload_official()


def _sync_demo_param():
    st.query_params["demo"] = "1" if st.session_state.get("demo_mode") else "0"


def stop_page():
    """st.stop() for a page: under main.py, which draws the sidebar after a page that runs to its
    end, the sidebar is drawn here first (nothing is drawn after st.stop())."""
    if RUN.in_entrypoint:
        sidebar_widgets()
    st.stop()


def upload_bundle():
    """Sidebar uploader: a .zip of a run directory, validated and unpacked into RUNS/uploads/."""
    up = st.file_uploader("Upload a bundle (.zip of a run directory)", type=["zip"], key="bundle_upload")
    if up is None or st.session_state.get("_uploaded") == up.file_id:
        return
    from sqvae_core import rundir as rd
    st.session_state["_uploaded"] = up.file_id
    name = upload_name(up.name)
    try:
        settings.refuse_if_read_only("uploading a bundle")
        (settings.runs_dir() / settings.UPLOADS).mkdir(parents=True, exist_ok=True)
        dest = rd.import_bundle_zip(up.getvalue(), settings.runs_dir() / settings.UPLOADS, name)
        st.success(f"Uploaded as `runs/{settings.UPLOADS}/{dest.name}`; choose it in the bundle list.")
    except (rd.BundleError, OSError) as e:       # ReadOnlyError is an OSError (PermissionError)
        st.error(f"Upload refused: {e}")


CHECKPOINT_SUFFIXES, CONFIG_SUFFIXES = (".pt", ".pth", ".ckpt"), (".yaml", ".yml", ".json")


def upload_name(file_name: str) -> str:
    """A new run name under RUNS/uploads/ for an uploaded file: its stem made safe, plus the time
    (and a counter when two uploads of one name arrive within a second)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(file_name).stem).lstrip(".")[:60] or "bundle"
    name, n = f"{stem}-{int(time.time())}", 1
    while (settings.runs_dir() / settings.UPLOADS / name).exists():
        n += 1
        name = f"{stem}-{int(time.time())}-{n}"
    return name


def upload_official():
    """Sidebar uploader: a checkpoint of the official SQ-VAE trainer and its YAML (or the configs.json
    written beside it), imported like `sqvae import-official` (sqvae_core.official: loaded with
    weights_only=True, checked key by key, written to a temp dir and renamed) into RUNS/uploads/."""
    ups = st.file_uploader("Import an official SQ-VAE checkpoint (.pt and its .yaml)", key="official_upload",
                           type=[s.lstrip(".") for s in CHECKPOINT_SUFFIXES + CONFIG_SUFFIXES],
                           accept_multiple_files=True)
    if not ups:
        return
    files = tuple(sorted(u.file_id for u in ups))
    if st.session_state.get("_imported") == files:
        return
    ckpts = [u for u in ups if Path(u.name).suffix.lower() in CHECKPOINT_SUFFIXES]
    configs = [u for u in ups if Path(u.name).suffix.lower() in CONFIG_SUFFIXES]
    if len(ckpts) != 1 or len(configs) != 1:
        st.info("Add exactly two files: the official checkpoint (.pt) and the YAML of its run.")
        return
    from sqvae_core import rundir as rd
    from sqvae_core.official import import_official
    st.session_state["_imported"] = files
    (ckpt,), (config,) = ckpts, configs
    try:
        settings.refuse_if_read_only("importing a checkpoint")
        big = [u.name for u in (ckpt, config) if u.size > rd.MAX_UPLOAD_BYTES]
        if big:
            raise rd.BundleError(f"{big[0]} is too large (limit {rd.MAX_UPLOAD_BYTES} bytes)")
        with st.spinner("Importing the official checkpoint…"):
            dest = import_official(ckpt.getvalue(), config.getvalue(),
                                   settings.runs_dir() / settings.UPLOADS / upload_name(config.name),
                                   checkpoint_name=Path(ckpt.name).name)
        st.success(f"Imported as `runs/{settings.UPLOADS}/{dest.name}`; choose it in the bundle list.")
    except (rd.BundleError, OSError) as e:
        st.error(f"Import refused: {e}")


# -------------------------------------------------------------------------- errors
def is_control_flow(e: BaseException) -> bool:
    """Streamlit's rerun/stop exceptions, which must pass through guard()."""
    return type(e).__module__.startswith("streamlit") and type(e).__name__ in (
        "RerunException", "StopException", "FragmentHandledException")


@contextlib.contextmanager
def guard(what: str):
    """Show any error of a page section as st.error and carry on with the rest of the page."""
    from sqvae_core.rundir import BundleError
    try:
        yield
    except BundleError as e:
        st.error(f"{what}: {e}")
    except Exception as e:           # noqa: BLE001 - the app must never crash
        if is_control_flow(e):
            raise
        log.exception("%s failed", what)
        msg = " ".join(str(e).split()) or e.__class__.__name__
        st.error(f"{what} failed: {e.__class__.__name__}: {msg[:500]}")


# ------------------------------------------------------------------------- widgets
def keep(key: str, default=None):
    """Widget state that survives lazy tabs (a widget not drawn in a run loses its state)."""
    shadow = f"_keep_{key}"
    if key not in st.session_state and shadow in st.session_state:
        st.session_state[key] = st.session_state[shadow]
    elif key not in st.session_state and default is not None:
        st.session_state[key] = default


def remember(key: str):
    st.session_state[f"_keep_{key}"] = st.session_state.get(key)


def show_grid(images: np.ndarray, ncol: int, caption: str, file_name: str, key: str, zoom: int = 3):
    """An image grid sent at native size (small PNG) and enlarged by the browser, pixelated, with a
    download of the same grid at 4x."""
    arr = image_grid(images, ncol=ncol, scale=1)
    w = arr.shape[1] * zoom
    st.image(arr, caption=caption, width="stretch" if w > 1000 else w, output_format="PNG")
    st.download_button("Download PNG", png_bytes(image_grid(images, ncol=ncol, scale=4)), file_name=file_name,
                       mime="image/png", key=key, on_click="ignore")


def card_html(items: list[tuple[str, object]]) -> str:
    """A row of label/value tiles as one HTML block (one element instead of a column per metric)."""
    tiles = "".join(f'<div class="sq-tile"><div class="sq-label">{html.escape(str(k))}</div>'
                    f'<div class="sq-value">{html.escape(str(v))}</div></div>' for k, v in items)
    return f'<div class="sq-card">{tiles}</div>'


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def metrics_csv(rows: list[dict]) -> bytes:
    import pandas as pd
    return pd.DataFrame(rows).to_csv(index=False).encode()
