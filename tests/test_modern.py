"""The modern collapse fixes (FSQ, LFQ, SimVQ, rotation trick) on vector-quantize-pytorch: the
library's own indices, our usage figures from them, their effective codebooks, bad K in one line."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqvae_core.config import MODERN_KINDS, ModelConfig
from sqvae_core.evaluate import evaluate_model
from sqvae_core.kinds import FSQ_LEVELS, KINDS, check_codebook_size, fsq_levels
from sqvae_core.models import build_model
from sqvae_core.modern import make_library_quantizer

ROOT = Path(__file__).resolve().parents[1]


def model_of(kind, k=16, d=16, **kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, codebook_size=k, code_dim=d, num_rb=1, **kw))


@pytest.mark.parametrize("kind", MODERN_KINDS)
@pytest.mark.parametrize("training", [True, False])
def test_indices_are_the_librarys_own_forward(kind, training):
    """Our quantizer's indices and z_q equal a fresh library module's, loaded with the same state,
    called directly on the same input (for the EMA kind, each sees the same batch once)."""
    model = model_of(kind).train(training)
    lib = make_library_quantizer(kind, 16, 16).train(training)
    lib.load_state_dict(model.quantizer.lib.state_dict())
    z = torch.randn(3, 16, 7, 7, generator=torch.Generator().manual_seed(1))
    ours = model.quantizer(z)
    theirs = lib(z)                 # (quantized, indices[, loss]): LFQ's as a named tuple
    assert torch.equal(ours.indices, theirs[1].long())
    assert torch.allclose(ours.z_q, theirs[0], atol=1e-6)
    assert ours.indices.shape == (3, 7, 7) and int(ours.indices.min()) >= 0 and int(ours.indices.max()) < 16


def test_vq_indices_are_the_nearest_effective_code():
    """SimVQ and the rotation-trick VQ pick the euclidean-nearest code of their effective codebook,
    recomputed here with torch.cdist (SimVQ's codebook is its frozen codes through the learned map)."""
    z = torch.randn(2, 16, 7, 7, generator=torch.Generator().manual_seed(2))
    for kind in ("simvq", "vq_rotation"):
        model = model_of(kind).eval()
        rows = z.permute(0, 2, 3, 1).reshape(-1, 16)
        nearest = torch.cdist(rows, model.codebook_vectors()).argmin(1).reshape(2, 7, 7)
        assert torch.equal(model.quantizer(z).indices, nearest), kind
    simvq = model_of("simvq").quantizer.lib
    assert torch.allclose(model_of("simvq").codebook_vectors(), simvq.code_transform(simvq.frozen_codebook))


def test_lfq_index_is_the_sign_pattern_of_the_projected_code():
    """LFQ: bit j of the index is 1 where the j-th projected dimension is positive (most significant
    first), so the K = 2^b codes are the corners of {−1, 1}^b."""
    model = model_of("lfq").eval()
    z = torch.randn(2, 16, 7, 7, generator=torch.Generator().manual_seed(3))
    proj = model.quantizer.lib.project_in(z.permute(0, 2, 3, 1))            # (2, 7, 7, log2 K)
    bits = (proj > 0).long()
    want = (bits * (2 ** torch.arange(3, -1, -1))).sum(-1)
    assert torch.equal(model.quantizer(z).indices, want)


def test_fsq_effective_codebook_is_the_projected_grid_of_levels():
    """FSQ: K = prod(levels) distinct codes; through the (affine) output projection the grid keeps
    its shape: the codes before projection are exactly the level grid, each level set once."""
    assert math.prod(fsq_levels(256)) == 256 and fsq_levels(512) == (8, 8, 8)
    for k, levels in FSQ_LEVELS.items():
        assert math.prod(levels) == k and all(3 <= lv <= 10 for lv in levels)
    model = model_of("fsq", k=64)
    lib = model.quantizer.lib
    grid = lib._indices_to_codes(torch.arange(64)) if hasattr(lib, "_indices_to_codes") else None
    vectors = model.codebook_vectors()
    assert vectors.shape == (64, 16) and len(torch.unique(vectors, dim=0)) == 64
    if grid is not None:          # each of the 3 dimensions takes its 4 levels, 16 times each
        for j in range(3):
            values, counts = torch.unique(grid[:, j], return_counts=True)
            assert len(values) == 4 and set(counts.tolist()) == {16}


@pytest.mark.parametrize("kind", MODERN_KINDS)
def test_decoded_edit_equals_the_forward_and_usage_comes_from_the_indices(kind):
    """decode_indices (code edits, Neighbor-k, prior samples) decodes the same image as the forward
    pass; evaluate's usage is the histogram of those indices, perplexity exp(H) of it, dead codes
    its zeros (recomputed by hand)."""
    model = model_of(kind).eval()
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    idx = model.codes(x)
    assert torch.allclose(model.decode_indices(idx), model.reconstruct(x), atol=1e-5)
    res = evaluate_model(model, x, batch_size=4)
    usage = torch.bincount(idx.flatten(), minlength=16).float()
    p = usage / usage.sum()
    ppl = math.exp(-sum(float(q) * math.log(float(q)) for q in p if q > 0))
    assert res["usage"] == usage.long().tolist()
    assert res["dead_codes"] == int((usage == 0).sum())
    assert math.isclose(res["perplexity"], ppl, rel_tol=1e-5)


def test_the_catalogue_knows_what_each_modern_kind_logs():
    x = torch.rand(2, 1, 28, 28)
    for kind in MODERN_KINDS:
        entry = KINDS[kind]
        assert entry.family == "modern" and entry.anneal is None and entry.metric == "euclidean"
        out = model_of(kind).train()(x)
        assert set(entry.stats) <= set(out.stats), kind
        assert torch.isclose(out.loss, sum(out.terms.values()))
    assert "entropy" in KINDS["lfq"].stats and "entropy" not in KINDS["fsq"].stats


@pytest.mark.parametrize("kind,k,msg", [("fsq", 100, r"valid K: 16 \[4, 4\].*512 \[8, 8, 8\]"),
                                         ("lfq", 100, "power of two.*nearest: 64 or 128"),
                                         ("lfq", 3, "nearest: 2 or 4")])
def test_a_bad_codebook_size_is_refused_in_one_line(kind, k, msg):
    with pytest.raises(ValueError, match=msg):
        check_codebook_size(kind, k)
    with pytest.raises(ValueError, match=msg):
        ModelConfig(kind=kind, codebook_size=k).validate()
    check_codebook_size("simvq", 100)            # any K for the codebook kinds


def test_cli_refuses_a_bad_fsq_k_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sqvae_core", "train", "--model", "fsq", "--codebook-size", "100",
                        "--out", str(tmp_path / "run"), "--steps", "2"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "fsq needs a codebook size K with FSQ levels; got 100; valid K: 16 [4, 4]" in r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
