"""Which weights of a run are meant: one reference, `Weights(run, which)`, owns the file, its step,
the validation figures that kept it and whether a stored result was made from it.

    w = Weights("runs/demo", "best")
    w.path            best.safetensors when the run keeps one, else model.safetensors
    w.step            the training step in the file's metadata (None: not recorded, e.g. an import)
    w.kept_by()       ["mse"], ["loss", "mse"], ... the figures whose lowest value these weights have
    w.made(record)    was a prior.json / eval.json (RunEval, PriorSummary) computed from these weights?

The best-weights policy (`sqvae train --best-by`): best.safetensors holds the weights at the lowest
validation MSE, or loss; its metadata names the `step` and the rule `best_by` (MSE before the flag).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .io import BEST, WEIGHTS, read_metrics, weights_metadata

WHICH = ("last", "best")
FIGURES = {"loss": "loss", "mse": "MSE"}


@dataclass(frozen=True)
class Weights:
    """A run's last ("last": model.safetensors) or best-validation ("best": best.safetensors,
    falling back to the last when the run keeps none) weights."""
    run: Path
    which: str = "last"

    def __post_init__(self):
        if self.which not in WHICH:
            raise ValueError(f"weights must be one of {', '.join(WHICH)}, got {self.which!r}")
        object.__setattr__(self, "run", Path(self.run))

    @property
    def path(self) -> Path:
        """The file loaded for these weights."""
        return self.run / (BEST if self.which == "best" and (self.run / BEST).is_file() else WEIGHTS)

    @property
    def is_best_file(self) -> bool:
        """Do these weights come from best.safetensors (False: the last weights, also as fallback)?"""
        return self.path.name == BEST

    @property
    def step(self) -> int | None:
        """The training step of these weights (their metadata); None when not recorded or no file."""
        path = self.path
        step = weights_metadata(path).get("step") if path.is_file() else None
        return int(step) if step is not None else None

    def kept_by(self, rows: list[dict] | None = None) -> list[str]:
        """The validation figures ("mse", "loss") whose lowest value these weights hold: the rule
        best.safetensors was kept by (its metadata; MSE for runs from before `train --best-by`), and the
        other one too when that figure's lowest value falls at the same step. [] for the last weights
        and for a run without best weights. `rows`: the run's metrics.jsonl when already read."""
        if not self.is_best_file:
            return []
        meta = weights_metadata(self.path)
        kept, step = meta.get("best_by", "mse"), int(meta.get("step", -1))
        rules = [kept]
        for other in sorted(set(FIGURES) - {kept}):
            val = [r for r in (read_metrics(self.run) if rows is None else rows) if f"val_{other}" in r]
            if val and min(val, key=lambda r: r[f"val_{other}"])["step"] == step:
                rules.append(other)
        return rules

    def made(self, record) -> bool:
        """Was `record` (a RunEval or PriorSummary: its weights_step names the weights it was computed
        from; the reader gives a record from before weights_step was kept the last weights' step)
        made from these weights?"""
        return record.weights_step == self.step


def figures_text(rules: list[str]) -> str:
    """Weights.kept_by's figures as words: "loss", "MSE", "loss and MSE"."""
    return " and ".join(FIGURES[r] for r in sorted(rules))


@dataclass(frozen=True)
class BestChoice:
    """A run whose best-validation weights are from another step than its last ones: a choice worth
    offering. Steps are None when not recorded."""
    last: int | None
    best: int | None
    kept_by: tuple[str, ...]


def best_choice(run: str | Path, rows: list[dict] | None = None) -> BestChoice | None:
    """BestChoice when the run keeps best weights of a recorded step other than its last, else None."""
    best = Weights(run, "best")
    if not best.is_best_file:
        return None
    last_step, best_step = Weights(run).step, best.step
    if best_step is None or best_step == last_step:
        return None
    return BestChoice(last_step, best_step, tuple(best.kept_by(rows)))
