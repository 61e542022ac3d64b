"""One run lister (sqvae_core.rundir.list_runs) for `sqvae list` and the app, and no torch to list."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_run(path: Path, kind: str = "vq") -> Path:
    """A run directory as far as listing goes: config.json (and a status)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model": {"kind": kind}, "dataset": "fashion-mnist"}))
    (path / "status.json").write_text(json.dumps({"state": "finished", "step": 7}))
    return path


def tree(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    fake_run(runs / "a")
    fake_run(runs / "ship" / "gaussian_1", "gaussian_1")
    fake_run(runs / "ship" / "vq")
    fake_run(runs / ".hidden")                       # hidden: skipped
    fake_run(runs / "bad name")                      # not [A-Za-z0-9_.-]: skipped
    fake_run(runs / "g" / "h" / "too_deep")          # two group levels: not a run of this root
    (runs / "empty").mkdir()
    outside = fake_run(tmp_path / "elsewhere")
    (runs / "link").symlink_to(outside)              # leads out of the root: skipped
    return runs


def test_list_runs_finds_children_and_group_members_only(tmp_path):
    from sqvae_core.rundir import list_runs
    runs = tree(tmp_path)
    assert [p.relative_to(runs).as_posix() for p in list_runs(runs)] == ["a", "ship/gaussian_1", "ship/vq"]
    assert list_runs(runs / "ship" / "vq") == [runs / "ship" / "vq"]          # a run directory itself
    assert list_runs(tmp_path / "missing") == []


def test_cli_list_and_the_app_show_the_same_runs(tmp_path, monkeypatch):
    """`sqvae list` used to miss runs/GROUP/NAME runs that the app showed."""
    runs = tree(tmp_path)
    out = subprocess.run([sys.executable, "-m", "sqvae_core", "list", str(runs)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    cli = [Path(line.split()[0]).relative_to(runs).as_posix() for line in out.stdout.splitlines()]
    monkeypatch.setenv("SQVAE_RUNS", str(runs))
    monkeypatch.setenv("SQVAE_CHECKPOINTS", str(tmp_path / "no_checkpoints"))
    from app import runs as app_runs
    assert [r.name for r in app_runs.list_bundles()] == cli == ["a", "ship/gaussian_1", "ship/vq"]


def test_listing_and_reading_run_files_import_no_torch():
    """The app paints Explore's first view from stored files before torch is imported; the CLI's
    list does not need it either."""
    code = ("import sys; from sqvae_core import rundir; from sqvae_core.cli import main; "
            f"rundir.list_runs({str(ROOT / 'checkpoints')!r}); rundir.read_json({str(ROOT / 'checkpoints' / 'vq' / 'config.json')!r}, 'c'); "
            "main(['list', 'checkpoints']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False", out.stdout


def test_cli_list_without_arguments_reads_the_app_directories(tmp_path):
    """`sqvae list` with no DIR lists $SQVAE_RUNS and $SQVAE_CHECKPOINTS (the app's directories),
    not ./runs and ./checkpoints of the working directory (issue 21)."""
    import os
    runs = tree(tmp_path)
    ck = fake_run(tmp_path / "bundles" / "b1", "gaussian_1").parent
    cwd = tmp_path / "elsewhere_cwd"
    fake_run(cwd / "runs" / "not_this_one")           # ./runs: not read when $SQVAE_RUNS is set
    env = {**os.environ, "SQVAE_RUNS": str(runs), "SQVAE_CHECKPOINTS": str(ck), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "sqvae_core", "list"], capture_output=True, text=True,
                         cwd=cwd, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = [line.split()[0] for line in out.stdout.splitlines()]
    assert listed == [str(runs / "a"), str(runs / "ship" / "gaussian_1"), str(runs / "ship" / "vq"), str(ck / "b1")]
    env.pop("SQVAE_RUNS")                              # unset: ./runs again
    out = subprocess.run([sys.executable, "-m", "sqvae_core", "list"], capture_output=True, text=True,
                         cwd=cwd, env=env, timeout=60)
    assert [line.split()[0] for line in out.stdout.splitlines()] == ["runs/not_this_one", str(ck / "b1")]
