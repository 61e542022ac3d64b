"""Compare runs: overlaid curves, a table of final metrics, a sweep launcher and the one-click
codebook-collapse race (Gaussian SQ-VAE vs VQ-VAE vs VQ-VAE EMA, demo preset)."""
from __future__ import annotations

import re
import time

import streamlit as st

from app import cache, charts, runs, settings, theme, ui
from app.jobs import ACTIVE

ui.page_setup("Compare", "Compare")

RACE_KINDS = ("gaussian_1", "vq", "vq_ema")
RACE_RE = re.compile(r"^race-(\d{8}-\d{6}(?:-\d+)?)-(gaussian_1|vq|vq_ema)$")
SKIP_KEYS = {"step", "wall_time", "elapsed"}
SWEEP_PARAMS = {   # option -> (label, parser)
    "model": ("model kind", str),
    "lr": ("learning rate", float),
    "codebook_size": ("K (codebook size)", int),
    "code_dim": ("d (code dim)", int),
    "batch_size": ("batch size", int),
    "seed": ("seed", int),
    "num_rb": ("residual blocks", int),
    "var_q_init": ("initial σ²_φ", float),
}


def run_summary(ref) -> dict:
    rows = runs.read_metrics(ref.path)
    val = runs.last_val_row(rows) or {}
    st_ = runs.read_status(ref.path)
    try:
        cfg = runs.read_config(ref.path)
    except Exception:      # noqa: BLE001
        cfg = {}
    k, d = runs.codebook_shape(cfg)       # a logged run's from its "logged" section
    return {"run": ref.label, "kind": runs.run_kind(cfg), "dataset": cfg.get("dataset"),
            "K": k, "d": d, "state": st_.get("state"),
            "step": max([r.get("step", 0) for r in rows] + [0]), "val step": val.get("step"),
            "val_mse": val.get("val_mse"), "val_perplexity": val.get("val_perplexity"),
            "val_dead_codes": val.get("val_dead_codes"), "val_entropy": val.get("val_entropy")}


# --------------------------------------------------------------------------- curves
def curves(refs):
    labels = [r.label for r in refs]
    by_label = {r.label: r for r in refs}
    if "cmp_runs" in st.session_state:
        st.session_state["cmp_runs"] = [x for x in st.session_state["cmp_runs"] if x in labels]
    else:
        st.session_state["cmp_runs"] = labels[: min(3, len(labels))]
    chosen = st.multiselect("Runs", labels, key="cmp_runs")
    if not chosen:
        st.info("Pick one or more runs.")
        return
    all_rows = {lab: runs.read_metrics(by_label[lab].path) for lab in chosen}
    keys = sorted({k for rows in all_rows.values() for r in rows for k, v in r.items()
                   if k not in SKIP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not keys:
        st.info("The chosen runs have no metrics yet.")
    else:
        default = next((k for k in ("val_perplexity", "perplexity", "val_mse", "loss") if k in keys), keys[0])
        if st.session_state.get("cmp_metric") not in keys:
            st.session_state["cmp_metric"] = default
        c1, c2 = st.columns([3, 1])
        metric = c1.selectbox("Metric", keys, key="cmp_metric")
        log_y = c2.toggle("log y", key="cmp_log")
        theme.plot(charts.runs_figure(all_rows, metric, log_y=log_y), key="cmp_chart")
    table = [run_summary(by_label[lab]) for lab in chosen]
    st.markdown("**Final metrics** (last validation row of each run)")
    st.dataframe(table, hide_index=True, width="stretch")
    st.download_button("Download table CSV", ui.metrics_csv(table), file_name="compare_final_metrics.csv",
                       mime="text/csv", key="dl_cmp", on_click="ignore")


# ---------------------------------------------------------------------------- sweep
def sweep(jm):
    st.markdown("Vary one setting over a list of values; every value becomes one training job "
                f"(at most {jm.max_jobs} run at once, the rest wait in the queue).")
    with st.form("sweep_form"):
        c = st.columns(4)
        kind = c[0].selectbox("Base model kind", settings.MODEL_KINDS, key="sw_kind")
        preset = c[1].selectbox("Preset", settings.PRESET_CHOICES, key="sw_preset")
        steps = c[2].number_input("Steps", 1, 10_000_000, value=None, placeholder="preset", key="sw_steps")
        param = c[3].selectbox("Vary", list(SWEEP_PARAMS), format_func=lambda p: SWEEP_PARAMS[p][0], key="sw_param")
        values = st.text_input("Values (comma-separated; model kinds by name)", key="sw_values",
                               placeholder="e.g. 0.0005, 0.001, 0.002   or   gaussian_1, vq, vq_ema")
        go_ = st.form_submit_button("Enqueue sweep", type="primary", icon=":material/playlist_add:")
    if not go_:
        return
    with ui.guard("Sweep"):
        label, parse = SWEEP_PARAMS[param]
        raw = [v.strip() for v in (values or "").split(",") if v.strip()]
        if not raw:
            raise ValueError("give at least one value")
        if len(raw) > 16:
            raise ValueError("at most 16 values per sweep")
        parsed = []
        for v in raw:
            try:
                x = parse(v)
            except ValueError:
                raise ValueError(f"{v!r} is not a valid {label}") from None
            if param == "model" and x not in settings.MODEL_KINDS:
                raise ValueError(f"unknown model kind {x!r}; choose from {', '.join(settings.MODEL_KINDS)}")
            parsed.append(x)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        started = []
        for x in parsed:
            opts = {"model": kind, "preset": None if preset == "none" else preset, "steps": steps}
            opts[param] = x
            name = f"sweep-{stamp}-{param}-{re.sub(r'[^A-Za-z0-9_.-]', '_', str(x))}"[:100]
            started.append((name, jm.submit(name, opts)))
        st.success("Enqueued: " + ", ".join(f"`{n}` ({s})" for n, s in started))
        st.session_state["cmp_runs"] = [f"runs/{n}" for n, _ in started]


# ----------------------------------------------------------------------------- race
def races() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ref in runs.list_bundles(("runs",)):
        m = RACE_RE.match(ref.name)
        if m:
            out.setdefault(m.group(1), []).append(ref.name)
    return out


def race_names(stamp: str) -> list[str]:
    return [f"race-{stamp}-{k}" for k in RACE_KINDS]


def race_panel(stamp: str):
    jm = cache.job_manager()
    names = race_names(stamp)
    states = {n: jm.job_state(n) for n in names}
    cols = st.columns(3)
    for col, n, kind in zip(cols, names, RACE_KINDS):
        s = states[n]
        col.metric(settings.KIND_LABELS[kind], s["state"], help=n)
        col.caption(f"step {runs.latest_step(jm.run_dir(n), s)}" + (f" · queue #{s['position']}" if s.get("position") else ""))
    rows = {n: runs.read_metrics(jm.run_dir(n)) for n in names}
    race_rows = [(settings.KIND_LABELS[kind], rows[n]) for n, kind in zip(names, RACE_KINDS)]
    left, right = st.columns(2)
    with left:
        theme.plot(charts.race_figure(race_rows, "perplexity", "Perplexity (codes in use; higher is better)",
                                      val_key="val_perplexity"), key="race_perplexity")
    with right:
        theme.plot(charts.race_figure(race_rows, "val_dead_codes", "Dead codes (validation)"), key="race_val_dead_codes")
    if any(s["state"] in ("stopped", "interrupted", "failed") for s in states.values()):
        st.caption("Some race runs are not running: see **Train live** to resume or read their errors.")
    active = any(s["state"] in ACTIVE for s in states.values())
    was = st.session_state.get("_race_active")
    st.session_state["_race_active"] = active
    if was and not active:
        st.rerun()


def race_fragment(stamp: str):
    with ui.guard("Race panel"):
        race_panel(stamp)


def race(jm):
    st.markdown("**Codebook collapse race** — Gaussian SQ-VAE vs VQ-VAE vs VQ-VAE (EMA), demo preset, "
                "started together (queued on a CPU, one after the other). What the SQ-VAE paper leads one to "
                "expect: SQ-VAE keeps many codes in use (high perplexity, few dead codes) while plain VQ-VAE "
                "collapses onto a few. Dead codes come from the validation passes (every 200 steps in the demo preset).")
    c1, c2 = st.columns([1, 3])
    steps = c1.number_input("Steps (empty = demo preset, 1200)", 1, 1_000_000, value=None, key="race_steps",
                            placeholder="1200")
    if c2.button("Start the race", type="primary", key="race_start", icon=":material/sports_score:"):
        with ui.guard("Race"):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            i = 1
            while any((settings.runs_dir() / n).exists() for n in race_names(stamp)):
                i += 1
                stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{i}"
            for n, kind in zip(race_names(stamp), RACE_KINDS):
                jm.submit(n, {"model": kind, "preset": "demo", "steps": steps})
            st.session_state["race"] = stamp
    known = races()
    for n in [q["name"] for q in jm.queue()] + [j["name"] for j in jm.jobs()]:
        m = RACE_RE.match(n)
        if m:
            known.setdefault(m.group(1), [])
    if st.session_state.get("race") and st.session_state["race"] not in known:
        known[st.session_state["race"]] = []
    if not known:
        st.info("No race yet: press **Start the race**.")
        return
    stamps = sorted(known, reverse=True)
    if st.session_state.get("race_pick") not in stamps or st.session_state.get("race") != st.session_state.get("_race_applied"):
        st.session_state["race_pick"] = st.session_state.get("race") if st.session_state.get("race") in stamps else stamps[0]
        st.session_state["_race_applied"] = st.session_state.get("race")
    stamp = st.selectbox("Race", stamps, key="race_pick")
    states = [jm.job_state(n)["state"] for n in race_names(stamp)]
    active = any(s in ACTIVE for s in states)
    st.session_state["_race_active"] = active
    st.fragment(run_every=settings.refresh_seconds() if active else None)(race_fragment)(stamp)


# ----------------------------------------------------------------------------- page
jm = cache.job_manager()
tabs = st.tabs(["Curves & final metrics", "Sweep", "Collapse race"], key="compare_tab", on_change="rerun")
with tabs[0]:
    if tabs[0].open:
        refs = runs.list_bundles()
        if not refs:
            st.info(f"No runs or bundles found in `{settings.runs_dir()}` or `{settings.checkpoints_dir()}`.")
        else:
            with ui.guard("Curves"):
                curves(refs)
with tabs[1]:
    if tabs[1].open:
        sweep(jm)
with tabs[2]:
    if tabs[2].open:
        race(jm)
