"""How the app looks: one colour palette (and its high-contrast twin for demo mode), the CSS,
and `plot()`, which shows a figure from app/charts.py in the current mode."""
from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

# One palette for every chart; DEMO_PALETTE[i] replaces PALETTE[i] in demo mode (black background).
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
DEMO_PALETTE = ["#00e5ff", "#ffd400", "#ff4df0", "#7CFC00", "#ff8c00", "#ffffff", "#ff6b6b", "#9d8cff"]
USED, DEAD, HIGHLIGHT, CHANGED = PALETTE[0], PALETTE[1], PALETTE[1], PALETTE[3]   # roles in the charts
SCALE = "Viridis"            # continuous values (usage counts, code indices)
DEMO_SCALE = 1.35            # demo mode: figures this much taller
# Plotly's mode bar, slimmed to what a visitor uses: a long tool row ran over the chart titles.
MODEBAR_REMOVE = ["select2d", "lasso2d", "autoScale2d", "zoomIn2d", "zoomOut2d", "toggleSpikelines",
                  "hoverClosestCartesian", "hoverCompareCartesian"]

BASE_CSS = """
<style>
img { image-rendering: pixelated; }
[data-testid="stMetricValue"] { font-size: 1.6rem; }
.sq-card { display: flex; flex-wrap: wrap; gap: 0.4rem 1.6rem; margin: 0.2rem 0 0.3rem 0; }
.sq-tile { min-width: 6.5rem; }
.sq-label { font-size: 0.85rem; opacity: 0.75; }
.sq-value { font-size: 1.7rem; line-height: 1.25; font-weight: 400; }
</style>
"""
DEMO_CSS = """
<style>
html, body, .stApp, [data-testid="stAppViewContainer"], [data-testid="stSidebar"], [data-testid="stHeader"] {
  background: #000 !important; color: #fff !important; }
.stApp p, .stApp li, .stApp label, .stApp span, .stApp td, .stApp th { font-size: 1.3rem; }
.stApp h1, .stApp h1 * { font-size: 3.4rem !important; color: #ffd400 !important; }
.stApp h2, .stApp h2 * { font-size: 2.5rem !important; color: #ffd400 !important; }
.stApp h3, .stApp h3 * { font-size: 2.0rem !important; color: #ffd400 !important; }
.stApp p, .stApp label, .stApp li, [data-testid="stMarkdownContainer"] { color: #fff !important; }
[data-testid="stCaptionContainer"], [data-testid="stCaptionContainer"] * { color: #ddd !important; font-size: 1.1rem !important; }
[data-testid="stMetricValue"], .sq-value { font-size: 2.8rem !important; color: #00e5ff !important; }
.sq-label { font-size: 1.3rem !important; color: #fff !important; opacity: 1 !important; }
button[data-testid^="stBaseButton"] { background: #111 !important; color: #fff !important;
  border: 2px solid #ffd400 !important; font-weight: 700 !important; }
button[data-testid^="stBaseButton"] p { color: #fff !important; }
button[data-testid="stBaseButton-primary"], button[data-testid="stBaseButton-primaryFormSubmit"] {
  background: #ffd400 !important; }
button[data-testid="stBaseButton-primary"] *, button[data-testid="stBaseButton-primaryFormSubmit"] * {
  color: #000 !important; }
.stApp input { font-size: 1.3rem !important; }
[data-testid="stHeader"] * { color: #fff !important; }
[data-testid="stAlertContainer"] { background: #151515 !important; border: 2px solid #00e5ff !important; }
[data-testid="stAlertContainer"] * { color: #fff !important; }
.stApp code { background: #222 !important; color: #fff !important; }
[role="tab"] p { font-size: 1.35rem !important; }
[role="tab"][aria-selected="true"] p { color: #ffd400 !important; }
</style>
"""


def favicon(cell: int = 8):
    """The tab icon: a 4x4 grid of codes in the palette's colours, drawn here (a PIL image, which
    Streamlit serves from the app's own server). A `:material/...:` page icon is fetched from Google's CDN,
    which an offline machine (a talk's laptop) cannot reach."""
    from PIL import Image

    img = Image.new("RGB", (4 * cell, 4 * cell))
    for i in range(16):
        colour = PALETTE[(5 * i + 3 * (i // 4)) % len(PALETTE)]     # no two neighbours alike
        img.paste(colour, ((i % 4) * cell, (i // 4) * cell, (i % 4 + 1) * cell, (i // 4 + 1) * cell))
    return img


def demo_mode() -> bool:
    return bool(st.session_state.get("demo_mode", False))


def page_style():
    """Demo-mode state (also ?demo=1) and the app's CSS: before any page content."""
    if "demo_mode" not in st.session_state:
        st.session_state["demo_mode"] = st.query_params.get("demo", "0").lower() in ("1", "true", "yes", "on")
    st.html(BASE_CSS + (DEMO_CSS if demo_mode() else ""))      # style-only: no layout element


def for_demo(fig: go.Figure) -> go.Figure:
    """A copy of a chart for demo mode: black template, large type, thick lines, each palette colour
    swapped for its high-contrast twin."""
    fig = go.Figure(fig)
    swap = dict(zip(PALETTE, DEMO_PALETTE))

    def recolour(obj, *paths):
        for path in paths:
            node = obj
            for part in path[:-1]:
                node = getattr(node, part, None)
                if node is None:
                    break
            else:
                value = getattr(node, path[-1], None)
                if isinstance(value, str) and value in swap:
                    setattr(node, path[-1], swap[value])

    for trace in fig.data:
        recolour(trace, ("marker", "color"), ("line", "color"))
    for shape in fig.layout.shapes:
        recolour(shape, ("line", "color"))
    height = fig.layout.height or 320
    fig.update_layout(template="plotly_dark", paper_bgcolor="#000", plot_bgcolor="#000",
                      font=dict(size=22, color="#fff"), colorway=DEMO_PALETTE, height=int(height * DEMO_SCALE),
                      title_font=dict(size=28, color="#ffd400"), legend=dict(font=dict(size=20)))
    fig.update_xaxes(gridcolor="#444", linecolor="#fff", tickfont=dict(size=20))
    fig.update_yaxes(gridcolor="#444", linecolor="#fff", tickfont=dict(size=20))
    fig.update_traces(selector=dict(type="scatter", mode="lines"), line=dict(width=4))
    if fig.layout.margin.b:
        fig.update_layout(margin=dict(b=int(fig.layout.margin.b * 1.6)))
    return fig


def plot(fig: go.Figure, key: str | None = None, modebar: bool = True, **kwargs):
    """st.plotly_chart in the current mode (demo: for_demo(fig), Streamlit's theme off so it stays)."""
    demo = demo_mode()
    return st.plotly_chart(for_demo(fig) if demo else fig, key=key, theme=None if demo else "streamlit",
                           config={"displaylogo": False, "displayModeBar": modebar and not demo,
                                   "modeBarButtonsToRemove": MODEBAR_REMOVE}, **kwargs)
