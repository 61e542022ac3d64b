"""Train live: start trainings as separate processes, watch their metrics.jsonl as they grow,
stop / resume them. Job control (cap, queue, cleanup) is in app/jobs.py."""
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
    st.set_page_config(page_title="Train live · SQ-VAE Explorer", layout="wide")
C.page_setup("Train live")

from app.jobs import log_tail          # noqa: E402

REFRESH = C.refresh_seconds()     # seconds between live refreshes (env SQVAE_APP_REFRESH, default 2)
ACTIVE = ("queued", "starting", "running")
STATE_ICON = {"queued": ":material/hourglass_top:", "starting": ":material/rocket_launch:",
              "running": ":material/play_circle:", "finished": ":material/check_circle:",
              "failed": ":material/error:", "stopped": ":material/stop_circle:",
              "interrupted": ":material/warning:", "unknown": ":material/help:"}
PRESETS = ["demo", "none", "paper"]


# ------------------------------------------------------------------------- charts
def usage_raster(snaps: list[dict]) -> go.Figure | None:
    if not snaps:
        return None
    z = np.stack([s["usage"] for s in snaps], 1).astype(float)          # (K, snapshots)
    steps = [s["step"] for s in snaps]
    fig = go.Figure(go.Heatmap(z=np.log10(1 + z), x=steps, y=list(range(z.shape[0])), colorscale="Viridis",
                               customdata=z, colorbar=dict(title="log10(1+uses)", thickness=12),
                               hovertemplate="step %{x}<br>code %{y}<br>uses %{customdata}<extra></extra>"))
    fig.update_xaxes(title="step (snapshot)", type="category" if len(steps) < 3 else "linear")
    fig.update_yaxes(title="code")
    return C.style(fig, 320, "Code usage per snapshot window (dark = dead)")


def map_animation(frames_pts: list[list[dict]], steps: list[int]) -> go.Figure | None:
    if not frames_pts:
        return None

    def trace(pts):
        u = np.array([p.get("usage") or 0 for p in pts], float)
        return go.Scatter(x=[p["x"] for p in pts], y=[p["y"] for p in pts], mode="markers",
                          customdata=[[p["code"], p.get("usage")] for p in pts],
                          marker=dict(size=8, color=np.log10(1 + u), colorscale="Viridis", cmin=0,
                                      cmax=max(1.0, float(np.log10(1 + max(u.max(), 1)))),
                                      symbol=["x" if p.get("dead") else "circle" for p in pts]),
                          hovertemplate="code %{customdata[0]}<br>uses %{customdata[1]}<extra></extra>")
    xs = [p["x"] for f in frames_pts for p in f]
    ys = [p["y"] for f in frames_pts for p in f]
    pad_x, pad_y = 0.05 * (max(xs) - min(xs) + 1e-9), 0.05 * (max(ys) - min(ys) + 1e-9)
    fig = go.Figure(data=[trace(frames_pts[-1])],
                    frames=[go.Frame(data=[trace(f)], name=str(s)) for f, s in zip(frames_pts, steps)])
    fig.update_xaxes(range=[min(xs) - pad_x, max(xs) + pad_x], showticklabels=False)
    fig.update_yaxes(range=[min(ys) - pad_y, max(ys) + pad_y], showticklabels=False)
    fig.update_layout(
        updatemenus=[dict(type="buttons", showactive=False, x=0, y=-0.08, xanchor="left", yanchor="top",
                          buttons=[dict(label="▶ play", method="animate",
                                        args=[None, dict(frame=dict(duration=300, redraw=True), fromcurrent=False)])])],
        sliders=[dict(active=len(steps) - 1, x=0.15, len=0.85, y=-0.02, currentvalue=dict(prefix="step "),
                      steps=[dict(label=str(s), method="animate",
                                  args=[[str(s)], dict(mode="immediate", frame=dict(duration=0, redraw=True))])
                             for s in steps])])
    return C.style(fig, 380, "Codebook map over training (PCA on shared axes; ✕ = dead in window)")


def live_charts(run_dir: Path, rows: list[dict], kind: str | None, key: str):
    """The live panels of one run (charts that have no data yet are skipped)."""
    from sqvae_core.explore import code_metric
    cat = kind in ("vmf", "nc")
    anneal_keys = ["kappa_q", "kappa_x"] if cat else ["sigma2_q", "sigma2_x"]
    anneal_title = ("Self-annealing: κ_φ (quantizer) and κ (decoder), log scale" if cat else
                    "Self-annealing: σ²_φ (quantizer) and σ² (decoder), log scale")
    names = {"sigma2_q": "σ²_φ", "sigma2_x": "σ² (decoder)", "kappa_q": "κ_φ", "kappa_x": "κ (decoder)",
             "val_dead_codes": "dead codes (val)"}
    specs = [
        (["loss", "val_loss"], "Loss", {}),
        (["mse", "val_mse"], "MSE (per image)", {}),
        (["perplexity", "val_perplexity"], "Perplexity & dead codes", {"secondary": ["val_dead_codes"]}),
        (["entropy", "val_entropy"], "Quantization entropy H(P̂(z_q|z)) [nats]", {}),
        (anneal_keys, anneal_title, {"log_y": True}),
        (["temperature"], "Gumbel-softmax temperature τ", {}),
    ]
    figs = []
    for keys, title, kw in specs:
        fig = C.line_figure(rows, keys, title, names=names, **kw)
        if fig is not None:
            figs.append(fig)
    snaps = C.snapshots(run_dir)
    if snaps:
        figs.append(usage_raster(snaps))
        try:
            maps = C.snapshot_maps(run_dir, code_metric(kind or "gaussian_1"))
            anim = map_animation(maps, [s["step"] for s in snaps])
            if anim is not None:
                figs.append(anim)
        except ValueError as e:
            st.caption(f"Codebook map unavailable: {e}")
    if not figs:
        st.info("No metrics yet: the first rows appear after `log_every` steps.")
        return
    for i in range(0, len(figs), 2):
        cols = st.columns(2)
        for j, fig in enumerate(figs[i:i + 2]):
            with cols[j]:
                C.plot(fig, key=f"{key}_{i + j}")


# -------------------------------------------------------------------------- panel
def run_kind(run_dir: Path) -> tuple[str | None, int | None]:
    try:
        cfg = C.read_config(run_dir)
        return cfg.get("model", {}).get("kind"), cfg.get("train", {}).get("steps")
    except Exception:       # noqa: BLE001 - no config yet (queued / starting)
        return None, None


def watch_panel(name: str) -> str:
    jm = C.job_manager()
    run_dir = jm.run_dir(name)
    info = jm.job_state(name)
    state = info["state"]
    kind, total = run_kind(run_dir)
    rows = C.read_metrics(run_dir)
    step = max([r.get("step", 0) for r in rows] + [info.get("step") or 0])

    head = st.columns([4, 1, 1])
    head[0].markdown(f"### {STATE_ICON.get(state, '')} `{name}` — {state}"
                     + (f" · {C.KIND_LABELS.get(kind, kind)}" if kind else ""))
    if state in ACTIVE:
        if head[1].button("Stop", key=f"stop_{name}", type="primary", icon=":material/stop:"):
            res = jm.stop(name)
            st.toast(f"{name}: {res}")
            info = jm.job_state(name)
            state = info["state"]
    if state in ("stopped", "interrupted") and (run_dir / "config.json").is_file():
        if head[1].button("Resume", key=f"resume_{name}", type="primary", icon=":material/play_arrow:"):
            with C.guard("Resume"):
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
    elif state == "finished":
        st.success(f"Finished {step} steps. Open it on the **Explore** page (bundle `runs/{name}`).")
    elif state == "stopped":
        err = info.get("error") or ""
        st.warning(f"Stopped at step {info.get('step')}. Resume continues from the last checkpoint."
                   + (f" ({err})" if err and not err.startswith("stopped by") else ""))
    elif state == "interrupted":
        st.warning(f"Interrupted: status.json says running but process {info.get('pid')} is gone "
                   f"(killed, or the machine restarted). Resume continues from the last checkpoint.")
    elif state == "failed":
        st.error(f"Training failed: {info.get('error') or 'see the log below'}")
    if (run_dir / "config.json").is_file() or rows:
        live_charts(run_dir, rows, kind, key=f"live_{name}")
    if rows:
        st.download_button("Download metrics CSV", C.metrics_csv(rows), file_name=f"{name.replace('/', '_')}_metrics.csv",
                           mime="text/csv", key=f"dl_{name}", on_click="ignore")
    tail = log_tail(run_dir, 12)
    if tail:
        with st.expander("Training log (train.log)"):
            st.code(tail, language=None)
    return state


def live_area(watched: str, names: list[str]):
    """Jobs table + the watched run's panel: re-run every REFRESH s while any job is active."""
    jm = C.job_manager()
    with C.guard("Jobs"):
        states = {n: jm.job_state(n) for n in names}
        with st.expander(f"All runs and jobs ({len(names)}; at most {jm.max_jobs} trainings at once)",
                         expanded=any(s["state"] in ACTIVE for s in states.values())):
            st.dataframe([{"run": n, "state": s["state"], "step": C.latest_step(jm.run_dir(n), s), "pid": s.get("pid"),
                           "queue position": s.get("position"), "error": (s.get("error") or "")[:160]}
                          for n, s in states.items()], hide_index=True, width="stretch")
    with C.guard(f"Run {watched}"):
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
        kind = c[0].selectbox("Model kind", C.MODEL_KINDS, key="f_kind",
                              format_func=lambda k: f"{k} — {C.KIND_LABELS.get(k, '')}")
        dataset = c[1].selectbox("Dataset", ["auto"] + list(C.DATASETS), key="f_dataset",
                                 help="auto: fashion-mnist, or fashion-mnist-cat8 for vmf/nc")
        preset = c[2].selectbox("Preset", PRESETS, key="f_preset",
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
        submitted = st.form_submit_button("Start training", type="primary", icon=":material/play_arrow:")
    if not submitted:
        return
    opts = {"model": kind, "dataset": None if dataset == "auto" else dataset,
            "preset": None if preset == "none" else preset, "codebook_size": k, "code_dim": d, "steps": steps,
            "batch_size": batch, "lr": lr, "seed": seed, "num_rb": num_rb, "log_every": log_every,
            "val_every": val_every, "snapshot_every": snap_every, "checkpoint_every": ck_every,
            "val_max_images": val_max}
    opts = {key: (int(v) if isinstance(v, float) and key != "lr" and float(v).is_integer() else v)
            for key, v in opts.items() if v is not None}
    with C.guard("Start"):
        run = (name or "").strip() or C.new_run_name(kind)
        state = jm.submit(run, opts)
        st.session_state["watch_run"] = run
        st.success(f"`{run}` {state}" + (" (waiting for a free slot)" if state == "queued" else ""))


def quick_buttons(jm):
    st.markdown("**One click** (demo preset, ~2 min each on a 2-core CPU):")
    cols = st.columns(4)
    for col, (kind, label) in zip(cols, [("gaussian_1", "SQ-VAE (Gaussian I)"), ("vq", "VQ-VAE"),
                                         ("vq_ema", "VQ-VAE (EMA)"), ("vmf", "vMF SQ-VAE")]):
        if col.button(label, key=f"quick_{kind}", width="stretch", icon=":material/bolt:"):
            with C.guard("Start"):
                name, state = C.start_demo_training(kind)
                st.session_state["watch_run"] = name
                st.toast(f"{name}: {state}")


def run_names(jm) -> list[str]:
    names = [j["name"] for j in jm.jobs()]
    for ref in C.list_bundles(("runs",)):
        if ref.name not in names:
            names.append(ref.name)
    return names


# ---------------------------------------------------------------------------- page
jm = C.job_manager()
quick_buttons(jm)
start_form(jm)

names = run_names(jm)
if not names:
    st.info(f"No runs yet in `{C.runs_dir()}`. Start one above.")
    C.stop_page()

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
