"""sqvae_core.explore: Neighbor-k edits, interpolation, single-code edits, codebook maps, galleries."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sqvae_core import explore, maps, rundir
from sqvae_core.config import ModelConfig
from sqvae_core.device import resolve_device
from sqvae_core.models import build_model
from sqvae_core.quantizers import to_rows


def synthetic_images(n, seed=0, size=28, channels=1):
    """Smooth random images in [0, 1] (blobs upsampled from a coarse grid): varied codes."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, size // 4, size // 4, generator=g)
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def make_model(kind="gaussian_1", K=32, d=16, num_rb=1, seed=0, **kw):
    """A small eval-mode model whose codebook is spread over its encoder's outputs (many codes used)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(kind=kind, codebook_size=K, code_dim=d, num_rb=num_rb, **kw)).eval()
    if model.discrete:
        with torch.no_grad():
            z, _ = model.encode(synthetic_images(32, seed=seed + 100))
            rows = to_rows(z)
            pick = rows[torch.randperm(rows.shape[0])[:K]]
            model.quantizer.codebook.copy_(pick + 0.05 * torch.randn_like(pick))
    return model


def brute_rank_k(model, k):
    """Rank-k code of every code by an explicit python sort: itself first, then (distance, index)."""
    cb = model.codebook_vectors().detach().double()
    cosine = model.cfg.kind in ("vmf", "nc")
    out = []
    for i in range(cb.shape[0]):
        def dist(j):
            if cosine:
                return 1 - float(cb[i] @ cb[j]) / (float(cb[i].norm()) * float(cb[j].norm()))
            return math.sqrt(float(((cb[i] - cb[j]) ** 2).sum()))
        others = sorted((j for j in range(cb.shape[0]) if j != i), key=lambda j: (dist(j), j))
        out.append(([i] + others)[k - 1])
    return torch.tensor(out)


# ------------------------------------------------------------------- Neighbor-k edits
@pytest.mark.parametrize("kind", ["gaussian_1", "vq", "vmf"])
def test_neighbour_1_edit_equals_reconstruction(kind):
    model = make_model(kind)
    x = synthetic_images(8)
    edited, idx = explore.neighbour_edit(model, x, 1)
    assert torch.equal(idx, model.codes(x))
    assert torch.allclose(edited, model.reconstruct(x), atol=1e-5)
    with torch.no_grad():                        # a duplicated code is still not its twin's rank 1
        model.quantizer.codebook[7] = model.quantizer.codebook[2]
    assert torch.equal(explore.kth_neighbours(model, 1), torch.arange(32))
    assert explore.kth_neighbours(model, 2)[7] == 2 and explore.kth_neighbours(model, 2)[2] == 7


@pytest.mark.parametrize("kind,k", [("gaussian_1", 2), ("gaussian_1", 5), ("vmf", 2), ("vmf", 7), ("vq", 3)])
def test_neighbour_k_replaces_codes_by_the_rank_k_code(kind, k):
    model = make_model(kind, K=24)
    want = brute_rank_k(model, k)
    nb = explore.kth_neighbours(model, k)
    assert torch.equal(nb, want)
    assert not torch.equal(nb, torch.arange(24))            # k > 1 really changes codes
    x = synthetic_images(6, seed=3)
    edited, idx = explore.neighbour_edit(model, x, k)
    assert torch.equal(idx, want[model.codes(x)])
    assert torch.allclose(edited, model.decode_indices(idx), atol=1e-6)
    assert not torch.allclose(edited, model.reconstruct(x))


def test_candidate_codes_sorted_by_distance_and_last_rank():
    model = make_model("vmf", K=16)
    cand = explore.candidate_codes(model, 5)
    assert cand[0] == 5 and sorted(cand.tolist()) == list(range(16))
    d = explore.code_distances(model, 5)
    assert torch.all(d[cand[1:]].diff() >= 0)
    assert torch.equal(explore.candidate_codes(model, 5, n=3), cand[:3])
    assert torch.equal(explore.kth_neighbours(model, 16), brute_rank_k(model, 16))


# ----------------------------------------------------------------------- interpolation
@pytest.mark.parametrize("kind", ["gaussian_1", "gaussian_4", "vq", "vmf", "vae"])
def test_interpolation_endpoints_are_the_reconstructions(kind):
    model = make_model(kind)
    x = synthetic_images(2, seed=5)
    out = explore.interpolate(model, x[0], x[1], steps=6)
    rec = model.reconstruct(x)
    assert out["latent"].shape == out["pixel"].shape == (6, 1, 28, 28)
    assert out["t"][0] == 0 and out["t"][-1] == 1
    assert torch.allclose(out["latent"][0], rec[0], atol=1e-5)
    assert torch.allclose(out["latent"][-1], rec[1], atol=1e-5)
    assert torch.allclose(out["pixel"][0], rec[0], atol=1e-6)
    assert torch.allclose(out["pixel"][-1], rec[1], atol=1e-6)
    assert torch.allclose(out["pixel"][2], 0.6 * rec[0] + 0.4 * rec[1], atol=1e-5)
    assert (out["indices"] is None) == (kind == "vae")


# ------------------------------------------------------------------ single-code edits
def hand_box(r, c, num_rb, size=28):
    """Receptive field by hand through the official 28x28 decoder: num_rb res-block 3x3 convs widen
    by one cell each (R = num_rb cells); each 4x4/2 convT maps [a, b] to [2a - 1, 2b + 2]: rows
    4r-4R-3 .. 4r+4R+6."""
    R = num_rb
    lo = lambda v: max(4 * v - 4 * R - 3, 0)
    hi = lambda v: min(4 * v + 4 * R + 6, size - 1) + 1
    return lo(r), hi(r), lo(c), hi(c)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_single_code_edit_changes_only_its_receptive_field(batch_norm):
    model = make_model("gaussian_1", K=16, num_rb=1, batch_norm=batch_norm)
    grid = model.codes(synthetic_images(1, seed=7))[0]
    base = model.decode_indices(grid[None])[0]
    for r, c in [(0, 0), (6, 6), (0, 6), (5, 1)]:
        new = (int(grid[r, c]) + 5) % 16
        edited = explore.edit_code(model, grid, r, c, new)
        t, b, lft, rgt = hand_box(r, c, num_rb=1)
        assert explore.cell_pixel_box(model, r, c) == (t, b, lft, rgt)
        changed = (edited != base).any(0)
        assert changed[t:b, lft:rgt].any()
        changed[t:b, lft:rgt] = False
        assert not changed.any(), f"edit of cell ({r}, {c}) changed pixels outside its receptive field"
    for rb in (2, 3):
        m = make_model("gaussian_1", K=16, num_rb=rb)
        assert explore.cell_pixel_box(m, 3, 1) == hand_box(3, 1, rb)


def test_paint_codes_and_edit_code_agree():
    model = make_model("gaussian_1", K=16)
    grid = model.codes(synthetic_images(1, seed=2))[0]
    mask = torch.zeros(7, 7, dtype=torch.bool)
    mask[2, 3] = True
    assert torch.equal(explore.paint_codes(model, grid, mask, 9), explore.edit_code(model, grid[None], 2, 3, 9))
    mask[:] = True
    assert torch.allclose(explore.paint_codes(model, grid, mask, 4),
                          model.decode_indices(torch.full((1, 7, 7), 4))[0])


# ------------------------------------------------------------------------ bad input
def test_bad_input_raises_clear_value_errors():
    model = make_model("gaussian_1", K=256)
    grid = torch.zeros(7, 7, dtype=torch.long)
    with pytest.raises(ValueError, match=r"code 300 is out of range for a codebook of K=256"):
        explore.edit_code(model, grid, 0, 0, 300)
    with pytest.raises(ValueError, match=r"code -1 is out of range for a codebook of K=256"):
        explore.edit_code(model, grid, 0, 0, -1)
    with pytest.raises(ValueError, match=r"cell \(row 7, col 0\) is outside the 7x7 code grid"):
        explore.edit_code(model, grid, 7, 0, 1)
    with pytest.raises(ValueError, match=r"cell \(row 2, col -1\) is outside the 7x7 code grid"):
        explore.edit_code(model, grid, 2, -1, 1)
    with pytest.raises(ValueError, match=r"expected one code grid of shape \(7, 7\)"):
        explore.edit_code(model, torch.zeros(8, 8, dtype=torch.long), 0, 0, 1)
    bad = grid.clone()
    bad[1, 2] = 256
    with pytest.raises(ValueError, match=r"code 256 at cell \(row 1, col 2\) is out of range"):
        explore.edit_code(model, bad, 0, 0, 1)
    with pytest.raises(ValueError, match="integer code indices"):
        explore.edit_code(model, grid.float(), 0, 0, 1)
    with pytest.raises(ValueError, match=r"code 256 is out of range"):
        explore.paint_codes(model, grid, torch.ones(7, 7, dtype=torch.bool), 256)
    with pytest.raises(ValueError, match=r"mask must have the code grid's shape"):
        explore.paint_codes(model, grid, torch.ones(6, 7, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match=r"code 999 is out of range"):
        explore.candidate_codes(model, 999)
    with pytest.raises(ValueError, match=r"k in \[1, K=256\]"):
        explore.kth_neighbours(model, 0)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 28, 28\)"):
        explore.neighbour_edit(model, torch.rand(2, 1, 32, 32), 2)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 28, 28\)"):
        explore.code_usage(model, torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"x_b: expected images of shape"):
        explore.interpolate(model, torch.rand(1, 28, 28), torch.rand(1, 32, 32))
    with pytest.raises(ValueError, match=r"image size and channel count must match"):
        explore.nearest_images(torch.rand(3, 28, 28), torch.rand(10, 1, 28, 28))
    with pytest.raises(ValueError, match="usage must hold one count per code"):
        explore.codebook_map(model, torch.zeros(10), method="pca")
    vae = make_model("vae")
    for call in (lambda: explore.codebook_map(vae, None, method="pca"), lambda: explore.kth_neighbours(vae, 2),
                 lambda: explore.edit_code(vae, grid, 0, 0, 1), lambda: explore.code_usage(vae, synthetic_images(2))):
        with pytest.raises(ValueError, match="the continuous VAE has no codebook"):
            call()


# ----------------------------------------------------------------------- codebook maps
@pytest.mark.parametrize("method", ["pca", "umap"])
@pytest.mark.slow
def test_codebook_map_has_one_point_per_code_with_usage_and_dead_flags(method):
    model = make_model("gaussian_1", K=32)
    usage = torch.arange(32) % 4 * 7          # every fourth code unused
    pts = explore.codebook_map(model, usage, method=method, seed=0)
    assert [p["code"] for p in pts] == list(range(32))
    assert [p["usage"] for p in pts] == usage.tolist()
    assert [p["dead"] for p in pts] == (usage == 0).tolist()
    assert all(math.isfinite(p["x"]) and math.isfinite(p["y"]) for p in pts)
    assert len({(p["x"], p["y"]) for p in pts}) > 16
    bare = explore.codebook_map(model, None, method=method, seed=0)
    assert all(p["usage"] is None and p["dead"] is None for p in bare)
    assert [(p["x"], p["y"]) for p in bare] == [(p["x"], p["y"]) for p in pts]


def test_code_usage_counts_deterministic_codes():
    model = make_model("gaussian_1", K=32)
    x = synthetic_images(20, seed=4)
    usage = explore.code_usage(model, x, batch_size=7)
    assert usage.dtype == torch.long and usage.shape == (32,) and int(usage.sum()) == 20 * 49
    assert torch.equal(usage, torch.bincount(model.codes(x).flatten(), minlength=32))


def test_umap_map_is_deterministic_for_a_seed():
    model = make_model("vmf", K=32)
    a = explore.codebook_map(model, None, method="umap", seed=3)
    b = explore.codebook_map(model, None, method="umap", seed=3)
    c = explore.codebook_map(model, None, method="umap", seed=4)
    assert a == b
    assert a != c


def test_pca_map_is_the_projection_on_the_top_axes():
    model = make_model("gaussian_1", K=32)
    cb = model.codebook_vectors().detach().double()
    pts = explore.codebook_map(model, None, method="pca")
    xy = torch.tensor([[p["x"], p["y"]] for p in pts], dtype=torch.float64)
    centred = cb - cb.mean(0)
    _, _, vt = torch.linalg.svd(centred, full_matrices=False)
    proj = centred @ vt[:2].T
    assert torch.allclose(xy.abs().sum(0), proj.abs().sum(0), rtol=1e-4)     # same axes up to sign
    assert torch.allclose(xy.abs(), proj.abs(), atol=1e-4)


@pytest.mark.parametrize("method", ["pca", "umap"])
def test_aligned_maps_have_one_frame_per_snapshot_and_do_not_jump(method):
    g = torch.Generator().manual_seed(0)
    last = torch.randn(40, 16, generator=g)
    snaps = [last + 0.5 * torch.randn(40, 16, generator=g), last + 0.1 * torch.randn(40, 16, generator=g),
             last.clone(), last]
    usages = [torch.randint(0, 5, (40,), generator=g) for _ in snaps]
    frames = explore.aligned_maps(snaps, usages, method=method, seed=0)
    assert len(frames) == len(snaps)
    for frame, usage in zip(frames, usages):
        assert [p["code"] for p in frame] == list(range(40))
        assert [p["usage"] for p in frame] == usage.tolist()
    xy = [np.array([[p["x"], p["y"]] for p in f]) for f in frames]
    assert np.array_equal(xy[2], xy[3])                  # an unchanged codebook does not move
    single = explore.aligned_maps([last], None, method=method, seed=0)[0]
    assert np.array_equal(np.array([[p["x"], p["y"]] for p in single]), xy[3])
    spread = xy[3].std()
    assert np.abs(xy[1] - xy[3]).mean() < 0.75 * spread  # a small change moves points a little
    if method == "pca":                                  # PCA frames share the last frame's axes
        mean, axes = maps._pca_axes(last.numpy())
        assert np.allclose(xy[0], maps._pca_project(snaps[0].numpy(), mean, axes), atol=1e-5)


# ------------------------------------------------------------------- cached map in a run dir
@pytest.fixture
def bundle_dir(tmp_path):
    """A tiny trained run directory: 30 Adam steps of a K=16 Gaussian SQ-VAE on synthetic images."""
    torch.manual_seed(0)
    cfg = ModelConfig(kind="gaussian_1", codebook_size=16, code_dim=16, num_rb=1)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = synthetic_images(64, seed=9)
    for step in range(30):
        opt.zero_grad()
        model(x[step % 4 * 16:(step % 4 + 1) * 16]).loss.backward()
        opt.step()
    rundir.atomic_write_json(tmp_path / rundir.CONFIG, {"model": cfg.to_dict(), "dataset": "synthetic"})
    rundir.save_weights(tmp_path / rundir.WEIGHTS, model.state_dict())
    return tmp_path


@pytest.mark.slow
def test_cached_map_is_stored_and_reused(bundle_dir, monkeypatch):
    calls = []
    real = maps._umap_embed

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(maps, "_umap_embed", counting)
    model = rundir.load_bundle(bundle_dir, resolve_device("auto")).model
    usage = torch.arange(16)
    first = explore.cached_codebook_map(bundle_dir, model, usage, method="umap", seed=0)
    assert len(calls) == 1 and (bundle_dir / "umap.json").is_file()
    assert first == explore.codebook_map(model, usage, method="umap", seed=0)
    assert len(calls) == 2
    again = explore.cached_codebook_map(bundle_dir, model, usage, method="umap", seed=0)
    assert again == first and len(calls) == 2                  # read back, not recomputed
    reloaded = rundir.load_bundle(bundle_dir, resolve_device("auto")).model
    other_usage = explore.cached_codebook_map(bundle_dir, reloaded, torch.zeros(16), method="umap", seed=0)
    assert len(calls) == 2 and all(p["dead"] for p in other_usage)
    assert [(p["x"], p["y"]) for p in other_usage] == [(p["x"], p["y"]) for p in first]
    explore.cached_codebook_map(bundle_dir, model, usage, method="pca")             # PCA cached alongside
    explore.cached_codebook_map(bundle_dir, model, usage, method="umap", seed=1)     # another seed: new map
    assert len(calls) == 3
    with torch.no_grad():
        model.quantizer.codebook[0] += 1.0                     # a changed codebook invalidates the entry
    explore.cached_codebook_map(bundle_dir, model, usage, method="umap", seed=0)
    assert len(calls) == 4
    assert len(json.loads((bundle_dir / "umap.json").read_text())["entries"]) == 4
    (bundle_dir / "umap.json").write_text("{not json")         # a corrupt cache is recomputed, not fatal
    explore.cached_codebook_map(bundle_dir, model, usage, method="umap", seed=0)
    assert len(calls) == 5


# ------------------------------------------------------------------ gallery, patches, nearest
def test_code_gallery_ranks_images_by_count():
    model = make_model("gaussian_1", K=16)
    x = synthetic_images(40, seed=11)
    codes = model.codes(x)
    code = int(torch.bincount(codes.flatten(), minlength=16).argmax())
    gallery = explore.code_gallery(model, x, code, top=5)
    counts = (codes == code).flatten(1).sum(1)
    want = sorted((i for i in range(40) if counts[i] > 0), key=lambda i: (-int(counts[i]), i))[:5]
    assert [g[0] for g in gallery] == want
    assert [g[1] for g in gallery] == [int(counts[i]) for i in want]
    assert all(g[1] == len(g[2]) and all(codes[g[0], r, c] == code for r, c in g[2]) for g in gallery)
    assert [g[1] for g in gallery] == sorted((g[1] for g in gallery), reverse=True)
    assert explore.code_gallery(model, None, code, top=5, codes=codes) == gallery


def test_mean_patch_is_the_mean_decoded_window():
    model = make_model("gaussian_1", K=16, num_rb=1)
    x = synthetic_images(10, seed=12)
    codes = model.codes(x)
    n, r, c = (codes == codes[0, 3, 3]).nonzero()[0].tolist()
    patch = explore.mean_patch(model, int(codes[0, 3, 3]), x, max_positions=1)
    t, b, lft, rgt = explore.cell_pixel_box(model, r, c, clip=False)
    assert patch.shape == (1, b - t, rgt - lft) == (1, 18, 18)       # 8R + 10 pixels, R = 1 block
    rec = F.pad(model.decode_indices(codes[n:n + 1])[0], (20, 20, 20, 20))
    assert torch.allclose(patch, rec[:, t + 20:b + 20, lft + 20:rgt + 20], atol=1e-6)
    assert explore.mean_patch(model, 5).shape == (1, 18, 18)       # no images: grid filled with code 5


def test_nearest_images_finds_an_exact_copy_at_distance_zero():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3000, 1, 28, 28, generator=g)
    idx, dist = explore.nearest_images(images[1234].clone(), images, top=5, chunk_size=700)
    assert idx[0] == 1234 and dist[0] == 0
    brute = (images.flatten(1) - images[1234].flatten()).pow(2).sum(1).sqrt()
    assert torch.equal(idx, torch.sort(brute, stable=True).indices[:5])
    assert torch.allclose(dist, torch.sort(brute).values[:5])
    copies = torch.arange(0, 3000, 150)
    idx, dist = explore.nearest_images(images[copies], images, top=2)
    assert torch.equal(idx[:, 0], copies) and torch.all(dist[:, 0] == 0) and torch.all(dist[:, 1] > 5)
    samples = images[[7, 2999]] + 0.01 * torch.randn(2, 1, 28, 28, generator=g)
    idx, dist = explore.nearest_images(samples, images, top=3)
    assert idx.shape == dist.shape == (2, 3) and idx[:, 0].tolist() == [7, 2999]
    assert torch.all(dist[:, 1:] >= dist[:, :1])
