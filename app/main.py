"""SQ-VAE Explorer: `streamlit run app/main.py`.

Pages (st.navigation): Explore (app/pages_/explore.py, the root page `/`, also at `/explore`), Train live
(app/pages_/train.py), Compare (app/pages_/compare.py). Each page script also runs on its own
(tests run them with AppTest.from_file). Where everything else lives: README.md, "Architecture".
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import theme, ui

PAGES = Path(__file__).resolve().parent / "pages_"

# Navigation across the top and the sidebar (demo toggle, directories, upload) collapsed at start:
# an expanded sidebar delays the first Plotly paint by ~0.5 s on a slow machine (layout shift).
st.set_page_config(page_title="SQ-VAE Explorer", page_icon=theme.favicon(), layout="wide",
                   initial_sidebar_state="collapsed")
# Explore is the root page, served at "/": Streamlit gives the default page the URL path "" whatever
# url_path says, so a link to /explore?run=X found no page ("Page not found"). The same script is
# also served, unlisted, at /explore, the page's own name, so such links open Explore on run X.
EXPLORE_ALIAS = "explore"
pages = [
    st.Page(PAGES / "explore.py", title="Explore", url_path="", default=True),
    st.Page(PAGES / "train.py", title="Train live", url_path="train"),
    st.Page(PAGES / "compare.py", title="Compare", url_path="compare"),
    st.Page(PAGES / "explore.py", title="Explore", url_path=EXPLORE_ALIAS, visibility="hidden"),
]
page = st.navigation(pages, position="top")
theme.page_style()
ui.RUN.in_entrypoint = True
try:
    page.run()
finally:
    ui.RUN.in_entrypoint = False
# The (collapsed) sidebar after the page: its widgets would otherwise delay Explore's first chart
# (benchmarks/first_paint.py). Pages that end early call ui.stop_page(), which draws it.
ui.sidebar_widgets()
