"""Every chart of the app: pure functions of data -> plotly Figure (no Streamlit, no torch).

Light look and one palette (app/theme.py); theme.plot() restyles a figure for demo mode at display
time. Titles stay short: Plotly's mode bar sits at the top right of every chart. Point lists of
codebook maps are sqvae_core.explore's: [{"code", "x", "y", "usage", "dead"}].
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app.theme import CHANGED, DEAD, HIGHLIGHT, PALETTE, SCALE, USED

LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.22, xanchor="left", x=0)


def _layout(fig: go.Figure, height: int, title: str | None = None) -> go.Figure:
    fig.update_layout(template="plotly_white", height=height, colorway=PALETTE,
                      margin=dict(l=10, r=10, t=50 if title else 20, b=10))
    if title:
        fig.update_layout(title=dict(text=title, x=0.01, xanchor="left"))
    return fig


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of one metric over metrics.jsonl rows that have both."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in r:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def _mode(key: str, n: int) -> str:
    """Validation rows (sparse) and short series get markers; long training series are lines."""
    return "lines+markers" if key.startswith("val_") or n < 25 else "lines"


def line_figure(rows: list[dict], keys: list[str], title: str, *, log_y: bool = False, names: dict | None = None,
                height: int = 300) -> go.Figure | None:
    """Lines of metric keys over steps; None if no key has data."""
    return panels_figure(rows, [keys], title, log_y=log_y, names=names, height=height)


def panels_figure(rows: list[dict], panels: list[list[str]], title: str, *, log_y: bool = False,
                  names: dict | None = None, height: int = 300) -> go.Figure | None:
    """One panel per list of keys, stacked on a shared step axis, each with its own y axis titled by
    its first key that has data (two quantities of different scales without a second y axis on the same plot);
    None if no key has data."""
    names = names or {}
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        row_heights=[2] + [1] * (len(panels) - 1) if len(panels) > 1 else None)
    any_data = False
    for row, keys in enumerate(panels, start=1):
        drawn = []
        for key in keys:
            xs, ys = series(rows, key)
            if xs:
                drawn.append(key)
                fig.add_trace(go.Scatter(x=xs, y=ys, mode=_mode(key, len(xs)), name=names.get(key, key)),
                              row=row, col=1)
        any_data = any_data or bool(drawn)
        if len(panels) > 1:
            first = (drawn or keys)[0]
            fig.update_yaxes(title_text=names.get(first, first), row=row, col=1)
    if not any_data:
        return None
    fig.update_xaxes(title_text="step", row=len(panels), col=1)
    if log_y:
        fig.update_yaxes(type="log")
    _layout(fig, height + 90 * (len(panels) - 1), title)
    fig.update_layout(legend=LEGEND_BELOW, margin=dict(b=70))
    return fig


def runs_figure(runs: dict[str, list[dict]], metric: str, *, log_y: bool = False) -> go.Figure:
    """One metric of several runs overlaid (Compare): {label: metrics rows}."""
    fig = go.Figure()
    for label, rows in runs.items():
        xs, ys = series(rows, metric)
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, name=label, mode=_mode(metric, len(xs))))
    fig.update_xaxes(title="step")
    fig.update_yaxes(title=metric, type="log" if log_y else "linear")
    _layout(fig, 420, f"{metric} over training")
    fig.update_layout(legend=LEGEND_BELOW)
    return fig


def race_figure(runs: list[tuple[str, list[dict]]], key: str, title: str, val_key: str | None = None) -> go.Figure:
    """The collapse race: one colour per run (its line and, if val_key, its validation diamonds)."""
    fig = go.Figure()
    for i, (label, rows) in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        xs, ys = series(rows, key)
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, name=label, line=dict(color=color), mode=_mode(key, len(xs))))
        vx, vy = series(rows, val_key) if val_key else ([], [])
        if vx:
            fig.add_trace(go.Scatter(x=vx, y=vy, name=f"{label} (val)", mode="markers", showlegend=False,
                                     marker=dict(color=color, size=9, symbol="diamond")))
    fig.update_xaxes(title="step")
    _layout(fig, 380, title)
    fig.update_layout(legend=LEGEND_BELOW)
    return fig


# ------------------------------------------------------------------------------ sweeps
def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def parallel_figure(trials: list[dict], metric: str) -> go.Figure | None:
    """Sweep trials from their params to a final metric (parallel coordinates), coloured by it.

    trials: sweep.json entries ({"name", "params", "metrics"}). One axis per param that varies
    among them: numeric if all its values are numbers, else one tick per value (model kind,
    dataset). Trials without the metric yet are left out; None if none has it."""
    done = [t for t in trials if _number((t.get("metrics") or {}).get(metric))]
    if not done:
        return None
    names = list(dict.fromkeys(k for t in done for k in (t.get("params") or {})))
    varying = [n for n in names if len({str((t.get("params") or {}).get(n)) for t in done}) > 1]
    names = varying or names          # a value every trial shares says nothing here
    dims = []
    for name in names:
        vals = [(t.get("params") or {}).get(name) for t in done]
        if all(_number(v) for v in vals):
            dims.append(dict(label=name, values=vals))
        else:
            cats = sorted({str(v) for v in vals})
            dims.append(dict(label=name, values=[cats.index(str(v)) for v in vals],
                             tickvals=list(range(len(cats))), ticktext=cats,
                             range=[-0.5, len(cats) - 0.5] if len(cats) == 1 else None))
    ys = [t["metrics"][metric] for t in done]
    dims.append(dict(label=metric, values=ys))
    fig = go.Figure(go.Parcoords(
        line=dict(color=ys, colorscale=SCALE, showscale=True, colorbar=dict(title=dict(text=metric))),
        dimensions=[{k: v for k, v in d.items() if v is not None} for d in dims]))
    _layout(fig, 360, f"Params → final {metric} ({len(done)} trial{'s' if len(done) > 1 else ''})")
    fig.update_layout(margin=dict(l=60, r=40, t=90, b=30))
    return fig


def trial_curves_figure(runs: dict[str, list[dict]], metric: str, stopped: set[str] = frozenset(),
                        *, log_y: bool = False) -> go.Figure:
    """One metric of every trial of a sweep; a trial the scheduler stopped is dashed, ends in an
    x and says "(stopped)" in its legend entry."""
    fig = go.Figure()
    for i, (name, rows) in enumerate(runs.items()):
        xs, ys = series(rows, metric)
        if not xs:
            continue
        color = PALETTE[i % len(PALETTE)]
        if name in stopped:
            fig.add_trace(go.Scatter(x=xs, y=ys, name=f"{name} (stopped)", mode="lines+markers",
                                     line=dict(color=color, dash="dash"),
                                     marker=dict(color=color, size=[6] * (len(xs) - 1) + [13],
                                                 symbol=["circle"] * (len(xs) - 1) + ["x"])))
        else:
            fig.add_trace(go.Scatter(x=xs, y=ys, name=name, mode=_mode(metric, len(xs)), line=dict(color=color)))
    fig.update_xaxes(title="step")
    fig.update_yaxes(title=metric, type="log" if log_y else "linear")
    _layout(fig, 400, f"{metric} of every trial")
    fig.update_layout(legend=LEGEND_BELOW)
    return fig


# ------------------------------------------------------------------------ the codebook
def map_figure(points: list[dict], title: str) -> go.Figure:
    """Codebook map: live codes coloured by log10(1+usage), dead codes as ✕ (clickable points)."""
    live = [p for p in points if not p.get("dead")]
    dead = [p for p in points if p.get("dead")]
    has_usage = any(p.get("usage") is not None for p in points)
    fig = go.Figure()
    if live:
        usage = np.array([p.get("usage") or 0 for p in live], dtype=float)
        fig.add_trace(go.Scatter(
            x=[p["x"] for p in live], y=[p["y"] for p in live], mode="markers", name="codes",
            customdata=[[p["code"], p.get("usage")] for p in live],
            marker=dict(size=9, color=np.log10(usage + 1).tolist() if has_usage else USED, colorscale=SCALE,
                        showscale=has_usage, line=dict(width=0.5, color="#333"),
                        colorbar=dict(title="log10(1+usage)", thickness=12) if has_usage else None),
            hovertemplate="code %{customdata[0]}<br>usage %{customdata[1]}<extra></extra>"))
    if dead:
        fig.add_trace(go.Scatter(
            x=[p["x"] for p in dead], y=[p["y"] for p in dead], mode="markers", name=f"dead codes ({len(dead)})",
            customdata=[[p["code"], 0] for p in dead], marker=dict(size=11, symbol="x", color=DEAD),
            hovertemplate="code %{customdata[0]}<br>dead (usage 0)<extra></extra>"))
    fig.update_xaxes(showticklabels=False, title=None)
    fig.update_yaxes(showticklabels=False, title=None)
    fig.update_layout(legend=dict(orientation="h", y=-0.05), clickmode="event+select", dragmode="pan")
    return _layout(fig, 430, title)


def usage_figure(usage: list[int]) -> go.Figure:
    """Codes sorted by usage (log bars); dead codes drawn at 0.5 in the dead colour."""
    u = np.asarray(usage)
    order = np.argsort(-u, kind="stable")
    counts = u[order]
    dead = counts == 0
    fig = go.Figure()
    fig.add_trace(go.Bar(x=[str(c) for c in order[~dead]], y=counts[~dead].tolist(), name="used codes",
                         marker_color=USED, hovertemplate="code %{x}<br>usage %{y}<extra></extra>"))
    if dead.any():
        fig.add_trace(go.Bar(x=[str(c) for c in order[dead]], y=[0.5] * int(dead.sum()),
                             name=f"dead codes ({int(dead.sum())}, drawn at 0.5)", marker_color=DEAD,
                             hovertemplate="code %{x}<br>dead (usage 0)<extra></extra>"))
    fig.update_yaxes(type="log", title="positions using the code")
    fig.update_xaxes(type="category", title="code (sorted by usage)", showticklabels=len(u) <= 64)
    fig.update_layout(bargap=0.05, legend=dict(orientation="h", y=-0.22, x=0))
    return _layout(fig, 430, "Codebook usage")


def grid_figure(grid: np.ndarray, row: int, col: int, changed: set) -> go.Figure:
    """The code grid of one image: code numbers on a heatmap, the selected cell boxed, edited cells
    dotted; trace 1 holds invisible click targets (heatmaps send no clicks)."""
    grid = np.asarray(grid)
    n = grid.shape[0]
    fig = go.Figure()
    fig.add_trace(go.Heatmap(z=grid.tolist(), colorscale=SCALE, showscale=False, hoverinfo="skip",
                             text=grid.astype(str), texttemplate="%{text}", textfont=dict(size=13)))
    rr, cc = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    fig.add_trace(go.Scatter(
        x=cc.ravel().tolist(), y=rr.ravel().tolist(), mode="markers",
        customdata=np.stack([rr.ravel(), cc.ravel(), grid.ravel()], 1).tolist(),
        marker=dict(size=34, color="rgba(255,255,255,0.01)", symbol="square"),
        selected=dict(marker=dict(color="rgba(255,255,255,0.01)")), unselected=dict(marker=dict(opacity=1)),
        hovertemplate="row %{customdata[0]}, col %{customdata[1]}<br>code %{customdata[2]}<extra></extra>",
        showlegend=False))
    fig.add_shape(type="rect", x0=col - 0.5, x1=col + 0.5, y0=row - 0.5, y1=row + 0.5,
                  line=dict(color=HIGHLIGHT, width=4))
    for (r, c) in sorted(changed):
        fig.add_shape(type="rect", x0=c - 0.45, x1=c + 0.45, y0=r - 0.45, y1=r + 0.45,
                      line=dict(color=CHANGED, width=2, dash="dot"))
    fig.update_yaxes(range=[n - 0.5, -0.5], showticklabels=True, dtick=1, title="row", scaleanchor="x",
                     showgrid=False, zeroline=False, constrain="domain")
    fig.update_xaxes(range=[-0.5, n - 0.5], showticklabels=True, dtick=1, title="col", side="top",
                     showgrid=False, zeroline=False, constrain="domain")
    fig.update_layout(clickmode="event+select", dragmode=False)
    return _layout(fig, 420)


# ------------------------------------------------------------------- over training
def usage_raster(snaps: list[dict]) -> go.Figure | None:
    """Per-code usage of each snapshot window: codes x snapshots, log colour (dark = dead)."""
    if not snaps:
        return None
    z = np.stack([np.asarray(s["usage"]) for s in snaps], 1).astype(float)          # (K, snapshots)
    steps = [s["step"] for s in snaps]
    fig = go.Figure(go.Heatmap(z=np.log10(1 + z), x=steps, y=list(range(z.shape[0])), colorscale=SCALE,
                               customdata=z, colorbar=dict(title="log10(1+uses)", thickness=12),
                               hovertemplate="step %{x}<br>code %{y}<br>uses %{customdata}<extra></extra>"))
    fig.update_xaxes(title="step (snapshot)", type="category" if len(steps) < 3 else "linear")
    fig.update_yaxes(title="code")
    return _layout(fig, 320, "Code usage per snapshot (dark = dead)")


def map_animation(frames_pts: list[list[dict]], steps: list[int]) -> go.Figure | None:
    """The codebook map of every snapshot on shared axes, played as an animation (✕ = dead)."""
    if not frames_pts:
        return None
    top = max(1.0, max(float(np.log10(1 + max((p.get("usage") or 0) for p in f))) for f in frames_pts if f))

    def trace(pts):
        u = np.array([p.get("usage") or 0 for p in pts], float)
        return go.Scatter(x=[p["x"] for p in pts], y=[p["y"] for p in pts], mode="markers",
                          customdata=[[p["code"], p.get("usage")] for p in pts],
                          marker=dict(size=8, color=np.log10(1 + u), colorscale=SCALE, cmin=0, cmax=top,
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
    return _layout(fig, 380, "Codebook map over training (PCA)")
