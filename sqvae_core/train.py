"""Training: one function, `train(cfg)`, that writes a run directory as it goes.

    resolve(cfg)   a copy of the config with what the data decides filled in (the caller's is untouched)
    restore        model, optimizer, LR schedule, RNG and step from the checkpoint (--resume)
    the loop       plain Adam steps; metrics, validation, snapshots and checkpoints on schedule
    finish         the final checkpoint and status.json (and, under DDP, agreement of the ranks)

Everything the app shows is written to RUN_DIR while training runs (see rundir.py): metrics
rows every `log_every` steps, validation rows (deterministic quantization, whole split)
every `val_every` steps or every epoch, codebook/usage snapshots every `snapshot_every`
steps, and atomic checkpoints.

Stops: SIGINT/SIGTERM -> checkpoint + state "stopped"; NaN/inf loss -> state "failed" with
the step and reason, the last good checkpoint untouched. `--resume` restores model,
optimizer, scheduler, RNG and step, so an interrupted run ends with the same weights as one
that never stopped. Under torchrun every rank trains on its own shard; rank 0 alone writes.
On a GPU the loop does not wait for the device between log points (statistics accumulate on
it), batches come from pinned host memory when the data set does not fit on the device, and
`amp` (bf16 autocast) and `compile` are there to switch on. `amp` runs the encoder's and
decoder's convolutions in bf16, on a GPU or on a CPU with native bf16 (AVX512-BF16, AMX); the
quantizer and the loss stay fp32 (models.full_precision). Where bf16 is not native the run says
so and trains in fp32.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import rundir as rd
from .rundir import RunWriter
from .config import CATEGORICAL_KINDS, ModelConfig
from .data import ImageData, dataset_shape, folder_rebuild_command, load_dataset, one_scan, to_float
from .device import amp_unavailable, compile_options, compile_unavailable, resolve_device
from .evaluate import evaluate_model
from .kinds import KINDS, PRESETS
from .models import build_model
from .nets import bias_apart_convs_, matmul_output_head_
from .quantizers import count_codes_

LR_SCHEDULES = ("constant", "cosine", "plateau")
# Compiling costs ~20 s of CPU on a 2-core machine (the step, then again for an epoch's smaller
# last batch) and saves ~15-30% of each step at the paper preset (benchmarks/train_throughput.py
# --compile): it pays off after a few thousand steps. Paper-preset runs are 17,000+ steps.
COMPILE_AUTO_STEPS = 5000
VAL_SPLITS = ("random", "last")
BEST_BY = ("mse", "loss")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: str = "fashion-mnist"
    out: str = "runs/run"
    steps: int = 2000
    epochs: float | None = None        # if set, steps = epochs x (steps per epoch)
    batch_size: int = 32
    lr: float = 1e-3
    # "constant"; "cosine" (to lr_min over `steps`); "plateau" (x plateau_factor after
    # plateau_patience validations without a relative improvement of 1e-4 of the validation
    # loss: torch's ReduceLROnPlateau, as the official SQ-VAE trainer uses it)
    lr_schedule: str = "constant"
    lr_min: float = 1e-5
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    seed: int = 0
    device: str = "auto"
    # Gumbel-softmax temperature τ = max(τ0·exp(−decay·t), τ_min) at the t-th update, t = 1, 2, …
    # (paper: 1.0, 1e-5, 0)
    temperature_init: float = 1.0
    temperature_decay: float = 1e-5
    temperature_min: float = 0.0
    grad_clip: float | None = None
    deterministic: bool = False
    # torch.compile the training forward. None = automatic: compiled when the run has at least
    # COMPILE_AUTO_STEPS steps and the device can compile (CPU: a C++ compiler; CUDA: triton);
    # config.json records what was decided
    compile: bool | None = None
    amp: bool = False                  # bf16 autocast of the convolutions (changes the numerics; no preset uses it)
    log_every: int = 10
    val_every: int = 500
    val_per_epoch: bool = False        # validate at the end of each epoch instead of every val_every steps
    snapshot_every: int = 100
    checkpoint_every: int = 500
    data_dir: str | None = None
    # folder: data only: crop the centre N x N pixels of each image before resizing to the image size
    # (the official CelebA loader: 140 on 178x218 images); None = shorter side resized, centre kept
    center_crop: int | None = None
    val_size: int = 5000
    val_split: str = "random"          # "random": a fixed-seed random subset; "last": the last val_size images
    val_max_images: int | None = None  # cap validation images (demo preset); None = whole split
    drop_last: bool = True             # False: each epoch ends with a smaller batch (single process only)
    # the validation figure whose minimum picks best.safetensors: "mse", or "loss" (the official
    # trainer's choice for its best.pt: the deterministic validation loss)
    best_by: str = "mse"
    preset: str | None = None

    def validate(self) -> "TrainConfig":
        self.model.validate()
        for name in ("steps", "batch_size", "log_every", "val_every", "snapshot_every", "checkpoint_every",
                     "plateau_patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 < self.plateau_factor < 1:
            raise ValueError(f"plateau factor must be in (0, 1), got {self.plateau_factor}")
        if self.val_split not in VAL_SPLITS:
            raise ValueError(f"val split must be one of {', '.join(VAL_SPLITS)}, got {self.val_split!r}")
        if self.best_by not in BEST_BY:
            raise ValueError(f"best-by must be one of {', '.join(BEST_BY)}, got {self.best_by!r}")
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
# `paper`: the official SQ-VAE setup (github sony/sqvae, vision/: configs/*.yaml, model.py,
# trainer*.py), per dataset:     K        d      blocks     exp(s) at init   epochs
PAPER = {
    "mnist":              dict(K=128, d=64, num_rb=2, s0=10.0, epochs=100),
    "fashion-mnist":      dict(K=256, d=64, num_rb=2, s0=10.0, epochs=100),
    "cifar10":            dict(K=512, d=64, num_rb=2, s0=20.0, epochs=100),
    "folder":             dict(K=512, d=64, num_rb=6, s0=20.0, epochs=70),    # CelebA: 64x64 RGB
    # categorical (vmf, nc). fashion-mnist-cat8 is ours (the paper has no such set): Fashion-MNIST's
    # K and nets with the vMF parametrisation of the official CelebAMask-HQ setting
    "fashion-mnist-cat8": dict(K=256, d=64, num_rb=2, s0=0.05, epochs=100),
}
# The official CelebAMask-HQ vMF setting (64x64 maps of 19 classes, grid 8x8), for folders of
# such label maps: K=64, d=64 (+1), 2 blocks, exp(s) 0.05, 70 epochs.
CELEBAMASK = dict(K=64, d=64, num_rb=2, s0=0.05, epochs=70)


def paper_preset(dataset: str, kind: str) -> dict:
    """TrainConfig values of the official setup for a dataset and model kind.

    Common to all: batch 32, Adam 1e-3 halved after 3 epochs without improvement of the
    (deterministic) validation loss, validation once per epoch on the last 10,000 training
    images (MNIST-style 50k/10k, CIFAR-10 40k/10k), best weights by that validation loss,
    no dropped last batch, τ = exp(−1e−5·t).
    Gaussian: σ²_φ = exp(v) + exp(s), v = 0 for variant I (so a floor of 1). vMF: κ_φ = 1 + exp(s),
    code dimension d + 1 (the official code adds one for the sphere), decoder κ = 1/0.01.
    A folder of images gets CelebA's setting (64x64 RGB); vmf/nc on a folder CelebAMask-HQ's.
    """
    base = dataset.split(":")[0]
    categorical = kind in CATEGORICAL_KINDS
    if base == "fashion-mnist-cat8" and not categorical:
        base = "fashion-mnist"     # a Gaussian model on the 8-level images: Fashion-MNIST's setting
    p = CELEBAMASK if base == "folder" and categorical else PAPER.get(base)
    if p is None or (categorical and base not in ("folder", "fashion-mnist-cat8")):
        raise ValueError(f"the paper preset has no setting for {kind} on {dataset!r}; it covers "
                         f"mnist, fashion-mnist, cifar10 and folder:PATH (64x64 RGB), and for vmf/nc "
                         f"fashion-mnist-cat8 and folder:PATH (64x64 label maps)")
    model = dict(net="official", codebook_size=p["K"], code_dim=p["d"], num_rb=p["num_rb"], arelbo=True)
    if categorical:
        model.update(code_dim=p["d"] + 1, kappa_q_floor=1.0, kappa_q_init=1.0 + p["s0"], kappa_x_init=100.0)
    else:
        floor = KINDS[kind].paper.get("var_q_floor", 0.0)      # variant I (and fixed_var): 1
        model.update(var_q_floor=floor, var_q_init=floor + p["s0"])
    model.update(KINDS[kind].paper)                             # the kind's own settings (kinds.py)
    if base == "folder":
        model.update(image_size=64, image_channels=1 if categorical else 3)
    else:
        c, size, _ = dataset_shape(dataset)
        model.update(image_size=size, image_channels=c)
    return dict(model=model, batch_size=32, lr=1e-3, lr_schedule="plateau", plateau_factor=0.5,
                plateau_patience=3, epochs=float(p["epochs"]), val_per_epoch=True, val_size=10_000,
                val_split="last", drop_last=False, best_by="loss", temperature_init=1.0, temperature_decay=1e-5,
                temperature_min=0.0, amp=False)


# `demo`: measured on a 2-core CPU so that within ~2 minutes the self-annealing curves and
# the SQ-VAE vs VQ-VAE codebook difference are plain to see (benchmarks/RESULTS.md).
DEMO = dict(model=dict(codebook_size=128, code_dim=32, num_rb=1, var_q_init=10.0),
            batch_size=32, lr=2e-3, steps=1200, log_every=10, val_every=200,
            snapshot_every=50, checkpoint_every=200, val_max_images=1000)


def apply_preset(cfg: TrainConfig, preset: str, explicit: set[str] = frozenset()) -> TrainConfig:
    """Fill cfg from a preset for its dataset and model kind; fields in `explicit` (set by the
    user; plain field names such as "lr" or "codebook_size") are kept."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = paper_preset(cfg.dataset, cfg.model.kind) if preset == "paper" else DEMO
    for k, v in values.items():
        if k == "model":
            for mk, mv in v.items():
                if mk not in explicit:
                    setattr(cfg.model, mk, mv)
        elif k not in explicit:
            setattr(cfg, k, v)
    if "steps" in explicit and "epochs" not in explicit:
        cfg.epochs = None          # --steps N beats a preset's epochs
    if "val_every" in explicit:
        cfg.val_per_epoch = False  # and --val-every N its validation once per epoch
    cfg.preset = preset
    return cfg


def temperature_at(cfg: TrainConfig, step: int) -> float:
    """τ for the update after `step` completed ones (the official t = step + 1):
    max(τ0·exp(−decay·t), τ_min)."""
    return max(cfg.temperature_init * math.exp(-cfg.temperature_decay * (step + 1)), cfg.temperature_min, 1e-8)


def make_scheduler(cfg: TrainConfig, optimizer):
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps, eta_min=cfg.lr_min)
    if cfg.lr_schedule == "plateau":   # stepped with the validation loss (validate_and_log), not every step
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience,
            threshold=1e-4, threshold_mode="rel")
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
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the next step.

    Signal handlers can only be installed from the main thread; a loop run in another thread
    (a Ray Tune trial runs its function in one) keeps its host's handlers and is stopped
    through `on_validation` instead."""

    def __init__(self):
        self.signal: str | None = None
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handler)

    def _handler(self, signum, _frame):
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch `epoch`: a pure function of (seed, epoch), so resume
    and every DDP rank agree on it without saving data-loader state. Cached: one permutation
    per epoch, not per step."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def steps_per_epoch(n: int, batch: int, world: int = 1, drop_last: bool = True) -> int:
    global_batch = batch * world
    if n // global_batch < 1:
        raise ValueError(f"batch size {batch} x {world} process(es) exceeds the {n} training images")
    return n // global_batch if drop_last else -(-n // global_batch)


def batch_indices(n: int, batch: int, seed: int, step: int, dist: Dist, drop_last: bool = True) -> torch.Tensor:
    """Indices of this rank's batch at global step `step`; without drop_last an epoch's last
    batch holds the remaining n mod batch images (single process)."""
    epoch, offset = divmod(step, steps_per_epoch(n, batch, dist.world, drop_last))
    start = offset * batch * dist.world + dist.rank * batch
    return _epoch_order(n, seed, epoch)[start:start + batch]


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


# ------------------------------------------------------------------- resolving a config
def resolve(cfg: TrainConfig, dist: Dist, data: ImageData | None = None,
            val_data: ImageData | None = None,
            device: torch.device | None = None) -> tuple[TrainConfig, ImageData, ImageData]:
    """A validated copy of cfg with what the data decides filled in: image shape, grey levels,
    the VQ data variance, steps from epochs, validation every epoch, and (given the device)
    whether an automatic `compile` is on. The caller's cfg is untouched."""
    cfg = copy.deepcopy(cfg).validate()
    if dist.world > 1:
        cfg.drop_last = True       # every rank must see a full batch: the smaller last one is dropped
    folder = cfg.dataset.startswith("folder:")
    c, s, _ = dataset_shape(cfg.dataset, cfg.model.image_size if folder else None,
                            cfg.model.image_channels if folder else None)
    cfg.model.image_channels, cfg.model.image_size = c, s
    split = dict(val_size=cfg.val_size, val_from_end=cfg.val_split == "last", image_size=s, channels=c,
                 center_crop=cfg.center_crop)
    with one_scan():           # a folder's files are listed and stat'ed once for both splits
        if data is None:
            data = load_dataset(cfg.dataset, "train", cfg.data_dir, **split)
        if val_data is None:
            val_data = load_dataset(cfg.dataset, "val", cfg.data_dir, **split)
    if cfg.val_max_images:
        val_data = val_data.head(cfg.val_max_images)
    if cfg.model.kind in CATEGORICAL_KINDS and data.levels:
        cfg.model.num_levels = data.levels
    if KINDS[cfg.model.kind].vq_reconstruction:
        cfg.model.data_variance = data.variance()
    per_epoch = steps_per_epoch(len(data), cfg.batch_size, dist.world, cfg.drop_last)
    if cfg.epochs:
        cfg.steps, cfg.epochs = max(1, int(cfg.epochs * per_epoch)), None
    if cfg.val_per_epoch:
        cfg.val_every = per_epoch
    if cfg.compile is None and device is not None:
        cfg.compile = cfg.steps >= COMPILE_AUTO_STEPS and compile_unavailable(device) is None
    return cfg.validate(), data, val_data


# ------------------------------------------------------------------------ checkpoints
@dataclass
class Progress:
    step: int = 0              # optimizer updates done
    elapsed: float = 0.0       # training seconds, over every process that worked on the run
    best: float = math.inf     # lowest validation figure so far (the one named by best_by)
    best_by: str = "mse"


class Checkpointer:
    """Writes and restores everything a resume needs: weights (safetensors, what the app loads),
    optimizer, LR schedule, RNG and progress. Rank 0 alone writes; every write is atomic, and a
    failed write (disk full) leaves the previous checkpoint as it was."""

    def __init__(self, out: Path, model, optimizer, scheduler, device: torch.device, enabled: bool):
        self.out, self.model, self.optimizer, self.scheduler = out, model, optimizer, scheduler
        self.device, self.enabled = device, enabled
        self.path = out / rd.CHECKPOINT

    def restore(self) -> Progress:
        try:
            ck = torch.load(self.path, map_location=self.device, weights_only=True)
            rd.check_state_dict(self.model, ck["model"], str(self.path))
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
        except rd.BundleError:
            raise
        except Exception as e:  # a truncated or foreign file
            raise rd.BundleError(f"cannot resume: checkpoint is unreadable ({e.__class__.__name__}): {self.path}") from None
        set_rng_state(ck["rng"], self.device)
        return Progress(int(ck["step"]), float(ck["elapsed"]), float(ck["best"]), ck.get("best_by", "mse"))

    def save(self, p: Progress, temperature: float) -> None:
        if not self.enabled:
            return
        if not all(torch.isfinite(w).all() for w in self.model.parameters()):
            raise FloatingPointError(f"weights became non-finite by step {p.step}")
        state = self.model.state_dict()
        try:
            rd.save_weights(self.out / rd.WEIGHTS, state,
                            {"step": str(p.step), "config": json.dumps(self.model.cfg.to_dict())})
            rd.atomic_torch_save(self.path, {
                "model": state, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": p.step, "elapsed": p.elapsed, "best": p.best, "best_by": p.best_by, "rng": rng_state(self.device),
                "temperature": temperature})
        except OSError as e:   # disk full, file too large, permissions: the old files survive
            raise OSError(f"could not write the checkpoint at step {p.step} to {self.out} ({e.strerror or e}); "
                          f"the previous checkpoint is kept") from None


# ----------------------------------------------------------------------- the loop
class Window:
    """Training statistics between two log points, summed on the device (reading them is the
    one host sync of a log point), and the code usage between two snapshots."""

    def __init__(self, kind: str, codebook_size: int, device: torch.device):
        keys = ["loss", "mse", *KINDS[kind].stats]    # the catalogue says what each kind logs
        self.sums = {key: torch.zeros((), device=device) for key in keys}
        self.n = 0
        self.usage = torch.zeros(codebook_size, dtype=torch.long, device=device)

    def add(self, outp) -> None:
        for key, v in self.sums.items():
            v += outp.loss.detach().float() if key == "loss" else outp.stats[key].float()
        self.n += 1
        if outp.indices is not None:
            count_codes_(self.usage, outp.indices)

    def means(self) -> dict[str, float]:
        """Window averages (then the window restarts); FloatingPointError if any is not finite."""
        vals = {key: float(v) / self.n for key, v in self.sums.items()}
        bad = [key for key, v in vals.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"{', '.join(bad)} became non-finite")
        for v in self.sums.values():
            v.zero_()
        self.n = 0
        return vals


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam; the fused kernel on CPU/CUDA (one pass over all parameters instead of a loop of
    small ops: about 0.7 ms less per step here, same update rule and state_dict)."""
    fused = device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in model.parameters())
    return torch.optim.Adam(model.parameters(), lr=lr, fused=fused or None)


def train_step(train_model, optimizer, x: torch.Tensor, tau: float, cfg: TrainConfig, device: torch.device,
               step: int):
    """One update: forward at Gumbel temperature tau, backward, (clip), Adam. Returns the output."""
    # compiled: τ as a tensor, a graph input, rather than a Python float the graph would be specialised on
    temperature = torch.tensor(tau, dtype=torch.float32, device=device) if cfg.compile else tau
    with _autocast(cfg, device):
        outp = train_model(x, temperature=temperature)
    loss = outp.loss
    if device.type == "cpu" and not torch.isfinite(loss):   # free on a CPU; on a GPU, at log points
        raise FloatingPointError(f"loss became {float(loss.detach())} at step {step + 1}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], cfg.grad_clip)
    optimizer.step()
    return outp


class Batches:
    """Training batches by global step, float32 in [0, 1], converted from the stored pixels (uint8,
    memory-mapped for folder data) as each batch is drawn (data.to_float): memory grows with the
    batch, not with the data set. The pixels live on the device when they fit in a quarter of its
    free memory (on a CPU they stay where they are: no copy); otherwise they stay in host memory
    and each batch is gathered into one of two pinned (uint8) buffers, copied to the GPU without
    blocking (a buffer is reused only once the copy out of it, two steps back, has completed) and
    converted there. Same values as converting the whole set first: one table of 256 floats."""

    def __init__(self, data: ImageData, cfg: TrainConfig, dist: Dist, device: torch.device,
                 on_device: bool | None = None):
        pixels = data.pixels
        self.n, self.cfg, self.dist, self.device, self.levels = len(pixels), cfg, dist, device, data.levels
        if on_device is None:
            on_device = device.type == "cpu" or pixels.nbytes < _free_device_bytes(device) // 4
        self.on_device = on_device
        self.pixels = pixels.to(device) if on_device else pixels
        pin = not on_device and device.type == "cuda"
        self.pinned = [torch.empty((cfg.batch_size, *pixels.shape[1:]), dtype=pixels.dtype).pin_memory()
                       for _ in range(2)] if pin else []
        self.copied = [None, None]     # CUDA events: the copy out of each pinned buffer is done

    def __call__(self, step: int) -> torch.Tensor:
        idx = batch_indices(self.n, self.cfg.batch_size, self.cfg.seed, step, self.dist, self.cfg.drop_last)
        if self.on_device:
            return to_float(self.pixels[idx.to(self.pixels.device, non_blocking=True)], self.levels)
        if not self.pinned:
            return to_float(self.pixels[idx].to(self.device), self.levels)
        slot = step % 2
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()
        buf = self.pinned[slot][:len(idx)]
        torch.index_select(self.pixels, 0, idx, out=buf)
        x = buf.to(self.device, non_blocking=True)
        self.copied[slot] = torch.cuda.Event()
        self.copied[slot].record()
        return to_float(x, self.levels)


def _free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return 1 << 62


def make_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    model = build_model(cfg.model).to(device)
    if device.type == "cpu":
        # oneDNN's convolutions run faster on NHWC: +9% (gaussian_1) and +13% (vq) images/s at the
        # paper preset (benchmarks/train_throughput.py). Saved weights are made contiguous.
        model = model.to(memory_format=torch.channels_last)
        # ... its last transposed conv (to 1 or 3 channels) as a matmul: see MatmulConvTranspose2d;
        # every other conv with its bias added apart (a faster backward): see nets.BiasApartConv2d.
        matmul_output_head_(model)
        bias_apart_convs_(model)
    return model


def _wrap(model: torch.nn.Module, cfg: TrainConfig, dist: Dist, device: torch.device) -> torch.nn.Module:
    """The module the loop calls: DDP across ranks, torch.compile on request (same weights)."""
    if dist.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        reason = compile_unavailable(device)
        if reason:
            raise ValueError(f"{reason}, or train with --no-compile")
        model = torch.compile(model, options=compile_options(device))
    return model


@contextlib.contextmanager
def _autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast of the forward with --amp (train() has turned it off where bf16 is not native),
    else nothing. The backward runs outside autocast, as eager autograd runs it: torch.compile traces
    a region's backward during its forward, by default under the autocast around that forward
    (torch._functorch.config.backward_pass_autocast = "same_as_forward"), which would run the
    quantizer's backward matmuls in bf16 although models.full_precision keeps its forward fp32."""
    if not cfg.amp:
        yield
        return
    with torch._functorch.config.patch(backward_pass_autocast="off"), \
            torch.autocast(device.type, dtype=torch.bfloat16):
        yield


def validate_and_log(model, val_data: ImageData, cfg: TrainConfig, p: Progress, device, writer, scheduler,
                     out: Path, main: bool) -> dict:
    """One validation pass (deterministic quantization, batches of the training size as the
    official trainer): a metrics row, best.safetensors on a new lowest cfg.best_by figure, the
    plateau LR step."""
    res = evaluate_model(model, val_data, device=device, batch_size=cfg.batch_size)
    row = {"step": p.step, "wall_time": time.time(), **{f"val_{m}": res[m] for m in
           ("mse", "perplexity", "entropy", "dead_codes", "loss") if res.get(m) is not None}}
    writer.metrics(row)
    if res[cfg.best_by] < p.best:
        p.best = res[cfg.best_by]
        if main:
            rd.save_weights(out / rd.BEST, model.state_dict(),
                            {"step": str(p.step), "best_by": cfg.best_by, f"val_{cfg.best_by}": str(p.best)})
    if cfg.lr_schedule == "plateau":
        scheduler.step(res["loss"])
    model.train()
    return row


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, data: ImageData | None = None,
          val_data: ImageData | None = None, on_validation=None) -> dict:
    """Train and write cfg.out. Returns the final status dict. cfg itself is not modified.

    on_validation(row): called with each validation row (rank 0) after a checkpoint of that very
    step has been written, so that whoever receives the row (a sweep's scheduler) may end the run
    there and leave it resumable. A return value that is a string stops the run: state "stopped"
    with that string as the reason. A checkpoint costs no random numbers: the weights stay those
    of a run without the hook."""
    dist, device = init_distributed(cfg.device)
    cfg, data, val_data = resolve(cfg, dist, data, val_data, device)
    out = Path(cfg.out)
    amp_fallback = amp_unavailable(device) if cfg.amp else None
    if amp_fallback:            # say so, and train in fp32 rather than slower in emulated bf16
        cfg.amp = False
        if dist.main:
            print(f"--amp: {amp_fallback}; training in fp32 instead", file=sys.stderr, flush=True)
    if dist.main:
        if not resume and (out / rd.CHECKPOINT).exists():
            raise ValueError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + dist.rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True    # fixed shapes: let cuDNN pick the fastest kernels

    # --- build, then restore
    batches = Batches(data, cfg, dist, device)
    model = make_model(cfg, device)
    optimizer = make_optimizer(model, cfg.lr, device)
    scheduler = make_scheduler(cfg, optimizer)
    ckpt = Checkpointer(out, model, optimizer, scheduler, device, dist.main)
    config_doc = {"model": cfg.model.to_dict(), "train": {k: v for k, v in cfg.to_dict().items() if k != "model"},
                  "dataset": cfg.dataset, "data_source": data.source, "n_train": len(data),
                  "n_val": len(val_data), "code_version": rd.CODE_VERSION, "torch_version": torch.__version__,
                  "world_size": dist.world, "device": device.type}
    config_doc["precision"] = "bf16 autocast (convolutions; quantizer and loss fp32)" if cfg.amp else "fp32"
    if amp_fallback:
        config_doc["amp_fallback"] = amp_fallback
    rebuild = folder_rebuild_command(cfg.dataset)
    if rebuild:
        config_doc["data_rebuild"] = rebuild     # eval & co. name it when the folder is missing
    p = Progress(best_by=cfg.best_by)
    resume = resume and ckpt.path.exists()   # killed before its first checkpoint: start over
    if resume:
        p = _restore(ckpt, cfg, out, optimizer, scheduler)
        config_doc["resumed_from_step"] = p.step
    train_model = _wrap(model, cfg, dist, device)

    writer = RunWriter(out, dist.main)
    if dist.main:
        rd.atomic_write_json(out / rd.CONFIG, config_doc)
    writer.open(p.step if resume else None)
    writer.status("running", p.step)
    stop = StopFlag()
    window = Window(cfg.model.kind, cfg.model.codebook_size, device)
    bar = _progress_bar(cfg, p.step) if progress and dist.main else None

    # --- the loop
    t_start = time.time() - p.elapsed
    state, error = "finished", None
    model.train()
    try:
        while p.step < cfg.steps:
            tau = temperature_at(cfg, p.step)
            x = batches(p.step)
            # An epoch's smaller last batch (drop_last=False: one process) runs eagerly, the same math:
            # compiling a graph for its shape once a run took 23 s, the eager step 40 ms (RESULTS.md).
            step_model = model if len(x) < cfg.batch_size else train_model
            outp = train_step(step_model, optimizer, x, tau, cfg, device, p.step)
            if cfg.lr_schedule != "plateau":
                scheduler.step()
            p.step += 1
            window.add(outp)
            if p.step % cfg.log_every == 0 or p.step == cfg.steps:
                p.elapsed = time.time() - t_start
                _log_row(writer, window, p, tau, optimizer, bar)
            if model.discrete and (p.step % cfg.snapshot_every == 0 or p.step == cfg.steps):
                writer.snapshot(p.step, model.codebook_vectors(), window.usage)
                window.usage.zero_()
            if dist.main and (p.step % cfg.val_every == 0 or p.step == cfg.steps):
                row = validate_and_log(model, val_data, cfg, p, device, writer, scheduler, out, dist.main)
                if on_validation is not None:
                    p.elapsed = time.time() - t_start
                    ckpt.save(p, temperature_at(cfg, p.step))
                    writer.status("running", p.step)
                    reason = on_validation(row)
                    if isinstance(reason, str):
                        state, error = "stopped", reason
                        break
            if p.step % cfg.checkpoint_every == 0 and p.step < cfg.steps:
                p.elapsed = time.time() - t_start
                ckpt.save(p, temperature_at(cfg, p.step))
                writer.status("running", p.step)
            if _should_stop(stop, dist, device):
                state, error = "stopped", f"stopped by {stop.signal or 'another rank'} at step {p.step}"
                break
        p.elapsed = time.time() - t_start
        ckpt.save(p, temperature_at(cfg, p.step))
    except FloatingPointError as e:
        state, error = "failed", f"non-finite loss: {e}; the last good checkpoint is kept"
    except Exception as e:
        state, error = "failed", f"{e.__class__.__name__}: {e}"
        try:
            writer.status(state, p.step, error)
        except OSError:
            pass   # the disk may be full; the error still reaches the caller
        raise
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        writer.close()

    # --- finish
    extra = {}
    if dist.world > 1:
        del train_model   # DDP's reducer holds the process group: free it while the group is still registered
        gc.collect()      # (DDP has reference cycles; `del` alone would leave its end to a later collection)
        extra = _agree_across_ranks(model, dist, device)
    writer.status(state, p.step, error, elapsed=round(p.elapsed, 3), **extra)
    return {"state": state, "step": p.step, "error": error, **extra}


def _restore(ckpt: Checkpointer, cfg: TrainConfig, out: Path, optimizer, scheduler) -> Progress:
    saved_cfg = rd.RunDir(out).config
    saved_model_cfg = saved_cfg.model_config(out)
    if saved_model_cfg != cfg.model:
        diff = {k: (v, getattr(cfg.model, k)) for k, v in saved_model_cfg.to_dict().items()
                if getattr(cfg.model, k) != v}
        raise ValueError(f"--resume with a different model config than the run's: {diff}")
    p = ckpt.restore()
    if p.best_by != cfg.best_by:   # a new --best-by on resume: the next validation sets the first best
        p.best, p.best_by = math.inf, cfg.best_by
    old_lr = float(saved_cfg.train.get("lr", cfg.lr))
    if old_lr != cfg.lr:   # a new --lr on resume rescales the schedule from here on
        for g in optimizer.param_groups:
            g["lr"], g["initial_lr"] = g["lr"] * cfg.lr / old_lr, cfg.lr
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
    return p


def _log_row(writer: RunWriter, window: Window, p: Progress, tau: float, optimizer, bar) -> None:
    try:
        vals = window.means()
    except FloatingPointError as e:
        raise FloatingPointError(f"{e} by step {p.step}") from None
    writer.metrics({"step": p.step, "wall_time": time.time(), "elapsed": round(p.elapsed, 3), **vals,
                    "temperature": tau, "lr": optimizer.param_groups[0]["lr"]})
    if bar is not None:
        shown = {"loss": f"{vals['loss']:.4g}", "mse": f"{vals['mse']:.3g}"}
        if "perplexity" in vals:
            shown["ppl"] = f"{vals['perplexity']:.1f}"
        for key in ("sigma2_q", "kappa_q"):
            if key in vals:
                shown[key] = f"{vals[key]:.3g}"
        bar.set_postfix(shown, refresh=False)
        bar.update(p.step - bar.n)


def _progress_bar(cfg: TrainConfig, step: int):
    from tqdm import tqdm
    return tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)


def _agree_across_ranks(model: torch.nn.Module, dist: Dist, device: torch.device) -> dict:
    """Parameters agree through DDP's gradient all-reduce; buffers (batch-norm running stats)
    follow rank 0, which wrote the checkpoint: make every rank hold exactly what was saved.
    Then each rank's weight digest goes to every rank, and the process group ends.

    Teardown without a deadlock. gloo's worker thread drops a finished collective's tensors just
    after the caller sees it finish, and dropping a tensor that Python also sees takes the GIL.
    The group's destructor joins that worker while holding the GIL, and it runs when DDP's reducer
    lets go of the group, when train() returns (destroy_process_group alone does not end it).
    Under CPU load a worker starved of CPU was still dropping a work then, and one rank hung
    (py-spy: ~Reducer -> ~ProcessGroupGloo in thread.join; the worker in ~AsyncAllgatherWork or
    ~AsyncBroadcastWork, waiting for the GIL): 5 of 25 two-rank runs with one core kept busy.
    Holding the tensors did not help (5 of 30): the drop takes the GIL all the same. So this waits,
    sleeping (without the GIL), until no work holds them any more: _released_by_collectives."""
    buffers = list(model.buffers())
    alone = [b._use_count() for b in buffers]       # references with no collective holding them
    for b in buffers:
        torch.distributed.broadcast(b, 0)           # in place: no temporary for the worker to free
    digest = weights_digest(model)
    mine = torch.tensor([int(digest[:8], 16), int(digest[8:], 16)], dtype=torch.int64, device=device)
    every = torch.empty(dist.world * 2, dtype=torch.int64, device=device)
    alone += [mine._use_count(), every._use_count()]
    torch.distributed.all_gather_into_tensor(every, mine)
    _released_by_collectives([*buffers, mine, every], alone)
    torch.distributed.destroy_process_group()
    digests = [f"{hi:08x}{lo:08x}" for hi, lo in every.view(dist.world, 2).tolist()]
    return {"rank_weight_digests": digests, "ranks_identical": len(set(digests)) == 1}


def _released_by_collectives(tensors: list[torch.Tensor], alone: list[int], timeout: float = 30.0) -> bool:
    """Sleep until each tensor's C++ reference count is back to `alone` (no collective work still
    holds it), at most `timeout` seconds; True if it came back. time.sleep releases the GIL, which
    the worker needs to let go (_agree_across_ranks)."""
    deadline = time.monotonic() + timeout
    while any(t._use_count() > n for t, n in zip(tensors, alone)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def _should_stop(stop: StopFlag, dist: Dist, device: torch.device) -> bool:
    """A signal on any rank stops every rank at the same step."""
    if dist.world == 1:
        return stop.signal is not None
    flag = torch.tensor([1.0 if stop.signal else 0.0], device=device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item() > 0)
