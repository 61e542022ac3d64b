"""Checkpoints of the official SQ-VAE trainer (github sony/sqvae, vision/) as run directories.

    import_official("best.pt", "fashion-mnist_gauss_1.yaml", "runs/official_g1")

The official trainer saves `state_dict()` of an `nn.DataParallel` wrapper (every key starts with
`module.`) and reads a yacs YAML. Its models are our `net="official"` models with other names
and two other parametrisations; the translation, official name -> ours:

    codebook                      quantizer.codebook
    log_param_q_scalar  (s)       quantizer.log_var_q (Gaussian) / quantizer.log_kappa_q (vMF), as is:
                                  official σ²_φ = exp(v) + exp(s) with v = 0 for variant I, so our
                                  var_q_floor is 1 for I and 0 for II-IV; κ_φ = 1 + exp(s): kappa_q_floor 1
    log_kappa_inv       (u, (1,)) log_kappa_x (t, ()): official κ = 1/(exp(u) + 1e-9), ours κ = exp(t),
                                  so t = -log(exp(u) + 1e-9)
    logvar_x                      likelihood.log_var_x (flags.arelbo false)
    encoder.res_m / res_v         encoder.res_mean / res_log_var
    encoder.conv.0.0.*            encoder.conv.0.* (the 64x64 encoder wraps its first conv)
    everything else               the same name (same Sequential indices, batch-norm statistics included)

The YAML gives the sizes: dataset.name (MNIST, FashionMNIST, CIFAR10, CelebA, CelebAMask_HQ),
model.name + model.param_var_q (GaussianSQVAE + gaussian_1..4, VmfSQVAE + vmf), network.num_rb,
network.num_class (vMF), quantization.size_dict / dim_dict (the official main.py adds 1 to dim_dict
for vMF; the configs.json the trainer writes beside best.pt already holds the +1, and is read too).

Everything is checked before anything is written: the file loads with
torch.load(weights_only=True) (nothing is unpickled), every tensor is there with the shape the
config gives, values are finite. The bundle is written into a hidden temp directory beside
RUN_DIR and renamed into place, so RUN_DIR is either complete or absent. Errors are
`OfficialImportError` (a `BundleError`) with a one-line message.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import rundir as rd
from .config import ModelConfig

SOURCE = "official"        # config.json "source" of an imported bundle
MAX_CHECKPOINT_BYTES = rd.MAX_WEIGHTS_BYTES
MAX_CONFIG_BYTES = rd.MAX_JSON_BYTES

# official dataset name -> (C, S, our dataset name or None: needs --dataset folder:PATH, network.name)
DATASETS = {
    "MNIST": ((1, 28), "mnist", "resnet"),
    "FashionMNIST": ((1, 28), "fashion-mnist", "resnet"),
    "CIFAR10": ((3, 32), "cifar10", "resnet"),
    "CelebA": ((3, 64), None, "resnet"),
    "CelebAMask_HQ": ((1, 64), None, "resnet_label"),
}
VARIANTS = {("GaussianSQVAE", f"gaussian_{i}"): f"gaussian_{i}" for i in (1, 2, 3, 4)} | {("VmfSQVAE", "vmf"): "vmf"}
DATASET_HINTS = {
    "CelebA": "a folder of CelebA images (they are center-cropped to a square and resized to 64x64 here; "
              "the official loader crops 140x140 first)",
    "CelebAMask_HQ": "a folder of 64x64 label maps stored as grey levels round(c*255/(C-1)) for class c",
}
KAPPA_EPS = 1e-9            # official κ = 1 / (exp(log_kappa_inv) + 1e-9)


class OfficialImportError(rd.BundleError):
    """An official checkpoint or config that cannot be imported, with a one-line message."""


@dataclass
class OfficialConfig:
    """What an official YAML says, translated: our model config and dataset."""
    model: ModelConfig
    dataset: str                 # our dataset name
    official: dict               # the official fields it was read from (stored in config.json)


# ----------------------------------------------------------------------- the YAML
def _decode(v):
    """yacs decodes strings that are Python literals ("(1, 28, 28)" -> a tuple); so do we, safely."""
    if isinstance(v, str):
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return v
    return v


def _read_text(src, what: str, limit: int) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    else:
        p = Path(src)
        if not p.is_file():
            raise OfficialImportError(f"{what} not found: {p}")
        if p.stat().st_size > limit:
            raise OfficialImportError(f"{what} is too large ({p.stat().st_size} bytes, limit {limit}): {p}")
        data = p.read_bytes()
    if len(data) > limit:
        raise OfficialImportError(f"{what} is too large ({len(data)} bytes, limit {limit})")
    return data


def read_official_config(src, dataset: str | None = None) -> OfficialConfig:
    """Parse an official YAML (or the trainer's configs.json): path or bytes. `dataset` overrides
    the dataset the bundle is evaluated on (needed for CelebA and CelebAMask_HQ: folder:PATH)."""
    import yaml
    data = _read_text(src, "config", MAX_CONFIG_BYTES)
    try:
        doc = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise OfficialImportError(f"config is not valid YAML ({first})") from None
    if not isinstance(doc, dict):
        raise OfficialImportError("config is not an official SQ-VAE YAML (expected a mapping with "
                                  "dataset, model, network and quantization sections)")

    def get(section: str, key: str, default=KeyError):
        sec = doc.get(section)
        if not isinstance(sec, dict) or key not in sec:
            if default is KeyError:
                raise OfficialImportError(f"config has no {section}.{key} (is it an official SQ-VAE YAML?)")
            return default
        return _decode(sec[key])

    def integer(section: str, key: str, lo: int, hi: int) -> int:
        v = get(section, key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise OfficialImportError(f"config {section}.{key} must be an integer in [{lo}, {hi}], got {v!r}")
        return v

    def number(section: str, key: str, default=KeyError) -> float:
        v = get(section, key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise OfficialImportError(f"config {section}.{key} must be a finite number, got {v!r}")
        return float(v)

    name = get("dataset", "name")
    if name not in DATASETS:
        raise OfficialImportError(f"unknown dataset.name {name!r} in the config; the official code has "
                                  f"{', '.join(DATASETS)}")
    (c, s), ours, net_name = DATASETS[name]
    shape = get("dataset", "shape", None)
    if shape is not None and (not isinstance(shape, (tuple, list)) or tuple(shape) != (c, s, s)):
        raise OfficialImportError(f"config dataset.shape {shape!r} does not fit dataset {name}, whose "
                                  f"official nets take ({c}, {s}, {s})")
    model_name, variant = get("model", "name"), get("model", "param_var_q")
    kind = VARIANTS.get((model_name, variant))
    if kind is None:
        raise OfficialImportError(
            f"unknown variant: model.name {model_name!r} with model.param_var_q {variant!r}; importable are "
            f"GaussianSQVAE with gaussian_1..gaussian_4 and VmfSQVAE with vmf")
    if (kind == "vmf") != (name == "CelebAMask_HQ"):
        raise OfficialImportError(f"{model_name} on {name}: the official code has vMF SQ-VAE on CelebAMask_HQ "
                                  f"label maps only, and Gaussian SQ-VAE on the image datasets")
    net = get("network", "name", net_name)
    if net != net_name:
        raise OfficialImportError(f"config network.name {net!r}: the official {name} nets are {net_name!r}")
    flags = doc.get("flags") if isinstance(doc.get("flags"), dict) else {}
    if _decode(flags.get("bn", True)) is not True:
        raise OfficialImportError("config flags.bn false: the official nets without batch-norm keep it in their "
                                  "residual blocks, which no model here reproduces")
    arelbo = _decode(flags.get("arelbo", True))
    if not isinstance(arelbo, bool):
        raise OfficialImportError(f"config flags.arelbo must be true or false, got {arelbo!r}")

    num_rb = integer("network", "num_rb", 1, 16)
    size_dict = integer("quantization", "size_dict", 2, 65536)
    dim_dict = integer("quantization", "dim_dict", 2, 2048)
    log_q = number("model", "log_param_q_init", 0.0)
    cfg = ModelConfig(kind=kind, image_channels=c, image_size=s, codebook_size=size_dict, code_dim=dim_dict,
                      num_rb=num_rb, batch_norm=True, net="official", arelbo=arelbo)
    official = {"dataset": name, "model": model_name, "param_var_q": variant, "num_rb": num_rb,
                "size_dict": size_dict, "dim_dict": dim_dict, "arelbo": arelbo}
    if kind == "vmf":
        # main.py adds 1 to dim_dict for VmfSQVAE before building; its saved configs.json (which
        # also has flags.var_q, set by main.py) already holds the +1
        if "var_q" not in flags:
            cfg.code_dim = dim_dict + 1
        cfg.num_levels = integer("network", "num_class", 2, 256)
        act = get("network", "act_decoder", None)
        if act != "exp":
            raise OfficialImportError(f"config network.act_decoder {act!r}: only 'exp' (a softplus, the official "
                                      f"setting) matches the vMF decoder here")
        cfg.kappa_q_floor = 1.0
        cfg.kappa_q_init = 1.0 + math.exp(min(log_q, 50.0))
        cfg.kappa_x_init = 1.0 / (math.exp(min(number("model", "log_kappa_inv", math.log(0.01)), 50.0)) + KAPPA_EPS)
        official.update(num_class=cfg.num_levels, act_decoder=act)
    else:
        cfg.var_q_floor = 1.0 if kind == "gaussian_1" else 0.0
        cfg.var_q_init = cfg.var_q_floor + math.exp(min(log_q, 50.0))
        if not arelbo:
            cfg.log_var_x_init = math.log(0.1)
    try:
        cfg.validate()
    except ValueError as e:
        raise OfficialImportError(f"config: {e}") from None

    if dataset is None:
        if ours is None:
            raise OfficialImportError(f"dataset {name} has no built-in loader here: pass --dataset folder:PATH, "
                                      f"{DATASET_HINTS[name]}")
        dataset = ours
    _check_dataset(dataset, c, s)
    return OfficialConfig(cfg, dataset, official)


def _check_dataset(name: str, c: int, s: int) -> None:
    from .data import dataset_shape
    try:
        shape = dataset_shape(name, s, c)
    except (ValueError, KeyError) as e:
        raise OfficialImportError(f"dataset: {str(e).splitlines()[0]}") from None
    if tuple(shape) != (c, s, s):
        raise OfficialImportError(f"dataset {name} has images of shape {tuple(shape)}; the checkpoint's model "
                                  f"takes ({c}, {s}, {s})")
    if name.startswith("folder:") and not Path(name[len("folder:"):]).expanduser().is_dir():
        raise OfficialImportError(f"dataset {name}: no such folder")


# ---------------------------------------------------------------- the state dict
def official_name(key: str, cfg: ModelConfig) -> str:
    """The official trainer's name (without `module.`) of one of our state-dict keys."""
    fixed = {"quantizer.codebook": "codebook", "quantizer.log_var_q": "log_param_q_scalar",
             "quantizer.log_kappa_q": "log_param_q_scalar", "log_kappa_x": "log_kappa_inv",
             "likelihood.log_var_x": "logvar_x"}
    if key in fixed:
        return fixed[key]
    for ours, theirs in (("encoder.res_mean.", "encoder.res_m."), ("encoder.res_log_var.", "encoder.res_v.")):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    if cfg.design == "64" and key.startswith("encoder.conv.0."):
        return "encoder.conv.0.0." + key[len("encoder.conv.0."):]
    return key


def load_official_checkpoint(src) -> dict:
    """The state dict of an official checkpoint (path or bytes), `module.` prefixes removed.
    torch.load(weights_only=True): a file holding anything but tensors is refused, not run."""
    import torch
    data = _read_text(src, "checkpoint", MAX_CHECKPOINT_BYTES)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:      # noqa: BLE001 - torch.load fails in many ways on junk; all mean the same
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:160]
        raise OfficialImportError(f"checkpoint is not a PyTorch state dict that torch.load(weights_only=True) "
                                  f"can read ({e.__class__.__name__}: {first})") from None
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        raise OfficialImportError(f"checkpoint holds a {type(obj).__name__}, not a state dict "
                                  f"(the official trainer saves model.state_dict())")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise OfficialImportError(f"checkpoint is not a plain state dict: {bad[0]!r} is a {type(obj[bad[0]]).__name__}"
                                  f", not a tensor (the official trainer saves model.state_dict())")
    wrapped = [k.startswith("module.") for k in obj]
    if any(wrapped) and not all(wrapped):
        raise OfficialImportError("checkpoint mixes keys with and without the 'module.' prefix of nn.DataParallel")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def translate_state_dict(state: dict, cfg: ModelConfig) -> dict:
    """Official state dict (no `module.`) -> ours, checked key by key against the model `cfg` builds."""
    import torch

    from .models import build_model
    expected = build_model(cfg).state_dict()
    names = {official_name(k, cfg): k for k in expected}
    missing = [n for n in names if n not in state]
    extra = sorted(set(state) - set(names))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing module.{missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if extra:
            parts.append(f"unexpected module.{extra[0]}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
        raise OfficialImportError(f"checkpoint does not fit the config ({'; '.join(parts)}): "
                                  f"is it the checkpoint of this YAML's run?")
    out = {}
    for theirs, ours in names.items():
        t, ref = state[theirs], expected[ours]
        want = (1,) if ours == "log_kappa_x" else tuple(ref.shape)
        if tuple(t.shape) != want:
            raise OfficialImportError(f"checkpoint tensor module.{theirs} has shape {tuple(t.shape)}, the config "
                                      f"gives {want}: is it the checkpoint of this YAML's run?")
        if t.is_floating_point() != ref.is_floating_point() or t.is_complex():
            raise OfficialImportError(f"checkpoint tensor module.{theirs} has dtype {t.dtype}, expected {ref.dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise OfficialImportError(f"checkpoint tensor module.{theirs} contains NaN or inf")
        if ours == "log_kappa_x":       # κ = 1/(exp(u) + 1e-9) = exp(t)
            t = -torch.log(t.double().exp() + KAPPA_EPS).reshape(())
        out[ours] = t.to(ref.dtype).reshape(ref.shape).clone()
    return out


# ------------------------------------------------------------------------ import
def import_official(checkpoint, config, out: str | Path, dataset: str | None = None, *,
                    center_crop: int | None = None, checkpoint_name: str | None = None) -> Path:
    """Write the run directory `out` (config.json, model.safetensors, status.json finished) from an
    official checkpoint and its YAML, each a path or the file's bytes (an upload; `checkpoint_name`
    is then the name recorded). `out` must not exist or be an empty directory. `center_crop`
    (folder: datasets) is stored as the run's crop, as `train --center-crop` does: 140 reads CelebA
    as the official loader does."""
    import socket

    import torch

    from .models import build_model
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OfficialImportError(f"{out} already exists and is not empty; choose another RUN_DIR")
    oc = read_official_config(config, dataset)
    if center_crop is not None:
        if isinstance(center_crop, bool) or not isinstance(center_crop, int) or center_crop <= 0:
            raise OfficialImportError(f"center crop must be a positive number of pixels, got {center_crop!r}")
        if not oc.dataset.startswith("folder:"):
            raise OfficialImportError(f"a center crop applies to folder: datasets only, not {oc.dataset}")
    ckpt_bytes = _read_text(checkpoint, "checkpoint", MAX_CHECKPOINT_BYTES)
    state = translate_state_dict(load_official_checkpoint(ckpt_bytes), oc.model)
    model = build_model(oc.model)
    model.load_state_dict(state)
    with torch.no_grad():          # a last guard: the model runs on a batch of zeros
        x = torch.zeros(1, oc.model.image_channels, oc.model.image_size, oc.model.image_size)
        if not torch.isfinite(model.eval().reconstruct(x)).all():
            raise OfficialImportError("the imported model gives non-finite reconstructions")
    doc = {"model": oc.model.to_dict(), "dataset": oc.dataset, "source": SOURCE,
           "official": {**oc.official,
                        "checkpoint": checkpoint_name or (None if isinstance(checkpoint, (bytes, bytearray))
                                                          else Path(checkpoint).name),
                        "checkpoint_sha256": hashlib.sha256(ckpt_bytes).hexdigest()},
           # the official loaders validate on the last 10000 training images
           "train": {"val_size": 10_000, "val_split": "last",
                     **({"center_crop": center_crop} if center_crop is not None else {})},
           "code_version": rd.CODE_VERSION, "torch_version": torch.__version__, "imported": time.time()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".import"))
    try:
        tmp.chmod(0o755)           # mkdtemp makes it private; a run directory is not
        rd.atomic_write_json(tmp / rd.CONFIG, doc)
        rd.save_weights(tmp / rd.WEIGHTS, model.state_dict(),
                        {"config": json.dumps(oc.model.to_dict()), "source": SOURCE})
        rd.atomic_write_json(tmp / rd.STATUS, {"state": "finished", "step": None, "error": None,
                                               "pid": os.getpid(), "host": socket.gethostname(),
                                               "updated": time.time(), "source": SOURCE})
        rd.RunDir(tmp).load()        # reads back like any bundle
        if out.is_dir():
            out.rmdir()            # empty (checked above); fails if something appeared meanwhile
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
