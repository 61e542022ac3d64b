"""SQ-VAE Explorer: `streamlit run app/main.py`.

Pages (st.navigation): Explore (app/pages_/explore.py), Train live (app/pages_/train.py),
Compare (app/pages_/compare.py). Shared helpers live in app/common.py, training job control in
app/jobs.py. Each page script also runs on its own (tests run them with AppTest.from_file).
"""
from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import streamlit as st  # noqa: E402

from app import common  # noqa: E402

PAGES = Path(__file__).resolve().parent / "pages_"

# Navigation across the top and the sidebar (demo toggle, directories, upload) collapsed at start:
# an expanded sidebar delays the first Plotly paint by ~0.5 s on a slow machine (layout shift).
st.set_page_config(page_title="SQ-VAE Explorer", page_icon=":material/grain:", layout="wide",
                   initial_sidebar_state="collapsed")
pages = [
    st.Page(PAGES / "explore.py", title="Explore", url_path="explore", default=True),
    st.Page(PAGES / "train.py", title="Train live", url_path="train"),
    st.Page(PAGES / "compare.py", title="Compare", url_path="compare"),
]
page = st.navigation(pages, position="top")
common.page_style()
common.RUN.in_entrypoint = True
try:
    page.run()
finally:
    common.RUN.in_entrypoint = False
# The (collapsed) sidebar after the page: its widgets would otherwise delay Explore's first chart
# (benchmarks/first_paint.py). Pages that end early call common.stop_page(), which draws it.
common.sidebar_widgets()
