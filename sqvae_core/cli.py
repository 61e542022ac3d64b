"""Command line: `python -m sqvae_core COMMAND ...` (installed as `sqvae` too).

Every command exits 0 on success; on bad input it prints one line naming the problem on
stderr and exits non-zero (a Python traceback only with --debug).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import MODEL_KINDS

# flag -> (TrainConfig field or "model.<field>", type, help)
TRAIN_FLAGS = {
    "--model": ("model.kind", str, f"model kind: {', '.join(MODEL_KINDS)}"),
    "--dataset": ("dataset", str, "fashion-mnist | mnist | cifar10 | fashion-mnist-cat8 | folder:PATH"),
    "--codebook-size": ("model.codebook_size", int, "K, number of codes"),
    "--code-dim": ("model.code_dim", int, "d, code dimension (also the conv width)"),
    "--num-rb": ("model.num_rb", int, "residual blocks in encoder and decoder"),
    "--image-size": ("model.image_size", int, "image size for folder: datasets (multiple of 4)"),
    "--channels": ("model.image_channels", int, "1 (grey) or 3 (RGB) for folder: datasets"),
    "--steps": ("steps", int, "training steps"),
    "--epochs": ("epochs", float, "training epochs (instead of --steps)"),
    "--batch-size": ("batch_size", int, "batch size per process"),
    "--lr": ("lr", float, "Adam learning rate"),
    "--lr-schedule": ("lr_schedule", str, "constant | cosine"),
    "--seed": ("seed", int, "random seed"),
    "--device": ("device", str, "auto | cpu | cuda | mps"),
    "--preset": ("preset", str, "paper | demo"),
    "--log-every": ("log_every", int, "steps between metrics rows (default 10)"),
    "--val-every": ("val_every", int, "steps between validation passes"),
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
    "--beta": ("model.beta", float, "VQ commitment weight"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sqvae", description="SQ-VAE Explorer: train, evaluate and explore "
                                "stochastically quantized VAEs and their VQ-VAE baselines.")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model and write a run directory")
    t.add_argument("--out", required=True, help="run directory to write")
    for flag, (_, typ, help_) in TRAIN_FLAGS.items():
        t.add_argument(flag, type=typ, default=None, help=help_)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--deterministic", action="store_true", default=None, help="deterministic algorithms")
    t.add_argument("--no-arelbo", action="store_true", default=None, help="learn σ² instead of ARELBO")
    t.add_argument("--no-batch-norm", action="store_true", default=None, help="nets without batch-norm")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    e = sub.add_parser("eval", help="evaluate a run with deterministic quantization")
    e.add_argument("run_dir")
    e.add_argument("--split", default="test", choices=("test", "val", "train"))
    e.add_argument("--json", action="store_true", help="one JSON object on stdout")
    e.add_argument("--weights", default="last", choices=("last", "best"))
    e.add_argument("--max-images", type=int, default=None)
    e.add_argument("--data-dir", default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    ls = sub.add_parser("list", help="list runs and bundles")
    ls.add_argument("dirs", nargs="*", help="directories to scan (default: runs checkpoints)")
    ls.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from . import rundir as rd
    from .train import TrainConfig, apply_preset, train
    explicit_model, explicit = set(), {}
    for flag, (target, _, _) in TRAIN_FLAGS.items():
        v = getattr(args, flag.lstrip("-").replace("-", "_"))
        if v is not None:
            explicit[target] = v
    if args.deterministic:
        explicit["deterministic"] = True
    if args.no_arelbo:
        explicit["model.arelbo"] = False
    if args.no_batch_norm:
        explicit["model.batch_norm"] = False
    out = Path(args.out)
    if args.resume and (out / rd.CONFIG).is_file():
        saved = rd.read_json(out / rd.CONFIG, "config.json")
        cfg = TrainConfig.from_dict({**saved.get("train", {}), "model": saved["model"]})
    else:
        cfg = TrainConfig()
        preset = explicit.get("preset")
        if preset:
            cfg.dataset = explicit.get("dataset", cfg.dataset)
            apply_preset(cfg, preset, {t.split(".")[-1] for t in explicit})
    for target, v in explicit.items():
        if target.startswith("model."):
            explicit_model.add(target)
            setattr(cfg.model, target[6:], v)
        else:
            setattr(cfg, target, v)
    cfg.out = str(out)
    if cfg.model.kind in ("vmf", "nc") and not cfg.dataset.endswith("cat8") and "dataset" not in explicit:
        cfg.dataset = "fashion-mnist-cat8"
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    if result["state"] == "failed":
        print(f"error: training failed: {result['error']}", file=sys.stderr)
        return 1
    if result["state"] == "stopped":
        print(f"stopped at step {result['step']}; continue with: sqvae train --out {out} --resume", file=sys.stderr)
        return 0
    print(f"finished {result['step']} steps -> {out}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from . import rundir as rd
    from .data import load_dataset
    from .device import resolve_device
    from .evaluate import evaluate_model
    device = resolve_device(args.device)
    b = rd.load_bundle(args.run_dir, device, which=args.weights)
    train_cfg = b.config.get("train", {})
    data = load_dataset(b.dataset, args.split, args.data_dir or train_cfg.get("data_dir"),
                        val_size=train_cfg.get("val_size", 5000), image_size=b.model_cfg.image_size,
                        channels=b.model_cfg.image_channels)
    images = data.images[:args.max_images] if args.max_images else data.images
    res = evaluate_model(b.model, images, device=device)
    res.update(split=args.split, run=str(b.path), kind=b.model_cfg.kind, weights=b.weights,
               data_source=data.source)
    if args.json:
        print(json.dumps(res))
    else:
        for key in ("kind", "split", "n_images", "mse", "perplexity", "entropy", "dead_codes", "codebook_size"):
            print(f"{key:>14}: {res[key]}")
    return 0


def cmd_list(args) -> int:
    from . import rundir as rd
    dirs = args.dirs or ["runs", "checkpoints"]
    found = 0
    for d in dirs:
        for run in rd.list_runs(d):
            try:
                cfg, mcfg = rd.read_config(run)
                desc = f"{mcfg.kind:<10} {cfg.get('dataset', '?'):<20} K={mcfg.codebook_size:<5} d={mcfg.code_dim:<4}"
            except rd.BundleError as e:
                desc = f"(unreadable: {e})"
            st = rd.read_status(run)
            vals = [r for r in rd.read_metrics(run) if "val_mse" in r]
            val = f" val_mse={vals[-1]['val_mse']:.2f}" if vals else ""
            print(f"{str(run):<40} {desc} {st.get('state', '?'):<11} step={st.get('step', '?')}{val}")
            found += 1
    if not found:
        print(f"no runs found in {', '.join(dirs)}", file=sys.stderr)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "list": cmd_list}


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
