"""Command line: `python -m sqvae_core COMMAND ...` (installed as `sqvae` too).

Every command exits 0 on success; on bad input it prints one line naming the problem on
stderr and exits non-zero (a Python traceback only with --debug).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import CATEGORICAL_KINDS
from .kinds import DATASETS, FAMILIES, PRESETS, kinds_of

KINDS_HELP = "; ".join(f"{label}: {', '.join(kinds_of(fam))}" for fam, label in FAMILIES.items())

# flag -> (TrainConfig field or "model.<field>", type, help)
TRAIN_FLAGS = {
    "--model": ("model.kind", str, f"model kind. {KINDS_HELP}"),
    "--dataset": ("dataset", str, f"{' | '.join(DATASETS)} | folder:PATH"),
    "--codebook-size": ("model.codebook_size", int, "K, number of codes (fsq: a product of FSQ levels, "
                        "lfq: a power of two)"),
    "--code-dim": ("model.code_dim", int, "d, code dimension (also the conv width)"),
    "--num-rb": ("model.num_rb", int, "residual blocks in encoder and decoder"),
    "--image-size": ("model.image_size", int, "image size for folder: datasets (multiple of 4)"),
    "--channels": ("model.image_channels", int, "1 (grey) or 3 (RGB) for folder: datasets"),
    "--center-crop": ("center_crop", int, "folder: datasets: crop the centre N x N pixels, then resize to "
                      "--image-size (official CelebA: 140 on 178x218 images; default: shorter side resized)"),
    "--steps": ("steps", int, "training steps"),
    "--epochs": ("epochs", float, "training epochs (instead of --steps)"),
    "--batch-size": ("batch_size", int, "batch size per process"),
    "--lr": ("lr", float, "Adam learning rate"),
    "--lr-schedule": ("lr_schedule", str, "constant | cosine | plateau (halve after 3 validations without gain)"),
    "--seed": ("seed", int, "random seed"),
    "--device": ("device", str, "auto | cpu | cuda | mps"),
    "--preset": ("preset", str, f"{' | '.join(PRESETS)}: paper (the official SQ-VAE setup for the dataset) | "
                 "demo (~2 min on a CPU)"),
    "--net": ("model.net", str, "official (the official SQ-VAE nets, default) | legacy (bundles made before)"),
    "--log-every": ("log_every", int, "steps between metrics rows (default 10)"),
    "--val-every": ("val_every", int, "steps between validation passes"),
    "--best-by": ("best_by", str, "mse | loss: the validation figure whose lowest value picks best.safetensors "
                  "(paper preset: loss, as the official trainer)"),
    "--snapshot-every": ("snapshot_every", int, "steps between codebook/usage snapshots"),
    "--checkpoint-every": ("checkpoint_every", int, "steps between checkpoints"),
    "--val-max-images": ("val_max_images", int, "cap on validation images (default: whole split)"),
    "--data-dir": ("data_dir", str, "where the dataset files are (else $SQVAE_DATA, system, cache)"),
    "--temperature-init": ("temperature_init", float, "Gumbel-softmax τ0 (paper 1.0)"),
    "--temperature-decay": ("temperature_decay", float, "τ decay per step (paper 1e-5)"),
    "--temperature-min": ("temperature_min", float, "τ floor (paper 0)"),
    "--grad-clip": ("grad_clip", float, "clip the gradient norm to this value"),
    "--var-q-init": ("model.var_q_init", float, "initial σ²_φ (Gaussian SQ; fixed value for fixed_var)"),
    "--var-q-floor": ("model.var_q_floor", float, "σ²_φ floor (official variant I code: 1.0)"),
    "--kappa-q-init": ("model.kappa_q_init", float, "initial κ_φ (vmf, nc)"),
    "--kappa-q-floor": ("model.kappa_q_floor", float, "κ_φ floor (official: 1.0)"),
    "--beta": ("model.beta", float, "VQ commitment weight (also lfq's, vq_rotation's)"),
}


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """The flags that make a TrainConfig (train_config): `sqvae train`'s and every sweep trial's."""
    for flag, (_, typ, help_) in TRAIN_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic algorithms")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (~20 s of compiling first). Default: on for runs "
                        "of 5,000+ steps where the device can compile (CPU: g++), off otherwise")
    p.add_argument("--amp", action="store_true", default=None,
                   help="bf16 autocast of the convolutions (quantizer and loss stay fp32): faster on GPUs and on "
                        "CPUs with native bf16 (AVX512-BF16, AMX); elsewhere the run says so and trains in fp32; "
                        "changes the numerics, off in every preset")
    p.add_argument("--no-arelbo", action="store_true", default=None, help="learn σ² instead of ARELBO")
    p.add_argument("--no-batch-norm", action="store_true", default=None, help="nets without batch-norm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sqvae", description="SQ-VAE Explorer: train, evaluate and explore "
                                "stochastically quantized VAEs and their VQ-VAE baselines.")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and write a run directory")
    t.add_argument("--out", required=True, help="run directory to write")
    add_train_flags(t)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    sw = sub.add_parser("sweep", help="hyperparameter sweep on Ray Tune (local or a cluster); trials are runs",
                        description="Train one run per trial on Ray Tune and write DIR/<trial>/ run directories "
                                    "and DIR/sweep.json. Every train flag not in a --grid is shared by all trials.")
    sw.add_argument("--out", required=True, metavar="DIR", help="sweep directory (shared by every node and the app)")
    sw.add_argument("--grid", action="append", default=[], metavar="FLAG=V1,V2",
                    help="a train flag without its dashes and its values, e.g. lr=0.001,0.002 (repeatable)")
    sw.add_argument("--samples", type=int, default=1,
                    help="grid: repeats of every grid point; random/optuna: number of trials")
    sw.add_argument("--search", default="grid", help="grid | random | optuna (TPE; needs `pip install optuna`)")
    sw.add_argument("--scheduler", default="fifo", help="fifo (every trial to its end) | asha (early stopping)")
    sw.add_argument("--metric", default="val_mse", help="validation figure for asha/optuna (default val_mse)")
    sw.add_argument("--mode", default="min", help="min | max")
    sw.add_argument("--grace", type=int, default=1,
                    help="asha: validation passes every trial gets before it can be stopped")
    sw.add_argument("--address", default=None,
                    help="Ray cluster to join (auto = the running one, also via $RAY_ADDRESS); default: a local Ray")
    sw.add_argument("--cpus-per-trial", type=float, default=1.0)
    sw.add_argument("--gpus-per-trial", type=float, default=0.0)
    sw.add_argument("--max-failures", type=int, default=2, help="retries of a trial whose worker or node dies")
    sw.add_argument("--max-concurrent", type=int, default=None, help="cap on trials running at once")
    add_train_flags(sw)
    sw.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    e = sub.add_parser("eval", help="evaluate a run with deterministic quantization")
    e.add_argument("run_dir")
    e.add_argument("--split", default="test", choices=("test", "val", "train"))
    e.add_argument("--json", action="store_true", help="one JSON object on stdout")
    e.add_argument("--weights", default="last", choices=("last", "best"))
    e.add_argument("--max-images", type=int, default=None)
    e.add_argument("--data-dir", default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    e.add_argument("--scores", action="store_true",
                   help="add the paper's Table 2 scores: rFD, generation/Neighbor-k/interpolation FD, prior NLL")
    e.add_argument("--n-fd", type=int, default=1000, help="test images per Fréchet distance (rFD, Neighbor-k, "
                   "interpolation)")
    e.add_argument("--n-gen", type=int, default=10_000, help="prior samples (and test images) of the generation FD, "
                   "drawn twice with the test images' classes")

    pr = sub.add_parser("prior", help="PixelCNN prior over a run's code grids")
    psub = pr.add_subparsers(dest="prior_command", required=True)
    pt = psub.add_parser("train", help="fit the prior to the run's training code grids")
    pt.add_argument("run_dir")
    pt.add_argument("--steps", type=int, default=None,
                    help="train exactly N steps and keep the last weights (default: stop on a validation plateau)")
    pt.add_argument("--max-steps", type=int, default=20000, help="hard cap of a plateau fit")
    pt.add_argument("--patience", type=int, default=4,
                    help="stop after this many evaluations without a 0.2%% relative improvement")
    pt.add_argument("--eval-every", type=int, default=250, help="steps between validation-NLL evaluations")
    pt.add_argument("--lr", type=float, default=1e-3)
    pt.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the step (default: when the step budget is >= 1,000 and the device can)")
    pt.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default: where bf16 is native, AVX512-BF16/AMX or a bf16 GPU; "
                         "--bf16 elsewhere says so and fits in fp32)")
    pt.add_argument("--ema", type=float, default=None,
                    help="decay of the moving average of the weights that is validated and kept "
                         "(default 0.999; 0: off, the raw weights)")
    pt.add_argument("--batch-size", type=int, default=64)
    pt.add_argument("--hidden", type=int, default=64)
    pt.add_argument("--layers", type=int, default=8)
    pt.add_argument("--unconditional", action="store_true", help="ignore class labels")
    pt.add_argument("--max-images", type=int, default=None, help="cap on training images to encode")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--data-dir", default=None)
    pt.add_argument("--device", default="auto")
    pt.add_argument("--json", action="store_true")
    ps = psub.add_parser("sample", help="decode samples of the prior to a PNG grid")
    ps.add_argument("run_dir")
    ps.add_argument("--n", type=int, default=64)
    ps.add_argument("--out", required=True, help="PNG file to write")
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--temperature", type=float, default=1.0)
    ps.add_argument("--label", type=int, default=None, help="class to condition on (conditional priors; without it each image draws a class uniformly)")
    ps.add_argument("--json", action="store_true")
    ps.add_argument("--device", default="auto")
    for q in (pr, pt, ps):
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    ex = sub.add_parser("explore", help="scripted figures: codebook map, Neighbor-k, interpolation")
    ex.add_argument("run_dir")
    ex.add_argument("--umap", action="store_true", help="codebook map (with --json: one object per code)")
    ex.add_argument("--pca", action="store_true", help="with --umap: the instant PCA map instead")
    ex.add_argument("--json", action="store_true")
    ex.add_argument("--image-index", type=int, default=None, help="test-split image for --neighbor")
    ex.add_argument("--neighbor", type=int, default=None, help="Neighbor-k edit (1 = the reconstruction)")
    ex.add_argument("--interpolate", type=int, nargs=2, metavar=("I", "J"), default=None)
    ex.add_argument("--steps", type=int, default=8)
    ex.add_argument("--out", default=None, help="PNG file to write")
    ex.add_argument("--max-images", type=int, default=2000, help="test images used for code usage")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--data-dir", default=None)
    ex.add_argument("--device", default="auto")
    ex.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    io_ = sub.add_parser("import-official", help="turn a checkpoint of the official SQ-VAE trainer into a bundle")
    io_.add_argument("checkpoint", metavar="CKPT", help="the official trainer's best.pt / current.pt")
    io_.add_argument("--config", required=True, metavar="YAML",
                     help="the official YAML of the run (or the configs.json the trainer wrote beside CKPT)")
    io_.add_argument("--out", required=True, metavar="RUN_DIR", help="bundle directory to write (new or empty)")
    io_.add_argument("--dataset", default=None, metavar="NAME",
                     help="dataset to evaluate on (default from the YAML; CelebA, CelebAMask_HQ: folder:PATH)")
    io_.add_argument("--center-crop", type=int, default=None, metavar="N",
                     help="folder: datasets: crop the centre N x N pixels before the resize (official CelebA: 140)")
    io_.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    ls = sub.add_parser("list", help="list runs and bundles")
    ls.add_argument("dirs", nargs="*", help="directories to scan (default: $SQVAE_RUNS, else runs, and "
                    "$SQVAE_CHECKPOINTS, else checkpoints)")
    ls.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------- commands
SWITCH_FLAGS = {   # argparse dest -> (TrainConfig field or "model.<field>", value when given)
    "deterministic": ("deterministic", True),
    "amp": ("amp", True),
    "no_arelbo": ("model.arelbo", False),
    "no_batch_norm": ("model.batch_norm", False),
}


def flag_dest(flag: str) -> str:
    """"--codebook-size" -> "codebook_size" (argparse's attribute name)."""
    return flag.lstrip("-").replace("-", "_")


def train_config(flags: dict, out: str | Path, resume: bool = False):
    """The TrainConfig of `sqvae train` for its flags, shared by `sqvae sweep`'s trials.

    flags: argparse dests of TRAIN_FLAGS and SWITCH_FLAGS plus "compile" -> value; None (or
    absent) = not given. Defaults, then the preset for the dataset and kind, then the explicit
    flags on top (they win over a preset). With resume and a config.json in `out`, the run's
    saved config replaces defaults and preset."""
    from . import rundir as rd
    from .train import TrainConfig, apply_preset
    explicit = {}
    for flag, (target, _, _) in TRAIN_FLAGS.items():
        v = flags.get(flag_dest(flag))
        if v is not None:
            explicit[target] = v
    for dest, (target, value) in SWITCH_FLAGS.items():
        if flags.get(dest):
            explicit[target] = value
    if flags.get("compile") is not None:
        explicit["compile"] = flags["compile"]
    out = Path(out)
    saved = rd.RunDir(out).config if (out / rd.CONFIG).is_file() else None
    if saved is not None and saved.logged:
        raise ValueError(f"{out} holds a logged run (RunLogger), which sqvae train can neither resume nor "
                         f"replace; choose another --out")
    if resume and saved is not None:
        cfg = TrainConfig.from_dict({**saved.train, "model": dict(saved.raw["model"])})
    else:
        cfg = TrainConfig()
        cfg.model.kind = explicit.get("model.kind", cfg.model.kind)
        cfg.dataset = explicit.get("dataset", cfg.dataset)
        if cfg.model.kind in CATEGORICAL_KINDS and "dataset" not in explicit:
            cfg.dataset = "fashion-mnist-cat8"   # categorical models need categorical data
        preset = explicit.get("preset")
        if cfg.dataset.startswith("folder:"):
            _folder_shape(cfg, explicit, preset)
        if preset:
            apply_preset(cfg, preset, {t.split(".")[-1] for t in explicit})
    for target, v in explicit.items():
        if target.startswith("model."):
            setattr(cfg.model, target[6:], v)
        else:
            setattr(cfg, target, v)
    cfg.out = str(out)
    return cfg


def cmd_train(args) -> int:
    from .data import one_scan
    from .train import train
    out = Path(args.out)
    with one_scan():   # a folder's files are listed and stat'ed once: for its shape and both splits
        cfg = train_config(vars(args), out, resume=args.resume)
        result = train(cfg, resume=args.resume, progress=not args.quiet)
    if result["state"] == "failed":
        print(f"error: training failed: {result['error']}", file=sys.stderr)
        return 1
    if result["state"] == "stopped":
        print(f"stopped at step {result['step']}; continue with: sqvae train --out {out} --resume", file=sys.stderr)
        return 0
    print(f"finished {result['step']} steps -> {out}", file=sys.stderr)
    return 0


def _folder_shape(cfg, explicit: dict, preset: str | None) -> None:
    """A folder's channels and size, where neither a flag nor the preset sets them, are read from
    its images (data.folder_shape): 1 channel when every image is grey (always, for the categorical
    kinds), the images' side when all are S x S with S in 28/32/64, else RGB 32x32. Says so in one line."""
    from .data import folder_shape
    by_preset = {"image_channels", "image_size"} if preset == "paper" else set()   # the paper's 64x64 RGB
    need = [f for f in ("image_channels", "image_size") if f"model.{f}" not in explicit and f not in by_preset]
    if not need:
        return
    shape = folder_shape(cfg.dataset)
    chosen = {"image_channels": 1 if cfg.model.kind in CATEGORICAL_KINDS else shape.channels,
              "image_size": shape.size or 32}
    flags = {"image_channels": "--channels", "image_size": "--image-size"}
    for f in need:
        setattr(cfg.model, f, chosen[f])
    why = shape.describe() + ("" if shape.size or "image_size" not in need else ", so resized to 32")
    print(f"{cfg.dataset}: {why}: training at {' '.join(f'{flags[f]} {chosen[f]}' for f in need)} "
          f"(read from the images; give {' or '.join(flags[f] for f in need)} to choose)", file=sys.stderr)


def cmd_eval(args) -> int:
    from . import rundir as rd
    from .device import resolve_device
    from .evaluate import evaluate_model
    from .scores import bundle_split
    device = resolve_device(args.device)
    b = rd.load_bundle(args.run_dir, device, which=args.weights)
    images, _, data = bundle_split(b, args.split, args.data_dir, args.max_images)
    res = evaluate_model(b.model, images, device=device)
    res.update(split=args.split, run=str(b.path), kind=b.model_cfg.kind, weights=b.weights.path.name,
               data_source=data.source)
    if args.scores:
        from .scores import score_run
        res.update(score_run(b, n=args.n_fd, n_gen=args.n_gen, data_dir=args.data_dir))
    if args.json:
        print(json.dumps(res))
    else:
        for key in ("kind", "split", "n_images", "mse", "perplexity", "entropy", "dead_codes", "codebook_size"):
            print(f"{key:>14}: {res[key]}")
    return 0


def cmd_list(args) -> int:
    from . import rundir as rd
    dirs = args.dirs or rd.default_run_dirs()
    found = 0
    for d in dirs:
        for run in map(rd.RunDir, rd.list_runs(d)):
            try:
                cfg = run.config
                if cfg.logged:      # RunLogger: no model, sizes under "logged"
                    desc = (f"{'logged':<10} {cfg.dataset or '?':<20} K={str(cfg.codebook_size or '?'):<5} "
                            f"d={str(cfg.code_dim or '?'):<4}")
                else:
                    mcfg = cfg.model_config(run.path)
                    desc = f"{mcfg.kind:<10} {cfg.dataset or '?':<20} K={mcfg.codebook_size:<5} d={mcfg.code_dim:<4}"
            except rd.BundleError as e:
                desc = f"(unreadable: {e})"
            st = run.status
            vals = [r for r in run.metrics.rows if "val_mse" in r]
            val = f" val_mse={vals[-1]['val_mse']:.2f}" if vals else ""
            step = "?" if st.state == "unknown" else st.step
            print(f"{str(run.path):<40} {desc} {st.state:<11} step={step}{val}")
            found += 1
    if not found:
        print(f"no runs found in {', '.join(dirs)}", file=sys.stderr)
    return 0


def cmd_prior(args) -> int:
    from . import rundir as rd
    from .device import resolve_device
    from .imageio import save_png
    from .prior import PriorFitConfig
    from .scores import load_run_prior, prior_summary, sample_images, train_run_prior
    device = resolve_device(args.device)
    if args.prior_command == "train":
        log = None if args.json else (lambda msg: print(msg, file=sys.stderr))
        fit = PriorFitConfig(steps=args.steps, max_steps=args.max_steps, patience=args.patience,
                             eval_every=args.eval_every, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                             compile=args.compile, bf16=args.bf16,
                             **({} if args.ema is None else {"ema": args.ema})).validate()
        summary = train_run_prior(args.run_dir, fit, hidden=args.hidden, layers=args.layers,
                                  conditional=not args.unconditional, max_images=args.max_images,
                                  data_dir=args.data_dir, device=device, log=log)
        brief = {k: v for k, v in summary.items() if k != "history"}
        if args.json:
            print(json.dumps(brief))
        else:
            print(summary["message"])
            print(f"prior NLL {brief['nll_bits_per_code']:.3f} bits/code on the test codes "
                  f"(unigram {brief['unigram_bits']:.3f}, uniform log2 K = {brief['uniform_bits']:.3f})")
        return 0
    b = rd.load_bundle(args.run_dir, device)
    if not b.model.discrete:
        raise ValueError("the continuous VAE has no code grids to model with a prior")
    prior = load_run_prior(b)
    images, _ = sample_images(b, prior, args.n, temperature=args.temperature, label=args.label, seed=args.seed)
    save_png(images, args.out, nrow=min(8, args.n))
    if args.json:
        summary = prior_summary(b)
        print(json.dumps({"out": str(args.out), "n": args.n, "seed": args.seed, "temperature": args.temperature,
                          "label": args.label, **{k: getattr(summary, k, None) for k in
                          ("nll_bits_per_code", "unigram_bits", "uniform_bits", "conditional")}}))
    return 0


def cmd_explore(args) -> int:
    import torch

    from . import explore
    from . import rundir as rd
    from .data import DatasetNotFoundError
    from .device import resolve_device
    from .imageio import save_png
    from .scores import bundle_split, stored_usage
    device = resolve_device(args.device)
    b = rd.load_bundle(args.run_dir, device)
    actions = [args.umap, args.neighbor is not None, args.interpolate is not None]
    if sum(actions) != 1:
        raise ValueError("choose exactly one of --umap, --neighbor K (with --image-index I), --interpolate I J")
    if args.umap:
        try:
            images, _, _ = bundle_split(b, "test", args.data_dir, args.max_images)
            usage = explore.code_usage(b.model, images)
        except DatasetNotFoundError:      # a bundle without its data: the usage it stores
            stored = stored_usage(b)
            if stored is None:
                raise
            usage, where = stored
            hint = b.run_config.data_rebuild
            print(f"{b.dataset}: not found; code usage from {where}"
                  + (f"; rebuild the data with `{hint}`" if hint else ""), file=sys.stderr)
        points = explore.cached_codebook_map(b.path, b.model, usage, method="pca" if args.pca else "umap",
                                             seed=args.seed)
        if args.json:
            print(json.dumps(points))
        else:
            for p in points:
                print(f"code {p['code']:>5}  x={p['x']:+.3f} y={p['y']:+.3f}  usage={p['usage']}"
                      f"{'  dead' if p['dead'] else ''}")
        return 0
    if not args.out:
        raise ValueError("--out FILE.png is required for --neighbor and --interpolate")
    images, _, _ = bundle_split(b, "test", args.data_dir)

    def pick(i):
        if not 0 <= i < len(images):
            raise ValueError(f"image index {i} is out of range for the test split ({len(images)} images)")
        return images[i:i + 1].to(device)

    if args.neighbor is not None:
        if args.image_index is None:
            raise ValueError("--neighbor needs --image-index I")
        x = pick(args.image_index)
        edited, _ = explore.neighbour_edit(b.model, x, args.neighbor)
        save_png(torch.cat([x.cpu(), b.model.reconstruct(x).cpu(), edited.cpu()]), args.out, nrow=3, scale=4)
    else:
        path = explore.interpolate(b.model, pick(args.interpolate[0]), pick(args.interpolate[1]), args.steps)
        save_png(torch.cat([path["latent"], path["pixel"]]), args.out, nrow=args.steps, scale=3)
    if args.json:
        print(json.dumps({"out": str(args.out)}))
    return 0


def cmd_import_official(args) -> int:
    from . import rundir as rd
    from .official import import_official
    out = import_official(args.checkpoint, args.config, args.out, dataset=args.dataset, center_crop=args.center_crop)
    cfg = rd.RunDir(out).config
    print(f"imported {cfg.kind} ({cfg.raw['official']['dataset']}, K={cfg.codebook_size}, d={cfg.code_dim}) "
          f"-> {out} (dataset {cfg.dataset})", file=sys.stderr)
    return 0


def cmd_sweep(args) -> int:
    from .sweep import SweepSpec, run_sweep
    spec = SweepSpec.from_args(args).validate()     # a bad grid: one line, before Ray starts
    summary = run_sweep(spec, address=args.address, log=lambda msg: print(msg, file=sys.stderr))
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items() if n)
    hint = "; run the same command again to continue it" if summary["state"] == "interrupted" else ""
    print(f"sweep {summary['state']}: {counts} -> {spec.out}/sweep.json{hint}", file=sys.stderr)
    return 130 if summary["state"] == "interrupted" else (1 if summary["counts"].get("failed") else 0)


COMMANDS = {"train": cmd_train, "sweep": cmd_sweep, "eval": cmd_eval, "list": cmd_list, "prior": cmd_prior, "explore": cmd_explore,
            "import-official": cmd_import_official}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --debug
        if args.debug:
            raise
        msg = " ".join(line.strip() for line in str(e).strip().splitlines()) or e.__class__.__name__
        if isinstance(e, (ValueError, FileNotFoundError, OSError, KeyError)):
            print(f"error: {msg}", file=sys.stderr)
        else:
            print(f"error: {e.__class__.__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
