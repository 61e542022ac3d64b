"""Train the feature classifier behind the Fréchet distances (checkpoints/fd_classifier/).

    python scripts/train_fd_classifier.py fashion-mnist [--epochs 3]

Writes <dataset>.safetensors and <dataset>.json (test accuracy, command, time).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sqvae_core.data import load_dataset  # noqa: E402
from sqvae_core.fd import save_classifier, train_classifier  # noqa: E402
from sqvae_core.rundir import atomic_write_json  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dataset", default="fashion-mnist", nargs="?")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "checkpoints" / "fd_classifier"))
    args = p.parse_args()
    t0 = time.time()
    train = load_dataset(args.dataset, "train", allow_subset=False)
    test = load_dataset(args.dataset, "test", allow_subset=False)
    model, info = train_classifier(train.images, train.labels, val_images=test.images, val_labels=test.labels,
                                   epochs=args.epochs, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_classifier(model, out / f"{args.dataset}.safetensors")
    doc = {"dataset": args.dataset, "test_accuracy": info["test_accuracy"], "train_accuracy": info["train_accuracy"],
           "epochs": args.epochs, "n_train": len(train), "n_test": len(test), "seconds": round(time.time() - t0, 1),
           "command": " ".join(["python", "scripts/train_fd_classifier.py", *sys.argv[1:]]),
           "torch": torch.__version__}
    atomic_write_json(out / f"{args.dataset}.json", doc)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
