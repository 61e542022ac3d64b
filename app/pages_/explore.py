"""Explore a trained bundle: model card, reconstructions, codebook usage and map, Neighbor-k,
interpolation, code edits, per-code gallery, PixelCNN prior samples, downloads."""
from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import numpy as np                     # noqa: E402
import plotly.graph_objects as go      # noqa: E402
import streamlit as st                 # noqa: E402

from app import common as C            # noqa: E402

if not C.RUN.in_entrypoint:
    st.set_page_config(page_title="Explore · SQ-VAE Explorer", layout="wide")
title_slot = st.container()      # filled after the codebook map: the map is sent first (first paint)
C.page_setup(None)

import torch                            # noqa: E402
from sqvae_core import explore          # noqa: E402
from sqvae_core.rundir import BundleError  # noqa: E402

N_SHOW = 16          # images in the reconstruction grid
N_TOOL = 8           # images in the Neighbor-k grid
TABS = ["Reconstructions", "Codebook usage", "Neighbor-k", "Interpolate", "Edit codes", "Code gallery", "Prior samples", "Metrics"]


# ------------------------------------------------------------------ cached computations
@st.cache_data(max_entries=32, show_spinner=False)
def _reconstructions(path: str, wm: int, cm: int, n: int, source: str = "test") -> np.ndarray:
    """Deterministic reconstructions of the first n test images ("test") or of the grid's images."""
    b = C._load_bundle(path, wm, cm)
    x = C.display_images(b, n)[0] if source == "display" else C.test_images(b)[0][:n]
    return b.model.reconstruct(torch.from_numpy(x)).numpy()


@st.cache_data(max_entries=64, show_spinner=False)
def _neighbour(path: str, wm: int, cm: int, k: int, n: int) -> np.ndarray:
    b = C._load_bundle(path, wm, cm)
    x = torch.from_numpy(C.test_images(b)[0][:n])
    return explore.neighbour_edit(b.model, x, k)[0].numpy()


@st.cache_data(max_entries=64, show_spinner=False)
def _interpolation(path: str, wm: int, cm: int, i: int, j: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    b = C._load_bundle(path, wm, cm)
    imgs = C.test_images(b)[0]
    res = explore.interpolate(b.model, torch.from_numpy(imgs[i]), torch.from_numpy(imgs[j]), steps)
    return res["latent"].numpy(), res["pixel"].numpy()


@st.cache_data(max_entries=64, show_spinner=False)
def _gallery(path: str, wm: int, cm: int, n: int, code: int) -> tuple[list, np.ndarray]:
    b = C._load_bundle(path, wm, cm)
    codes = torch.from_numpy(C._dataset_codes(path, wm, cm, n))
    hits = explore.code_gallery(b.model, None, code, top=16, codes=codes)
    patch = explore.mean_patch(b.model, code, codes=codes).numpy()
    return hits, patch


@st.cache_data(max_entries=64, show_spinner=False)
def _previews(path: str, wm: int, cm: int, grid_bytes: bytes, row: int, col: int, codes: tuple) -> np.ndarray:
    b = C._load_bundle(path, wm, cm)
    n = b.model_cfg.latent_size
    grid = torch.from_numpy(np.frombuffer(grid_bytes, dtype=np.int64).reshape(n, n).copy())
    imgs = np.stack([explore.edit_code(b.model, grid, row, col, c).numpy() for c in codes])
    return C.image_grid(imgs, ncol=len(codes), scale=3)


@st.cache_resource(max_entries=4, show_spinner=False)
def _prior(path: str, mt: int, num_codes: int):
    from sqvae_core.prior import load_prior
    return load_prior(path, "cpu", num_codes=num_codes)


@st.cache_data(max_entries=32, show_spinner=False)
def _prior_samples(path: str, wm: int, cm: int, prior_path: str, pm: int, temperature: float,
                   label, seed: int, n: int) -> np.ndarray:
    b = C._load_bundle(path, wm, cm)
    prior = _prior(prior_path, pm, b.model_cfg.codebook_size)
    gen = torch.Generator().manual_seed(int(seed))
    labels = torch.tensor(label) if isinstance(label, tuple) else label
    codes = prior.sample(n, temperature=temperature, labels=labels, generator=gen)
    with torch.no_grad():
        return b.model.decode_indices(codes).numpy()


# ---------------------------------------------------------------------------- pieces
def keep(key: str, default=None):
    """Widget state that survives lazy tabs (a widget not drawn in a run loses its state)."""
    shadow = f"_keep_{key}"
    if key not in st.session_state and shadow in st.session_state:
        st.session_state[key] = st.session_state[shadow]
    elif key not in st.session_state and default is not None:
        st.session_state[key] = default


def remember(key: str):
    st.session_state[f"_keep_{key}"] = st.session_state.get(key)


def no_bundles():
    st.info(
        "No trained bundles found.\n\n"
        f"The app looks in `{C.checkpoints_dir()}` (env `SQVAE_CHECKPOINTS`) and `{C.runs_dir()}` "
        "(env `SQVAE_RUNS`). Train one from a terminal:\n\n"
        f"```bash\npython -m sqvae_core train --model gaussian_1 --preset demo --out {C.runs_dir()}/demo\n```\n\n"
        "(about two minutes on a 2-core CPU), or start the same demo training here and watch it live:")
    if st.button("Train a demo model", type="primary", key="train_demo"):
        with C.guard("Starting the demo training"):
            name, state = C.start_demo_training()
            st.success(f"Demo training `{name}` {state}. Open **Train live** to watch it.")
            st.session_state["watch_run"] = name
            try:
                st.switch_page(str(Path(__file__).resolve().parent / "train.py"))
            except Exception as e:     # noqa: BLE001 - the page runs on its own (tests)
                if C._is_control_flow(e):
                    raise


def show_grid(images: np.ndarray, ncol: int, caption: str, file_name: str, key: str, zoom: int = 3):
    """An image grid sent at native size (small PNG) and enlarged by the browser, pixelated."""
    arr = C.image_grid(images, ncol=ncol, scale=1)
    w = arr.shape[1] * zoom
    st.image(arr, caption=caption, width="stretch" if w > 1000 else w, output_format="PNG")
    st.download_button("Download PNG", C.png_bytes(C.image_grid(images, ncol=ncol, scale=4)), file_name=file_name,
                       mime="image/png", key=key, on_click="ignore")


def model_card(ref, bundle, ev: dict | None, rows: list[dict], status: dict):
    cfg = bundle.model_cfg
    val = C.last_val_row(rows)
    steps = status.get("step") or (val or {}).get("step") or bundle.config.get("train", {}).get("steps")
    full = C.eval_json(bundle)
    if full is not None and full.get("test_mse") is not None:
        mse, ppl, dead = full.get("test_mse"), full.get("test_perplexity"), full.get("dead_codes")
        src = f"the bundle's eval.json ({full.get('n_test', '?')} test images, deterministic quantization)"
    elif ev is not None:
        mse, ppl, dead, src = ev.get("mse"), ev.get("perplexity"), ev.get("dead_codes"), \
            f"quick eval on {ev.get('n_images')} test images (deterministic quantization)"
    elif val is not None:
        mse, ppl, dead, src = val.get("val_mse"), val.get("val_perplexity"), val.get("val_dead_codes"), \
            f"the run's last validation row (step {val.get('step')})"
    else:
        mse = ppl = dead = None
        src = "no evaluation available"
    items = [("Kind", cfg.kind), ("Dataset", bundle.dataset), ("K (codes)", cfg.codebook_size),
             ("d (code dim)", cfg.code_dim), ("Steps", C.fmt(steps)), ("Test MSE", C.fmt(mse, 4)),
             ("Perplexity", C.fmt(ppl, 4)), ("Dead codes", C.fmt(dead))]
    st.html(C.card_html(items))
    state = status.get("state", "unknown")
    st.caption(f"**{C.KIND_LABELS.get(cfg.kind, cfg.kind)}** · `{ref.label}` · weights `{bundle.weights}` · "
               f"run state: {state} · metrics from {src}. Test MSE: per-image sum of squared error "
               f"(pixels in [0, 1]); perplexity: exp(H) of the code usage; dead codes: codes no position uses.")
    if state == "failed" and status.get("error"):
        st.error(f"This run failed: {status['error']}")


def map_figure(points: list[dict], title: str) -> go.Figure:
    live = [p for p in points if not p.get("dead")]
    dead = [p for p in points if p.get("dead")]
    fig = go.Figure()
    has_usage = any(p.get("usage") is not None for p in points)
    if live:
        usage = np.array([p.get("usage") or 0 for p in live], dtype=float)
        fig.add_trace(go.Scatter(
            x=[p["x"] for p in live], y=[p["y"] for p in live], mode="markers", name="codes",
            customdata=[[p["code"], p.get("usage")] for p in live],
            marker=dict(size=9, color=np.log10(usage + 1).tolist() if has_usage else None, colorscale="Viridis",
                        showscale=has_usage, line=dict(width=0.5, color="#333"),
                        colorbar=dict(title="log10(1+usage)", thickness=12) if has_usage else None),
            hovertemplate="code %{customdata[0]}<br>usage %{customdata[1]}<extra></extra>"))
    if dead:
        fig.add_trace(go.Scatter(
            x=[p["x"] for p in dead], y=[p["y"] for p in dead], mode="markers", name=f"dead codes ({len(dead)})",
            customdata=[[p["code"], 0] for p in dead],
            marker=dict(size=11, symbol="x", color="#d62728"),
            hovertemplate="code %{customdata[0]}<br>dead (usage 0)<extra></extra>"))
    fig.update_xaxes(showticklabels=False, title=None)
    fig.update_yaxes(showticklabels=False, title=None)
    fig.update_layout(legend=dict(orientation="h", y=-0.05), clickmode="event+select", dragmode="pan")
    return C.style(fig, 430, title)


def usage_figure(usage: list[int]) -> go.Figure:
    u = np.asarray(usage)
    order = np.argsort(-u, kind="stable")
    counts = u[order]
    dead = counts == 0
    fig = go.Figure()
    fig.add_trace(go.Bar(x=[str(c) for c in order[~dead]], y=counts[~dead], name="used codes",
                         marker_color="#1f77b4", hovertemplate="code %{x}<br>usage %{y}<extra></extra>"))
    if dead.any():
        fig.add_trace(go.Bar(x=[str(c) for c in order[dead]], y=[0.5] * int(dead.sum()),
                             name=f"dead codes ({int(dead.sum())}, drawn at 0.5)", marker_color="#d62728",
                             hovertemplate="code %{x}<br>dead (usage 0)<extra></extra>"))
    fig.update_yaxes(type="log", title="positions using the code")
    fig.update_xaxes(type="category", title="code (sorted by usage)", showticklabels=len(u) <= 64)
    fig.update_layout(bargap=0.05, legend=dict(orientation="h", y=-0.22, x=0))
    return C.style(fig, 430, "Codebook usage")


def selected_code(event) -> int | None:
    try:
        pts = event.selection.points if event is not None else []
    except AttributeError:
        pts = (event or {}).get("selection", {}).get("points", [])
    for p in pts or []:
        cd = p.get("customdata")
        if isinstance(cd, dict):          # typed-array payloads arrive as {"0": .., "1": ..}
            cd = [cd[k] for k in sorted(cd, key=str)]
        if isinstance(cd, (list, tuple)) and cd:
            try:
                return int(cd[0])
            except (TypeError, ValueError):
                continue
    return None


# ------------------------------------------------------------------------- sections
def codebook_map_section(bundle):
    with C.guard("Codebook map"):
        if not bundle.model.discrete:
            st.info("The continuous VAE has no codebook to map.")
            return
        pts, state = C.umap_map(bundle)
        method = "UMAP"
        if pts is None:
            pts, method = C.pca_map(bundle), "PCA"
        n_used = (C.quick_eval(bundle) or {}).get("n_images", C.eval_images())
        fig = map_figure(pts, f"Codebook map ({method}) — colour: usage on {n_used} test images, "
                              f"✕: codes unused there")
        event = C.plot(fig, key="map_chart", on_select="rerun", selection_mode="points")
        code = selected_code(event)
        if code is not None and code != st.session_state.get("_map_code"):
            st.session_state["_map_code"] = code
            st.session_state["gallery_code"] = code
            st.session_state["_keep_gallery_code"] = code
        if code is not None:
            st.caption(f"Selected code {code}: open **Code gallery** to see where it is used.")
        if state == "computing":
            st.caption(":material/hourglass_top: UMAP is being computed in the background; "
                       "showing the instant PCA map until it is ready.")
        elif state not in ("ready", "off"):
            st.caption(f"UMAP unavailable ({state}); showing PCA.")


def usage_section(bundle, ev):
    with C.guard("Codebook usage"):
        if ev is not None and ev.get("usage") is not None:
            C.plot(usage_figure(ev["usage"]), key="usage_chart")
            st.caption(f"{ev['dead_codes']} of {ev['codebook_size']} codes dead on {ev['n_images']} test images; "
                       f"perplexity {ev['perplexity']:.1f}.")
        elif bundle.model.discrete:
            st.info("Code usage needs the test images (see the error above).")


def reconstructions(ref, bundle):
    imgs, source = C.display_images(bundle, N_SHOW)
    n = len(imgs)
    rec = _reconstructions(*C.bundle_key(bundle.path), n, "display")
    st.markdown("**Originals (top) vs reconstructions (bottom)**")
    show_grid(np.concatenate([imgs, rec]), n, f"{n} images: {source}",
              f"{ref.name.replace('/', '_')}_reconstructions.png", "dl_recon")


def neighbour_tool(ref, bundle):
    k_max = min(bundle.model_cfg.codebook_size, 64)
    keep("nk_k", min(2, k_max))
    if not 1 <= int(st.session_state["nk_k"]) <= k_max:
        st.session_state["nk_k"] = min(2, k_max)
    k = st.slider("Neighbor-k: replace every code by its k-th nearest code (k = 1 is the code itself)",
                  1, k_max, key="nk_k")
    remember("nk_k")
    imgs = C.test_images(bundle)[0]
    n = min(N_TOOL, len(imgs))
    key = C.bundle_key(bundle.path)
    edited = _neighbour(*key, int(k), n)
    rec = _reconstructions(*key, n)
    st.markdown(f"**Neighbor-{k}** edit: rows are originals, reconstructions (Neighbor-1) and Neighbor-{k}.")
    show_grid(np.concatenate([imgs[:n], rec, edited]), n, f"Neighbor-{k} on {n} test images",
              f"{ref.name.replace('/', '_')}_neighbor{k}.png", "dl_nk")
    st.caption("The SQ-VAE paper's test of codebook smoothness: with a smooth codebook, near codes decode to "
               "near images and small k changes little; compare a Gaussian SQ-VAE bundle with a VQ-VAE one.")


def interpolation_tool(ref, bundle):
    imgs, labels, _, names = C.test_images(bundle)
    n = min(N_SHOW, len(imgs))

    def label(i):
        if labels is not None and names is not None and 0 <= int(labels[i]) < len(names):
            return f"#{i} ({names[int(labels[i])]})"
        return f"#{i}"
    c1, c2, c3 = st.columns(3)
    for key, default in (("interp_a", 0), ("interp_b", min(1, n - 1)), ("interp_steps", 8)):
        keep(key, default)
        if key != "interp_steps" and not 0 <= int(st.session_state[key]) < n:
            st.session_state[key] = default
    i = c1.selectbox("Image A", list(range(n)), format_func=label, key="interp_a")
    j = c2.selectbox("Image B", list(range(n)), format_func=label, key="interp_b")
    steps = c3.slider("Steps", 3, 16, key="interp_steps")
    for key in ("interp_a", "interp_b", "interp_steps"):
        remember(key)
    latent, pixel = _interpolation(*C.bundle_key(bundle.path), int(i), int(j), int(steps))
    st.markdown(f"**Interpolation {label(i)} → {label(j)}, {steps} steps.** Top: path in latent space "
                "(mix the encoder outputs, quantize, decode). Bottom: pixel-space cross-fade of the reconstructions.")
    show_grid(np.concatenate([latent, pixel]), int(steps), "latent path (top) vs pixel mixture (bottom)",
              f"{ref.name.replace('/', '_')}_interp_{i}_{j}.png", "dl_interp")


def _mark_box(image: np.ndarray, box) -> np.ndarray:
    """(C,H,W) in [0,1] -> RGB (3,H,W) with a red rectangle (display only)."""
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image.copy()
    t, b, l, r = box
    red = np.array([1.0, 0.1, 0.1])[:, None]
    rgb[:, t, l:r] = red
    rgb[:, b - 1, l:r] = red
    rgb[:, t:b, l] = red
    rgb[:, t:b, r - 1] = red
    return rgb


def grid_figure(grid: np.ndarray, row: int, col: int, changed: set) -> go.Figure:
    n = grid.shape[0]
    fig = go.Figure()
    fig.add_trace(go.Heatmap(z=grid.tolist(), colorscale="Viridis", showscale=False, hoverinfo="skip",
                             text=grid.astype(str), texttemplate="%{text}", textfont=dict(size=13)))
    rr, cc = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    fig.add_trace(go.Scatter(   # invisible click targets on the cell centres (heatmaps send no clicks)
        x=cc.ravel().tolist(), y=rr.ravel().tolist(), mode="markers",
        customdata=np.stack([rr.ravel(), cc.ravel(), grid.ravel()], 1).tolist(),
        marker=dict(size=34, color="rgba(255,255,255,0.01)", symbol="square"),
        selected=dict(marker=dict(color="rgba(255,255,255,0.01)")),
        unselected=dict(marker=dict(opacity=1)),
        hovertemplate="row %{customdata[0]}, col %{customdata[1]}<br>code %{customdata[2]}<extra></extra>",
        showlegend=False))
    fig.add_shape(type="rect", x0=col - 0.5, x1=col + 0.5, y0=row - 0.5, y1=row + 0.5,
                  line=dict(color="#ff2d2d", width=4))
    for (r, c) in changed:
        fig.add_shape(type="rect", x0=c - 0.45, x1=c + 0.45, y0=r - 0.45, y1=r + 0.45,
                      line=dict(color="#ffd400", width=2, dash="dot"))
    fig.update_yaxes(range=[n - 0.5, -0.5], showticklabels=True, dtick=1, title="row", scaleanchor="x",
                     showgrid=False, zeroline=False, constrain="domain")
    fig.update_xaxes(range=[-0.5, n - 0.5], showticklabels=True, dtick=1, title="col", side="top",
                     showgrid=False, zeroline=False, constrain="domain")
    fig.update_layout(clickmode="event+select", dragmode=False)
    return C.style(fig, 420)


def clicked_cell(event, n: int) -> tuple[int, int] | None:
    """(row, col) of the clicked click-target point of the code grid (trace 1), or None."""
    try:
        pts = event.selection.points if event is not None else []
    except AttributeError:
        pts = []
    for p in pts or []:
        if p.get("curve_number", 1) != 1:
            continue
        idx = p.get("point_index", p.get("point_number"))
        if isinstance(idx, int) and 0 <= idx < n * n:
            return divmod(idx, n)
    return None


@st.fragment
def edit_tool(ref, bundle):
    with C.guard("Edit codes"):      # a fragment rerun runs outside the page's guard
        _edit_tool(ref, bundle)


def _edit_tool(ref, bundle):
    model = bundle.model
    cfg = model.cfg
    n_lat = cfg.latent_size
    imgs = C.test_images(bundle)[0]
    codes_all = C.dataset_codes(bundle)
    n = min(N_SHOW, len(imgs))
    keep("edit_img", 0)
    if not 0 <= int(st.session_state["edit_img"]) < n:
        st.session_state["edit_img"] = 0
    idx = st.selectbox("Image to edit", list(range(n)), key="edit_img", format_func=lambda i: f"test image #{i}")
    remember("edit_img")
    gkey = f"edit_grid::{ref.label}::{idx}"
    if gkey not in st.session_state:
        st.session_state[gkey] = codes_all[idx].copy()
    grid = np.asarray(st.session_state[gkey])
    changed = {(int(r), int(c)) for r, c in zip(*np.nonzero(grid != codes_all[idx]))}
    for k_ in ("edit_row", "edit_col"):
        v = st.session_state.get(k_)
        if not isinstance(v, int) or not 0 <= v < n_lat:
            st.session_state[k_] = n_lat // 2

    left, right = st.columns([1, 1])
    with left:
        st.markdown(f"**Code grid ({n_lat}×{n_lat})** — click a cell, or pick row/col below.")
        event = C.plot(grid_figure(grid, st.session_state["edit_row"], st.session_state["edit_col"], changed),
                       key=f"grid_chart_{idx}", on_select="rerun", selection_mode="points", modebar=False)
        cell = clicked_cell(event, n_lat)
        if cell is not None and cell != st.session_state.get("_grid_sel"):
            st.session_state["_grid_sel"] = cell
            st.session_state["edit_row"], st.session_state["edit_col"] = cell
            st.rerun(scope="fragment")
        c1, c2 = st.columns(2)
        row = int(c1.number_input("row", 0, n_lat - 1, key="edit_row", step=1))
        col = int(c2.number_input("col", 0, n_lat - 1, key="edit_col", step=1))
    cur = int(grid[row, col])
    n_cand = min(cfg.codebook_size, 16)
    cands = explore.candidate_codes(model, cur, n_cand).tolist()
    dist = explore.code_distances(model, cur)
    usage = (C.quick_eval(bundle).get("usage") or [None] * cfg.codebook_size)
    with right:
        choice = st.selectbox(
            f"Replacement code for cell ({row}, {col}) — now code {cur}; candidates sorted by codebook distance",
            cands, index=min(1, len(cands) - 1), key=f"edit_code_{idx}_{row}_{col}",
            format_func=lambda c: f"code {c}  ·  distance {float(dist[c]):.3g}  ·  usage {usage[c]}"
            + ("  (current)" if c == cur else ""))
        edited = explore.edit_code(model, torch.from_numpy(grid), row, col, int(choice)).numpy()
        before = model.decode_indices(torch.from_numpy(grid)[None]).detach().numpy()[0] if changed else \
            _reconstructions(*C.bundle_key(bundle.path), n)[idx]
        box = explore.cell_pixel_box(model, row, col)
        orig = np.repeat(imgs[idx], 3, axis=0) if imgs.shape[1] == 1 else imgs[idx]
        pics = np.stack([orig, _mark_box(before, box), _mark_box(edited, box)])
        arr = C.image_grid(pics, ncol=3, scale=6)
        st.image(arr, caption=f"original · decoded grid · cell ({row}, {col}) set to code {choice} "
                              f"(red box: pixels this cell can reach)")
        st.markdown(f"Edited cell ({row}, {col}): code {cur} → **{choice}**")
        b1, b2, b3 = st.columns(3)
        if b1.button("Keep this edit", key="edit_keep"):
            g = grid.copy()
            g[row, col] = int(choice)
            st.session_state[gkey] = g
            st.rerun(scope="fragment")
        if b2.button("Reset grid", key="edit_reset"):
            st.session_state[gkey] = codes_all[idx].copy()
            st.rerun(scope="fragment")
        b3.download_button("PNG", C.png_bytes(arr), file_name=f"edit_{idx}_{row}_{col}_{choice}.png",
                           mime="image/png", key="dl_edit", on_click="ignore")
        st.markdown("**Candidate previews** (the cell set to each of the nearest codes):")
        prev = _previews(*C.bundle_key(bundle.path), grid.tobytes(), row, col, tuple(int(c) for c in cands[:8]))
        st.image(prev, caption="  ·  ".join(str(c) for c in cands[:8]))


def gallery_tool(ref, bundle):
    k = bundle.model_cfg.codebook_size
    ev = C.quick_eval(bundle)
    keep("gallery_code", int(np.argmax(ev["usage"])) if ev.get("usage") else 0)
    if not 0 <= int(st.session_state["gallery_code"]) < k:
        st.session_state["gallery_code"] = 0
    code = int(st.number_input(f"Code (0 … {k - 1}); clicking a point of the codebook map selects it too",
                               0, k - 1, key="gallery_code", step=1))
    remember("gallery_code")
    imgs = C.test_images(bundle)[0]
    hits, patch = _gallery(*C.bundle_key(bundle.path), C.eval_images(), code)
    usage = (ev.get("usage") or [0] * k)[code]
    c1, c2 = st.columns([1, 4])
    with c1:
        st.image(C.image_grid(patch[None], scale=8), caption=f"mean patch of code {code}")
        st.metric("usage", usage)
    with c2:
        if not hits:
            st.info(f"Code {code} is dead: no test image uses it. The mean patch shows the code decoded alone.")
        else:
            sel = np.stack([imgs[i] for i, _, _ in hits])
            caps = ", ".join(f"#{i}×{cnt}" for i, cnt, _ in hits)
            st.markdown(f"**Test images that use code {code} most** ({len(hits)} shown; image #id × cells):")
            show_grid(sel, min(8, len(sel)), caps, f"code_{code}_gallery.png", "dl_gallery")


def prior_tool(ref, bundle):
    ppath = bundle.path / C.PRIOR_FILE
    if not ppath.is_file():
        st.info("This bundle has no PixelCNN prior yet. Fit one over the run's code grids with\n\n"
                f"```bash\npython -m sqvae_core prior train {bundle.path}\n```\n\n"
                f"It is stored as `{C.PRIOR_FILE}` in the run directory; reload this page afterwards.")
        return
    pm = C.mtime(ppath)
    try:
        prior = _prior(str(ppath), pm, bundle.model_cfg.codebook_size)
    except (ValueError, OSError) as e:
        st.error(f"The prior in {ppath.name} cannot be loaded: {e}")
        return
    c1, c2, c3 = st.columns([2, 2, 1])
    keep("prior_temp", 1.0)
    temp = c1.slider("Temperature", 0.1, 2.0, step=0.05, key="prior_temp")
    remember("prior_temp")
    label, ncol, n = None, 8, 16
    nc = getattr(prior.config, "num_classes", None)
    names = C.test_images(bundle)[3] if nc else None
    if nc:
        opts = ["every class"] + list(range(nc))
        choice = c2.selectbox("Class", opts, key="prior_class",
                              format_func=lambda v: "every class (one per column)" if v == "every class" else
                              (f"{v}: {names[v]}" if names and v < len(names) else str(v)))
        if choice == "every class":
            ncol, n = min(nc, 10), 2 * min(nc, 10)
            label = tuple(i % ncol for i in range(n))
        else:
            label = int(choice)
    else:
        c2.caption("Unconditional prior (no class input).")
    st.session_state.setdefault("prior_seed", 0)
    if c3.button("Regenerate", key="prior_regen", icon=":material/casino:"):
        st.session_state["prior_seed"] += 1
    samples = _prior_samples(*C.bundle_key(bundle.path), str(ppath), pm, float(temp), label,
                             int(st.session_state["prior_seed"]), n)
    if isinstance(label, tuple) and names:
        st.caption("Columns: " + " · ".join(names[i] if i < len(names) else str(i) for i in range(ncol)))
    show_grid(samples, ncol, f"{n} samples · temperature {temp:.2f} · seed {st.session_state['prior_seed']}",
              f"{ref.name.replace('/', '_')}_prior_samples.png", "dl_prior")


def metrics_tab(ref, bundle, rows, ev):
    if not rows:
        st.info("This bundle has no metrics.jsonl.")
    else:
        c1, c2 = st.columns(2)
        with c1:
            fig = C.line_figure(rows, ["loss", "val_loss"], "Loss")
            if fig:
                C.plot(fig, key="m_loss")
        with c2:
            fig = C.line_figure(rows, ["perplexity", "val_perplexity"], "Perplexity & dead codes",
                                secondary=["val_dead_codes"])
            if fig:
                C.plot(fig, key="m_ppl")
        st.download_button("Download metrics CSV", C.metrics_csv(rows), file_name=f"{ref.name.replace('/', '_')}_metrics.csv",
                           mime="text/csv", key="dl_metrics", on_click="ignore")
    if ev is not None:
        summary = {k: v for k, v in ev.items() if k != "usage"}
        st.download_button("Download quick-eval CSV", C.metrics_csv([summary]), file_name="quick_eval.csv",
                           mime="text/csv", key="dl_eval", on_click="ignore")
        st.json(summary, expanded=False)


def continue_page():
    """Timer fragment of the progressive first paint: its first, inline call does nothing; the
    browser's timer call (after the map is on screen) reruns the page in full."""
    if st.session_state.get("_explore_continue"):
        st.rerun()
    st.session_state["_explore_continue"] = True


# ------------------------------------------------------------------------------- page
refs = C.list_bundles()
if not refs:
    title_slot.title("Explore")
    no_bundles()
    C.stop_page()

labels = [r.label for r in refs]
wanted = st.query_params.get("run")
if "bundle" not in st.session_state or st.session_state["bundle"] not in labels:
    st.session_state["bundle"] = wanted if wanted in labels else next(
        (lab for lab in labels if lab.startswith("checkpoints/")), labels[0])


def bundle_selector() -> str:
    return st.selectbox("Bundle", labels, key="bundle",
                        help="Trained bundles from the checkpoints directory and runs from the runs directory")


# The codebook map is computed and sent first (it is the page's first useful paint), into a
# container placed below the title, bundle selector and model card, which are filled in
# afterwards (and main.py draws the sidebar after the page): ~0.1 s sooner on screen.
ref = C.resolve_label(st.session_state["bundle"])
head, maps = st.container(), st.container()
status = C.read_status(ref.path)
rows = C.read_metrics(ref.path)
try:
    bundle = C.get_bundle(ref.path)
except BundleError as e:
    title_slot.title("Explore")
    with head:
        bundle_selector()
        st.error(f"Cannot load `{ref.label}`: {e}")
        if status.get("state") == "failed" and status.get("error"):
            st.error(f"The run failed: {status['error']}")
        if rows:
            fig = C.line_figure(rows, ["loss", "val_loss"], "Loss (from metrics.jsonl)")
            if fig:
                C.plot(fig, key="broken_loss")
    C.stop_page()

ev = None
with head:
    with C.guard("Quick evaluation"):
        ev = C.quick_eval(bundle)
with maps:
    # while UMAP computes in the background this section (only) re-runs every 1.5 s and swaps
    # the PCA map for the UMAP map once it is there, without disturbing the rest of the page
    umap_state = C.umap_map(bundle)[1] if bundle.model.discrete else "off"
    st.fragment(run_every=1.5 if umap_state == "computing" else None)(codebook_map_section)(bundle)
title_slot.title("Explore")
with head:
    bundle_selector()
    with C.guard("Model card"):
        model_card(ref, bundle, ev, rows, status)

if C.progressive() and not st.session_state.get("_explore_full"):
    # Progressive first paint: a new session's first run sends the header and the codebook map
    # only. A fragment timer in the browser (it fires once the browser is free again, i.e. after
    # the map is drawn) then asks for a full run that adds the tools below. On a slow machine the
    # browser would otherwise lay out the whole page before drawing the map.
    st.session_state["_explore_full"] = True
    st.session_state["_explore_continue"] = False
    st.fragment(run_every=0.25)(continue_page)()
    C.stop_page()

tabs = st.tabs(TABS, key="explore_tab", on_change="rerun")
sections = {
    "Reconstructions": lambda: reconstructions(ref, bundle),
    "Codebook usage": lambda: usage_section(bundle, ev),
    "Neighbor-k": lambda: neighbour_tool(ref, bundle),
    "Interpolate": lambda: interpolation_tool(ref, bundle),
    "Edit codes": lambda: edit_tool(ref, bundle),
    "Code gallery": lambda: gallery_tool(ref, bundle),
    "Prior samples": lambda: prior_tool(ref, bundle),
    "Metrics": lambda: metrics_tab(ref, bundle, rows, ev),
}
NEEDS_CODEBOOK = {"Codebook usage", "Neighbor-k", "Edit codes", "Code gallery", "Prior samples"}
for name, tab in zip(TABS, tabs):
    with tab:
        if not tab.open:
            continue
        if name in NEEDS_CODEBOOK and not bundle.model.discrete:
            st.info("The continuous VAE has no codebook: try Reconstructions, Interpolate or Metrics.")
            continue
        with C.guard(name):
            sections[name]()
