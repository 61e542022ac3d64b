"""Compare runs: overlaid curves, a table of final metrics, sweeps on Ray Tune (started here as
`sqvae sweep` processes and watched live: trial table, params -> metric, every trial's curve) and the
codebook-collapse race (any set of kinds, demo preset; by default Gaussian SQ-VAE vs VQ-VAE vs FSQ)."""
from __future__ import annotations

import re
import time

import streamlit as st

from app import cache, charts, runs, settings, sweeps, theme, ui
from app.jobs import ACTIVE, check_name
from sqvae_core import rundir as rd
from sqvae_core.sweep import SCHEDULERS, SEARCHES

ui.page_setup("Compare", "Compare")

# The race: every discrete kind may run; the default is small enough for a talk on 2 cores (one
# run at a time on a CPU, ~1.5 min each at the demo preset): SQ-VAE, the collapsing VQ-VAE, a modern fix.
RACE_CHOICES = tuple(k for k in settings.MODEL_KINDS if settings.KINDS[k].discrete)
RACE_DEFAULT = ("gaussian_1", "vq", "fsq")
RACE_RE = re.compile(rf"^race-(\d{{8}}-\d{{6}}(?:-\d+)?)-({'|'.join(RACE_CHOICES)})$")
SKIP_KEYS = {"step", "wall_time", "elapsed"}
SWEEP_METRICS = ("val_mse", "val_loss", "val_perplexity", "val_dead_codes", "val_entropy")
MAXIMISED = ("val_perplexity",)                  # the others are better lower
SHOWN_METRICS = ("val_mse", "val_perplexity", "val_dead_codes", "val_entropy", "val_loss")


def run_summary(ref) -> dict:
    rows = runs.read_metrics(ref.path)
    val = runs.last_val_row(rows) or {}
    try:
        cfg = runs.read_config(ref.path)
    except Exception:      # noqa: BLE001
        cfg = rd.RunConfig.from_dict({})
    # K and d: a logged run's from its "logged" section
    return {"run": ref.label, "kind": runs.run_kind(cfg), "dataset": cfg.dataset,
            "K": cfg.codebook_size, "d": cfg.code_dim, "state": runs.read_status(ref.path).state,
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
def sweep_form():
    """A new sweep: the base training, a grid in `sqvae sweep --grid` syntax, search and scheduler."""
    with st.form("sweep_form"):
        c = st.columns(4)
        name = c[0].text_input("Sweep name", key="sw_name", placeholder="sweep-<time>")
        kind = c[1].selectbox("Base model kind", settings.MODEL_KINDS, key="sw_kind")
        preset = c[2].selectbox("Preset", settings.PRESET_CHOICES, key="sw_preset")
        steps = c[3].number_input("Steps", 1, 10_000_000, value=None, placeholder="preset", key="sw_steps")
        grid_text = st.text_area("Grid: one train flag (without dashes) and its values per line", key="sw_grid",
                                 placeholder="lr=0.0005,0.001,0.002\nmodel=gaussian_1,vq", height=90)
        c = st.columns(4)
        search = c[0].selectbox("Search", SEARCHES, key="sw_search")
        samples = c[1].number_input("Samples (grid: repeats; random/optuna: trials)", 1, 1000, 1, key="sw_samples")
        scheduler = c[2].selectbox("Scheduler", SCHEDULERS, key="sw_scheduler",
                                   format_func=lambda s: {"asha": "asha (early stopping)"}.get(s, s))
        metric = c[3].selectbox("Metric (asha, optuna)", SWEEP_METRICS, key="sw_metric")
        go_ = st.form_submit_button("Start sweep", type="primary", icon=":material/play_arrow:")
    if not go_:
        return
    with ui.guard("Sweep"):
        try:
            grid = sweeps.parse_grid_text(grid_text)
            name = (name or "").strip() or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
            check_name(name)
            opts = {"model": kind, "preset": None if preset == "none" else preset, "steps": steps}
            opts = {k: v for k, v in opts.items() if k.replace("_", "-") not in grid}   # the grid's values win
            sweeps.start(settings.runs_dir() / name, grid, opts, samples=int(samples), search=search,
                         scheduler=scheduler, metric=metric, mode="max" if metric in MAXIMISED else "min")
        except ValueError as e:       # what `sqvae sweep` would refuse: its one line
            st.error(f"Sweep: {e}")
            return
        st.session_state["sw_pick"] = name
        st.success(f"Started sweep `{name}` on {sweeps.ray_target()}.")


def trial_table(out, v: dict) -> list[dict]:
    table = []
    for t in v["doc"].get("trials", []):
        status = v["status"].get(t["name"])
        m = t.get("metrics") or {}
        state = t["state"]
        if state == "running" and status and status.state in ("stopped", "failed", "interrupted"):
            state = status.state
        row = {"trial": t["name"], "state": state, "node": (t.get("node") or "")[:8] or None,
               "step": runs.latest_step(out / t["name"], status.step) if status else None}
        row.update({k: v_ for k, v_ in (t.get("params") or {}).items()})
        row.update({k: m.get(k) for k in SHOWN_METRICS if k in m})
        row["explore"] = f"./?run=runs/{out.name}/{t['name']}"
        if t.get("error") and t["state"] in ("failed", "stopped", "pending"):
            row["note"] = t["error"]
        table.append(row)
    return table


def sweep_view(out):
    v = sweeps.view(out)
    doc, trials = v["doc"], v["doc"].get("trials", [])
    state = v["state"]
    counts = {s: sum(t["state"] == s for t in trials) for s in ("running", "pending", "finished", "stopped", "failed")}
    c = st.columns([1, 1, 1, 1, 1, 1.3])
    c[0].metric("Sweep", state)
    for col, s in zip(c[1:5], ("running", "finished", "stopped", "failed")):
        col.metric(s.capitalize(), counts[s])
    controls = not settings.read_only()           # read-only: visitors watch sweeps, nothing more
    if controls and state == "running" and c[5].button("Stop sweep", key="sw_stop", icon=":material/stop:"):
        st.toast(f"{out.name}: {sweeps.stop(out)}")
    if controls and state == "interrupted" and c[5].button("Resume sweep", key="sw_resume", icon=":material/play_arrow:",
                                              help="Run the sweep's command again: finished trials are kept, the "
                                                   "others continue from their checkpoints"):
        sweeps.resume(out)
        st.session_state["_sw_running"] = True
        st.rerun()
    spec = doc.get("spec") or {}
    if spec:
        st.caption(f"{spec.get('search')} search · {spec.get('scheduler')} scheduler · metric {spec.get('metric')} "
                   f"({spec.get('mode')}) · {len(trials)} trials · `{out}`")
    if not trials:
        st.info("No trials yet: the sweep is starting (Ray takes a few seconds).")
    else:
        st.dataframe(trial_table(out, v), hide_index=True, width="stretch", key="sw_table",
                     column_config={"explore": st.column_config.LinkColumn("Explore", display_text="open ↗")})
        have = [k for k in SWEEP_METRICS if any(k in (t.get("metrics") or {}) for t in trials)]
        if have:
            default = spec.get("metric") if spec.get("metric") in have else have[0]
            if st.session_state.get("sw_view_metric") not in have:
                st.session_state["sw_view_metric"] = default
            metric = st.selectbox("Metric", have, key="sw_view_metric")
            left, right = st.columns(2)
            with left:
                fig = charts.parallel_figure(trials, metric)
                if fig is not None:
                    theme.plot(fig, key="sw_parallel")
            with right:
                stopped = {t["name"] for t in trials if t["state"] == "stopped"}
                theme.plot(charts.trial_curves_figure({t["name"]: v["rows"][t["name"]] for t in trials}, metric,
                                                      stopped), key="sw_curves")
        else:
            st.info("No validation row yet: the table and plots fill in as trials validate.")
    with st.expander("Sweep log"):
        st.code(sweeps.log_tail(out, 20) or "(empty)", language=None)
    was = st.session_state.get("_sw_running")
    st.session_state["_sw_running"] = state == "running"
    if was and state != "running":
        st.rerun()


def sweep_fragment(out):
    with ui.guard("Sweep"):
        sweep_view(out)


def sweep():
    st.markdown(f"A sweep trains one run per trial on Ray Tune, here on {sweeps.ray_target()} "
                "(set `RAY_ADDRESS` before starting the app to use a cluster). Trials are run directories under "
                "the sweep's folder, so every other page reads them too. Same as `sqvae sweep` on the command line.")
    found = sweeps.list_sweeps(settings.runs_dir())
    if settings.read_only():
        st.caption(":material/visibility: Read-only dashboard: sweeps can be watched; starting, stopping and "
                   "resuming them is turned off (SQVAE_READ_ONLY).")
    else:
        with st.expander("New sweep", expanded=not found, icon=":material/add:"):
            sweep_form()
    found = sweeps.list_sweeps(settings.runs_dir())
    if not found:
        st.info("No sweep yet in the runs directory.")
        return
    names = [p.name for p in found]
    if st.session_state.get("sw_pick") not in names:
        st.session_state["sw_pick"] = names[0]
    name = st.selectbox("Sweep", names, key="sw_pick")
    out = settings.runs_dir() / name
    running = sweeps.view(out)["state"] in ("running", "starting")
    st.session_state["_sw_running"] = running
    st.fragment(run_every=settings.refresh_seconds() if running else None)(sweep_fragment)(out)


# ----------------------------------------------------------------------------- race
def races(jm) -> dict[str, list[str]]:
    """Every race: its stamp -> its kinds (catalogue order), from the run directories and the job queue."""
    out: dict[str, set[str]] = {}
    names = [ref.name for ref in runs.list_bundles(("runs",))] + [q["name"] for q in jm.queue()] + \
        [j["name"] for j in jm.jobs()]
    for n in names:
        m = RACE_RE.match(n)
        if m:
            out.setdefault(m.group(1), set()).add(m.group(2))
    return {stamp: [k for k in RACE_CHOICES if k in kinds] for stamp, kinds in out.items()}


def race_names(stamp: str, kinds) -> list[str]:
    return [f"race-{stamp}-{k}" for k in kinds]


def race_panel(stamp: str, kinds: list[str]):
    jm = cache.job_manager()
    names = race_names(stamp, kinds)
    states = {n: jm.job_state(n) for n in names}
    per_row = 5
    for i in range(0, len(names), per_row):
        cols = st.columns(per_row)
        for col, n, kind in zip(cols, names[i:i + per_row], kinds[i:i + per_row]):
            s = states[n]
            col.metric(settings.KIND_LABELS[kind], s["state"], help=n)
            col.caption(f"step {runs.latest_step(jm.run_dir(n), s['step'])}"
                        + (f" · queue #{s['position']}" if s.get("position") else ""))
    race_rows = [(settings.KIND_LABELS[kind], runs.read_metrics(jm.run_dir(n))) for n, kind in zip(names, kinds)]
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


def race_fragment(stamp: str, kinds: list[str]):
    with ui.guard("Race panel"):
        race_panel(stamp, kinds)


def race(jm):
    st.markdown("**Codebook collapse race** — any set of model kinds on the demo preset, started together "
                "(queued on a CPU, one after the other). What the SQ-VAE paper leads one to expect: SQ-VAE keeps "
                "many codes in use (high perplexity, few dead codes) while plain VQ-VAE collapses onto a few; the "
                "modern fixes (FSQ, LFQ, SimVQ, rotation trick) are built to avoid collapse too. Dead codes come "
                "from the validation passes (every 200 steps in the demo preset).")
    if settings.read_only():
        st.caption(":material/visibility: Read-only dashboard: races already run can be watched; starting "
                   "one is turned off (SQVAE_READ_ONLY).")
    else:
        race_controls(jm)
    known = races(jm)
    if not known:
        st.info("No race yet: choose the kinds and press **Start the race**." if not settings.read_only()
                else "No race has been run here.")
        return
    stamps = sorted(known, reverse=True)
    if st.session_state.get("race_pick") not in stamps or st.session_state.get("race") != st.session_state.get("_race_applied"):
        st.session_state["race_pick"] = st.session_state.get("race") if st.session_state.get("race") in stamps else stamps[0]
        st.session_state["_race_applied"] = st.session_state.get("race")
    stamp = st.selectbox("Race", stamps, key="race_pick",
                         format_func=lambda s: f"{s} ({', '.join(known[s])})")
    kinds = known[stamp]
    states = [jm.job_state(n)["state"] for n in race_names(stamp, kinds)]
    active = any(s in ACTIVE for s in states)
    st.session_state["_race_active"] = active
    st.fragment(run_every=settings.refresh_seconds() if active else None)(race_fragment)(stamp, kinds)


def race_controls(jm):
    """Kinds, steps and the start button of a new race."""
    if st.session_state.pop("_race_all", False):
        st.session_state["race_kinds"] = list(RACE_CHOICES)
    st.session_state.setdefault("race_kinds", list(RACE_DEFAULT))
    c0, c1, c2, c3 = st.columns([4, 1, 1, 1], vertical_alignment="bottom")
    kinds = c0.multiselect("Kinds", RACE_CHOICES, key="race_kinds",       # chips by name; labels in the help
                           help="; ".join(f"{k}: {settings.KIND_LABELS[k]}" for k in RACE_CHOICES))
    if c1.button("All kinds", key="race_all", help=f"all {len(RACE_CHOICES)} kinds with a codebook "
                 "(about 1.5 min each at the demo preset on a 2-core CPU)"):
        st.session_state["_race_all"] = True
        st.rerun()
    steps = c2.number_input("Steps", 1, 1_000_000, value=None, key="race_steps", placeholder="1200",
                            help="empty: the demo preset's 1,200")
    if c3.button("Start the race", type="primary", key="race_start", icon=":material/sports_score:"):
        with ui.guard("Race"):
            if not kinds:
                raise ValueError("choose at least one kind for the race")
            # A stamp no earlier race has: a race started in the same second (its runs maybe only queued,
            # with no directory yet) must not merge with this one.
            taken = set(races(jm))
            stamp, i = time.strftime("%Y%m%d-%H%M%S"), 1
            while stamp in taken or any((settings.runs_dir() / n).exists() for n in race_names(stamp, kinds)):
                i += 1
                stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{i}"
            ordered = [k for k in RACE_CHOICES if k in kinds]
            for n, kind in zip(race_names(stamp, ordered), ordered):
                jm.submit(n, {"model": kind, "preset": "demo", "steps": steps})
            st.session_state["race"] = stamp


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
        sweep()
with tabs[2]:
    if tabs[2].open:
        race(jm)
