"""The typed run directory: RunDir's dataclasses and the one weights reference, Weights(run, which)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqvae_core import rundir as rd
from sqvae_core.config import ModelConfig
from sqvae_core.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(kind="gaussian_1", codebook_size=8, code_dim=8, num_rb=1)


def make_run(path: Path, *, last_step: int | None = 50, best_step: int | None = None, best_by: str = "mse",
             rows: list[dict] = (), **config) -> Path:
    """A run directory with config.json, model.safetensors (metadata step), optionally best.safetensors."""
    path.mkdir(parents=True)
    rd.atomic_write_json(path / rd.CONFIG, {"model": CFG.to_dict(), "dataset": "mnist", **config})
    state = build_model(CFG).state_dict()
    rd.save_weights(path / rd.WEIGHTS, state, {} if last_step is None else {"step": str(last_step)})
    if best_step is not None:
        rd.save_weights(path / rd.BEST, state, {"step": str(best_step), "best_by": best_by})
    (path / rd.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------- Weights
def test_a_run_without_best_weights_falls_back_to_its_last_ones(tmp_path):
    run = make_run(tmp_path / "r")
    best = rd.Weights(run, "best")
    assert best.path == run / rd.WEIGHTS and not best.is_best_file
    assert best.step == rd.Weights(run).step == 50
    assert best.kept_by() == [] and rd.best_choice(run) is None
    with pytest.raises(ValueError, match="weights must be one of last, best"):
        rd.Weights(run, "newest")


def test_best_weights_name_their_step_and_every_figure_that_keeps_them(tmp_path):
    rows = [{"step": 10, "val_mse": 3.0, "val_loss": 9.0}, {"step": 30, "val_mse": 2.0, "val_loss": 7.0},
            {"step": 50, "val_mse": 2.5, "val_loss": 8.0}]
    run = make_run(tmp_path / "r", best_step=30, best_by="loss", rows=rows)
    best = rd.Weights(run, "best")
    assert best.path == run / rd.BEST and best.step == 30
    assert best.kept_by() == ["loss", "mse"]                      # MSE is lowest at step 30 too
    assert rd.figures_text(best.kept_by()) == "loss and MSE"
    assert rd.Weights(run).kept_by() == []
    assert rd.best_choice(run) == rd.BestChoice(50, 30, ("loss", "mse"))
    rows[2]["val_mse"] = 1.0                                       # now MSE is lowest at the last step
    assert best.kept_by(rows) == ["loss"]


def test_an_imported_run_without_a_recorded_step_offers_no_choice_and_matches_old_records(tmp_path):
    """import-official writes weights without a step; records from before weights_step are of the last weights."""
    run = make_run(tmp_path / "r", last_step=None)
    w = rd.Weights(run)
    assert w.step is None
    rd.atomic_write_json(run / rd.EVAL, {"test_mse": 3.0})                 # no weights_step: the last weights'
    assert rd.RunDir(run).eval(w).test_mse == 3.0
    rd.atomic_write_json(run / rd.EVAL, {"test_mse": 3.0, "weights_step": 40})
    assert rd.RunDir(run).eval(w) is None
    rd.atomic_write_json(run / rd.PRIOR_SUMMARY, {"steps": 5, "weights_step": None})
    assert w.made(rd.RunDir(run).prior_summary)


def test_records_count_only_for_the_weights_they_were_made_from(tmp_path):
    run = make_run(tmp_path / "r", best_step=30)
    rd.atomic_write_json(run / rd.EVAL, {"test_mse": 2.5, "usage": [1] * 8, "n_test": 10, "weights_step": 30})
    ev = rd.RunDir(run).eval(rd.Weights(run, "best"))
    assert (ev.test_mse, ev.usage, ev.n_test, ev.weights_step) == (2.5, (1,) * 8, 10, 30)
    assert rd.RunDir(run).eval() is None                                # not the last (step 50) weights'
    rd.atomic_write_json(run / rd.PRIOR_SUMMARY, {"steps": 5, "nll_bits_per_code": 4.2, "weights_step": 50})
    prior = rd.RunDir(run).prior_summary
    assert prior.nll_bits_per_code == 4.2 and rd.Weights(run).made(prior) and not rd.Weights(run, "best").made(prior)


# ------------------------------------------------------------------------- the reader
def test_config_is_typed_with_the_precision_it_trained_in(tmp_path):
    run = rd.RunDir(make_run(tmp_path / "r", train={"steps": 200, "amp": True, "data_dir": "d", "val_size": 100},
                             data_rebuild="python make.py"))
    cfg = run.config
    assert (cfg.kind, cfg.dataset, cfg.codebook_size, cfg.code_dim, cfg.steps) == ("gaussian_1", "mnist", 8, 8, 200)
    assert cfg.precision == rd.reader.BF16 and not cfg.logged     # an older run: derived from train.amp
    assert cfg.data_options == rd.DataOptions("d", 100, False, None) and cfg.data_rebuild == "python make.py"
    assert cfg.model_config() == CFG
    fell_back = rd.RunDir(make_run(tmp_path / "f", precision="fp32", amp_fallback="no native bf16")).config
    assert fell_back.precision_text == "fp32 (bf16 asked for, not native)" and fell_back.amp_fallback == "no native bf16"
    assert rd.RunDir(make_run(tmp_path / "o")).config.precision == "fp32"
    with pytest.raises(TypeError):
        cfg.raw["dataset"] = "x"                                    # read-only


def test_a_logged_run_has_sizes_but_no_model(tmp_path):
    (tmp_path / "r").mkdir()
    rd.atomic_write_json(tmp_path / "r" / rd.CONFIG, {"source": rd.LOGGED_SOURCE, "logged": {"codebook_size": 16,
                                                                                       "code_dim": None}})
    run = rd.RunDir(tmp_path / "r")
    assert run.is_logged and (run.config.codebook_size, run.config.code_dim, run.config.kind) == (16, None, None)
    with pytest.raises(rd.BundleError, match="logged run"):
        run.load()


def test_status_states_and_a_corrupt_status_json_gets_a_clear_error(tmp_path):
    run = rd.RunDir(make_run(tmp_path / "r"))
    assert run.status.state == "unknown" and "status.json not found" in run.status.problem
    (run.path / rd.STATUS).write_text('{"state": "runn')                   # torn by a kill
    st = run.status
    assert st.state == "unknown" and st.step is None
    assert st.problem == f"status.json is not valid JSON (JSONDecodeError): {run.path / rd.STATUS}"
    rd.atomic_write_json(run.path / rd.STATUS, {"state": "done"})
    assert "no valid state ('done'" in run.status.problem
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rd.atomic_write_json(run.path / rd.STATUS, {"state": "running", "step": 7, "pid": dead.pid})
    assert (run.status.state, run.status.step, run.status.active) == ("interrupted", 7, True)
    rd.atomic_write_json(run.path / rd.STATUS, {"state": "running", "step": 8, "pid": os.getpid()})
    assert run.status.state == "running"


def test_metrics_skip_a_torn_line_and_name_the_last_validation(tmp_path):
    run = rd.RunDir(make_run(tmp_path / "r", rows=[{"step": 5, "loss": 1.0}, {"step": 10, "val_mse": 2.0}]))
    with open(run.path / rd.METRICS, "a") as f:
        f.write('{"step": 15, "lo')
    m = run.metrics
    assert len(m.rows) == 2 and m.last_val() == {"step": 10, "val_mse": 2.0} and m.last_step == 10


def test_load_gives_the_weights_reference_it_loaded(tmp_path):
    run = make_run(tmp_path / "r", best_step=30)
    b = rd.RunDir(run).load("best")
    assert b.weights == rd.Weights(run, "best") and b.weights.path.name == rd.BEST
    assert b.dataset == "mnist" and b.config["dataset"] == "mnist" and b.model_cfg == CFG
    assert rd.load_bundle(run).weights.path.name == rd.WEIGHTS


def test_reading_a_run_imports_no_torch(tmp_path):
    make_run(tmp_path / "r", best_step=3)
    code = ("import sys; from sqvae_core import rundir as rd; r = rd.RunDir(sys.argv[1]); "
            "r.config, r.status, r.metrics, r.eval(), rd.Weights(r.path, 'best').step, rd.best_choice(r.path); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert torch is not None
