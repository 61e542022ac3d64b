"""Every figure builder of app/charts.py on small inputs: traces, axes, colours (no Streamlit run)."""
from __future__ import annotations

import math

import numpy as np

from app import charts, theme
from app.theme import DEAD, DEMO_PALETTE, PALETTE

ROWS = [{"step": s, "loss": 10.0 - s / 10, "perplexity": 2.0 + s / 10} for s in range(10, 310, 10)] + [
    {"step": 100, "val_perplexity": 9.5, "val_dead_codes": 4},
    {"step": 200, "val_perplexity": 12.0, "val_dead_codes": 2},
    {"step": 250, "loss": True},                        # a bool is not a value
    {"loss": 3.0},                                      # a row without a step is skipped
]


def points(usage):
    return [{"code": i, "x": float(i), "y": float(-i), "usage": u, "dead": None if u is None else u == 0}
            for i, u in enumerate(usage)]


def test_series_keeps_numeric_values_with_a_step():
    xs, ys = charts.series(ROWS, "loss")
    assert xs == list(range(10, 310, 10)) and ys[0] == 9.0 and len(ys) == 30


def test_line_figure_lines_for_training_markers_for_validation():
    fig = charts.line_figure(ROWS, ["perplexity", "val_perplexity"], "Perplexity", names={"val_perplexity": "val"})
    assert [t.name for t in fig.data] == ["perplexity", "val"]
    assert fig.data[0].mode == "lines" and fig.data[1].mode == "lines+markers"
    assert list(fig.data[1].y) == [9.5, 12.0]
    assert fig.layout.title.text == "Perplexity" and list(fig.layout.colorway) == PALETTE
    assert fig.layout.xaxis.title.text == "step"


def test_line_figure_short_series_get_markers_log_axis_and_none_without_data():
    fig = charts.line_figure(ROWS[:5], ["loss"], "Loss", log_y=True)
    assert fig.data[0].mode == "lines+markers" and fig.layout.yaxis.type == "log"
    assert charts.line_figure(ROWS, ["kappa_q"], "κ") is None


def test_panels_figure_puts_dead_codes_on_its_own_panel_below_perplexity():
    """The perplexity / dead-codes chart: two stacked panels on one step axis, no second y axis."""
    fig = charts.panels_figure(ROWS, [["perplexity", "val_perplexity"], ["val_dead_codes"]], "Perplexity and dead codes",
                               names={"val_dead_codes": "dead codes (val)"})
    by_name = {t.name: t for t in fig.data}
    assert by_name["perplexity"].yaxis == "y" and by_name["val_perplexity"].yaxis == "y"
    assert by_name["dead codes (val)"].yaxis == "y2" and list(by_name["dead codes (val)"].y) == [4, 2]
    assert fig.layout.yaxis.title.text == "perplexity" and fig.layout.yaxis2.title.text == "dead codes (val)"
    assert fig.layout.yaxis2.overlaying is None                     # stacked, not overlaid
    assert fig.layout.xaxis.matches == "x2" or fig.layout.xaxis2.matches == "x"       # one shared step axis
    assert fig.layout.xaxis2.title.text == "step"
    assert fig.layout.height == 300 + 90


def test_panels_figure_titles_a_panel_by_its_first_key_with_data():
    """Train live's dead-codes panel lists the window's dead codes (RunLogger) before the validation
    ones (sqvae train): each run's axis names what it has."""
    names = {"dead_codes": "dead codes (window)", "val_dead_codes": "dead codes (val)"}
    panels = [["perplexity", "val_perplexity"], ["dead_codes", "val_dead_codes"]]
    trained = charts.panels_figure(ROWS, panels, "P", names=names)
    assert trained.layout.yaxis2.title.text == "dead codes (val)"
    logged = charts.panels_figure([{"step": s, "perplexity": 3.0, "dead_codes": 8 - s} for s in range(1, 4)], panels,
                                  "P", names=names)
    assert logged.layout.yaxis2.title.text == "dead codes (window)"
    assert [(t.name, t.yaxis, list(t.y)) for t in logged.data][1] == ("dead codes (window)", "y2", [7, 6, 5])


def test_runs_figure_one_trace_per_run_with_data():
    fig = charts.runs_figure({"runs/a": ROWS, "runs/b": [{"step": 1, "mse": 2.0}]}, "loss", log_y=True)
    assert [t.name for t in fig.data] == ["runs/a"]
    assert fig.layout.yaxis.type == "log" and fig.layout.title.text == "loss over training"


def test_race_figure_gives_each_run_one_palette_colour_for_line_and_validation_markers():
    other = [{"step": s, "perplexity": 1.0, "val_perplexity": 1.5} for s in (10, 20)]
    fig = charts.race_figure([("SQ", ROWS), ("VQ", other)], "perplexity", "Perplexity", val_key="val_perplexity")
    lines = [t for t in fig.data if t.showlegend is not False]
    vals = [t for t in fig.data if t.showlegend is False]
    assert [t.line.color for t in lines] == PALETTE[:2]
    assert [t.marker.color for t in vals] == PALETTE[:2] and {t.marker.symbol for t in vals} == {"diamond"}


def test_map_figure_colours_live_codes_by_log_usage_and_marks_dead_ones():
    fig = charts.map_figure(points([0, 9, 99, 0]), "Codebook map (UMAP)")
    live, dead = fig.data
    assert [c[0] for c in live.customdata] == [1, 2]
    assert np.allclose(live.marker.color, [1.0, 2.0])           # log10(1 + usage)
    assert live.marker.showscale is True
    assert [c[0] for c in dead.customdata] == [0, 3] and dead.marker.symbol == "x" and dead.marker.color == DEAD
    assert dead.name == "dead codes (2)"


def test_map_figure_without_usage_draws_every_code_in_one_colour():
    fig = charts.map_figure(points([None] * 5), "Codebook map (PCA)")
    assert len(fig.data) == 1 and len(fig.data[0].x) == 5
    assert fig.data[0].marker.color == PALETTE[0] and not fig.data[0].marker.showscale


def test_usage_figure_sorts_codes_and_draws_dead_codes_at_half():
    fig = charts.usage_figure([5, 0, 50, 1])
    used, dead = fig.data
    assert list(used.x) == ["2", "0", "3"] and list(used.y) == [50, 5, 1]
    assert list(dead.x) == ["1"] and list(dead.y) == [0.5] and dead.marker.color == DEAD
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.showticklabels is True
    assert charts.usage_figure(list(range(1, 100))).layout.xaxis.showticklabels is False


def test_grid_figure_shows_the_codes_the_selected_cell_and_the_edited_ones():
    grid = np.arange(16).reshape(4, 4)
    fig = charts.grid_figure(grid, 1, 2, {(3, 3), (0, 0)})
    heat, targets = fig.data
    assert np.array_equal(np.array(heat.z), grid)
    assert len(targets.x) == 16 and targets.customdata[6] == [1, 2, 6]     # point 6 is row 1, col 2
    sel, *edited = fig.layout.shapes
    assert (sel.x0, sel.x1, sel.y0, sel.y1) == (1.5, 2.5, 0.5, 1.5) and sel.line.color == theme.HIGHLIGHT
    assert len(edited) == 2 and {s.line.dash for s in edited} == {"dot"}
    assert tuple(fig.layout.yaxis.range) == (3.5, -0.5)                  # row 0 at the top


def test_usage_raster_is_codes_by_snapshots_in_log_counts():
    snaps = [{"step": 100, "usage": np.array([0, 9, 99])}, {"step": 200, "usage": np.array([1, 0, 999])}]
    fig = charts.usage_raster(snaps)
    z = np.array(fig.data[0].z)
    assert z.shape == (3, 2) and math.isclose(z[2, 1], 3.0) and z[0, 0] == 0.0
    assert list(fig.data[0].x) == [100, 200]
    assert charts.usage_raster([]) is None


def test_map_animation_has_one_frame_per_snapshot_on_shared_axes():
    frames = [points([1, 0, 3]), [{**p, "x": p["x"] * 10} for p in points([0, 2, 5])]]
    fig = charts.map_animation(frames, [100, 200])
    assert [f.name for f in fig.frames] == ["100", "200"]
    assert [s.label for s in fig.layout.sliders[0].steps] == ["100", "200"]
    lo, hi = fig.layout.xaxis.range
    assert lo < 0 and hi > 20                                            # every frame's points fit
    assert list(fig.data[0].marker.symbol) == ["x", "circle", "circle"]     # the last frame: code 0 dead
    assert charts.map_animation([], []) is None


def test_for_demo_swaps_palette_colours_and_enlarges_without_touching_the_original():
    fig = charts.race_figure([("SQ", ROWS)], "perplexity", "Perplexity", val_key="val_perplexity")
    demo = theme.for_demo(fig)
    assert demo.data[0].line.color == DEMO_PALETTE[0] and demo.data[1].marker.color == DEMO_PALETTE[0]
    assert demo.layout.height == int(380 * theme.DEMO_SCALE) and demo.layout.paper_bgcolor == "#000"
    assert fig.data[0].line.color == PALETTE[0] and fig.layout.height == 380


SWEEP_TRIALS = [
    {"name": "t000", "params": {"lr": 0.001, "model": "vq"}, "metrics": {"step": 40, "val_mse": 30.0}},
    {"name": "t001", "params": {"lr": 0.002, "model": "gaussian_1"}, "metrics": {"step": 40, "val_mse": 20.0}},
    {"name": "t002", "params": {"lr": 0.004, "model": "vq"}, "metrics": {"step": 20, "val_mse": 50.0}},
    {"name": "t003", "params": {"lr": 0.008, "model": "vq"}, "metrics": None},          # no validation yet
]
for _t in SWEEP_TRIALS:
    _t["params"]["num-rb"] = 1                        # shared by all: no axis


def test_parallel_figure_numeric_and_categorical_axes_to_the_metric():
    fig = charts.parallel_figure(SWEEP_TRIALS, "val_mse")
    (pc,) = fig.data
    dims = {d.label: d for d in pc.dimensions}
    assert list(dims) == ["lr", "model", "val_mse"]
    assert list(dims["lr"].values) == [0.001, 0.002, 0.004] and dims["lr"].ticktext is None
    assert list(dims["model"].ticktext) == ["gaussian_1", "vq"] and list(dims["model"].values) == [1, 0, 1]
    assert list(dims["val_mse"].values) == [30.0, 20.0, 50.0] == list(pc.line.color)
    assert "3 trials" in fig.layout.title.text
    assert charts.parallel_figure(SWEEP_TRIALS, "val_perplexity") is None


def test_trial_curves_mark_stopped_trials():
    runs = {"t000": [{"step": 20, "val_mse": 40.0}, {"step": 40, "val_mse": 30.0}],
            "t002": [{"step": 20, "val_mse": 50.0}],
            "t003": [{"step": 10, "loss": 1.0}]}                       # no val_mse: no trace
    fig = charts.trial_curves_figure(runs, "val_mse", stopped={"t002"})
    assert [t.name for t in fig.data] == ["t000", "t002 (stopped)"]
    assert fig.data[0].line.dash is None and fig.data[1].line.dash == "dash"
    assert list(fig.data[1].marker.symbol) == ["x"] and fig.data[0].line.color != fig.data[1].line.color
