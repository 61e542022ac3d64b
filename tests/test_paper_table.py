"""benchmarks/paper_table.py --root: which finished runs, priors and stored scores it reuses."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from sqvae_core import rundir as rd
from sqvae_core.config import ModelConfig
from sqvae_core.data import ImageData
from sqvae_core.prior import PriorFitConfig
from sqvae_core.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import paper_table as pt  # noqa: E402


def _data(n, split, seed):
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return ImageData(pixels=x, labels=None, name="fashion-mnist", split=split, source="synthetic",
                     num_labels=None, levels=None)


def test_a_run_is_reused_only_if_it_trained_the_same_thing_and_scores_only_for_the_same_weights(tmp_path):
    out = tmp_path / "vq_s0"
    cfg = TrainConfig(model=ModelConfig(kind="vq", codebook_size=16, code_dim=16, num_rb=1), out=str(out),
                      epochs=2, batch_size=16, val_per_epoch=True, snapshot_every=5, checkpoint_every=5,
                      compile=False)
    assert train(cfg, progress=False, data=_data(64, "train", 0), val_data=_data(32, "val", 1))["state"] == "finished"
    assert pt.reusable(out, cfg)                                      # 2 epochs of 4 steps: 8 steps
    cadence = TrainConfig(**{**cfg.__dict__, "snapshot_every": 1000, "checkpoint_every": 2000, "out": "x",
                             "compile": None})
    assert pt.reusable(out, cadence)                                  # saves differently, learns the same
    for changed in (dict(seed=1), dict(epochs=3), dict(lr=2e-3)):
        assert not pt.reusable(out, TrainConfig(**{**cfg.__dict__, **changed})), changed
    other = TrainConfig(**cfg.__dict__)
    other.model = ModelConfig(kind="vq", codebook_size=32, code_dim=16, num_rb=1)
    assert not pt.reusable(out, other)

    last, best = rd.Weights(out).step, rd.Weights(out, "best").step
    assert last == 8 and best in (4, 8)
    val = [r for r in rd.read_metrics(out) if "val_mse" in r]
    assert best == min(val, key=lambda r: r["val_mse"])["step"]

    # kept by MSE, wanted by loss (the paper preset): reusable only if the loss keeps the same weights
    by_loss = TrainConfig(**{**cfg.__dict__, "best_by": "loss"})
    loss_step = min(val, key=lambda r: r["val_loss"])["step"]
    tensors, meta = rd.load_weights(out / rd.BEST)
    for step, same in ((loss_step, True), (12 - loss_step, False)):     # steps 4 and 8
        rd.save_weights(out / rd.BEST, tensors, {**meta, "step": str(step)})
        assert pt.reusable(out, by_loss) is same and pt.reusable(out, cfg)    # (cfg: kept by its own rule)
    rd.save_weights(out / rd.BEST, tensors, meta)

    # a prior counts only with the table's steps, all training grids, and the evaluated weights
    best_w = rd.Weights(out, "best")
    fixed = PriorFitConfig(steps=1500)
    summary = {"steps": 1500, "n_train_grids": 50_000, "weights_step": best}     # from before `fit` was kept
    (out / rd.PRIOR_SUMMARY).write_text(json.dumps(summary))
    assert pt.prior_fitted(best_w, fixed, None)
    assert not pt.prior_fitted(best_w, PriorFitConfig(steps=3000), None)
    assert not pt.prior_fitted(best_w, PriorFitConfig(), None)            # the plateau fit wants one
    (out / rd.PRIOR_SUMMARY).write_text(json.dumps({**summary, "weights_step": best - 1}))
    assert not pt.prior_fitted(best_w, fixed, None)
    # a plateau fit: recognised by its settings (compile aside) and a finished stop
    plateau = PriorFitConfig()
    rec = {**summary, "steps": 4250, "stop_reason": "plateau", "fit": {**plateau.to_dict(), "compile": True}}
    (out / rd.PRIOR_SUMMARY).write_text(json.dumps(rec))
    assert pt.prior_fitted(best_w, plateau, None) and not pt.prior_fitted(best_w, fixed, None)
    assert not pt.prior_fitted(best_w, PriorFitConfig(patience=8), None)
    (out / rd.PRIOR_SUMMARY).write_text(json.dumps({**rec, "stop_reason": "callback"}))
    assert not pt.prior_fitted(best_w, plateau, None)
    (out / rd.PRIOR_SUMMARY).write_text(json.dumps({**rec, "stop_reason": "max_steps"}))
    assert pt.prior_fitted(best_w, plateau, None)

    # stored scores: FDs on as many images, the evaluated weights, written after weights and prior
    doc = {"test_mse": 1.5, "test_perplexity": 9.0, "dead_codes": 3, "test_entropy": 0.0, "rfd": 2.0,
           "n_fd_images": 1000, "fd_generation": 4.0, "n_gen_images": 10000, "weights_step": best}
    (out / rd.PRIOR_SUMMARY).write_text(json.dumps(summary))
    rd.atomic_write_json(out / rd.EVAL, doc)
    got = pt.stored_scores(best_w, 1000, 10000)
    assert got["test_mse"] == 1.5 and got["perplexity"] == 9.0 and got["rfd"] == 2.0 and got["fd_generation"] == 4.0
    assert pt.stored_scores(best_w, 2000, 10000) is None and pt.stored_scores(best_w, 1000, 500) is None
    # a generation FD from before the test-class protocol (no n_gen_images) is scored again
    rd.atomic_write_json(out / rd.EVAL, {k: v for k, v in doc.items() if k != "n_gen_images"})
    assert pt.stored_scores(best_w, 1000, 10000) is None
    rd.atomic_write_json(out / rd.EVAL, {**doc, "weights_step": best + 100})
    assert pt.stored_scores(best_w, 1000, 10000) is None


@pytest.mark.slow
def test_finish_bundles_ships_and_scores_the_best_validation_weights(tmp_path):
    """scripts/finish_bundles.py (which="best"): the bundle's model.safetensors holds the run's
    best-validation tensors, eval.json says their step and its figures are theirs, and a prior
    fitted on other weights is fitted again on these."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import finish_bundles as fb
    from sqvae_core.evaluate import evaluate_model
    from sqvae_core.scores import bundle_split
    run = tmp_path / "runs" / "vq"
    cfg = TrainConfig(model=ModelConfig(kind="vq", codebook_size=16, code_dim=16, num_rb=1), out=str(run),
                      steps=8, batch_size=16, val_every=4, snapshot_every=4, checkpoint_every=4,
                      val_max_images=64, compile=False)
    assert train(cfg, progress=False)["state"] == "finished"
    # make the best-validation weights differ from the last ones: those of step 4, perturbed
    last, _ = rd.load_weights(run / rd.WEIGHTS)
    best = {k: (v + 0.01 if v.is_floating_point() and "codebook" not in k else v) for k, v in last.items()}
    rd.save_weights(run / rd.BEST, best, {"step": "4", "val_mse": "1.0"})
    rd.atomic_write_json(run / rd.PRIOR_SUMMARY, {"steps": 3, "weights_step": 8})   # fitted on the last weights
    rows = [{**r, "val_loss": 2.0 if r["step"] == 4 else 1.0, "val_mse": 2.0 if r["step"] == 4 else 1.0}
            if "val_loss" in r else r for r in rd.read_metrics(run)]
    (run / rd.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))       # lowest both at step 8
    (run / rd.PRIOR).write_bytes(b"stale")

    doc = fb.finish(run, tmp_path / "ck", prior_steps=3, n_fd=40, prior_images=200, which="best", n_gen=40)
    shipped, meta = rd.load_weights(tmp_path / "ck" / "vq" / rd.WEIGHTS)
    assert all(torch.equal(shipped[k], best[k]) for k in best) and meta["step"] == "4" and "config" in meta
    assert doc["weights_step"] == 4 and doc["weights"] == "best validation MSE" and doc["steps"] == 8
    rd.save_weights(run / rd.BEST, best, {"step": "8", "val_mse": "1.0"})
    assert fb.kept_by(run) == "best validation loss and MSE"      # kept by MSE, and the loss is lowest there
    rd.save_weights(run / rd.BEST, best, {"step": "4", "best_by": "loss", "val_loss": "2.0"})
    assert fb.kept_by(run) == "best validation loss"
    rd.save_weights(run / rd.BEST, best, {"step": "4", "val_mse": "1.0"})
    assert json.loads((run / rd.PRIOR_SUMMARY).read_text())["weights_step"] == 4     # refitted
    b = rd.load_bundle(tmp_path / "ck" / "vq")
    x, _, _ = bundle_split(b, "test")
    assert abs(evaluate_model(b.model, x)["mse"] - doc["test_mse"]) < 1e-4 * doc["test_mse"]
    assert json.loads((run / rd.EVAL).read_text()) == doc                            # beside the run too

    # --refit-shipped: the bundle alone (no run beside it) gets a plateau-stopped prior of the size it
    # had, stored in float16; eval.json's prior figures follow it and nothing else of the bundle moves
    shutil.rmtree(run)
    ck = tmp_path / "ck" / "vq"
    before = {p.relative_to(ck): p.read_bytes() for p in ck.rglob("*") if p.is_file()}
    old_prior = json.loads((ck / rd.PRIOR_SUMMARY).read_text())
    fit = PriorFitConfig(max_steps=60, eval_every=5, patience=2, min_improvement=0.9)
    new = fb.refit_shipped(ck, fit=fit, max_images=200, n_gen=40)
    summary = json.loads((ck / rd.PRIOR_SUMMARY).read_text())
    assert summary["stop_reason"] == "plateau" and summary["steps"] == 15       # 2 evaluations without a 90% gain
    assert summary["best_step"] == min(summary["history"], key=lambda r: r["val_nll_bits"])["step"]
    assert summary["config"] == old_prior["config"] and summary["weights_step"] == 4
    tensors, _ = rd.load_weights(ck / rd.PRIOR, "prior")
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    assert new["prior_nll_bits"] == summary["nll_bits_per_code"] and new["n_gen_images"] == 40
    assert new["fd_generation"] == sum(new["fd_generation_rounds"]) / 2 > 0
    assert {k: v for k, v in new.items() if k not in fb.GEN_KEYS} == {k: v for k, v in doc.items() if k not in fb.GEN_KEYS}
    after = {p.relative_to(ck) for p in ck.rglob("*") if p.is_file()}
    assert after == set(before)
    changed = {p for p in after if (ck / p).read_bytes() != before[p]}
    assert changed == {Path(rd.PRIOR), Path(rd.PRIOR_SUMMARY), Path(rd.EVAL)}
