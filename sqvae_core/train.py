"""Training: one function, `train(cfg)`, that writes a run directory as it goes.

The loop is plain Adam on in-memory tensors. Everything the app shows is written to
RUN_DIR while training runs (see rundir.py): metrics rows every `log_every` steps,
validation rows (deterministic quantization, whole split) every `val_every` steps,
codebook/usage snapshots every `snapshot_every` steps, and atomic checkpoints.

Stops: SIGINT/SIGTERM -> checkpoint + state "stopped"; NaN/inf loss -> state "failed" with
the step and reason, the last good checkpoint untouched. `--resume` restores model,
optimizer, scheduler, RNG and step, so an interrupted run ends with the same weights as one
that never stopped. Under torchrun every rank trains on its own shard; rank 0 alone writes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import rundir as rd
from .config import CATEGORICAL_KINDS, GAUSSIAN_KINDS, VQ_KINDS, ModelConfig
from .data import ImageData, dataset_shape, load_dataset
from .device import resolve_device
from .evaluate import evaluate_model
from .models import build_model


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: str = "fashion-mnist"
    out: str = "runs/run"
    steps: int = 2000
    epochs: float | None = None        # if set, steps = epochs x (training images // global batch)
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "constant"      # "constant" | "cosine" (to lr_min over `steps`)
    lr_min: float = 1e-5
    seed: int = 0
    device: str = "auto"
    # Gumbel-softmax temperature τ = max(τ0·exp(−decay·step), τ_min)  (paper: 1.0, 1e-5, 0)
    temperature_init: float = 1.0
    temperature_decay: float = 1e-5
    temperature_min: float = 0.0
    grad_clip: float | None = None
    deterministic: bool = False
    compile: bool = False              # torch.compile the training forward (pays off after a few hundred steps)
    log_every: int = 10
    val_every: int = 500
    snapshot_every: int = 100
    checkpoint_every: int = 500
    data_dir: str | None = None
    val_size: int = 5000
    val_max_images: int | None = None  # cap validation images (demo preset); None = whole split
    preset: str | None = None

    def validate(self) -> "TrainConfig":
        self.model.validate()
        for name in ("steps", "batch_size", "log_every", "val_every", "snapshot_every", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr schedule must be constant or cosine, got {self.lr_schedule!r}")
        if not self.temperature_init > 0:
            raise ValueError("temperature-init must be > 0")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        model = ModelConfig.from_dict(d.pop("model", {}))
        known = {f.name for f in fields(cls)}
        return cls(model=model, **{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- presets
# `paper`: the SQ-VAE paper's settings per dataset (Takida et al. 2022, Appendix).
# `demo`: measured on a 2-core CPU so that within ~2 minutes the self-annealing curves and
# the SQ-VAE vs VQ-VAE codebook difference are plain to see (benchmarks/README.md).
PRESETS = {
    "paper": {
        "fashion-mnist": dict(model=dict(codebook_size=256, code_dim=64, num_rb=2, var_q_init=10.0),
                              batch_size=32, lr=1e-3, steps=171_900),   # 100 epochs of 55k
        "mnist": dict(model=dict(codebook_size=256, code_dim=64, num_rb=2, var_q_init=10.0),
                      batch_size=32, lr=1e-3, steps=171_900),
        "cifar10": dict(model=dict(codebook_size=512, code_dim=64, num_rb=2, var_q_init=10.0),
                        batch_size=32, lr=1e-3, steps=140_700),          # 100 epochs of 45k
        "fashion-mnist-cat8": dict(model=dict(codebook_size=256, code_dim=64, num_rb=2),
                                   batch_size=32, lr=1e-3, steps=171_900),
    },
    "demo": {
        "*": dict(model=dict(codebook_size=128, code_dim=32, num_rb=1, var_q_init=10.0),
                  batch_size=32, lr=2e-3, steps=1200, log_every=10, val_every=200,
                  snapshot_every=50, checkpoint_every=200, val_max_images=1000),
    },
}


def apply_preset(cfg: TrainConfig, preset: str, explicit: set[str] = frozenset()) -> TrainConfig:
    """Fill cfg from a preset; fields in `explicit` (set by the user) are kept."""
    table = PRESETS.get(preset)
    if table is None:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = table.get(cfg.dataset.split(":")[0], table.get("*", table.get("fashion-mnist")))
    for k, v in values.items():
        if k == "model":
            for mk, mv in v.items():
                if mk not in explicit:
                    setattr(cfg.model, mk, mv)
        elif k not in explicit:
            setattr(cfg, k, v)
    cfg.preset = preset
    return cfg


def temperature_at(cfg: TrainConfig, step: int) -> float:
    """τ(step) = max(τ0·exp(−decay·step), τ_min)."""
    return max(cfg.temperature_init * math.exp(-cfg.temperature_decay * step), cfg.temperature_min, 1e-8)


def make_scheduler(cfg: TrainConfig, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps, eta_min=cfg.lr_min)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


# ------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device(device.type, local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return Dist(rank, world, local), device


# ----------------------------------------------------------------------- helpers
class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the next step."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handler)

    def _handler(self, signum, _frame):
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`: a pure function of (seed, epoch), so resume
    and every DDP rank agree on it without saving data-loader state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(n: int, batch: int, seed: int, step: int, dist: Dist) -> torch.Tensor:
    """Indices of this rank's batch at global step `step` (drop-last epochs)."""
    global_batch = batch * dist.world
    per_epoch = n // global_batch
    if per_epoch < 1:
        raise ValueError(f"batch size {batch} x {dist.world} process(es) exceeds the {n} training images")
    epoch, offset = divmod(step, per_epoch)
    order = _epoch_order(n, seed, epoch)
    start = offset * global_batch + dist.rank * batch
    return order[start:start + batch]


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state[device.type] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and device.type in state:
        torch.cuda.set_rng_state(state[device.type], device)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class RunWriter:
    """Everything rank 0 writes into RUN_DIR (other ranks get a writer that does nothing)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        self._metrics = None

    def open(self, resume_step: int | None):
        if not self.enabled:
            return
        (self.path / rd.SNAPSHOTS).mkdir(parents=True, exist_ok=True)
        mpath = self.path / rd.METRICS
        if resume_step is not None and mpath.exists():
            # drop rows logged after the checkpoint we resume from (they will be redone)
            keep = [r for r in rd.read_metrics(mpath) if r.get("step", 0) <= resume_step]
            rd.atomic_write_bytes(mpath, "".join(json.dumps(r) + "\n" for r in keep).encode())
            for p in (self.path / rd.SNAPSHOTS).glob("step_*.safetensors"):
                if int(p.stem.split("_")[-1]) > resume_step:
                    p.unlink()
        self._metrics = open(mpath, "a", buffering=1)

    def metrics(self, row: dict):
        if self.enabled:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()

    def status(self, state: str, step: int, error: str | None = None, **extra):
        if self.enabled:
            rd.atomic_write_json(self.path / rd.STATUS, {
                "state": state, "step": step, "error": error, "pid": os.getpid(),
                "host": socket.gethostname(), "updated": time.time(), **extra})

    def snapshot(self, step: int, codebook: torch.Tensor, usage: torch.Tensor):
        if self.enabled:
            rd.save_weights(self.path / rd.SNAPSHOTS / f"step_{step:08d}.safetensors",
                            {"codebook": codebook.detach().half(), "usage": usage.long()},
                            metadata={"step": str(step)})

    def close(self):
        if self._metrics:
            self._metrics.close()


# ----------------------------------------------------------------------- the loop
def _stat_keys(kind: str) -> tuple[str, ...]:
    keys = ["loss", "mse"]
    if kind != "vae":
        keys.append("perplexity")
    if kind in GAUSSIAN_KINDS or kind in CATEGORICAL_KINDS:
        keys.append("entropy")
    if kind in GAUSSIAN_KINDS:
        keys += ["sigma2_q", "sigma2_x"]
    if kind in CATEGORICAL_KINDS:
        keys.append("kappa_q")
    if kind == "vmf":
        keys.append("kappa_x")
    if kind == "vae":
        keys += ["sigma2_x", "kl"]
    return tuple(keys)



def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam; the fused kernel on CPU/CUDA (one pass over all parameters instead of a loop of
    small ops: about 0.7 ms less per step here, same update rule and state_dict)."""
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in model.parameters())
    return torch.optim.Adam(model.parameters(), lr=lr, fused=fused or None)


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, data: ImageData | None = None,
          val_data: ImageData | None = None) -> dict:
    """Train and write cfg.out. Returns the final status dict."""
    cfg.validate()
    dist, device = init_distributed(cfg.device)
    out = Path(cfg.out)
    ckpt_path = out / rd.CHECKPOINT
    if dist.main:
        if not resume and ckpt_path.exists():
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed + dist.rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    # data: in-memory tensors on the device, batches by index
    c, s, _ = dataset_shape(cfg.dataset, cfg.model.image_size if cfg.dataset.startswith("folder:") else None,
                            cfg.model.image_channels if cfg.dataset.startswith("folder:") else None)
    cfg.model.image_channels, cfg.model.image_size = c, s
    if data is None:
        data = load_dataset(cfg.dataset, "train", cfg.data_dir, val_size=cfg.val_size,
                            image_size=s, channels=c)
    if val_data is None:
        val_data = load_dataset(cfg.dataset, "val", cfg.data_dir, val_size=cfg.val_size,
                                image_size=s, channels=c)
    if cfg.val_max_images:
        val_data.images = val_data.images[:cfg.val_max_images]
    if cfg.model.kind in CATEGORICAL_KINDS and data.levels:
        cfg.model.num_levels = data.levels
    if cfg.model.kind in VQ_KINDS:
        cfg.model.data_variance = float(data.images.var())
    if cfg.epochs:
        cfg.steps = max(1, int(cfg.epochs * (len(data) // (cfg.batch_size * dist.world))))
        cfg.epochs = None
    images = data.images.to(device)

    model = build_model(cfg.model).to(device)
    if device.type == "cpu":
        # oneDNN's convolutions run faster on NHWC: +9% (gaussian_1) and +13% (vq) images/s at the
        # paper preset (benchmarks/train_throughput.py). Saved weights are made contiguous.
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.lr, device)
    scheduler = make_scheduler(cfg, optimizer)
    step, elapsed, best = 0, 0.0, float("inf")

    config_doc = {"model": cfg.model.to_dict(), "train": {k: v for k, v in cfg.to_dict().items() if k != "model"},
                  "dataset": cfg.dataset, "data_source": data.source, "n_train": len(data),
                  "n_val": len(val_data), "code_version": rd.CODE_VERSION, "torch_version": torch.__version__,
                  "world_size": dist.world, "device": device.type}
    if resume and ckpt_path.exists():
        saved_cfg, saved_model_cfg = rd.read_config(out)
        if saved_model_cfg != cfg.model:
            diff = {k: (v, getattr(cfg.model, k)) for k, v in saved_model_cfg.to_dict().items()
                    if getattr(cfg.model, k) != v}
            raise ValueError(f"--resume with a different model config than the run's: {diff}")
        try:
            ck = torch.load(ckpt_path, map_location=device, weights_only=True)
            rd.check_state_dict(model, ck["model"], str(ckpt_path))
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
        except rd.BundleError:
            raise
        except Exception as e:  # a truncated or foreign file
            raise rd.BundleError(f"cannot resume: checkpoint is unreadable ({e.__class__.__name__}): {ckpt_path}") from None
        step, elapsed, best = int(ck["step"]), float(ck["elapsed"]), float(ck["best"])
        old_lr = float(saved_cfg.get("train", {}).get("lr", cfg.lr))
        if old_lr != cfg.lr:   # a new --lr on resume rescales the schedule from here on
            for g in optimizer.param_groups:
                g["lr"], g["initial_lr"] = g["lr"] * cfg.lr / old_lr, cfg.lr
            scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
        set_rng_state(ck["rng"], device)
        config_doc["resumed_from_step"] = step
    elif resume:
        resume = False   # killed before its first checkpoint: nothing to resume, start over

    train_model = model
    if dist.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise ValueError("--compile on a CPU needs a C++ compiler (torch.compile generates C++): "
                             "install g++ (Debian: apt-get install g++) or train without --compile")
        train_model = torch.compile(train_model)   # same module and weights: checkpoints are unchanged

    writer = RunWriter(out, dist.main)
    if dist.main:
        rd.atomic_write_json(out / rd.CONFIG, config_doc)
    writer.open(step if resume else None)
    writer.status("running", step)
    stop = StopFlag()
    keys = _stat_keys(cfg.model.kind)
    k = cfg.model.codebook_size
    window = {key: torch.zeros((), device=device) for key in keys}
    n_window, usage = 0, torch.zeros(k, dtype=torch.long, device=device)
    bar = None
    if progress and dist.main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def save_checkpoint():
        if not dist.main:
            return
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise FloatingPointError(f"weights became non-finite by step {step}")
        try:
            _write_checkpoint()
        except OSError as e:   # disk full, file too large, permissions: the old files survive
            raise OSError(f"could not write the checkpoint at step {step} to {out} ({e.strerror or e}); "
                          f"the previous checkpoint is kept") from None

    def _write_checkpoint():
        rd.save_weights(out / rd.WEIGHTS, model.state_dict(), {"step": str(step), "config": json.dumps(cfg.model.to_dict())})
        rd.atomic_torch_save(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "step": step, "elapsed": elapsed, "best": best, "rng": rng_state(device),
            "temperature": temperature_at(cfg, step)})

    def validate():
        nonlocal best
        res = evaluate_model(model, val_data.images, device=device)
        row = {"step": step, "wall_time": time.time(), **{f"val_{m}": res[m] for m in
               ("mse", "perplexity", "entropy", "dead_codes", "loss") if res.get(m) is not None}}
        writer.metrics(row)
        if res["mse"] < best:
            best = res["mse"]
            if dist.main:
                rd.save_weights(out / rd.BEST, model.state_dict(), {"step": str(step), "val_mse": str(best)})
        model.train()
        return row

    t_start = time.time() - elapsed
    state, error = "finished", None
    model.train()
    try:
        while step < cfg.steps:
            idx = batch_indices(len(images), cfg.batch_size, cfg.seed, step, dist)
            x = images[idx.to(device)]
            tau = temperature_at(cfg, step)
            outp = train_model(x, temperature=tau)
            loss = outp.loss
            if device.type == "cpu" and not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {float(loss.detach())} at step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            for key in keys:
                window[key] += loss.detach() if key == "loss" else outp.stats[key]
            n_window += 1
            if outp.indices is not None:
                usage += torch.bincount(outp.indices.reshape(-1), minlength=k)

            if step % cfg.log_every == 0 or step == cfg.steps:
                vals = {key: float(v) / n_window for key, v in window.items()}
                if not all(math.isfinite(v) for v in vals.values()):
                    bad = [key for key, v in vals.items() if not math.isfinite(v)]
                    raise FloatingPointError(f"{', '.join(bad)} became non-finite by step {step}")
                elapsed = time.time() - t_start
                row = {"step": step, "wall_time": time.time(), "elapsed": round(elapsed, 3), **vals,
                       "temperature": tau, "lr": optimizer.param_groups[0]["lr"]}
                writer.metrics(row)
                for key in window:
                    window[key].zero_()
                n_window = 0
                if bar is not None:
                    shown = {"loss": f"{vals['loss']:.4g}", "mse": f"{vals['mse']:.3g}"}
                    if "perplexity" in vals:
                        shown["ppl"] = f"{vals['perplexity']:.1f}"
                    for key in ("sigma2_q", "kappa_q"):
                        if key in vals:
                            shown[key] = f"{vals[key]:.3g}"
                    bar.set_postfix(shown, refresh=False)
                    bar.update(step - bar.n)
            if model.discrete and (step % cfg.snapshot_every == 0 or step == cfg.steps):
                writer.snapshot(step, model.codebook_vectors(), usage)
                usage.zero_()
            if dist.main and (step % cfg.val_every == 0 or step == cfg.steps):
                validate()
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                elapsed = time.time() - t_start
                save_checkpoint()
                writer.status("running", step)
            if _should_stop(stop, dist, device):
                state, error = "stopped", f"stopped by {stop.signal or 'another rank'} at step {step}"
                break
        elapsed = time.time() - t_start
        save_checkpoint()
    except FloatingPointError as e:
        state, error = "failed", f"non-finite loss: {e}; the last good checkpoint is kept"
    except Exception as e:
        state, error = "failed", f"{e.__class__.__name__}: {e}"
        try:
            writer.status(state, step, error)
        except OSError:
            pass   # the disk may be full; the error still reaches the caller
        raise
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        writer.close()

    extra = {}
    if dist.world > 1:
        # parameters agree through DDP's gradient all-reduce; buffers (batch-norm running stats)
        # follow rank 0, which wrote the checkpoint: make every rank hold exactly what was saved
        for b in model.buffers():
            torch.distributed.broadcast(b.data, 0)
        digests = [None] * dist.world
        torch.distributed.all_gather_object(digests, weights_digest(model))
        extra = {"rank_weight_digests": digests, "ranks_identical": len(set(digests)) == 1}
        torch.distributed.destroy_process_group()
    writer.status(state, step, error, elapsed=round(elapsed, 3), **extra)
    return {"state": state, "step": step, "error": error, **extra}


def _should_stop(stop: StopFlag, dist: Dist, device: torch.device) -> bool:
    """A signal on any rank stops every rank at the same step."""
    if dist.world == 1:
        return stop.signal is not None
    flag = torch.tensor([1.0 if stop.signal else 0.0], device=device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item() > 0)
