"""Reading a run directory: `RunDir(path)` gives its files as frozen dataclasses.

    run = RunDir("runs/demo")
    run.config        RunConfig   config.json (BundleError when missing or broken)
    run.status        RunStatus   status.json; "interrupted" when it says running but its process is
                                  gone, "unknown" (with .problem saying why) when missing or broken
    run.metrics       Metrics     metrics.jsonl rows (a torn last line skipped)
    run.eval(w)       RunEval     eval.json when made from the weights w, else None
    run.prior_summary PriorSummary prior.json, or None
    run.weights(which) Weights    (weights.py)
    run.load(which)   Bundle      the model rebuilt with those weights

The keys and file names are docs/interface.md's. torch is imported only by load() and
snapshots(): listing runs and reading their JSON files costs no torch import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from ..config import ModelConfig
from .io import (CONFIG, EVAL, LOGGED_SOURCE, METRICS, PRIOR_SUMMARY, SNAPSHOTS, STATES, STATUS, BundleError,
                 check_state_dict, load_weights, read_json, read_metrics)
from .weights import Weights
from .writer import pid_alive

FP32 = "fp32"
BF16 = "bf16 autocast (convolutions; quantizer and loss fp32)"    # what train.py writes with --amp
DEFAULT_DATASET = "fashion-mnist"     # runs from before config.json named it


def _section(doc: Mapping, key: str) -> Mapping:
    """A JSON object inside doc, read-only ({} when absent or not an object)."""
    v = doc.get(key)
    return MappingProxyType(v) if isinstance(v, dict) else MappingProxyType({})


def _int_or_none(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _num_or_none(v) -> float | int | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _str_or_none(v) -> str | None:
    return v if isinstance(v, str) else None


# ------------------------------------------------------------------------- config.json
@dataclass(frozen=True)
class DataOptions:
    """The data options a run was trained with, to read its splits again as it did."""
    data_dir: str | None
    val_size: int
    val_from_end: bool
    center_crop: int | None


@dataclass(frozen=True)
class RunConfig:
    """config.json: what trained the run (`model`, `train`, `dataset`, ...) or, for a RunLogger run
    (logged), the sizes it logged. `raw` is the whole file, read-only."""
    raw: Mapping[str, Any]
    source: str | None              # "official" (import-official), "runlogger", or None (sqvae train)
    dataset: str | None
    kind: str | None                # the model kind (None for a logged run)
    codebook_size: int | None       # K: the model's, or what RunLogger logged
    code_dim: int | None            # d (a logged run: None before its first codebook)
    model: Mapping[str, Any]        # the "model" section ({} for a logged run)
    train: Mapping[str, Any]        # the "train" section ({} when absent)
    precision: str                  # "fp32" or "bf16 autocast (...)": what the run trained in
    amp_fallback: str | None        # why --amp was asked for and the run trained in fp32
    data_rebuild: str | None        # the command that regenerates a generated folder data set
    decoder: Mapping[str, Any] | None   # a logged run's saved decoder (RunLogger.save_decoder)
    n_train: int | None

    @classmethod
    def from_dict(cls, doc: dict) -> "RunConfig":
        logged = doc.get("source") == LOGGED_SOURCE
        model, train = _section(doc, "model"), _section(doc, "train")
        sizes = _section(doc, "logged") if logged else model
        precision = _str_or_none(doc.get("precision")) or (BF16 if train.get("amp") is True else FP32)
        return cls(raw=MappingProxyType(dict(doc)), source=_str_or_none(doc.get("source")),
                   dataset=_str_or_none(doc.get("dataset")), kind=None if logged else _str_or_none(model.get("kind")),
                   codebook_size=_int_or_none(sizes.get("codebook_size")), code_dim=_int_or_none(sizes.get("code_dim")),
                   model=model, train=train, precision=precision,
                   amp_fallback=_str_or_none(doc.get("amp_fallback")), data_rebuild=_str_or_none(doc.get("data_rebuild")),
                   decoder=_section(doc, "decoder") if isinstance(doc.get("decoder"), dict) else None,
                   n_train=_int_or_none(doc.get("n_train")))

    @property
    def logged(self) -> bool:
        """Written by RunLogger: curves and snapshots, no model to rebuild."""
        return self.source == LOGGED_SOURCE

    @property
    def steps(self) -> int | None:
        """The steps the training was asked for (train.steps)."""
        return _int_or_none(self.train.get("steps"))

    @property
    def data_options(self) -> "DataOptions":
        """How the data set was read at training time (train.data_dir, val_size, val_split, center_crop)."""
        val_size = self.train.get("val_size", 5000)
        return DataOptions(_str_or_none(self.train.get("data_dir")), val_size if _int_or_none(val_size) is not None
                           else 5000, self.train.get("val_split") == "last", _int_or_none(self.train.get("center_crop")))

    @property
    def precision_text(self) -> str:
        """precision, saying so when --amp asked for bf16 where it is not native (amp_fallback says why)."""
        return f"{self.precision} (bf16 asked for, not native)" if self.amp_fallback else self.precision

    def model_config(self, where: str | Path = "") -> ModelConfig:
        """The validated ModelConfig; BundleError for a logged run, a missing or invalid section."""
        if self.logged:
            raise BundleError(f"{where} is a logged run (RunLogger): it has metrics and codebook snapshots but "
                              f"no model to rebuild or evaluate; watch it in the app's Train live and Compare pages")
        if "model" not in self.raw:
            raise BundleError(f"config.json has no 'model' section: {where}")
        try:
            return ModelConfig.from_dict(dict(self.model))
        except ValueError as e:
            raise BundleError(f"config.json: {e}") from None


# ------------------------------------------------------------------------- status.json
@dataclass(frozen=True)
class RunStatus:
    """status.json. state: running, finished, failed, stopped; "interrupted" when it says running
    but its process is gone; "unknown" when the file is missing or unusable (`problem` says why)."""
    state: str
    step: int | None = None
    error: str | None = None
    pid: int | None = None
    host: str | None = None
    updated: float | None = None
    elapsed: float | None = None
    problem: str | None = None

    @classmethod
    def read(cls, run_dir: Path) -> "RunStatus":
        path = Path(run_dir) / STATUS
        try:
            doc = read_json(path, STATUS)
        except BundleError as e:
            return cls("unknown", problem=str(e))
        state = doc.get("state")
        if state not in STATES:
            return cls("unknown", problem=f"{STATUS} has no valid state ({state!r}; expected one of "
                                          f"{', '.join(STATES)}): {path}")
        st = cls(state, _int_or_none(doc.get("step")), _str_or_none(doc.get("error")), _int_or_none(doc.get("pid")),
                 _str_or_none(doc.get("host")), _num_or_none(doc.get("updated")), _num_or_none(doc.get("elapsed")))
        if state == "running" and not pid_alive(st.pid, st.host):
            st = cls("interrupted", st.step, st.error, st.pid, st.host, st.updated, st.elapsed)
        return st

    @property
    def active(self) -> bool:
        """Still training or resumable from where it was cut (running or interrupted)."""
        return self.state in ("running", "interrupted")


# ------------------------------------------------------------------------- metrics.jsonl
@dataclass(frozen=True)
class Metrics:
    """metrics.jsonl: its rows in file order (training rows and `val_` validation rows)."""
    rows: tuple[dict, ...] = ()

    def last_val(self) -> dict | None:
        """The last validation row (any `val_` key), or None."""
        vals = [r for r in self.rows if any(k.startswith("val_") for k in r)]
        return vals[-1] if vals else None

    @property
    def last_step(self) -> int:
        """The largest step of the rows (0 without any)."""
        return max([r["step"] for r in self.rows if isinstance(r.get("step"), int)] + [0])


# ------------------------------------------------------------- what other commands store
def _weights_step(doc: Mapping, run_dir: Path) -> int | None:
    """The step of the weights a record was computed from: its weights_step, or, for a record from
    before weights_step was kept, the last weights'."""
    return _int_or_none(doc["weights_step"]) if "weights_step" in doc else Weights(run_dir).step


@dataclass(frozen=True)
class RunEval:
    """eval.json (shipped bundles, scripts/finish_bundles.py): the whole test split, deterministic
    quantization, at the weights of step `weights_step`. `raw` holds the scores beside them."""
    raw: Mapping[str, Any]
    test_mse: float | None
    test_perplexity: float | None
    test_entropy: float | None
    dead_codes: int | None
    codebook_size: int | None
    n_test: int | None
    usage: tuple[int, ...] | None       # K counts, None when absent or malformed
    n_fd_images: int | None
    weights_step: int | None

    @classmethod
    def from_dict(cls, doc: dict, run_dir: Path) -> "RunEval":
        usage = doc.get("usage")
        ok = isinstance(usage, list) and all(type(u) is int for u in usage)
        return cls(MappingProxyType(dict(doc)), _num_or_none(doc.get("test_mse")), _num_or_none(doc.get("test_perplexity")),
                   _num_or_none(doc.get("test_entropy")), _int_or_none(doc.get("dead_codes")),
                   _int_or_none(doc.get("codebook_size")), _int_or_none(doc.get("n_test")),
                   tuple(usage) if ok else None, _int_or_none(doc.get("n_fd_images")), _weights_step(doc, run_dir))


@dataclass(frozen=True)
class PriorSummary:
    """prior.json (`prior train`): how the PixelCNN prior was fitted, on the code grids of the weights
    of step `weights_step`."""
    raw: Mapping[str, Any]
    steps: int | None
    n_train_grids: int | None
    nll_bits_per_code: float | None      # on the test codes, beside:
    unigram_bits: float | None           # the entropy of their code usage
    uniform_bits: float | None           # log2 K
    conditional: bool | None
    weights_step: int | None
    stop_reason: str | None              # "plateau", "max_steps" or "steps" (a fixed count); None before
    fit: Mapping[str, Any] | None        # the PriorFitConfig as run; None for priors from before it

    @classmethod
    def from_dict(cls, doc: dict, run_dir: Path) -> "PriorSummary":
        cond, stop, fit = doc.get("conditional"), doc.get("stop_reason"), doc.get("fit")
        return cls(MappingProxyType(dict(doc)), _int_or_none(doc.get("steps")), _int_or_none(doc.get("n_train_grids")),
                   *(_num_or_none(doc.get(k)) for k in ("nll_bits_per_code", "unigram_bits", "uniform_bits")),
                   cond if isinstance(cond, bool) else None, _weights_step(doc, run_dir),
                   stop if isinstance(stop, str) else None,
                   MappingProxyType(dict(fit)) if isinstance(fit, dict) else None)


# --------------------------------------------------------------------------- bundles
@dataclass
class Bundle:
    """A loaded run directory: its config, a ready model (eval mode) and the weights it holds."""
    path: Path
    run_config: RunConfig
    model_cfg: ModelConfig
    model: Any                   # torch.nn.Module
    weights: Weights             # the weights loaded

    @property
    def config(self) -> Mapping[str, Any]:
        """The whole config.json (read-only)."""
        return self.run_config.raw

    @property
    def dataset(self) -> str:
        return self.run_config.dataset or DEFAULT_DATASET

    @property
    def name(self) -> str:
        return self.path.name


# ------------------------------------------------------------------------- the reader
@dataclass(frozen=True)
class RunDir:
    """A run directory (or shipped bundle), read file by file; each property reads its file anew."""
    path: Path = field()

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(read_json(self.path / CONFIG, CONFIG))

    @property
    def is_logged(self) -> bool:
        """Was this run written by RunLogger (False too when config.json is missing or broken)?"""
        try:
            return self.config.logged
        except BundleError:
            return False

    @property
    def status(self) -> RunStatus:
        return RunStatus.read(self.path)

    @property
    def metrics(self) -> Metrics:
        return Metrics(tuple(read_metrics(self.path / METRICS)))

    def weights(self, which: str = "last") -> Weights:
        return Weights(self.path, which)

    def eval(self, weights: Weights | None = None) -> RunEval | None:
        """eval.json when present, readable and made from `weights` (default: the last), else None."""
        try:
            ev = RunEval.from_dict(read_json(self.path / EVAL, EVAL), self.path)
        except BundleError:
            return None
        return ev if (weights or self.weights()).made(ev) else None

    @property
    def prior_summary(self) -> PriorSummary | None:
        """prior.json, or None without one (BundleError when it is broken)."""
        path = self.path / PRIOR_SUMMARY
        return PriorSummary.from_dict(read_json(path, PRIOR_SUMMARY), self.path) if path.is_file() else None

    def load(self, which: str = "last", device="cpu") -> Bundle:
        """Rebuild the model and load the weights `which` ("last", or "best", falling back to last)."""
        from ..models import build_model
        if not self.path.is_dir():
            raise BundleError(f"not a run directory: {self.path}")
        config = self.config
        model_cfg = config.model_config(self.path)
        weights = self.weights(which)
        if not weights.path.is_file():
            raise BundleError(f"no trained weights in {self.path} (expected {weights.path.name}; has training "
                              f"written a checkpoint yet?)")
        state, _ = load_weights(weights.path)
        model = build_model(model_cfg)
        check_state_dict(model, state, str(weights.path))
        model.load_state_dict(state)
        return Bundle(self.path, config, model_cfg, model.to(device).eval(), weights)

    def snapshots(self) -> list[dict]:
        """Codebook/usage snapshots in step order: [{"step", "codebook" (K,d) float32, "usage" (K,)}]."""
        out = []
        folder = self.path / SNAPSHOTS
        if not folder.is_dir():
            return out
        for p in sorted(folder.glob("step_*.safetensors")):
            try:
                t, meta = load_weights(p)
                out.append({"step": int(meta.get("step", p.stem.split("_")[-1])),
                            "codebook": t["codebook"].float(), "usage": t["usage"].long()})
            except (BundleError, KeyError, ValueError):
                continue      # a snapshot torn by a kill is skipped, not fatal
        return sorted(out, key=lambda s: s["step"])


def load_bundle(run_dir: str | Path, device="cpu", which: str = "last") -> Bundle:
    """RunDir(run_dir).load(which, device): the model of a run directory or bundle with its weights."""
    return RunDir(run_dir).load(which, device)
