"""Turn trained runs into the shipped bundles of checkpoints/ and write checkpoints/README.md.

    python scripts/finish_bundles.py runs/ship [--refit-priors] [--prior-steps N] [--n-fd 1000]
    python scripts/finish_bundles.py --refit-shipped [--bf16] [--only KIND ...]
    python scripts/finish_bundles.py --rescore-shipped [--only KIND ...]

--refit-shipped refits the priors of the bundles already in checkpoints/ in place (their runs need
not be on disk: a bundle is a run directory holding the weights it was evaluated with), at the
prior size each one has, and updates the prior-dependent figures of its eval.json.

For each run: fit the PixelCNN prior (discrete models), evaluate on the test split,
compute the Fréchet-distance scores, then copy a compact bundle to checkpoints/<kind>/:
config, metrics history, status, weights, prior, at most 25 codebook snapshots (float16),
the cached UMAP map, 16 test images as PNG (so the app needs no dataset) and eval.json.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sqvae_core import explore  # noqa: E402
from sqvae_core import rundir as rd  # noqa: E402
from sqvae_core.config import MODEL_KINDS  # noqa: E402
from sqvae_core.evaluate import evaluate_model  # noqa: E402
from sqvae_core.imageio import save_png  # noqa: E402
from sqvae_core.train import DEMO, paper_preset, steps_per_epoch  # noqa: E402
from sqvae_core.scores import (GEN_FD_IMAGES, PRIOR_SUMMARY, PRIOR_WEIGHTS, bundle_split, generation_fd,  # noqa: E402
                               load_fd_classifier, prior_summary, score_run, train_run_prior)
from sqvae_core.prior import PriorFitConfig  # noqa: E402

KEEP = [rd.CONFIG, rd.METRICS, rd.STATUS, rd.WEIGHTS, PRIOR_WEIGHTS, PRIOR_SUMMARY]
MAX_SNAPSHOTS = 15


def compact(dest: Path, max_snapshots: int = MAX_SNAPSHOTS) -> None:
    """Keep shipped bundles small: the prior in float16 (load_prior casts back to float32;
    its NLL in eval.json was measured in float32) and at most max_snapshots snapshots."""
    prior = dest / PRIOR_WEIGHTS
    if prior.is_file():
        tensors, meta = rd.load_weights(prior, "prior")
        rd.save_weights(prior, {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, meta)
    snaps = sorted((dest / rd.SNAPSHOTS).glob("step_*.safetensors"))
    stride = max(1, -(-len(snaps) // max_snapshots))
    keep = set(snaps[::-1][::stride])          # always keep the last one
    for p in snaps:
        if p not in keep:
            p.unlink()


def refit_shipped(bundle: Path, fit: PriorFitConfig, max_images: int | None = None,
                  n_gen: int = GEN_FD_IMAGES) -> dict:
    """Fit the bundle's prior again as `fit` says (the default: until its validation NLL plateaus),
    at the size and conditioning of the prior it ships, store it in float16, and rescore generation
    FD and prior NLL in eval.json. Nothing else of the bundle changes."""
    t0 = time.time()
    old = json.loads((bundle / PRIOR_SUMMARY).read_text())["config"]
    kind = json.loads((bundle / rd.EVAL).read_text())["kind"]
    summary = train_run_prior(rd.Weights(bundle), fit, max_images=max_images, hidden=old["hidden"],
                              layers=old["layers"], conditional=old["num_classes"] is not None,
                              log=lambda m: print(f"  {kind}: {m}", flush=True))
    compact(bundle, max_snapshots=10**6)           # the prior in float16; every snapshot stays
    doc = rescore_generation(bundle, n_gen)
    print(f"{bundle.name}: {summary['message']}; test NLL {summary['nll_bits_per_code']:.3f} bits, gen FD "
          f"{fmt(doc.get('fd_generation'))} ({time.time() - t0:.0f} s)", flush=True)
    return doc


GEN_KEYS = ("fd_generation", "fd_generation_rounds", "n_gen_images", "prior_nll_bits")


def rescore_generation(bundle: Path, n_gen: int = GEN_FD_IMAGES) -> dict:
    """Generation FD and prior NLL of a bundle's stored prior, written into its eval.json."""
    doc = json.loads((bundle / rd.EVAL).read_text())
    b = rd.RunDir(bundle).load("last")
    try:
        doc.update(generation_fd(b, load_fd_classifier(b.dataset), n_gen))
    except rd.BundleError as e:        # no feature classifier for this data set: NLL only
        print(f"  {bundle.name}: no Fréchet distances ({e})", flush=True)
    doc["prior_nll_bits"] = prior_summary(b).nll_bits_per_code
    rd.atomic_write_json(bundle / rd.EVAL, doc)
    return doc


def train_command(b: rd.Bundle, run: Path) -> str:
    """The `sqvae train` command that made the run (epochs when it validated once per epoch)."""
    tc, cfg = b.run_config.train, b.model_cfg
    size = f" --image-size {cfg.image_size} --channels {cfg.image_channels}" if b.dataset.startswith("folder:") else ""
    per_epoch = steps_per_epoch(b.run_config.n_train or tc["batch_size"], tc["batch_size"], 1,
                                tc.get("drop_last", True))
    if tc.get("val_per_epoch") and tc["steps"] % per_epoch == 0:
        length = f"--epochs {tc['steps'] // per_epoch}"
    else:
        length = f"--steps {tc['steps']} --val-every {tc['val_every']}"
    preset = (paper_preset(b.dataset, cfg.kind) if tc["preset"] == "paper" else DEMO)["model"]
    for field, flag in (("codebook_size", "--codebook-size"), ("code_dim", "--code-dim"), ("num_rb", "--num-rb")):
        if field in preset and getattr(cfg, field) != preset[field]:      # given on the command line
            size += f" {flag} {getattr(cfg, field)}"
    return (f"python -m sqvae_core train --model {cfg.kind} --dataset {b.dataset}{size} --out {run} "
            f"--preset {tc['preset']} {length} --snapshot-every {tc['snapshot_every']} "
            f"--checkpoint-every {tc['checkpoint_every']} --seed {tc['seed']}")


def kept_by(run: Path) -> str:
    """Which lowest validation figure(s) the run's best.safetensors sits at."""
    return "best validation " + rd.figures_text(rd.Weights(run, "best").kept_by())


def finish(run: Path, dest_root: Path, prior_steps: int | None, n_fd: int, prior_images: int | None,
           which: str = "best", prior_size: dict | None = None, max_snapshots: int = MAX_SNAPSHOTS,
           refit_prior: bool = False, n_gen: int = GEN_FD_IMAGES) -> dict:
    """which="best": the bundle ships the run's best-validation weights (as the official trainer
    tests its best checkpoint), which="last" its last ones. prior_size: the PixelCNN's hidden and
    layers when not train_run_prior's defaults. The prior is fitted when the run has none from
    these weights, or always with refit_prior: until its validation NLL plateaus
    (prior_steps=None), else for prior_steps steps."""
    t0 = time.time()
    b = rd.RunDir(run).load(which)
    kind, step = b.model_cfg.kind, b.weights.step
    fitted = prior_summary(b) if (run / PRIOR_WEIGHTS).is_file() else None
    if b.model.discrete and (refit_prior or not (fitted and b.weights.made(fitted))):
        train_run_prior(b.weights, PriorFitConfig(steps=prior_steps), max_images=prior_images,
                        **(prior_size or {}),
                        log=lambda m: print(f"  {kind}: {m}", flush=True))
    test_x, test_y, data = bundle_split(b, "test")
    ev = evaluate_model(b.model, test_x)
    try:
        scores = score_run(b, n=n_fd, n_gen=n_gen)
    except rd.BundleError as e:        # no feature classifier for this data set: no FD columns
        print(f"  {run.name}: no Fréchet distances ({e})", flush=True)
        summary = prior_summary(b)
        scores = {"prior_nll_bits": summary and summary.nll_bits_per_code}
    status = rd.RunDir(run).status
    doc = {"kind": kind, "dataset": b.dataset, "steps": status.step, "train_seconds": status.elapsed,
           "weights": kept_by(run) if b.weights.is_best_file else "last", "weights_step": step,
           "test_mse": ev["mse"], "test_perplexity": ev["perplexity"], "test_entropy": ev["entropy"],
           "dead_codes": ev["dead_codes"], "codebook_size": ev["codebook_size"], "n_test": ev["n_images"],
           "usage": ev["usage"],      # per-code counts: the app's first paint colours the codebook map with them
           **{k: v for k, v in scores.items() if k != "mse"},
           "command": train_command(b, run)}
    dest = dest_root / run.name        # runs/ship/<kind> -> checkpoints/<kind>
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in KEEP:
        if (run / name).is_file() and name != rd.WEIGHTS:
            shutil.copy2(run / name, dest / name)
    tensors, meta = rd.load_weights(b.weights.path)      # the evaluated weights, as the bundle's model
    rd.save_weights(dest / rd.WEIGHTS, tensors, {**rd.load_weights(run / rd.WEIGHTS)[1], **meta})
    if (run / rd.SNAPSHOTS).is_dir():
        shutil.copytree(run / rd.SNAPSHOTS, dest / rd.SNAPSHOTS)
    compact(dest, max_snapshots)
    (dest / rd.SAMPLES).mkdir()
    for i in range(16):
        save_png(test_x[i:i + 1], dest / rd.SAMPLES / f"test_{i:02d}.png")
    if b.model.discrete:
        usage = explore.code_usage(b.model, test_x[:2000])
        explore.cached_codebook_map(dest, b.model, usage, method="umap", seed=0)
        explore.cached_codebook_map(dest, b.model, usage, method="pca", seed=0)
    rd.atomic_write_json(dest / rd.EVAL, doc)
    rd.atomic_write_json(run / rd.EVAL, doc)     # and beside the run: paper_table.py --root reuses it
    print(f"{kind}: done in {time.time() - t0:.0f}s: " + json.dumps({k: doc[k] for k in ("test_mse", "test_perplexity", "dead_codes")}), flush=True)
    return doc


def fmt(v, nd=2):
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def write_readme(docs: list[dict], dest_root: Path, clf_info: dict | None):
    lines = ["# Shipped checkpoints", "",
             "Bundles trained on this project's 2-core CPU machine and loaded by the app by default. Each folder",
             "is a run directory (../docs/interface.md): config, metrics history, status, weights, the PixelCNN",
             "prior, float16 codebook snapshots, the cached codebook map, 16 test images and `eval.json`.", "",
             "The Fashion-MNIST and fashion-mnist-cat8 bundles are the official SQ-VAE setup (`--preset paper`,",
             "its nets, K=256, d=64, batch 32, Adam 1e-3 with the plateau rule) trained for 11 epochs (17,193",
             "steps, seed 0). Every bundle's PixelCNN prior is fitted on all of its training code grids until the",
             "validation NLL plateaus with its weights averaged (EMA 0.999), keeping the best-validation average,",
             "under bf16 autocast (`--refit-shipped --bf16`, 2026-12-06); each bundle's prior.json says where and",
             "why its fit stopped.",
             "Each bundle holds the run's best-validation weights (`weights step`: the step they are from), as the",
             "official code tests its best checkpoint; all figures are for those weights. `kept at lowest val.`",
             "says which validation figure is lowest at that step: the paper preset keeps best weights at the",
             "lowest validation loss, as the official trainer does (`--best-by loss`); runs from before that",
             "option kept them at the lowest validation MSE, and the column says where the loss is lowest too.", "",
             "Test split of the dataset (its size in the `test images` column); deterministic quantization. MSE is",
             "the per-image sum of squared error (pixels in [0, 1], every channel); for vmf/nc it is on grey levels",
             "c/7 of the most probable class. FD columns are Fréchet distances on the feature classifier (lower is",
             "better) against 1,000 test images (Fashion-MNIST only: – elsewhere), except gen FD: 10,000 prior samples,",
             "each drawn with a test image's class, against those 10,000 test images, the mean of two sampling rounds",
             "(../docs/interface.md). Gen FD is one prior fit's: three averaged fits on one autoencoder differ",
             "by 4.3% (`gaussian_1`) and 2.3% (`vq_ema`) SD over mean, and two autoencoders of one model by",
             "6.5–7.5% (../benchmarks/RESULTS.md), so gaps under about 10% do not rank models.",
             "Prior NLL is in bits per code on the test code grids (priors stored in float16).",
             "The colour bundle's data is not shipped but rebuilt from the ten colour photographs inside the",
             "scikit-image and scikit-learn wheels: `python scripts/make_colour_photos.py runs/rgb/colour-photos",
             "--size 32` (needs scikit-image, in requirements-dev.txt) writes the same 8,906 patches of 32×32,",
             "7,124 train, 891 val and 891 test, with val and test cut from held-out regions of each photo (fixed",
             "seed); then its train command below (the paper preset with CIFAR-10's 2 residual blocks at 32×32,",
             "stopped after 41 epochs where validation MSE had flattened) and `python scripts/finish_bundles.py",
             "runs/rgb --prior-hidden 32 --max-snapshots 10` (a narrower prior and fewer",
             "snapshots keep checkpoints/ within its 40 MB). The bundle carries 16 of its test images in samples/",
             "so that the app needs none of them.",
             "Train times are wall-clock on a machine shared with other jobs. What these figures say about",
             "the paper's claims is discussed in ../benchmarks/RESULTS.md.", "",
             "| bundle | model | data | test images | steps | weights step | kept at lowest val. | train time (s) | test MSE | perplexity | dead codes | rFD | gen FD | prior NLL (bits) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in docs:
        lines.append(f"| `{d['bundle']}` | `{d['kind']}` | {d['dataset']} | {d['n_test']} | {d['steps']} | "
                     f"{d.get('weights_step') or d['steps']} | {(d.get('weights') or 'last').replace('best validation ', '')} | "
                     f"{fmt(d['train_seconds'], 0)} | {fmt(d['test_mse'])} | "
                     f"{fmt(d['test_perplexity'], 1)} | {fmt(d['dead_codes'])} | {fmt(d.get('rfd'), 3)} | "
                     f"{fmt(d.get('fd_generation'), 3)} | {fmt(d.get('prior_nll_bits'), 3)} |")
    lines += ["", "Commands (each also in the bundle's `eval.json`):", "", "```bash"]
    lines += [d["command"] for d in docs]
    lines += ["python scripts/finish_bundles.py runs/ship --refit-priors   # prior, scores, compact copy into checkpoints/",
              "python scripts/finish_bundles.py --refit-shipped --bf16   # or: refit the priors of the bundles in place",
              "```", ""]
    if clf_info:
        lines += ["## Feature classifier for Fréchet distances", "",
                  f"`fd_classifier/{clf_info['dataset']}.safetensors`: test accuracy "
                  f"{clf_info['test_accuracy']:.4f} on {clf_info['n_test']} test images after {clf_info['epochs']} epochs "
                  f"({clf_info['seconds']:.0f} s). Made with `{clf_info['command']}`.", ""]
    (dest_root / "README.md").write_text("\n".join(lines))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="?", default="runs/ship")
    p.add_argument("--dest", default=str(ROOT / "checkpoints"))
    p.add_argument("--prior-steps", type=int, default=None,
                   help="fit priors for exactly N steps (default: until the validation NLL plateaus)")
    p.add_argument("--refit-priors", action="store_true",
                   help="fit every prior again, even one already fitted on the shipped weights")
    p.add_argument("--n-fd", type=int, default=1000)
    p.add_argument("--weights", choices=("best", "last"), default="best",
                   help="ship each run's best-validation weights (default, as the official code tests) or its last")
    p.add_argument("--prior-images", type=int, default=None,
                   help="fit the prior on the code grids of at most this many training images (default: all)")
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--prior-hidden", type=int, default=None, help="PixelCNN channels (default: train_run_prior's, 64)")
    p.add_argument("--prior-layers", type=int, default=None, help="PixelCNN gated layers (default: train_run_prior's, 8)")
    p.add_argument("--max-snapshots", type=int, default=MAX_SNAPSHOTS,
                   help=f"codebook snapshots kept per bundle (default {MAX_SNAPSHOTS})")
    p.add_argument("--compact-only", action="store_true", help="only shrink the bundles already in --dest")
    p.add_argument("--refit-shipped", action="store_true",
                   help="refit the priors of the bundles in --dest in place, until the validation NLL plateaus")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="with --refit-shipped: bf16 autocast (default: where bf16 is native)")
    p.add_argument("--rescore-shipped", action="store_true",
                   help="only recompute the generation FD and prior NLL of the bundles in --dest (their priors as they are)")
    args = p.parse_args()
    if args.compact_only:
        for d in rd.list_runs(args.dest):
            compact(d)
        return
    torch.set_num_threads(1)
    dest = Path(args.dest)
    in_place = args.refit_shipped or args.rescore_shipped
    for run in rd.list_runs(args.runs) if not in_place else []:
        if args.only and run.name not in args.only:
            continue
        if rd.RunDir(run).status.state != "finished":
            print(f"skip {run}: not finished", flush=True)
            continue
        size = {k: v for k, v in (("hidden", args.prior_hidden), ("layers", args.prior_layers)) if v is not None}
        finish(run, dest, args.prior_steps, args.n_fd, args.prior_images, args.weights, size, args.max_snapshots,
               args.refit_priors)
    for bundle in rd.list_runs(dest) if in_place else []:
        if (bundle / PRIOR_SUMMARY).is_file() and (not args.only or bundle.name in args.only):
            if args.refit_shipped:
                refit_shipped(bundle, PriorFitConfig(bf16=args.bf16))
            else:
                doc = rescore_generation(bundle)
                print(f"{bundle.name}: gen FD {fmt(doc.get('fd_generation'))}", flush=True)
    docs = [{"bundle": d.name, **json.loads((d / rd.EVAL).read_text())}
            for d in sorted(dest.iterdir()) if (d / rd.EVAL).is_file()]
    order = list(MODEL_KINDS)           # the catalogue's order
    docs.sort(key=lambda d: order.index(d["kind"]) if d["kind"] in order else 99)
    clf = dest / "fd_classifier" / "fashion-mnist.json"
    write_readme(docs, dest, json.loads(clf.read_text()) if clf.is_file() else None)


if __name__ == "__main__":
    main()
