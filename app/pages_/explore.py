"""Explore a trained bundle: model card, codebook map, then one tab per tool (SECTIONS).

The first run of a session paints the card and the codebook map from what the bundle stores
(app/runs.first_view: config.json, eval.json, umap.json) before torch is imported; a timer in
the browser then asks for the full page, which loads the model (app/cache.py) for the tabs.
A logged run (RunLogger) that saved a decoder gets the tabs that need only a code space.

A new tab: one function of a View, one entry in SECTIONS (what it needs), and its test.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import streamlit as st

from app import cache, charts, runs, settings, theme, ui
from app.images import image_grid, mark_box, png_bytes
from sqvae_core import rundir as rd

ui.page_setup(None, "Explore")

N_SHOW = 16          # images in the reconstruction grid
N_TOOL = 8           # images in the Neighbor-k grid


@dataclass
class View:
    """The run on screen and what the page already read about it."""
    ref: runs.RunRef
    bundle: object | None        # sqvae_core.rundir.Bundle; None for a logged run (no model)
    rows: list[dict]             # metrics.jsonl
    ev: dict | None              # cache.evaluation(): test-split numbers and per-code usage
    space: cache.Space | None    # the code space of the code tools; None without a codebook

    @property
    def file_stem(self) -> str:
        return runs.safe_filename(self.ref.name)


# ------------------------------------------------------------------------ head and map
def no_bundles():
    st.info(
        "No trained bundles found.\n\n"
        f"The app looks in `{settings.checkpoints_dir()}` (env `SQVAE_CHECKPOINTS`) and `{settings.runs_dir()}` "
        "(env `SQVAE_RUNS`). Train one from a terminal:\n\n"
        f"```bash\npython -m sqvae_core train --model gaussian_1 --preset demo --out {settings.runs_dir()}/demo\n```\n\n"
        "(about two minutes on a 2-core CPU), or start the same demo training here and watch it live:")
    if not settings.read_only() and st.button("Train a demo model", type="primary", key="train_demo"):
        with ui.guard("Starting the demo training"):
            name, state = cache.job_manager().start_demo()
            st.success(f"Demo training `{name}` {state}. Open **Train live** to watch it.")
            st.session_state["watch_run"] = name
            try:
                st.switch_page(str(Path(__file__).resolve().parent / "train.py"))
            except Exception as e:     # noqa: BLE001 - the page runs on its own (tests)
                if ui.is_control_flow(e):
                    raise


def model_card(ref, config: rd.RunConfig, ev: dict | None, rows: list[dict], status: rd.RunStatus,
               weights: str = rd.WEIGHTS):
    """Kind, data, size and test numbers: from ev (eval.json or the quick eval), else the last
    validation row of metrics.jsonl. `weights`: the file the model shown was loaded from."""
    val = runs.last_val_row(rows)
    steps = status.step or (val or {}).get("step") or config.steps
    if ev is not None:
        mse, ppl, dead, src = ev.get("mse"), ev.get("perplexity"), ev.get("dead_codes"), ev["source"]
    elif val is not None:
        mse, ppl, dead = val.get("val_mse"), val.get("val_perplexity"), val.get("val_dead_codes")
        src = f"the run's last validation row (step {val.get('step')})"
    else:
        mse = ppl = dead = None
        src = "no evaluation available"
    kind = config.kind
    items = [("Kind", kind), ("Dataset", config.dataset or rd.DEFAULT_DATASET), ("K (codes)", config.codebook_size),
             ("d (code dim)", config.code_dim), ("Steps", ui.fmt(steps)), ("Test MSE", ui.fmt(mse, 4)),
             ("Perplexity", ui.fmt(ppl, 4)), ("Dead codes", ui.fmt(dead)), ("Precision", config.precision_text)]
    st.html(ui.card_html(items))
    state = status.state
    st.caption(f"**{settings.KIND_LABELS.get(kind, kind)}** · `{ref.label}` · weights `{weights}` · "
               f"run state: {state} · metrics from {src}. Test MSE: per-image sum of squared error "
               f"(pixels in [0, 1]); perplexity: exp(H) of the code usage; dead codes: codes no position uses."
               + (f" --amp trained in fp32 here: {config.amp_fallback}." if config.amp_fallback else ""))
    if state == "failed" and status.error:
        st.error(f"This run failed: {status.error}")


def selected_code(event) -> int | None:
    """The code of the clicked point of the codebook map (customdata[0]), or None."""
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


def draw_map(points: list[dict], method: str, ev: dict, state: str = "ready"):
    """The codebook map; a click selects the code for the Code gallery tab."""
    event = theme.plot(charts.map_figure(points, f"Codebook map ({method})"), key="map_chart",
                       on_select="rerun", selection_mode="points")
    note = f"Colour: each code's usage on {ev['n_images']} test images; ✕: codes unused there."
    code = selected_code(event)
    if code is not None and code != st.session_state.get("_map_code"):
        st.session_state["_map_code"] = code
        st.session_state["gallery_code"] = code
        st.session_state["_keep_gallery_code"] = code
    if code is not None:
        note += f" Selected code {code}: open **Code gallery** to see where it is used."
    if state == "computing":
        note += " :material/hourglass_top: UMAP is being computed in the background; this is the instant PCA map."
    elif state not in ("ready", "off"):
        note += f" UMAP unavailable ({state}); showing PCA."
    st.caption(note)


def codebook_map_section(bundle, ev: dict):
    with ui.guard("Codebook map"):
        points, method, state = cache.codebook_map(bundle, ev["usage"])
        draw_map(points, method, ev, state)


def bundle_selector(labels: list[str]) -> str:
    return st.selectbox("Bundle", labels, key="bundle",
                        help="Trained bundles from the checkpoints directory and runs from the runs directory")


def weights_selector(choice: rd.BestChoice | None):
    """For a run whose best-validation weights are from another step than its last ones: which
    to explore (the official code evaluates its best checkpoint)."""
    if choice is None:
        return

    def step(n):
        return f"step {n:,}" if isinstance(n, int) else "step not recorded"
    names = {"last": f"last ({step(choice.last)})",
             "best": f"lowest validation {rd.figures_text(choice.kept_by)} ({step(choice.best)})"}
    st.radio("Weights", list(names), format_func=names.get, key="weights", horizontal=True,
             help="model.safetensors holds the run's last weights, best.safetensors those of its best validation")


def continue_page():
    """Timer fragment of the progressive first paint: its first, inline call does nothing; the
    browser's timer call (after the map is on screen) reruns the page in full."""
    if st.session_state.get("_explore_continue"):
        st.rerun()
    st.session_state["_explore_continue"] = True


def end_first_paint():
    st.session_state["_explore_continue"] = False
    st.fragment(run_every=0.25)(continue_page)()


# ------------------------------------------------------------------------------ tabs
def reconstructions(v: View):
    imgs, source = cache.display_images(v.bundle, N_SHOW)
    n = len(imgs)
    rec = cache.reconstructions(v.bundle, n, "display")
    st.markdown("**Originals (top) vs reconstructions (bottom)**")
    ui.show_grid(np.concatenate([imgs, rec]), n, f"{n} images: {source}", f"{v.file_stem}_reconstructions.png",
                 "dl_recon")


def usage_section(v: View):
    ev = v.ev
    if ev is None or ev.get("usage") is None:
        st.info("Code usage needs the test images (see the error above).")
        return
    theme.plot(charts.usage_figure(ev["usage"]), key="usage_chart")
    st.caption(f"{ev['dead_codes']} of {ev['codebook_size']} codes dead on {ev['n_images']} test images; "
               f"perplexity {ev['perplexity']:.1f}.")


def neighbour_tool(v: View):
    space = v.space
    k_max = min(space.codebook_size, 64)
    ui.keep("nk_k", min(2, k_max))
    if not 1 <= int(st.session_state["nk_k"]) <= k_max:
        st.session_state["nk_k"] = min(2, k_max)
    k = st.slider("Neighbor-k: replace every code by its k-th nearest code (k = 1 is the code itself)",
                  1, k_max, key="nk_k")
    ui.remember("nk_k")
    originals, grids = cache.examples(space, N_TOOL)
    n = len(grids)
    decoded, edited = cache.neighbour(space, int(k), n)
    shown = [g for g in (originals, decoded, edited) if g is not None and g.shape[1:] == decoded.shape[1:]]
    rows = ("originals, " if len(shown) == 3 else "") + \
        ("their codes decoded" if space.logged else "reconstructions (Neighbor-1)")
    st.markdown(f"**Neighbor-{k}** edit: rows are {rows} and Neighbor-{k}.")
    ui.show_grid(np.concatenate(shown), n, f"Neighbor-{k} on {n} {space.item}s",
                 f"{v.file_stem}_neighbor{k}.png", "dl_nk")
    st.caption("The SQ-VAE paper's test of codebook smoothness: with a smooth codebook, near codes decode to "
               "near images and small k changes little; compare a Gaussian SQ-VAE bundle with a VQ-VAE one.")


def interpolation_tool(v: View):
    imgs, labels, _, names = cache.test_images(v.bundle)
    n = min(N_SHOW, len(imgs))

    def label(i):
        if labels is not None and names is not None and 0 <= int(labels[i]) < len(names):
            return f"#{i} ({names[int(labels[i])]})"
        return f"#{i}"
    c1, c2, c3 = st.columns(3)
    for key, default in (("interp_a", 0), ("interp_b", min(1, n - 1)), ("interp_steps", 8)):
        ui.keep(key, default)
        if key != "interp_steps" and not 0 <= int(st.session_state[key]) < n:
            st.session_state[key] = default
    i = c1.selectbox("Image A", list(range(n)), format_func=label, key="interp_a")
    j = c2.selectbox("Image B", list(range(n)), format_func=label, key="interp_b")
    steps = c3.slider("Steps", 3, 16, key="interp_steps")
    for key in ("interp_a", "interp_b", "interp_steps"):
        ui.remember(key)
    latent, pixel = cache.interpolation(v.bundle, int(i), int(j), int(steps))
    st.markdown(f"**Interpolation {label(i)} → {label(j)}, {steps} steps.** Top: path in latent space "
                "(mix the encoder outputs, quantize, decode). Bottom: pixel-space cross-fade of the reconstructions.")
    ui.show_grid(np.concatenate([latent, pixel]), int(steps), "latent path (top) vs pixel mixture (bottom)",
                 f"{v.file_stem}_interp_{i}_{j}.png", "dl_interp")


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


def cell_picker(grid: np.ndarray, changed: set, prefix: str, chart_key: str) -> tuple[int, int]:
    """The clickable code grid (edited cells marked) and its row/col inputs (keys PREFIX_row,
    PREFIX_col), in the current column: the chosen (row, col). Runs inside an edit fragment."""
    n_lat = len(grid)
    rk, ck, sel = f"{prefix}_row", f"{prefix}_col", f"_{prefix}_grid_sel"
    for k_ in (rk, ck):
        val = st.session_state.get(k_)
        if not isinstance(val, int) or not 0 <= val < n_lat:
            st.session_state[k_] = n_lat // 2
    st.markdown(f"**Code grid ({n_lat}×{n_lat})** — click a cell, or pick row/col below.")
    event = theme.plot(charts.grid_figure(grid, st.session_state[rk], st.session_state[ck], changed),
                       key=chart_key, on_select="rerun", selection_mode="points", modebar=False)
    cell = clicked_cell(event, n_lat)
    if cell is not None and cell != st.session_state.get(sel):
        st.session_state[sel] = cell
        st.session_state[rk], st.session_state[ck] = cell
        st.rerun(scope="fragment")
    c1, c2 = st.columns(2)
    return (int(c1.number_input("row", 0, n_lat - 1, key=rk, step=1)),
            int(c2.number_input("col", 0, n_lat - 1, key=ck, step=1)))


@st.fragment
def edit_tool(v: View):
    with ui.guard("Edit codes"):      # a fragment rerun runs outside the page's guard
        _edit_tool(v)


def _edit_tool(v: View):
    space = v.space
    originals, grids = cache.examples(space, N_SHOW)
    n = len(grids)
    ui.keep("edit_img", 0)
    if not 0 <= int(st.session_state["edit_img"]) < n:
        st.session_state["edit_img"] = 0
    idx = st.selectbox(f"{space.item.capitalize()} to edit", list(range(n)), key="edit_img",
                       format_func=lambda i: f"{space.item} #{i}")
    ui.remember("edit_img")
    base = grids[idx]
    gkey = f"edit_grid::{v.ref.label}::{idx}"
    if gkey not in st.session_state:
        st.session_state[gkey] = base.copy()
    grid = np.asarray(st.session_state[gkey])
    changed = {(int(r), int(c)) for r, c in zip(*np.nonzero(grid != base))}
    left, right = st.columns([1, 1])
    with left:
        row, col = cell_picker(grid, changed, "edit", f"grid_chart_{idx}")
    cur = int(grid[row, col])
    cands, dist = cache.candidates(space, cur, 16)
    usage = (v.ev or {}).get("usage")

    def describe(c):
        return (f"code {c}  ·  distance {float(dist[c]):.3g}" + (f"  ·  usage {usage[c]}" if usage else "")
                + ("  (current)" if c == cur else ""))
    with right:
        choice = st.selectbox(
            f"Replacement code for cell ({row}, {col}) — now code {cur}; candidates sorted by codebook distance",
            cands, index=min(1, len(cands) - 1), key=f"edit_code_{idx}_{row}_{col}", format_func=describe)
        before, edited, box = cache.edit(space, grid, row, col, int(choice))
        shown = [before, edited] if box is None else [mark_box(before, box), mark_box(edited, box)]
        if originals is not None and originals.shape[2:] == before.shape[1:]:
            orig = originals[idx]
            shown.insert(0, np.repeat(orig, 3, axis=0) if orig.shape[0] == 1 and shown[0].shape[0] == 3 else orig)
        arr = image_grid(np.stack(shown), ncol=len(shown), scale=6)
        st.image(arr, caption=("original · " if len(shown) == 3 else "") + f"decoded grid · cell ({row}, {col}) set "
                 f"to code {choice}" + ("" if box is None else " (red box: pixels this cell can reach)"),
                 output_format="PNG")
        st.markdown(f"Edited cell ({row}, {col}): code {cur} → **{choice}**")
        kept = grid.copy()
        kept[row, col] = int(choice)
        b1, b2, b3 = st.columns(3)      # callbacks: the state is set before the (fragment) rerun draws it
        b1.button("Keep this edit", key="edit_keep", on_click=st.session_state.__setitem__, args=(gkey, kept))
        b2.button("Reset grid", key="edit_reset", on_click=st.session_state.__setitem__, args=(gkey, base.copy()))
        b3.download_button("PNG", png_bytes(arr), file_name=f"edit_{idx}_{row}_{col}_{choice}.png",
                           mime="image/png", key="dl_edit", on_click="ignore")
        st.markdown("**Candidate previews** (the cell set to each of the nearest codes):")
        st.image(cache.previews(space, grid, row, col, cands[:8]), caption="  ·  ".join(str(c) for c in cands[:8]),
                 output_format="PNG")


def gallery_tool(v: View):
    k = v.bundle.model_cfg.codebook_size
    usage = (v.ev or {}).get("usage") or [0] * k
    ui.keep("gallery_code", int(np.argmax(usage)))
    if not 0 <= int(st.session_state["gallery_code"]) < k:
        st.session_state["gallery_code"] = 0
    code = int(st.number_input(f"Code (0 … {k - 1}); clicking a point of the codebook map selects it too",
                               0, k - 1, key="gallery_code", step=1))
    ui.remember("gallery_code")
    imgs = cache.test_images(v.bundle)[0]
    hits, patch = cache.gallery(v.bundle, code)
    c1, c2 = st.columns([1, 4])
    with c1:
        st.image(image_grid(patch[None], scale=8), caption=f"mean patch of code {code}", output_format="PNG")
        st.metric("usage", usage[code])
    with c2:
        if not hits:
            st.info(f"Code {code} is dead: no test image uses it. The mean patch shows the code decoded alone.")
        else:
            sel = np.stack([imgs[i] for i, _, _ in hits])
            caps = ", ".join(f"#{i}×{cnt}" for i, cnt, _ in hits)
            st.markdown(f"**Test images that use code {code} most** ({len(hits)} shown; image #id × cells):")
            ui.show_grid(sel, min(8, len(sel)), caps, f"code_{code}_gallery.png", "dl_gallery")


def prior_tool(v: View):
    ppath = v.bundle.path / rd.PRIOR
    if not ppath.is_file():
        st.info("This bundle has no PixelCNN prior yet. Fit one over the run's code grids with\n\n"
                f"```bash\npython -m sqvae_core prior train {v.bundle.path}\n```\n\n"
                f"It is stored as `{rd.PRIOR}` in the run directory; reload this page afterwards.")
        return
    try:
        prior = cache.prior(v.bundle, ppath)
    except (ValueError, OSError) as e:
        st.error(f"The prior in {ppath.name} cannot be loaded: {e}")
        return
    mismatch = runs.prior_mismatch(v.bundle.weights)
    if mismatch:
        st.warning(mismatch, icon=":material/warning:")
    c1, c2, c3 = st.columns([2, 2, 1])
    ui.keep("prior_temp", 1.0)
    temp = c1.slider("Temperature", 0.1, 2.0, step=0.05, key="prior_temp")
    ui.remember("prior_temp")
    label, ncol, n = None, 8, 16
    nc = getattr(prior.config, "num_classes", None)
    names = cache.test_images(v.bundle)[3] if nc else None
    if nc:
        opts = ["every class"] + list(range(nc))
        choice = c2.selectbox("Class", opts, key="prior_class",
                              format_func=lambda c: "every class (one per column)" if c == "every class" else
                              (f"{c}: {names[c]}" if names and c < len(names) else str(c)))
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
    samples = cache.prior_samples(v.bundle, ppath, temp, label, st.session_state["prior_seed"], n)
    if isinstance(label, tuple) and names:
        st.caption("Columns: " + " · ".join(names[i] if i < len(names) else str(i) for i in range(ncol)))
    ui.show_grid(samples, ncol, f"{n} samples · temperature {temp:.2f} · seed {st.session_state['prior_seed']}",
                 f"{v.file_stem}_prior_samples.png", "dl_prior")


def metrics_tab(v: View):
    if not v.rows:
        st.info("This bundle has no metrics.jsonl.")
    else:
        c1, c2 = st.columns(2)
        with c1:
            fig = charts.line_figure(v.rows, ["loss", "val_loss"], "Loss")
            if fig:
                theme.plot(fig, key="m_loss")
        with c2:
            fig = charts.panels_figure(v.rows, [["perplexity", "val_perplexity"], ["val_dead_codes"]],
                                       "Perplexity and dead codes", names=NAMES)
            if fig:
                theme.plot(fig, key="m_ppl")
        st.download_button("Download metrics CSV", ui.metrics_csv(v.rows), file_name=f"{v.file_stem}_metrics.csv",
                           mime="text/csv", key="dl_metrics", on_click="ignore")
    if v.ev is not None:
        summary = {k: val for k, val in v.ev.items() if k != "usage"}
        st.download_button("Download evaluation CSV", ui.metrics_csv([summary]), file_name="evaluation.csv",
                           mime="text/csv", key="dl_eval", on_click="ignore")
        st.json(summary, expanded=False)


NAMES = {"val_dead_codes": "dead codes (val)"}


@dataclass(frozen=True)
class Section:
    """One Explore tab: draw(view), and what it needs: "model" (a bundle's model, any kind),
    "codebook" (a discrete model), "codes" (a code space: a discrete model or a logged run's decoder)."""
    draw: Callable[[View], None]
    needs: str = "model"


# One entry per tab, in tab order: the tab names are the keys.
SECTIONS = {
    "Reconstructions": Section(reconstructions),
    "Codebook usage": Section(usage_section, "codebook"),
    "Neighbor-k": Section(neighbour_tool, "codes"),
    "Interpolate": Section(interpolation_tool),
    "Edit codes": Section(edit_tool, "codes"),
    "Code gallery": Section(gallery_tool, "codebook"),
    "Prior samples": Section(prior_tool, "codebook"),
    "Metrics": Section(metrics_tab),
}


def draw_tabs(v: View):
    """The tabs the view offers (a logged run: those that need only codes); only the open one is drawn."""
    shown = {name: s for name, s in SECTIONS.items() if v.bundle is not None or s.needs == "codes"}
    tabs = st.tabs(list(shown), key="explore_tab", on_change="rerun")
    for (name, section), tab in zip(shown.items(), tabs):
        with tab:
            if not tab.open:
                continue
            if section.needs != "model" and v.space is None:
                st.info("The continuous VAE has no codebook: try Reconstructions, Interpolate or Metrics.")
                continue
            with ui.guard(name):
                section.draw(v)


# ------------------------------------------------------------------------------- page
@dataclass
class Shown:
    """What a run shows under the bundle selector (`head`: the card, an error or a note) and what
    follows: the tabs of `view`, or, on a progressive first paint, the browser's call for the rest."""
    head: Callable[[], None]
    choice: rd.BestChoice | None = None
    view: View | None = None
    first_paint: bool = False


def pick_run(refs: list[runs.RunRef]) -> runs.RunRef:
    """The run in the bundle selector: kept across reruns, else ?run=LABEL, else the default bundle."""
    labels = [r.label for r in refs]
    wanted = st.query_params.get("run")
    if "bundle" not in st.session_state or st.session_state["bundle"] not in labels:
        st.session_state["bundle"] = wanted if wanted in labels else runs.default_label(refs)
    return runs.resolve_label(st.session_state["bundle"])


def logged_run(ref: runs.RunRef) -> Shown:
    """A run of someone's own loop (RunLogger): no model. A decoder it saved (not in an upload) gets
    the code tools on its saved code grids."""
    config = runs.read_config(ref.path)
    offered = config.decoder is not None and ref.source in settings.SOURCES and \
        ref.name.split("/")[0] != settings.UPLOADS       # torch.export.load may unpickle: never an upload's

    def head():
        st.info(f"`{ref.label}` is a logged run: metrics and codebook snapshots only; see **Train live** / **Compare**.")
        if offered:
            st.caption("It saved a decoder (RunLogger.save_decoder): its example code grids can be edited and decoded.")
    if not offered:
        return Shown(head)
    with ui.guard("Saved decoder"):
        return Shown(head, view=View(ref, None, runs.read_metrics(ref.path), None, cache.logged_space(ref)))
    return Shown(head)


def broken_run(ref: runs.RunRef, error: Exception, status: rd.RunStatus, rows: list[dict]) -> Shown:
    def head():
        st.error(f"Cannot load `{ref.label}`: {error}")
        if status.state == "failed" and status.error:
            st.error(f"The run failed: {status.error}")
        fig = charts.line_figure(rows, ["loss", "val_loss"], "Loss (from metrics.jsonl)")
        if fig:
            theme.plot(fig, key="broken_loss")
    return Shown(head)


def bundle_run(ref: runs.RunRef, head, maps) -> Shown:
    """A bundle: the codebook map first (the page's first useful paint, into `maps`, below the head
    filled afterwards), then the card; the tabs, or on a progressive first paint, the timer's call."""
    status = runs.read_status(ref.path)
    rows = runs.read_metrics(ref.path)
    choice = runs.best_weights(ref.path, rows)
    which = st.session_state.get("weights", "last") if choice else "last"
    first_run = settings.progressive() and not st.session_state.get("_explore_full")
    stored = runs.first_view(ref.path) if first_run and which == "last" else None
    if stored is not None:
        # Progressive first paint from the bundle's files, no torch: the map and the card. The
        # browser's fragment timer (it fires once the browser is free again, i.e. after the map is
        # drawn) then asks for the full run, which loads the model and adds the tools below.
        st.session_state["_explore_full"] = True
        if stored["points"] is not None:
            with maps:
                st.fragment(draw_map)(stored["points"], "UMAP", stored["evaluation"])
        return Shown(lambda: model_card(ref, stored["config"], stored["evaluation"], rows, status), choice,
                     first_paint=True)
    try:
        bundle = cache.get_bundle(rd.Weights(ref.path, which))
    except rd.BundleError as e:
        return broken_run(ref, e, status, rows)
    ev = None
    with head, ui.guard("Evaluation"):
        ev = cache.evaluation(bundle)
    if ev is not None and bundle.model.discrete:
        with maps:
            # while UMAP computes in the background this section (only) re-runs every 1.5 s and swaps
            # the PCA map for the UMAP map once it is there, without disturbing the rest of the page
            umap_state = cache.umap_map(bundle, ev["usage"])[1]
            st.fragment(run_every=1.5 if umap_state == "computing" else None)(codebook_map_section)(bundle, ev)
    elif not bundle.model.discrete:
        maps.info("The continuous VAE has no codebook to map.")

    def card():
        with ui.guard("Model card"):
            model_card(ref, bundle.run_config,
                       runs.stored_evaluation(bundle.weights, bundle.model_cfg.codebook_size) or ev, rows, status,
                       bundle.weights.path.name)
    if first_run:
        # Progressive first paint with the model (a bundle that stores no eval.json / map): header
        # and map first, the tabs on the timer's full run.
        st.session_state["_explore_full"] = True
    space = cache.bundle_space(bundle, ref.label) if bundle.model.discrete else None
    return Shown(card, choice, View(ref, bundle, rows, ev, space), first_paint=first_run)


def explore_page():
    """The page, top to bottom: title, bundle selector, the run's head, its codebook map, its tabs.
    The map is computed and sent first (into a container placed below the head, which is filled
    afterwards; main.py draws the sidebar after the page)."""
    title, head, maps = st.container(), st.container(), st.container()
    refs = runs.list_bundles()
    if not refs:
        shown = Shown(no_bundles)
    else:
        ref = pick_run(refs)
        shown = logged_run(ref) if rd.RunDir(ref.path).is_logged else bundle_run(ref, head, maps)
    title.title("Explore")
    with head:
        if refs:
            bundle_selector([r.label for r in refs])
            weights_selector(shown.choice)
        shown.head()
    if shown.first_paint:
        end_first_paint()
    elif shown.view is not None:
        draw_tabs(shown.view)


explore_page()
