from pathlib import Path

import pytest



@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny gaussian_1 run trained for 150 steps on Fashion-MNIST, shared by tests that read runs."""
    from sqvae_core.config import ModelConfig
    from sqvae_core.train import TrainConfig, train
    out = tmp_path_factory.mktemp("runs") / "g1"
    cfg = TrainConfig(model=ModelConfig(kind="gaussian_1", codebook_size=32, code_dim=16, num_rb=1), out=str(out),
                      steps=150, batch_size=32, log_every=10, val_every=75, snapshot_every=50,
                      checkpoint_every=75, val_max_images=500)
    assert train(cfg, progress=False)["state"] == "finished"
    return out
