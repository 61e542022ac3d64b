"""The run directory: the contract between training and everything that reads it.

    RUN_DIR/
      config.json          every setting needed to rebuild the model (+ dataset, code version)
      metrics.jsonl        one JSON object per logged step, appended and flushed live
      status.json          {"state": running|finished|failed|stopped, "step", "error", "pid", ...}
      model.safetensors    last weights (the model only; config in the metadata too)
      best.safetensors     weights with the lowest validation MSE (or loss: train --best-by) so far
      checkpoint.pt        full training state for --resume (torch.load(weights_only=True)-safe)
      snapshots/step_XXXXXXXX.safetensors   codebook (float16) + per-code usage over a window
      samples.png, umap.json, prior.safetensors, ...  written by other commands

Every file that is replaced is written to a temp file in the same directory and renamed
over the old one (os.replace), so a kill at any moment leaves the previous version readable.
Every file read here may be corrupt or hostile: loads validate and raise `BundleError`
(a ValueError) with a one-line message; nothing is ever unpickled. This is the one
safetensors layer of the project: run weights and snapshots (`save_weights`/`load_weights`),
and models that carry their own config in the metadata, the PixelCNN prior and the FD
classifier (`save_tagged`/`load_tagged`).

torch is imported by the functions that need it, not here: listing runs and reading their JSON
files (what the app's first paint and `sqvae list` do) costs no torch import.
"""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import ModelConfig

CONFIG, METRICS, STATUS = "config.json", "metrics.jsonl", "status.json"
WEIGHTS, BEST, CHECKPOINT, SNAPSHOTS = "model.safetensors", "best.safetensors", "checkpoint.pt", "snapshots"
# written by other commands (docs/interface.md): the prior, codebook maps, a shipped bundle's evaluation, test images
PRIOR, PRIOR_SUMMARY, MAPS, EVAL, SAMPLES = "prior.safetensors", "prior.json", "umap.json", "eval.json", "samples"
MAX_JSON_BYTES = 1 << 20            # config/status files are tiny; refuse huge ones
MAX_WEIGHTS_BYTES = 1 << 30
MAX_HEADER_BYTES = 100 << 20        # the safetensors reader's own bound
CODE_VERSION = "0.1.0"
STATES = ("running", "finished", "failed", "stopped")
LOGGED_SOURCE = "runlogger"     # config.json "source" of runs written by RunLogger: no model to rebuild


class BundleError(ValueError):
    """A run directory or bundle that cannot be used, with a message for the user."""


class MissingFileError(BundleError, FileNotFoundError):
    """A file that should be there is not (still a BundleError, and a FileNotFoundError)."""


# ----------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)              # mkstemp's 0600 would hide run files from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def atomic_torch_save(path: Path, obj) -> None:
    import torch
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (temp + rename)."""
    from safetensors.torch import save
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


# ------------------------------------------------------------------------- reading
def read_json(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{what} not found: {path}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise BundleError(f"{what} is too large ({path.stat().st_size} bytes): {path}")
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{what} is not valid JSON ({e.__class__.__name__}): {path}") from None
    if not isinstance(obj, dict):
        raise BundleError(f"{what} must hold a JSON object: {path}")
    return obj


def read_metrics(path: Path) -> list[dict]:
    """All rows of metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    rows = []
    if not path.is_file():
        return rows
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _check_header(data: bytes, what: str, path: Path) -> None:
    """Cheap structural check before safetensors parses anything: pickles and torn files are refused."""
    n = int.from_bytes(data[:8], "little")
    if len(data) >= 10 and n <= MAX_HEADER_BYTES and 8 + n <= len(data) and data[8:9] == b"{":
        return     # a header length that fits, then JSON: safetensors parses the rest
    if data[:1] == b"\x80" or data[:2] == b"PK":   # (a valid header length may start with 0x80 too)
        raise BundleError(f"{what} file looks like a pickle / torch.save archive, not safetensors; refusing "
                          f"to load it (pickles can execute code): {path}")
    if len(data) < 10:
        raise BundleError(f"{what} file is corrupt or not safetensors (truncated: {len(data)} bytes): {path}")
    raise BundleError(f"{what} file is corrupt or not safetensors (bad or truncated header): {path}")


def load_weights(path: Path, what: str = "weights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with clear errors (BundleError) for broken files."""
    from safetensors import SafetensorError
    from safetensors.torch import load
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise BundleError(f"{what} file too large ({size} bytes): {path}")
    data = path.read_bytes()
    _check_header(data, what, path)
    try:
        tensors = load(data)
        meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, RuntimeError, OSError, AttributeError) as e:
        raise BundleError(f"{what} file is corrupt or not safetensors ({str(e).splitlines()[0][:120]}): {path}") from None
    return tensors, meta


def weights_metadata(path: Path, what: str = "weights") -> dict[str, str]:
    """The metadata of a safetensors file (step, config, best_by, ...), read from its header alone:
    the tensors are not read. Broken files raise BundleError as in load_weights."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        data = f.read(8)
        n = int.from_bytes(data, "little")
        data += f.read(min(n, MAX_HEADER_BYTES))
    _check_header(data, what, path)
    try:
        meta = json.loads(data[8:]).get("__metadata__", {}) or {}
    except (ValueError, AttributeError):
        raise BundleError(f"{what} file is corrupt or not safetensors (bad header): {path}") from None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor `model` expects present with the right shape and dtype kind; nothing extra."""
    check_tensors(model.state_dict(), state, source)


def check_tensors(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """`state` against reference tensors (real or on the meta device): same names, shapes, float or
    not; floats finite. Raises BundleError naming the first offending tensor."""
    import torch
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise BundleError(f"{source}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                          f"(weights do not match the config)")
    if extra:
        raise BundleError(f"{source}: unexpected tensors {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    for k, ref in expected.items():
        t = state[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise BundleError(f"{source}: tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if t.is_floating_point() != ref.is_floating_point():
            raise BundleError(f"{source}: tensor {k!r} has dtype {t.dtype}, expected {ref.dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise BundleError(f"{source}: tensor {k!r} contains NaN or inf")


# ---------------------------------------------------- models that carry their config (prior, FD classifier)
TAGGED_VERSION = "1"


def save_tagged(model: torch.nn.Module, fmt: str, path: Path) -> None:
    """Weights + `model.config` (its `to_dict()` as JSON) under the format tag `fmt`, atomically."""
    meta = {"format": fmt, "format_version": TAGGED_VERSION,
            "config": json.dumps(model.config.to_dict(), sort_keys=True)}
    save_weights(path, dict(model.state_dict()), meta)


def load_tagged(path: Path, fmt: str, config_from_dict: Callable[[Any], Any],
                build: Callable[[Any], torch.nn.Module], device=None) -> torch.nn.Module:
    """The model saved by `save_tagged(model, fmt, path)`, rebuilt and in eval mode on `device`.

    The format tag, the config (through `config_from_dict`, which validates) and every tensor
    against a meta-device build of that config are checked before anything is allocated for
    real; BundleError (MissingFileError for a missing file) says what is wrong."""
    import torch
    from .device import as_device
    tensors, meta = load_weights(path, "checkpoint")
    where = f"checkpoint {path}"
    if not meta:
        raise BundleError(f"{where}: safetensors file has no metadata (expected format={fmt!r} and config)")
    if meta.get("format") != fmt:
        raise BundleError(f"{where}: unexpected checkpoint format {meta.get('format')!r}, expected {fmt!r}")
    if "config" not in meta:
        raise BundleError(f"{where}: metadata is missing the 'config' entry")
    try:
        raw = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise BundleError(f"{where}: config metadata is not valid JSON ({e})") from None
    try:
        cfg = config_from_dict(raw)
    except (TypeError, ValueError) as e:
        raise BundleError(f"{where}: invalid config: {e}") from None
    with torch.device("meta"):
        model = build(cfg)
    check_tensors(model.state_dict(), tensors, where)
    model.load_state_dict({k: t.float() for k, t in tensors.items()}, strict=True, assign=True)
    return model.to(as_device(device)).eval()


# --------------------------------------------------------------------------- bundles
@dataclass
class Bundle:
    """A loaded run directory: its config, a ready model (eval mode) and where it came from."""
    path: Path
    config: dict                 # the whole config.json
    model_cfg: ModelConfig
    model: torch.nn.Module
    weights: str                 # which weights file was loaded

    @property
    def dataset(self) -> str:
        return self.config.get("dataset", "fashion-mnist")

    @property
    def which(self) -> str:
        """"best" or "last": the `which` of load_bundle that names the weights file loaded."""
        return "best" if self.weights == BEST else "last"

    @property
    def name(self) -> str:
        return self.path.name


def read_config(run_dir: Path) -> tuple[dict, ModelConfig]:
    cfg = read_json(Path(run_dir) / CONFIG, "config.json")
    if cfg.get("source") == LOGGED_SOURCE:
        raise BundleError(f"{run_dir} is a logged run (RunLogger): it has metrics and codebook snapshots but "
                          f"no model to rebuild or evaluate; watch it in the app's Train live and Compare pages")
    if "model" not in cfg:
        raise BundleError(f"config.json has no 'model' section: {run_dir}")
    try:
        model_cfg = ModelConfig.from_dict(cfg["model"])
    except ValueError as e:
        raise BundleError(f"config.json: {e}") from None
    return cfg, model_cfg


def is_logged(run_dir: str | Path) -> bool:
    """Was this run written by RunLogger (config.json "source": "runlogger": curves and snapshots, no model)?"""
    try:
        return read_json(Path(run_dir) / CONFIG, "config.json").get("source") == LOGGED_SOURCE
    except BundleError:
        return False


def load_bundle(run_dir: str | Path, device: torch.device | str = "cpu", which: str = "last") -> Bundle:
    """Rebuild the model of a run directory or shipped bundle and load its weights.

    which: "last" (model.safetensors) or "best" (best.safetensors, falling back to last).
    """
    from .models import build_model
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BundleError(f"not a run directory: {run_dir}")
    cfg, model_cfg = read_config(run_dir)
    path = weights_path(run_dir, which)
    if not path.is_file():
        raise BundleError(f"no trained weights in {run_dir} (expected {WEIGHTS}; has training written a checkpoint yet?)")
    state, _ = load_weights(path)
    model = build_model(model_cfg)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state)
    return Bundle(run_dir, cfg, model_cfg, model.to(device).eval(), path.name)


def weights_path(run_dir: str | Path, which: str = "last") -> Path:
    """The weights file load_bundle(run_dir, which=which) loads: best.safetensors for "best" when
    there is one, else model.safetensors."""
    run_dir = Path(run_dir)
    return run_dir / (BEST if which == "best" and (run_dir / BEST).is_file() else WEIGHTS)


def weights_step(run_dir: str | Path, which: str = "last") -> int | None:
    """The training step of the weights load_bundle(run_dir, which=which) loads (their metadata)."""
    path = weights_path(run_dir, which)
    step = weights_metadata(path).get("step") if path.is_file() else None
    return int(step) if step is not None else None


def best_kept_by(run_dir: str | Path, rows: list[dict] | None = None) -> list[str]:
    """The validation figures ("mse", "loss") that keep the run's best.safetensors: the rule it was
    kept by (its metadata; MSE for runs from before `train --best-by`), and the other one too when
    that figure's lowest value falls at the same step. [] without best weights. `rows`: the run's
    metrics.jsonl when the caller has read it already."""
    path = Path(run_dir) / BEST
    if not path.is_file():
        return []
    meta = weights_metadata(path)
    kept, step = meta.get("best_by", "mse"), int(meta.get("step", -1))
    rules = [kept]
    for other in {"mse", "loss"} - {kept}:
        val = [r for r in (read_metrics(Path(run_dir)) if rows is None else rows) if f"val_{other}" in r]
        if val and min(val, key=lambda r: r[f"val_{other}"])["step"] == step:
            rules.append(other)
    return rules


def figures_text(rules: list[str]) -> str:
    """best_kept_by's figures as words: "loss", "MSE", "loss and MSE"."""
    return " and ".join({"loss": "loss", "mse": "MSE"}[r] for r in sorted(rules))


def made_from(record: dict, run_dir: str | Path, which: str) -> bool:
    """Was `record` (prior.json, eval.json: computed from the run's weights, its `weights_step`
    saying which) made from the weights load_bundle(run_dir, which=which) loads? A record from
    before weights_step was kept is of the last weights."""
    return record.get("weights_step", weights_step(run_dir)) == weights_step(run_dir, which)


# ------------------------------------------------------------------------- status
def read_status(run_dir: Path) -> dict:
    """status.json, with state "interrupted" when it says running but its process is gone."""
    try:
        st = read_json(Path(run_dir) / STATUS, "status.json")
    except BundleError:
        return {"state": "unknown"}
    if st.get("state") == "running" and not pid_alive(st.get("pid"), st.get("host")):
        st = {**st, "state": "interrupted"}
    return st


def pid_alive(pid, host: str | None = None) -> bool:
    """Is process `pid` (on `host`, default this machine) running and not a zombie?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if host and host != socket.gethostname():
        return True      # cannot tell for another machine; trust the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie (finished but not reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


# ------------------------------------------------------------------------- writing a run
class RunWriter:
    """Everything a training process writes into RUN_DIR while it runs: metrics rows (appended and
    flushed, tailed live by the app), status.json and codebook snapshots (atomic). `sqvae train`
    makes one per process (enabled on rank 0 only; the others write nothing), RunLogger one."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self._metrics = None

    def open(self, resume_step: int | None = None):
        if not self.enabled:
            return
        (self.path / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
        mpath = self.path / METRICS
        if resume_step is not None and mpath.exists():
            # drop rows logged after the checkpoint we resume from (they will be redone)
            keep = [r for r in read_metrics(mpath) if r.get("step", 0) <= resume_step]
            atomic_write_bytes(mpath, "".join(json.dumps(r) + "\n" for r in keep).encode())
            for p in (self.path / SNAPSHOTS).glob("step_*.safetensors"):
                if int(p.stem.split("_")[-1]) > resume_step:
                    p.unlink()
        self._metrics = open(mpath, "a", buffering=1)

    def metrics(self, row: dict):
        if self.enabled:
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()

    def status(self, state: str, step: int | None, error: str | None = None, **extra):
        if self.enabled:
            atomic_write_json(self.path / STATUS, {
                "state": state, "step": step, "error": error, "pid": os.getpid(),
                "host": socket.gethostname(), "updated": time.time(), **extra})

    def snapshot(self, step: int, codebook: torch.Tensor, usage: torch.Tensor):
        if self.enabled:
            save_weights(self.path / SNAPSHOTS / f"step_{step:08d}.safetensors",
                         {"codebook": codebook.detach().half(), "usage": usage.long()},
                         metadata={"step": str(step)})

    def close(self):
        if self._metrics:
            self._metrics.close()


# ------------------------------------------------------------------------- listing runs
RUN_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def valid_run_name(name) -> bool:
    """A directory name a listed run may have: [A-Za-z0-9_.-], at most 100 characters, no
    leading dot, no '..' (no hidden directories, no path tricks)."""
    return isinstance(name, str) and bool(RUN_NAME_RE.fullmatch(name)) and not name.startswith(".") \
        and ".." not in name


#: Environment variables naming where runs and bundles live (the app reads the same two).
RUNS_ENV, CHECKPOINTS_ENV = "SQVAE_RUNS", "SQVAE_CHECKPOINTS"


def default_run_dirs() -> list[str]:
    """What `sqvae list` scans without arguments: $SQVAE_RUNS (else runs) and $SQVAE_CHECKPOINTS
    (else checkpoints), relative to the working directory, as the app's directories are."""
    return [os.environ.get(RUNS_ENV) or "runs", os.environ.get(CHECKPOINTS_ENV) or "checkpoints"]


def list_runs(root: str | Path) -> list[Path]:
    """Run directories (holding config.json): root itself if it is one, else those directly under
    root and, one group level down, under its sub-directories (runs/ship/gaussian_1), in name order.
    Hidden or oddly named directories and symlinks that lead out of root are skipped. The one lister
    of the project: `sqvae list` and the app show the same runs."""
    root = Path(root)
    if (root / CONFIG).is_file():
        return [root]

    def children(folder: Path) -> list[Path]:
        try:
            return sorted(p for p in folder.iterdir() if valid_run_name(p.name) and p.is_dir() and _inside(p, root))
        except OSError:
            return []

    out = []
    for child in children(root):
        if (child / CONFIG).is_file():
            out.append(child)
        else:
            out.extend(g for g in children(child) if (g / CONFIG).is_file())
    return out


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def read_snapshots(run_dir: Path) -> list[dict]:
    """Codebook/usage snapshots in step order: [{"step", "codebook" (K,d) float32, "usage" (K,)}]."""
    out = []
    folder = Path(run_dir) / SNAPSHOTS
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


# ----------------------------------------------------------------------- uploads
UPLOAD_FILES = {CONFIG, METRICS, STATUS, WEIGHTS, BEST, PRIOR, PRIOR_SUMMARY, MAPS, EVAL}
MAX_UPLOAD_BYTES = 64 << 20


def import_bundle_zip(data: bytes, dest_root: str | Path, name: str) -> Path:
    """Unpack an uploaded bundle (.zip of a run directory) into dest_root/name, safely.

    Only known file names (optionally under one top folder, plus snapshots/ and samples/)
    are extracted, sizes are capped, and the result must load with `load_bundle`;
    otherwise nothing is left behind and a BundleError says why.
    """
    import io
    import re
    import shutil
    import zipfile
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}", name) or ".." in name:
        raise BundleError(f"invalid bundle name {name!r}: use letters, digits, '_', '-', '.'")
    if len(data) > MAX_UPLOAD_BYTES:
        raise BundleError(f"upload too large ({len(data)} bytes, limit {MAX_UPLOAD_BYTES})")
    dest = Path(dest_root) / name
    if dest.exists():
        raise BundleError(f"a bundle named {name} already exists")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in zf.infolist() if not m.is_dir()]
    except zipfile.BadZipFile:
        raise BundleError("upload is not a valid .zip file") from None
    if sum(m.file_size for m in members) > 4 * MAX_UPLOAD_BYTES or len(members) > 2000:
        raise BundleError("upload expands to too much data")
    # the bundle's root is where config.json is: the zip's top level or one folder down
    roots = [m.filename[:-len(CONFIG)] for m in members
             if m.filename.split("/")[-1] == CONFIG and m.filename.count("/") <= 1]
    if not roots:
        raise BundleError(f"upload has no {CONFIG} at its top level or in one folder")
    strip = roots[0]
    dest.mkdir(parents=True)
    try:
        for m in members:
            if not m.filename.startswith(strip):
                continue
            rel = m.filename[len(strip):]
            parts = rel.split("/")
            ok = (rel in UPLOAD_FILES or (len(parts) == 2 and parts[0] in (SNAPSHOTS, SAMPLES)
                  and re.fullmatch(r"[A-Za-z0-9_.-]+\.(safetensors|png)", parts[1])))
            if not ok:
                continue        # anything else (paths, pickles, scripts) is ignored
            (dest / parts[0]).parent.mkdir(exist_ok=True)
            if len(parts) == 2:
                (dest / parts[0]).mkdir(exist_ok=True)
            (dest / rel).write_bytes(zf.read(m))
        load_bundle(dest)
    except BundleError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise BundleError(f"upload could not be read ({e.__class__.__name__}: {e})") from None
    return dest
