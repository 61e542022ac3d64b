"""Add per-code usage to the eval.json of shipped bundles (scripts/finish_bundles.py now writes it).

    python scripts/eval_usage.py checkpoints

For each discrete bundle: evaluate the whole test split again (deterministic quantization, as
finish_bundles did), check that the dead-code count and perplexity equal the stored ones, and store
`usage` (K counts). The app then colours its first codebook map from eval.json without a model.
"""
import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sqvae_core import rundir as rd  # noqa: E402
from sqvae_core.evaluate import evaluate_model  # noqa: E402
from sqvae_core.scores import bundle_split  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    args = ap.parse_args()
    for run in rd.list_runs(args.root):
        path = run / rd.EVAL
        if not path.is_file():
            continue
        doc = rd.read_json(path, rd.EVAL)
        b = rd.load_bundle(run)
        if not b.model.discrete:
            continue
        images, _, _ = bundle_split(b, "test")
        ev = evaluate_model(b.model, images)
        if ev["n_images"] != doc["n_test"] or ev["dead_codes"] != doc["dead_codes"] \
                or not math.isclose(ev["perplexity"], doc["test_perplexity"], rel_tol=1e-6):
            raise SystemExit(f"{run}: evaluation differs from eval.json: {ev['n_images']} images, "
                             f"{ev['dead_codes']} dead, perplexity {ev['perplexity']} vs {doc['n_test']}, "
                             f"{doc['dead_codes']}, {doc['test_perplexity']}")
        doc["usage"] = ev["usage"]
        rd.atomic_write_json(path, doc)
        print(f"{run.name}: usage of {len(ev['usage'])} codes on {ev['n_images']} images "
              f"({ev['dead_codes']} dead, perplexity {ev['perplexity']:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
