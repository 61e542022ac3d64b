"""Train live: start trainings as separate processes, watch their metrics.jsonl as they grow,
stop / resume them. Job control (cap, queue, cleanup) is in app/jobs.py."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import cache, charts, runs, settings, theme, ui
from app.jobs import ACTIVE, COMPILE_CHOICES, log_tail
from sqvae_core.rundir import CONFIG

ui.page_setup("Train live", "Train live")

REFRESH = settings.refresh_seconds()     # seconds between live refreshes (env SQVAE_APP_REFRESH, default 2)
STATE_ICON = {"queued": ":material/hourglass_top:", "starting": ":material/rocket_launch:",
              "running": ":material/play_circle:", "finished": ":material/check_circle:",
              "failed": ":material/error:", "stopped": ":material/stop_circle:",
              "interrupted": ":material/warning:", "unknown": ":material/help:"}
NAMES = {"sigma2_q": "σ²_φ (quantizer)", "sigma2_x": "σ² (decoder)", "kappa_q": "κ_φ (quantizer)",
         "kappa_x": "κ (decoder)", "val_dead_codes": "dead codes (val)", "dead_codes": "dead codes (window)"}
PLOTTED = {"step", "wall_time", "elapsed", "loss", "mse", "perplexity", "dead_codes", "entropy", "sigma2_q",
           "sigma2_x", "kappa_q", "kappa_x", "temperature"}      # keys with a panel of their own (or none)
MAX_OTHER = 8       # scalars of a logged run shown in its "Other logged scalars" panel


def other_scalars(rows: list[dict]) -> list[str]:
    """Numeric keys of a logged run's rows that no other panel plots (your commit loss, lr, ...), sorted."""
    keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return sorted(k for k in keys if k not in PLOTTED and not k.startswith("val_"))[:MAX_OTHER]


# ------------------------------------------------------------------------- charts
# the catalogue's annealing panels (sqvae_core.kinds.Kind.anneal): keys and title
ANNEAL = {"gaussian": (["sigma2_q", "sigma2_x"], "Self-annealing: σ²_φ and σ² (log)"),
          "vmf": (["kappa_q", "kappa_x"], "Self-annealing: κ_φ and κ (log)"),
          "nc": (["kappa_q"], "κ_φ (log): NC has no decoder κ to anneal with")}


def live_figures(run_dir: Path, rows: list[dict], kind: str | None) -> list[tuple[object, str | None]]:
    """(figure, caption) of each live panel of a run that has data yet. The annealing and Gumbel
    temperature panels are drawn for the kinds that quantize stochastically (the catalogue's
    `anneal`); a run of an unknown kind (RunLogger) gets the Gaussian panel, which shows what it logs."""
    entry = settings.KINDS.get(kind)
    anneal = ANNEAL["gaussian"] if entry is None else ANNEAL.get(entry.anneal)
    entropy_title = "Quantization entropy H(P̂(z_q|z)), nats" if entry is None or entry.anneal else \
        "Per-code entropy of the soft assignment, nats"     # LFQ's (its entropy penalty), not an SQ P̂
    figs = [charts.line_figure(rows, ["loss", "val_loss"], "Loss", names=NAMES),
            charts.line_figure(rows, ["mse", "val_mse"], "MSE (per image)", names=NAMES),
            charts.panels_figure(rows, [["perplexity", "val_perplexity"], ["dead_codes", "val_dead_codes"]],
                                 "Perplexity and dead codes", names=NAMES),
            charts.line_figure(rows, ["entropy", "val_entropy"], entropy_title, names=NAMES)]
    if anneal:
        figs += [charts.line_figure(rows, anneal[0], anneal[1], log_y=True, names=NAMES),
                 charts.line_figure(rows, ["temperature"], "Gumbel-softmax temperature τ", names=NAMES)]
    if kind == runs.LOGGED:
        other = charts.line_figure(rows, other_scalars(rows), "Other logged scalars", names=NAMES)
        figs.append(other.update_layout(showlegend=True) if other else None)     # names even a lone scalar
    out = [(f, None) for f in figs if f is not None]
    snaps = cache.snapshots(run_dir)
    if snaps:
        out.append((charts.usage_raster(snaps), "Uses of each code in each snapshot window."))
        try:
            anim = charts.map_animation(cache.snapshot_maps(run_dir, kind or "gaussian_1"), [s["step"] for s in snaps])
            if anim is not None:
                out.append((anim, "PCA of each snapshot's codebook on shared axes; ✕ = dead in that window."))
        except ValueError as e:
            st.caption(f"Codebook map unavailable: {e}")
    return out


def live_charts(run_dir: Path, rows: list[dict], kind: str | None, key: str):
    """The live panels of one run, two per row (charts that have no data yet are skipped)."""
    figs = live_figures(run_dir, rows, kind)
    if not figs:
        st.info("No metrics yet: the first rows appear after `log_every` steps.")
        return
    for i in range(0, len(figs), 2):
        cols = st.columns(2)
        for j, (fig, caption) in enumerate(figs[i:i + 2]):
            with cols[j]:
                theme.plot(fig, key=f"{key}_{i + j}")
                if caption:
                    st.caption(caption)


# -------------------------------------------------------------------------- panel
def run_kind(run_dir: Path) -> tuple[str | None, int | None]:
    """(kind, total steps): "logged" for a RunLogger run (its loop's length is unknown)."""
    try:
        cfg = runs.read_config(run_dir)
        return runs.run_kind(cfg), cfg.steps
    except Exception:       # noqa: BLE001 - no config yet (queued / starting)
        return None, None


def watch_panel(name: str) -> str:
    jm = cache.job_manager()
    run_dir = jm.run_dir(name)
    info = jm.job_state(name)
    state = info["state"]
    kind, total = run_kind(run_dir)
    logged = kind == runs.LOGGED       # its loop runs outside the app: no Stop, no Resume, no model
    resume_note = "" if logged else " Resume continues from the last checkpoint."
    rows = runs.read_metrics(run_dir)
    step = max([r.get("step", 0) for r in rows] + [info.get("step") or 0])

    head = st.columns([4, 1, 1])
    head[0].markdown(f"### {STATE_ICON.get(state, '')} `{name}` — {state}"
                     + (f" · {settings.KIND_LABELS.get(kind, kind)}" if kind else ""))
    controls = not logged and not settings.read_only()   # read-only: visitors watch, nothing more
    if state in ACTIVE and controls:
        if head[1].button("Stop", key=f"stop_{name}", type="primary", icon=":material/stop:"):
            res = jm.stop(name)
            st.toast(f"{name}: {res}")
            info = jm.job_state(name)
            state = info["state"]
    if state in ("stopped", "interrupted") and (run_dir / CONFIG).is_file() and controls:
        if head[1].button("Resume", key=f"resume_{name}", type="primary", icon=":material/play_arrow:"):
            with ui.guard("Resume"):
                res = jm.resume(name)
                st.toast(f"{name}: resumed ({res})")
                st.rerun()
    if state == "running" and total:
        st.progress(min(1.0, step / max(1, total)), text=f"step {step} / {total}")
    elif state == "queued":
        st.info(f"Queued (position {info.get('position')}); it starts when a training slot frees up "
                f"(at most {jm.max_jobs} at a time, env SQVAE_MAX_JOBS).")
    elif state == "starting":
        st.info("Starting: loading the data set and building the model…")
    elif state == "finished" and logged:
        st.success(f"Finished {step} steps (logged run: curves and snapshots only, no model to explore).")
    elif state == "finished":
        st.success(f"Finished {step} steps. Open it on the **Explore** page (bundle `runs/{name}`).")
    elif state == "stopped":
        err = info.get("error") or ""
        st.warning(f"Stopped at step {info.get('step')}.{resume_note}"
                   + (f" ({err})" if err and not err.startswith("stopped by") else ""))
    elif state == "interrupted":
        st.warning(f"Interrupted: status.json says running but process {info.get('pid')} is gone "
                   f"(killed, or the machine restarted).{resume_note}")
    elif state == "failed":
        st.error(f"Training failed: {info.get('error') or 'see the log below'}")
    if (run_dir / CONFIG).is_file() or rows:
        live_charts(run_dir, rows, kind, key=f"live_{name}")
    if rows:
        st.download_button("Download metrics CSV", ui.metrics_csv(rows), file_name=f"{runs.safe_filename(name)}_metrics.csv",
                           mime="text/csv", key=f"dl_{name}", on_click="ignore")
    tail = log_tail(run_dir, 12)
    if tail:
        with st.expander("Training log (train.log)"):
            st.code(tail, language=None)
    return state


def live_area(watched: str, names: list[str]):
    """Jobs table + the watched run's panel: re-run every REFRESH s while any job is active."""
    jm = cache.job_manager()
    with ui.guard("Jobs"):
        states = {n: jm.job_state(n) for n in names}
        with st.expander(f"All runs and jobs ({len(names)}; at most {jm.max_jobs} trainings at once)",
                         expanded=any(s["state"] in ACTIVE for s in states.values())):
            st.dataframe([{"run": n, "state": s["state"], "step": runs.latest_step(jm.run_dir(n), s["step"]), "pid": s.get("pid"),
                           "queue position": s.get("position"), "error": (s.get("error") or "")[:160]}
                          for n, s in states.items()], hide_index=True, width="stretch")
    with ui.guard(f"Run {watched}"):
        watch_panel(watched)
    active = any(jm.job_state(n)["state"] in ACTIVE for n in names)
    was = st.session_state.get("_any_active")
    st.session_state["_any_active"] = active
    if was and not active:
        st.rerun()          # whole page: stop polling


# --------------------------------------------------------------------------- form
def start_form(jm):
    with st.form("train_form"):
        st.markdown("**New training run** — empty number fields take the preset's value "
                    "(or the trainer's default with preset *none*).")
        c = st.columns(4)
        kind = c[0].selectbox("Model kind", settings.MODEL_KINDS, key="f_kind",
                              format_func=lambda k: f"{k} — {settings.KIND_LABELS.get(k, '')}")
        dataset = c[1].selectbox("Dataset", ["auto"] + list(settings.DATASETS) + ["folder"], key="f_dataset",
                                 help="auto: fashion-mnist, or fashion-mnist-cat8 for vmf/nc; folder: a folder "
                                      "of images on this server (path and size under Advanced), RGB")
        preset = c[2].selectbox("Preset", settings.PRESET_CHOICES, key="f_preset",
                                help="demo: K=128, d=32, 1200 steps (~2 min on a 2-core CPU); paper: the paper's settings")
        name = c[3].text_input("Run name", key="f_name", placeholder="auto",
                               help="letters, digits, _ - . ; created under the runs directory")
        c = st.columns(6)
        k = c[0].number_input("K (codes)", 2, 65536, value=None, key="f_k", placeholder="preset")
        d = c[1].number_input("d (code dim)", 2, 2048, value=None, step=2, key="f_d", placeholder="preset")
        steps = c[2].number_input("Steps", 1, 10_000_000, value=None, key="f_steps", placeholder="preset")
        batch = c[3].number_input("Batch", 1, 4096, value=None, key="f_batch", placeholder="preset")
        lr = c[4].number_input("Learning rate", 1e-6, 1.0, value=None, format="%.5f", key="f_lr", placeholder="preset")
        seed = c[5].number_input("Seed", 0, 2**31 - 1, value=0, key="f_seed")
        with st.expander("Advanced"):
            a = st.columns(6)
            num_rb = a[0].number_input("Residual blocks", 1, 16, value=None, key="f_num_rb", placeholder="preset")
            log_every = a[1].number_input("log every", 1, 100000, value=None, key="f_log_every", placeholder="10")
            val_every = a[2].number_input("val every", 1, 10_000_000, value=None, key="f_val_every", placeholder="preset")
            snap_every = a[3].number_input("snapshot every", 1, 10_000_000, value=None, key="f_snapshot_every",
                                           placeholder="preset")
            ck_every = a[4].number_input("checkpoint every", 1, 10_000_000, value=None, key="f_checkpoint_every",
                                         placeholder="preset")
            val_max = a[5].number_input("max val images", 16, 100000, value=None, key="f_val_max_images",
                                        placeholder="preset")
            f = st.columns([4, 1, 1, 1, 1])
            folder = f[0].text_input("Image folder (dataset folder)", key="f_folder",
                                     placeholder="/path/to/images (one sub-folder per class optional)")
            image_size = f[1].number_input("Image size", 8, 256, value=None, step=4, key="f_image_size",
                                           placeholder="from images", help="folder: images are resized to this; "
                                           "empty: read from the images (their side if 28, 32 or 64, else 32; grey "
                                           "images train with 1 channel), or the preset's")
            crop = f[2].number_input("Centre crop", 1, 4096, value=None, key="f_center_crop", placeholder="none",
                                     help="folder: crop the centre N x N pixels first (official CelebA: 140)")
            compile_ = f[3].selectbox("torch.compile", COMPILE_CHOICES, key="f_compile",
                                      help="auto: compiled for runs of 5,000+ steps (about 20 s of compiling "
                                           "first, then faster steps); on / off: always / never")
            amp = f[4].checkbox("bf16 (--amp)", key="f_amp",
                                help="bf16 autocast of the convolutions (quantizer and loss stay fp32): about "
                                     "1.5-2x the images/s on a GPU or a CPU with native bf16 (AVX512-BF16, AMX), "
                                     "at slightly different numerics. Without native bf16 the run says so and "
                                     "trains in fp32.")
        submitted = st.form_submit_button("Start training", type="primary", icon=":material/play_arrow:")
    if not submitted:
        return
    if dataset == "folder":
        if not (folder or "").strip():
            st.error("Dataset *folder*: give the image folder's path under Advanced.")
            return
        dataset = f"folder:{folder.strip()}"
    else:
        image_size = crop = None          # folder-only settings
    opts = {"model": kind, "dataset": None if dataset == "auto" else dataset,
            "image_size": image_size, "center_crop": crop,
            "preset": None if preset == "none" else preset, "codebook_size": k, "code_dim": d, "steps": steps,
            "batch_size": batch, "lr": lr, "seed": seed, "num_rb": num_rb, "log_every": log_every,
            "val_every": val_every, "snapshot_every": snap_every, "checkpoint_every": ck_every,
            "val_max_images": val_max, "compile": compile_, "amp": amp or None}
    opts = {key: (int(v) if isinstance(v, float) and key != "lr" and float(v).is_integer() else v)
            for key, v in opts.items() if v is not None}
    with ui.guard("Start"):
        run = (name or "").strip() or jm.new_name(kind)
        state = jm.submit(run, opts)
        st.session_state["watch_run"] = run
        st.success(f"`{run}` {state}" + (" (waiting for a free slot)" if state == "queued" else ""))


def quick_buttons(jm):
    st.markdown("**One click** (demo preset, ~2 min each on a 2-core CPU):")
    choices = [("gaussian_1", "SQ-VAE (Gaussian I)"), ("vq", "VQ-VAE"), ("vq_ema", "VQ-VAE (EMA)"),
               ("fsq", "FSQ"), ("vmf", "vMF SQ-VAE")]
    cols = st.columns(len(choices))
    for col, (kind, label) in zip(cols, choices):
        if col.button(label, key=f"quick_{kind}", width="stretch", icon=":material/bolt:"):
            with ui.guard("Start"):
                name, state = jm.start_demo(kind)
                st.session_state["watch_run"] = name
                st.toast(f"{name}: {state}")


def run_names(jm) -> list[str]:
    names = [j["name"] for j in jm.jobs()]
    for ref in runs.list_bundles(("runs",)):
        if ref.name not in names:
            names.append(ref.name)
    return names


# ---------------------------------------------------------------------------- page
jm = cache.job_manager()
if settings.read_only():
    st.info("Read-only dashboard: the trainings below can be watched; starting, stopping and resuming "
            "them is turned off (SQVAE_READ_ONLY).", icon=":material/visibility:")
else:
    quick_buttons(jm)
    start_form(jm)

names = run_names(jm)
if not names:
    st.info(f"No runs yet in `{settings.runs_dir()}`." + ("" if settings.read_only() else " Start one above."))
    ui.stop_page()

states = {n: jm.job_state(n) for n in names}
request = st.session_state.pop("watch_run", None)       # one-shot: a run just started
if request in names:
    st.session_state["watch"] = request
elif st.session_state.get("watch") not in names:
    prev = st.session_state.get("_keep_watch")
    st.session_state["watch"] = prev if prev in names else next(
        (n for n in names if states[n]["state"] in ACTIVE), names[0])
watched = st.selectbox("Watch run", names, key="watch")
st.session_state["_keep_watch"] = watched

any_active = any(s["state"] in ACTIVE for s in states.values())
st.session_state["_any_active"] = any_active
st.fragment(run_every=REFRESH if any_active else None)(live_area)(watched, names)
