"""RunLogger: the run directory it writes is the one the app and the CLI read; its metrics are
right by hand; its status is honest; its writes are atomic; it reads device values only at log points."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqvae_core import RunLogger
from sqvae_core import edits
from sqvae_core import rundir as rd
from sqvae_core.codespace import CodeSpace

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "sqvae_core", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def logged_run(path: Path, steps: int = 8, k: int = 4, **kw) -> Path:
    """A finished logged run: each step uses codes step % k (8 positions), codebook (k, 3)."""
    with RunLogger(path, codebook_size=k, config={"dataset": "fashion-mnist", "lr": 1e-3}, **kw) as log:
        for step in range(1, steps + 1):
            log.log(step, indices=torch.full((2, 2, 2), step % k), codebook=torch.randn(k, 3) * step,
                    loss=torch.tensor(1.0 / step))
    return path


# ------------------------------------------------------------------------- metrics by hand
def test_window_perplexity_dead_codes_and_means_recomputed_by_hand(tmp_path):
    k = 4
    with RunLogger(tmp_path / "r", codebook_size=k, log_every=2, snapshot_every=4) as log:
        cb = torch.randn(k, 3)
        log.log(1, indices=torch.tensor([0, 0, 1, 1]), codebook=cb, loss=torch.tensor(1.0), lr=0.5)
        log.log(2, indices=torch.tensor([[2, 2], [2, 2]]), loss=torch.tensor(3.0))          # no lr this call
        log.log(3, indices=torch.tensor([3, 3, 3, 3]), loss=2.0, lr=0.25)                  # float and tensor mixed
        log.log(4, indices=torch.tensor([3, 3, 3, 3]), loss=torch.tensor(4.0), lr=0.25)
        log.log(5, indices=torch.tensor([1]), loss=10.0)                                   # partial last window
    rows = rd.read_metrics(tmp_path / "r")
    assert [r["step"] for r in rows] == [2, 4, 5]
    # window 1: counts [2, 2, 4, 0] -> p = [1/4, 1/4, 1/2]; H = 1.5 ln 2; perplexity 2^1.5; code 3 dead
    assert rows[0]["perplexity"] == pytest.approx(2 ** 1.5)
    assert rows[0]["dead_codes"] == 1
    assert rows[0]["loss"] == pytest.approx(2.0) and rows[0]["lr"] == pytest.approx(0.5)   # lr: mean of the 1 call
    # window 2: only code 3 -> perplexity 1, three dead codes
    assert rows[1]["perplexity"] == pytest.approx(1.0) and rows[1]["dead_codes"] == 3
    assert rows[1]["loss"] == pytest.approx(3.0) and rows[1]["lr"] == pytest.approx(0.25)
    assert rows[2]["perplexity"] == pytest.approx(1.0) and rows[2]["dead_codes"] == 3 and rows[2]["loss"] == 10.0
    assert "lr" not in rows[2]                                                  # not logged in that window
    snaps = rd.RunDir(tmp_path / "r").snapshots()
    assert [s["step"] for s in snaps] == [4, 5]
    assert snaps[0]["usage"].tolist() == [2, 2, 4, 8] and snaps[1]["usage"].tolist() == [0, 1, 0, 0]
    assert torch.allclose(snaps[0]["codebook"], cb.half().float())


def test_non_finite_scalar_mean_is_written_as_null_and_the_file_stays_json(tmp_path):
    with RunLogger(tmp_path / "r", codebook_size=2, log_every=2) as log:
        log.log(1, loss=torch.tensor(float("nan")), ok=1.0)
        log.log(2, loss=torch.tensor(1.0), ok=3.0)
    line = (tmp_path / "r" / rd.METRICS).read_text().splitlines()[0]
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert row["loss"] is None and row["ok"] == 2.0


# ------------------------------------------------------------------- what the app/CLI read
def test_format_read_by_the_readers_the_app_uses(tmp_path):
    from sqvae_core.explore import aligned_maps
    run = logged_run(tmp_path / "runs" / "mine", steps=20, log_every=5, snapshot_every=10)
    assert rd.list_runs(tmp_path / "runs") == [run]
    cfg = rd.read_json(run / rd.CONFIG, "config.json")
    assert cfg["source"] == rd.LOGGED_SOURCE and "model" not in cfg
    assert cfg["logged"] == {"codebook_size": 4, "code_dim": 3, "log_every": 5, "snapshot_every": 10}
    assert cfg["dataset"] == "fashion-mnist" and cfg["config"]["lr"] == 1e-3
    st = rd.RunDir(run).status
    assert st.state == "finished" and st.step == 20 and st.error is None
    rows = rd.read_metrics(run)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all({"wall_time", "loss", "perplexity", "dead_codes"} <= set(r) for r in rows)
    snaps = rd.RunDir(run).snapshots()
    assert [s["step"] for s in snaps] == [10, 20] and all(s["codebook"].shape == (4, 3) for s in snaps)
    assert sum(int(s["usage"].sum()) for s in snaps) == 20 * 8                   # every position counted once
    frames = aligned_maps([s["codebook"].numpy() for s in snaps], [s["usage"].numpy() for s in snaps], method="pca")
    assert len(frames) == 2 and len(frames[0]) == 4                           # the Train live codebook animation


@pytest.mark.slow
def test_sqvae_list_shows_the_run_and_eval_explore_train_refuse_it_in_one_line(tmp_path):
    run = logged_run(tmp_path / "runs" / "mine")
    out = cli("list", tmp_path / "runs")
    assert out.returncode == 0, out.stderr
    line, = out.stdout.splitlines()
    assert line.split()[:3] == [str(run), "logged", "fashion-mnist"] and "K=4" in line and "finished" in line
    for cmd in (["eval", run], ["eval", run, "--json"], ["explore", run, "--umap"], ["train", "--out", run, "--resume"]):
        res = cli(*cmd)
        assert res.returncode != 0 and res.stdout == ""
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
        assert "logged run (RunLogger)" in res.stderr
        assert ("no model" if cmd[0] != "train" else "neither resume nor replace") in res.stderr
    res = cli("train", "--out", run, "--steps", "1", "--quiet")              # would have overwritten config.json
    assert res.returncode != 0 and "logged run (RunLogger)" in res.stderr
    assert rd.read_json(run / rd.CONFIG, "config.json")["source"] == rd.LOGGED_SOURCE


def test_status_running_while_open_with_rows_already_on_disk(tmp_path):
    """The app tails the run while the loop still runs: rows flushed, status 'running' with a live pid."""
    log = RunLogger(tmp_path / "r", codebook_size=3, log_every=2)
    for step in range(1, 5):
        log.log(step, indices=torch.tensor([step % 3]), loss=float(step))
    st = rd.RunDir(tmp_path / "r").status
    assert st.state == "running" and st.pid == os.getpid()              # not "interrupted"
    assert [r["step"] for r in rd.read_metrics(tmp_path / "r")] == [2, 4]
    log.close()
    assert rd.RunDir(tmp_path / "r").status.state == "finished"
    with pytest.raises(RuntimeError, match="closed"):
        log.log(5, loss=1.0)


# ------------------------------------------------------------------------------ status
def test_failed_status_names_the_error_and_the_exception_propagates(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with RunLogger(tmp_path / "r", codebook_size=2, log_every=10) as log:
            for step in range(1, 4):
                log.log(step, indices=torch.tensor([0, 1]), loss=float(step))
            1 / 0
    st = rd.RunDir(tmp_path / "r").status
    assert st.state == "failed" and st.step == 3
    assert st.error == "ZeroDivisionError: division by zero"
    row, = rd.read_metrics(tmp_path / "r")                                   # the partial window is kept
    assert row["step"] == 3 and row["loss"] == 2.0 and row["dead_codes"] == 0


def test_keyboard_interrupt_is_stopped_not_failed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with RunLogger(tmp_path / "r", codebook_size=2) as log:
            log.log(7, loss=1.0)
            raise KeyboardInterrupt
    st = rd.RunDir(tmp_path / "r").status
    assert st.state == "stopped" and "step 7" in st.error


# ----------------------------------------------------------------------- atomic writes
def test_a_failed_write_leaves_the_previous_files_whole(tmp_path, monkeypatch):
    """Snapshots and status go through temp file + rename: if the rename fails (as a kill
    would leave it), the readers still see the previous complete files and nothing torn."""
    run = tmp_path / "r"
    log = RunLogger(run, codebook_size=4, log_every=2, snapshot_every=2)
    log.log(1, indices=torch.tensor([0]), codebook=torch.ones(4, 3), loss=1.0)
    log.log(2, indices=torch.tensor([1]), loss=1.0)                          # snapshot 2 + status
    before = {p.name: p.read_bytes() for p in [run / rd.STATUS, run / rd.CONFIG, *(run / rd.SNAPSHOTS).iterdir()]}

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", no_rename)
    log.log(3, indices=torch.tensor([2]), loss=1.0)
    with pytest.raises(OSError, match="No space"):
        log.log(4, indices=torch.tensor([3]), loss=1.0)                      # snapshot 4 cannot be renamed
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in [run / rd.STATUS, run / rd.CONFIG, *(run / rd.SNAPSHOTS).iterdir()]}
    assert after == before                                                   # no new, partial or temp file
    assert [s["step"] for s in rd.RunDir(run).snapshots()] == [2]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------ no host sync
def test_steps_between_log_points_never_read_a_tensor(tmp_path):
    """Meta tensors have no data: any .item(), float(), .cpu(), .tolist() or torch.bincount
    (which reads max() back from a GPU) raises on them. Steps that are not log points must
    run on them; the log point must be where the values are read."""
    meta = torch.device("meta")
    idx, cb = torch.zeros(4, 7, 7, dtype=torch.long, device=meta), torch.zeros(16, 8, device=meta)
    loss = torch.zeros((), device=meta)
    with pytest.raises(RuntimeError):
        float(loss)                                                          # the probe can fail
    with pytest.raises(NotImplementedError):
        torch.bincount(idx.reshape(-1), minlength=16)
    log = RunLogger(tmp_path / "r", codebook_size=16, log_every=5, snapshot_every=5)
    for step in range(1, 5):
        log.log(step, indices=idx, codebook=cb, loss=loss, commit=loss * 2)   # no read: no error
    with pytest.raises((RuntimeError, NotImplementedError)):
        log.log(5, indices=idx, codebook=cb, loss=loss)                      # log point: reads
    with pytest.raises((RuntimeError, NotImplementedError)):
        log.close()                               # the last window cannot be read: raised, not hidden
    assert rd.RunDir(tmp_path / "r").status.state == "failed"


# --------------------------------------------------------------------------- bad input
def test_bad_arguments_fail_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="multiple of log_every"):
        RunLogger(tmp_path / "a", codebook_size=8, log_every=10, snapshot_every=25)
    with pytest.raises(ValueError, match="codebook_size must be a positive integer"):
        RunLogger(tmp_path / "b", codebook_size=0)
    with RunLogger(tmp_path / "c", codebook_size=8) as log:
        with pytest.raises(ValueError, match=r"indices must be codes in \[0, 8\)"):
            log.log(1, indices=torch.tensor([3, 8]))
        with pytest.raises(TypeError, match="integer tensor"):
            log.log(1, indices=torch.tensor([0.5]))
        with pytest.raises(ValueError, match=r"codebook must be a \(8, d\) tensor, got \(7, 4\)"):
            log.log(1, codebook=torch.zeros(7, 4))
        with pytest.raises(ValueError, match="'perplexity' is written by RunLogger"):
            log.log(1, perplexity=3.0)
        with pytest.raises(ValueError, match="one element"):
            log.log(1, loss=torch.zeros(3))
        with pytest.raises(TypeError, match="step must be a Python int"):
            log.log(torch.tensor(1), loss=1.0)


def test_never_overwrites_a_trained_run_and_replaces_a_logged_one_only_when_asked(tmp_path):
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / rd.CONFIG).write_text(json.dumps({"model": {"kind": "vq"}}))
    with pytest.raises(ValueError, match="RunLogger did not write"):
        RunLogger(trained, codebook_size=4, overwrite=True)
    assert json.loads((trained / rd.CONFIG).read_text()) == {"model": {"kind": "vq"}}
    run = logged_run(tmp_path / "logged", steps=20, log_every=5, snapshot_every=10)
    with pytest.raises(ValueError, match="pass overwrite=True"):
        RunLogger(run, codebook_size=4)
    logged_run(run, steps=5, log_every=5, snapshot_every=5, overwrite=True)
    assert [r["step"] for r in rd.read_metrics(run)] == [5]
    assert [s["step"] for s in rd.RunDir(run).snapshots()] == [5]


# ------------------------------------------------------------------------------ example
@pytest.mark.slow
def test_example_vector_quantize_loop_writes_a_listed_logged_run(tmp_path):
    out = tmp_path / "runs" / "own_vq"
    res = subprocess.run([sys.executable, "examples/own_loop_vector_quantize.py", "--out", str(out), "--steps", "20",
                          "--log-every", "5", "--snapshot-every", "10", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = rd.read_metrics(out)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(1.0 <= r["perplexity"] <= 64 and 0 <= r["dead_codes"] < 64 and math.isfinite(r["mse"]) for r in rows)
    assert [s["step"] for s in rd.RunDir(out).snapshots()] == [10, 20]
    assert rd.RunDir(out).status.state == "finished"
    listed = cli("list", tmp_path / "runs")
    assert "logged" in listed.stdout and "K=64" in listed.stdout and "d=32" in listed.stdout
    from sqvae_core.runlogger import load_decoder
    dec = load_decoder(out)                                                 # the example saves its decoder
    assert dec.indices.shape == (64, 7, 7) and dec.decode(dec.indices).shape == dec.images.shape == (64, 1, 28, 28)


# ----------------------------------------------------------------------------- decoder
class Decoder(torch.nn.Module):
    """Code grids (B, 3, 3) -> (B, 1, 6, 6) images: codebook lookup, batch-norm, transposed conv."""

    def __init__(self, k=5, d=4):
        super().__init__()
        self.codebook = torch.nn.Parameter(torch.randn(k, d))
        self.net = torch.nn.Sequential(torch.nn.BatchNorm2d(d), torch.nn.ConvTranspose2d(d, 1, 4, 2, 1),
                                       torch.nn.Sigmoid())

    def forward(self, indices):
        return self.net(torch.nn.functional.embedding(indices, self.codebook).permute(0, 3, 1, 2))


@pytest.mark.slow
def test_saved_decoder_decodes_edited_codes_like_the_module(tmp_path):
    from sqvae_core.runlogger import load_decoder
    torch.manual_seed(0)
    dec = Decoder()
    dec.net[0].running_mean.add_(0.5)                                       # eval-mode statistics matter
    codes = torch.randint(5, (4, 3, 3))
    with RunLogger(tmp_path / "r", codebook_size=5) as log:
        log.log(1, indices=codes, codebook=dec.codebook, loss=1.0)
        log.save_decoder(dec, codes, images=torch.rand(4, 1, 6, 6))
    assert dec.training                                                     # the caller's module is untouched
    info = rd.read_json(tmp_path / "r" / rd.CONFIG, "config.json")["decoder"]
    assert info["code_shape"] == [3, 3] and info["image_shape"] == [1, 6, 6] and info["export_max_abs_diff"] <= 1e-4
    loaded = load_decoder(tmp_path / "r")
    assert torch.equal(loaded.indices, codes) and loaded.images.shape == (4, 1, 6, 6)
    assert torch.allclose(loaded.codebook, dec.codebook.detach())
    edited = codes[:1].clone()
    edited[0, 1, 1] = (edited[0, 1, 1] + 1) % 5                              # one code changed, batch of 1
    with torch.no_grad():
        expected = dec.eval()(edited)
    assert torch.allclose(loaded.decode(edited), expected, atol=1e-6)
    assert not torch.allclose(loaded.decode(codes[:1]), expected, atol=1e-4)  # the edit shows
    assert "logged run" in cli("eval", tmp_path / "r").stderr                 # still no model to evaluate


def test_decoder_that_cannot_be_exported_fails_clearly_and_writes_nothing(tmp_path):
    from sqvae_core.runlogger import load_decoder

    class Branchy(Decoder):
        def forward(self, indices):
            out = super().forward(indices)
            return out if out.sum() > 0 else -out                           # a branch on a tensor value
    with RunLogger(tmp_path / "r", codebook_size=5) as log:
        with pytest.raises(ValueError, match="could not export the decoder with torch.export"):
            log.save_decoder(Branchy(), torch.randint(5, (2, 3, 3)))
        with pytest.raises(ValueError, match=r"codes in \[0, 5\)"):
            log.save_decoder(Decoder(), torch.full((2, 3, 3), 5))
    assert not (tmp_path / "r" / "decoder.pt2").exists() and not (tmp_path / "r" / "codes.safetensors").exists()
    with pytest.raises(rd.BundleError, match="no decoder saved"):
        load_decoder(tmp_path / "r")


# ------------------------------------------------------------------------------- the app
def _figures(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def _points(figs: list[dict], title: str) -> int:
    """Points of the first trace of the figure whose title starts with `title`."""
    for f in figs:
        t = f.get("layout", {}).get("title", {})
        if (t.get("text") if isinstance(t, dict) else str(t) or "").startswith(title):
            return len(f["data"][0]["x"])
    raise AssertionError(f"no chart titled {title!r} among {[f.get('layout', {}).get('title') for f in figs]}")


def test_train_live_shows_a_running_logged_run_growing_and_explore_says_it_has_no_model(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("SQVAE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SQVAE_CHECKPOINTS", str(tmp_path / "no_checkpoints"))
    monkeypatch.setenv("SQVAE_APP_UMAP", "0")
    monkeypatch.setenv("SQVAE_OFFLINE", "1")
    pages = ROOT / "app" / "pages_"
    log = RunLogger(tmp_path / "runs" / "mine", codebook_size=8, log_every=5, snapshot_every=10)

    def steps(first, last):
        for s in range(first, last + 1):
            log.log(s, indices=torch.randint(8, (4, 7, 7)), codebook=torch.randn(8, 3), loss=torch.tensor(1.0 / s))
    try:
        steps(1, 20)                                     # the loop is still running (this process)
        at = AppTest.from_file(str(pages / "train.py"), default_timeout=120).run()
        assert not at.exception, [e.value for e in at.exception]
        assert any("`mine` — running" in m.value for m in at.markdown)
        before = _points(_figures(at), "Loss")
        assert before == 4
        steps(21, 40)
        at.run()
        assert _points(_figures(at), "Loss") == 8                                   # the curve grew
        assert _points(_figures(at), "Perplexity") >= 8
        assert any("Code usage" in str(f.get("layout", {}).get("title")) for f in _figures(at))   # usage raster
    finally:
        log.close()
    ex = AppTest.from_file(str(pages / "explore.py"), default_timeout=120)
    ex.query_params["run"] = "runs/mine"
    ex.run()
    ex.run()
    assert not ex.exception and not ex.error, [e.value for e in [*ex.exception, *ex.error]]
    assert any("logged run: metrics and codebook snapshots only" in i.value for i in ex.info)
    assert not ex.tabs                                                     # no decoder: nothing to edit


def test_saved_decoder_ranks_codes_by_codebook_distance_for_neighbour_k(tmp_path):
    """Neighbor-k on a logged decoder: k = 1 is the identity (even beside a duplicate code), k = 2 the
    nearest other code, here on a codebook whose distances are known by hand."""
    from sqvae_core.runlogger import load_decoder
    dec = Decoder(k=5, d=2)
    with torch.no_grad():
        dec.codebook.copy_(torch.tensor([[0.0, 0], [1, 0], [3, 0], [3, 0], [10, 0]]))   # codes 2 and 3 coincide
    codes = torch.randint(5, (2, 3, 3))
    with RunLogger(tmp_path / "r", codebook_size=5) as log:
        log.log(1, indices=codes, codebook=dec.codebook, loss=1.0)
        log.save_decoder(dec, codes)
    loaded = load_decoder(tmp_path / "r")
    assert isinstance(loaded, CodeSpace) and loaded.codebook_size == 5 and loaded.grid_shape == (3, 3)
    assert edits.kth_neighbours(loaded, 1).tolist() == [0, 1, 2, 3, 4]
    assert edits.kth_neighbours(loaded, 2).tolist() == [1, 0, 3, 2, 2]
    assert edits.kth_neighbours(loaded, 5).tolist() == [4, 4, 4, 4, 0]
    assert edits.candidate_codes(loaded, 4, 2).tolist() == [4, 2] and float(edits.code_distances(loaded, 0)[4]) == 10.0
    with pytest.raises(ValueError, match=r"k in \[1, K=5\]"):
        edits.kth_neighbours(loaded, 6)
    grid = codes[0].clone()
    grid[1, 1] = 4
    assert torch.allclose(edits.edit_code(loaded, codes[0], 1, 1, 4), dec.eval()(grid[None])[0].detach(), atol=1e-5)


def _app_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SQVAE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SQVAE_CHECKPOINTS", str(tmp_path / "no_checkpoints"))
    monkeypatch.setenv("SQVAE_APP_UMAP", "0")
    monkeypatch.setenv("SQVAE_OFFLINE", "1")
    return ROOT / "app" / "pages_"


def test_train_live_treats_a_finished_logged_run_as_logged_and_compare_reads_its_sizes(tmp_path, monkeypatch):
    """Kind "logged": no Stop/Resume (the job manager refuses both), the finished message names what
    there is, the window's dead codes beside perplexity, the other scalars on a panel; Compare's
    K and d come from the "logged" section."""
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest
    from app.jobs import JobManager
    pages = _app_env(tmp_path, monkeypatch)
    with RunLogger(tmp_path / "runs" / "mine", codebook_size=8, log_every=5, snapshot_every=10) as log:
        for s in range(1, 21):
            log.log(s, indices=torch.full((4,), s % 3), codebook=torch.randn(8, 3), loss=1.0 / s, commit=0.1, lr=3e-4)
    at = AppTest.from_file(str(pages / "train.py"), default_timeout=120).run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert any("`mine` — finished · logged run (RunLogger)" in m.value for m in at.markdown)
    assert [s.value for s in at.success] == ["Finished 20 steps (logged run: curves and snapshots only, "
                                             "no model to explore)."]
    assert not [b for b in at.button if b.label in ("Stop", "Resume")]
    figs = {f["layout"]["title"]["text"]: f for f in _figures(at) if isinstance(f["layout"].get("title"), dict)}
    dead = [t for t in figs["Perplexity and dead codes"]["data"] if t["name"] == "dead codes (window)"]
    assert dead and list(dead[0]["y"]) == [5, 5, 5, 5] and dead[0]["yaxis"] == "y2"     # 3 of 8 codes used
    assert sorted(t["name"] for t in figs["Other logged scalars"]["data"]) == ["commit", "lr"]

    jm = JobManager(tmp_path / "runs", max_jobs=1)
    with pytest.raises(ValueError, match="'mine' is a logged run .*no checkpoint to resume"):
        jm.resume("mine")
    assert jm.stop("mine") == "not running"

    cmp_ = AppTest.from_file(str(pages / "compare.py"), default_timeout=120)
    cmp_.session_state["cmp_runs"] = ["runs/mine"]
    cmp_.run()
    assert not cmp_.exception, [e.value for e in cmp_.exception]
    row = cmp_.dataframe[0].value.iloc[0]
    assert (row["kind"], row["K"], row["d"], row["state"], row["step"]) == ("logged", 8, 3, "finished", 20)


def test_explore_edits_and_neighbour_k_on_a_logged_decoder_but_never_loads_one_from_an_upload(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    import shutil
    from streamlit.testing.v1 import AppTest
    pages = _app_env(tmp_path, monkeypatch)
    torch.manual_seed(0)
    dec = Decoder()
    codes = torch.randint(5, (4, 3, 3))
    with RunLogger(tmp_path / "runs" / "dec", codebook_size=5) as log:
        log.log(1, indices=codes, codebook=dec.codebook, loss=1.0)
        log.save_decoder(dec, codes, images=torch.rand(4, 1, 6, 6))
    shutil.copytree(tmp_path / "runs" / "dec", tmp_path / "runs" / "uploads" / "dec")

    ex = AppTest.from_file(str(pages / "explore.py"), default_timeout=120)
    ex.query_params["run"] = "runs/dec"
    ex.run()
    assert not ex.exception and not ex.error, [e.value for e in [*ex.exception, *ex.error]]
    assert [t.label for t in ex.tabs] == ["Neighbor-k", "Edit codes"]          # the tabs that need only codes
    assert ex.slider(key="nk_k").value == 2
    ex.session_state["explore_tab"] = "Edit codes"
    ex.run()
    assert not ex.exception and not ex.error, [e.value for e in [*ex.exception, *ex.error]]
    grids = [json.loads(c.proto.spec) for c in ex.get("plotly_chart")]
    z = next(f["data"][0]["z"] for f in grids if f["data"][0]["type"] == "heatmap")
    assert z == codes[0].tolist()                                          # the saved grid to edit
    assert ex.selectbox(key="edit_img").value == 0
    cell = (int(ex.number_input(key="edit_row").value), int(ex.number_input(key="edit_col").value))
    choice = ex.selectbox(key=f"edit_code_0_{cell[0]}_{cell[1]}").value
    order = torch.cdist(dec.codebook.detach(), dec.codebook.detach())[codes[0][cell]].argsort()
    assert choice == int(order[1])                                         # the nearest other code
    ex.button(key="edit_keep").click().run()
    assert not ex.exception, [e.value for e in ex.exception]
    kept = ex.session_state["edit_grid::runs/dec::0"]
    assert kept[cell] == choice and (kept != codes[0].numpy()).sum() == 1

    up = AppTest.from_file(str(pages / "explore.py"), default_timeout=120)
    up.query_params["run"] = "runs/uploads/dec"
    up.run()
    assert not up.exception and not up.tabs                                # an upload's decoder is never loaded
    assert any("logged run" in i.value for i in up.info)
