"""Retrain the SQ-VAE vs VQ-VAE comparison at a fixed budget and print the paper's Table 2.

    python benchmarks/paper_table.py --quick            # < 20 min on a 2-core CPU
    python benchmarks/paper_table.py --budget paper10   # --preset paper, 11 epochs (17,193 steps); seeds
                                                        # 0-1 for gaussian_1, vq, vq_ema, fsq, simvq, seed 0
                                                        # for the rest
    python benchmarks/paper_table.py --budget paper10 --kinds fsq simvq   # only these kinds
    python benchmarks/paper_table.py                    # paper-size models, longer budget (GPU)
    python benchmarks/paper_table.py --budget paper10 --root runs/paper10   # keep the runs; rerunning
                                                        # reuses every finished run and fitted prior

Every model gets the same steps, batch, learning rate and seeds. Columns: test MSE, rFD,
generation FD (PixelCNN prior samples), Neighbor-3/5/10 FD, interpolation FD, perplexity and
dead codes, mean ± std over seeds; then the vMF-vs-NC table: κ_φ growth relative to its
initial value and the final quantization entropy. FDs use the shipped feature classifier
(checkpoints/fd_classifier). Prints Markdown; nothing is tuned to make a claim hold.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sqvae_core import rundir as rd  # noqa: E402
from sqvae_core.config import ModelConfig  # noqa: E402
from sqvae_core.device import resolve_device  # noqa: E402
from sqvae_core.evaluate import evaluate_model  # noqa: E402
from sqvae_core.prior import PriorFitConfig  # noqa: E402
from sqvae_core.scores import bundle_split, score_run, train_run_prior  # noqa: E402
from sqvae_core.train import TrainConfig, apply_preset, steps_per_epoch, train  # noqa: E402

KINDS = ["gaussian_1", "gaussian_4", "fixed_var", "vq", "vq_ema", "vq_reset", "fsq", "lfq", "simvq", "vq_rotation"]
CATEGORICAL = ["vmf", "nc"]     # on fashion-mnist-cat8: the vMF-vs-NC table
COLUMNS = [("test_mse", "MSE", 2), ("rfd", "rFD", 3), ("fd_generation", "Gen. FD", 3),
           ("fd_neighbor_3", "Nbr-3 FD", 3), ("fd_neighbor_5", "Nbr-5 FD", 3), ("fd_neighbor_10", "Nbr-10 FD", 3),
           ("fd_interpolation", "Interp. FD", 3), ("perplexity", "perplexity", 1), ("dead_codes", "dead codes", 1)]


# --budget paper10: the kinds that get every seed
MULTI_SEED_KINDS = ("gaussian_1", "vq", "vq_ema", "fsq", "simvq")


def budget(mode: str) -> dict:
    if mode == "paper10":   # the official setup (train.paper_preset) for 11 epochs: >= 10 epochs, >= 17,190 steps
        # evaluated at each run's best-validation weights, as the official code tests its best checkpoint
        return dict(preset="paper", epochs=11, prior=PriorFitConfig(), n_fd=1000, n_gen=10_000, max_images=None, weights="best",
                    seeds=2, seeds_other=1)
    if mode == "quick":
        return dict(model=dict(codebook_size=128, code_dim=32, num_rb=1), steps=1000, batch_size=32, lr=2e-3,
                    prior=PriorFitConfig(steps=300), n_fd=500, n_gen=500, max_images=5000, val_every=500,
                    vmf_steps=2000)   # vmf/nc train longer: they need no prior or FDs, and κ_φ moves slowly
    return dict(model=dict(codebook_size=256, code_dim=64, num_rb=2), steps=20000, batch_size=32, lr=1e-3,
                prior=PriorFitConfig(), n_fd=5000, n_gen=10_000, max_images=None, val_every=2000,
                vmf_steps=20000)


def reusable(out: Path, cfg: TrainConfig) -> bool:
    """A finished run in `out` that trained what cfg would train: the same model and training
    fields, except those that change what is saved rather than what is learnt (output path,
    snapshot/checkpoint/log cadence, device, compile: float noise only) and those the data fills in (steps from epochs,
    image shape, grey levels, the VQ data variance)."""
    run = rd.RunDir(out)
    if run.status.state != "finished" or not (out / rd.CONFIG).is_file():
        return False
    saved = run.config
    n_train = saved.n_train or 0
    per_epoch = steps_per_epoch(n_train or 1, cfg.batch_size, 1, cfg.drop_last) if n_train >= cfg.batch_size else 0
    steps = max(1, int(cfg.epochs * per_epoch)) if cfg.epochs else cfg.steps
    skip = {"out", "snapshot_every", "checkpoint_every", "log_every", "device", "compile", "steps", "epochs",
            "val_every", "model", "best_by"}
    model_skip = {"image_size", "image_channels", "num_levels", "data_variance"}
    want = {k: v for k, v in cfg.to_dict().items() if k not in skip}
    have = {k: v for k, v in saved.train.items() if k not in skip}
    want_m = {k: v for k, v in cfg.model.to_dict().items() if k not in model_skip}
    have_m = {k: v for k, v in saved.model_config(out).to_dict().items() if k not in model_skip}
    return want == have and want_m == have_m and saved.steps == steps and keeps_best_by(out, cfg.best_by)


def keeps_best_by(out: Path, best_by: str) -> bool:
    """The run's best.safetensors is the one `best_by` keeps: it was kept by that figure, or (a
    run kept by the other, as every run from before --best-by was by MSE) that figure's lowest
    validation value falls at the step of the weights it kept: the training is the same either way."""
    return best_by in rd.Weights(out, "best").kept_by() or not (out / rd.BEST).is_file()


def prior_fitted(weights: rd.Weights, fit: PriorFitConfig, max_images: int | None) -> bool:
    """The run holds a prior fitted the table's way on all (or max_images) training grids of the
    weights the table evaluates: a finished plateau fit with the table's settings (prior.json's
    `fit`; `compile` aside, float noise only), or a fit of the table's fixed step count (a
    prior.json from before `fit` was recorded: `steps` alone)."""
    s = rd.RunDir(weights.run).prior_summary
    if s is None:
        return False
    if s.fit is not None:
        def settings(d):
            return {k: v for k, v in d.items() if k != "compile"}
        same = settings(s.fit) == settings(fit.to_dict()) and \
            s.stop_reason in (("plateau", "max_steps") if fit.plateau else ("steps",))
    else:
        same = not fit.plateau and s.steps == fit.steps
    return same and (max_images is None or s.n_train_grids == max_images) \
        and (max_images is not None or (s.n_train_grids or 0) >= 40_000) and weights.made(s)


def stored_scores(weights: rd.Weights, n_fd: int, n_gen: int) -> dict | None:
    """The test figures and scores scripts/finish_bundles.py stored in the run's eval.json, if they
    were computed the table's way (FDs on n_fd test images, generation FD on n_gen samples with the
    test classes: scores from before that protocol have no n_gen_images) after the weights and the prior."""
    out, doc_path = weights.run, weights.run / rd.EVAL
    ev = rd.RunDir(out).eval(weights)
    if ev is None:
        return None
    newer = all(doc_path.stat().st_mtime >= (out / f).stat().st_mtime for f in (rd.WEIGHTS, rd.PRIOR_SUMMARY)
                if (out / f).is_file())
    if not newer or ev.n_fd_images != n_fd or ("fd_generation" in ev.raw and ev.raw.get("n_gen_images") != n_gen):
        return None
    return {"test_mse": ev.test_mse, "perplexity": ev.test_perplexity, "dead_codes": ev.dead_codes,
            "entropy": ev.test_entropy, **{k: ev.raw[k] for k in ("rfd", "fd_generation", "fd_neighbor_3",
            "fd_neighbor_5", "fd_neighbor_10", "fd_interpolation", "prior_nll_bits", "n_fd_images", "n_gen_images")
            if k in ev.raw}}


def run_one(kind: str, seed: int, b: dict, root: Path, device: str) -> dict:
    dataset = "fashion-mnist-cat8" if kind in CATEGORICAL else "fashion-mnist"
    out = root / f"{kind}_s{seed}"
    if b.get("preset"):
        cfg = apply_preset(TrainConfig(model=ModelConfig(kind=kind), dataset=dataset, out=str(out), seed=seed,
                                       device=device), b["preset"])
        cfg.epochs, cfg.snapshot_every, cfg.checkpoint_every = b["epochs"], 1000, 2000
    else:
        steps = b["vmf_steps"] if kind in CATEGORICAL else b["steps"]
        cfg = TrainConfig(model=ModelConfig(kind=kind, **b["model"]), dataset=dataset, out=str(out), steps=steps,
                          batch_size=b["batch_size"], lr=b["lr"], seed=seed, device=device,
                          val_every=b["val_every"], snapshot_every=steps, checkpoint_every=steps,
                          val_max_images=1000)
    if reusable(out, cfg):
        st_ = rd.RunDir(out).status
        status = {"state": st_.state, "elapsed": st_.elapsed}
        print(f"reusing {out} (finished, same configuration)", file=sys.stderr, flush=True)
    else:
        status = train(cfg, progress=False)
    res = {"kind": kind, "seed": seed, "state": status["state"], "train_s": status.get("elapsed")}
    if status["state"] == "stopped":     # SIGINT/SIGTERM reached the training: end the whole table
        sys.exit(f"interrupted while training {kind} (seed {seed}); no table printed")
    if status["state"] != "finished":
        return res
    t0 = time.time()
    weights = rd.Weights(out, b.get("weights", "last"))
    bundle = rd.RunDir(out).load(weights.which, device)
    res["weights_step"] = weights.step
    # (a run trained just now is newer than any eval.json beside it: stored_scores refuses that)
    stored = stored_scores(weights, b["n_fd"], b["n_gen"]) if b.get("preset") else None
    if stored:
        print(f"using {out / rd.EVAL} (scored the same way after training)", file=sys.stderr, flush=True)
        res.update(stored)
    else:
        test_x, _, _ = bundle_split(bundle, "test")
        ev = evaluate_model(bundle.model, test_x, device=torch.device(device) if device != "auto" else None)
        res.update(test_mse=ev["mse"], perplexity=ev["perplexity"], dead_codes=ev["dead_codes"], entropy=ev["entropy"])
    res["eval_s"] = time.time() - t0
    rows = [r for r in rd.read_metrics(out) if "loss" in r]
    for key in ("kappa_q", "sigma2_q", "kappa_x"):
        if rows and key in rows[0]:
            mid = min(rows, key=lambda r: abs(r["step"] - rows[-1]["step"] / 2))
            res[f"{key}_first"], res[f"{key}_mid"], res[f"{key}_last"] = rows[0][key], mid[key], rows[-1][key]
    if kind in CATEGORICAL:
        res["kappa_q_init"] = bundle.model_cfg.kappa_q_init
        return res
    if stored:
        return res
    t0 = time.time()
    if bundle.model.discrete and not prior_fitted(weights, b["prior"], b["max_images"]):
        train_run_prior(weights, b["prior"], max_images=b["max_images"], device=device)
    res["prior_s"], t0 = time.time() - t0, time.time()
    res.update({k: v for k, v in score_run(bundle, n=b["n_fd"], n_gen=b["n_gen"]).items() if k != "mse"})
    res["score_s"] = time.time() - t0
    return res


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, s


def table(results: list[dict], kinds: list[str]) -> str:
    head = "| model | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for kind in kinds:
        rs = [r for r in results if r["kind"] == kind and r["state"] == "finished"]
        cells = []
        for key, _, nd in COLUMNS:
            ms = mean_std([r.get(key) for r in rs])
            cells.append("–" if ms == "–" else f"{ms[0]:.{nd}f} ± {ms[1]:.{nd}f}")
        lines.append(f"| `{kind}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def vmf_table(results: list[dict]) -> str:
    """κ_φ growth (last / init), its growth over the second half of training (last / mid: still
    rising, or saturated?), the decoder's κ where there is one, final entropy, MSE, perplexity."""
    def cell(values, nd):
        ms = mean_std(values)
        return "–" if ms == "–" else f"{ms[0]:.{nd}f} ± {ms[1]:.{nd}f}"
    lines = ["| model | κ_φ init | κ_φ last log | growth (last / init) | 2nd-half growth (last / mid) | decoder κ last | "
             "final entropy (nats) | test MSE | perplexity |", "|---|---|---|---|---|---|---|---|---|"]
    for kind in ("vmf", "nc"):
        rs = [r for r in results if r["kind"] == kind and r["state"] == "finished"]
        if not rs:
            continue
        lines.append(
            f"| `{kind}` | {rs[0]['kappa_q_init']:g} | {cell([r['kappa_q_last'] for r in rs], 3)} | "
            f"{cell([r['kappa_q_last'] / r['kappa_q_init'] for r in rs], 2)} | "
            f"{cell([r['kappa_q_last'] / r['kappa_q_mid'] for r in rs if r.get('kappa_q_mid')], 2)} | "
            f"{cell([r.get('kappa_x_last') for r in rs], 2)} | {cell([r['entropy'] for r in rs], 3)} | "
            f"{cell([r['test_mse'] for r in rs], 2)} | {cell([r['perplexity'] for r in rs], 1)} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="same as --budget quick")
    p.add_argument("--budget", choices=("quick", "paper10", "long"), default=None)
    p.add_argument("--seeds", type=int, default=None, help="seeds per kind (default 3; paper10: 2 for "
                   f"{', '.join(MULTI_SEED_KINDS)} and 1 for the others)")
    p.add_argument("--device", default="auto")
    p.add_argument("--kinds", nargs="*", default=KINDS + CATEGORICAL,
                   help="model kinds to train and score (default: all; vmf and nc train on fashion-mnist-cat8)")
    p.add_argument("--json", default=None, help="also write all per-run results here")
    p.add_argument("--root", default=None, help="keep the runs in ROOT/KIND_sSEED (default: a temporary "
                   "directory); a finished run with the same configuration is reused, not retrained")
    args = p.parse_args()
    device = str(resolve_device(args.device))
    b = budget(args.budget or ("quick" if args.quick else "long"))
    seeds = args.seeds or b.get("seeds", 3)
    seeds_other = b.get("seeds_other", seeds) if args.seeds is None else seeds
    t0 = time.time()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp)
        for seed in range(seeds):
            for kind in args.kinds:
                if seed >= seeds_other and kind not in MULTI_SEED_KINDS:
                    continue
                r = run_one(kind, seed, b, root, device)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),
                      file=sys.stderr, flush=True)
                results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    cmd = "python benchmarks/paper_table.py " + " ".join(sys.argv[1:])
    print(f"Command: `{cmd}`  \nDevice: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}  \n"
          f"Date: {datetime.date.today()}  \nBudget: {json.dumps(b, default=lambda o: o.to_dict())}, seeds 0..{seeds - 1}  \n"
          f"Wall time: {(time.time() - t0) / 60:.1f} min\n")
    print("## Table 2 layout (Fashion-MNIST, mean ± std over seeds)\n")
    print(table(results, [k for k in args.kinds if k not in CATEGORICAL]))
    print("\n## vMF vs NC on fashion-mnist-cat8 (self-annealing of κ_φ)\n")
    print(vmf_table(results))


if __name__ == "__main__":
    main()
