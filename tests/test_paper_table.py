"""benchmarks/paper_table.py --root: which finished runs, priors and stored scores it reuses."""
import json
import sys
from pathlib import Path

import torch

from sqvae_core import rundir as rd
from sqvae_core.config import ModelConfig
from sqvae_core.data import ImageData
from sqvae_core.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import paper_table as pt  # noqa: E402


def _data(n, split, seed):
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return ImageData(images=x, labels=None, name="fashion-mnist", split=split, source="synthetic",
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

    last, best = rd.weights_step(out), rd.weights_step(out, "best")
    assert last == 8 and best in (4, 8)
    val = [r for r in rd.read_metrics(out) if "val_mse" in r]
    assert best == min(val, key=lambda r: r["val_mse"])["step"]

    # a prior counts only with the table's steps, all training grids, and the evaluated weights
    summary = {"steps": 1500, "n_train_grids": 50_000, "weights_step": best}
    (out / rd.PRIOR_SUMMARY).write_text(json.dumps(summary))
    assert pt.prior_fitted(out, 1500, None, "best")
    assert not pt.prior_fitted(out, 3000, None, "best")
    (out / rd.PRIOR_SUMMARY).write_text(json.dumps({**summary, "weights_step": best - 1}))
    assert not pt.prior_fitted(out, 1500, None, "best")

    # stored scores: FDs on as many images, the evaluated weights, written after weights and prior
    doc = {"test_mse": 1.5, "test_perplexity": 9.0, "dead_codes": 3, "test_entropy": 0.0, "rfd": 2.0,
           "n_fd_images": 1000, "weights_step": best}
    (out / rd.PRIOR_SUMMARY).write_text(json.dumps(summary))
    rd.atomic_write_json(out / rd.EVAL, doc)
    got = pt.stored_scores(out, 1000, "best")
    assert got["test_mse"] == 1.5 and got["perplexity"] == 9.0 and got["rfd"] == 2.0
    assert pt.stored_scores(out, 2000, "best") is None
    rd.atomic_write_json(out / rd.EVAL, {**doc, "weights_step": best + 100})
    assert pt.stored_scores(out, 1000, "best") is None
