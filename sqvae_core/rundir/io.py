"""The run directory's I/O: atomic writes, JSON and safetensors reads with one-line errors, and
models that carry their config in the metadata (the PixelCNN prior, the FD classifier).

Every file that is replaced is written to a temp file in the same directory and renamed
over the old one (os.replace), so a kill at any moment leaves the previous version readable.
Every file read here may be corrupt or hostile: loads validate and raise `BundleError`
(a ValueError) with a one-line message; nothing is ever unpickled. This is the one
safetensors layer of the project: run weights and snapshots (`save_weights`/`load_weights`),
and models that carry their own config in the metadata (`save_tagged`/`load_tagged`).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

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
    from ..device import as_device
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


