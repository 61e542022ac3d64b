"""RunLogger: write a run directory from any training loop, so the app can watch it.

    from sqvae_core import RunLogger

    with RunLogger("runs/my_vq", codebook_size=512, config={"dataset": "fashion-mnist", "lr": 3e-4}) as log:
        for step in range(1, steps + 1):
            x_rec, idx, commit = model(x)             # idx: code indices, any shape, any device
            loss = mse(x_rec, x) + commit
            ...
            log.log(step, indices=idx, codebook=vq.codebook, loss=loss, commit=commit)

What lands in out_dir (the run-directory format of rundir.py, read by the app and `sqvae list`):

    config.json     {"source": "runlogger", "logged": {codebook_size, code_dim, log_every, snapshot_every},
                     "config": <your dict>, "dataset": config["dataset"] if given, versions}.
                    There is no "model" section: nothing can rebuild the model, so `sqvae eval`,
                    `explore` and `prior` refuse the run with one line (rundir.RunConfig.model_config).
    metrics.jsonl   one row every `log_every` calls of log(): {"step", "wall_time", "elapsed",
                    <each scalar averaged over the calls of the window that passed it>,
                    "perplexity", "dead_codes"}. perplexity = exp(H(u)), u the usage of the codes
                    of *all* indices logged in the window pooled together (not the mean of
                    per-batch perplexities as `sqvae train` logs); dead_codes = codes that none
                    of them used. Rows are appended and flushed, so the app tails them live.
    snapshots/step_XXXXXXXX.safetensors   every `snapshot_every` calls: the last codebook passed
                    (float16, (K, d)) and the code usage counted since the previous snapshot.
    decoder.pt2, codes.safetensors   only if you call save_decoder(): your decoder (code indices ->
                    images) exported with torch.export, and example code grids (+ their images and
                    the codebook) to decode, edit and re-decode; load_decoder(run_dir) reads them back.
    status.json     "running" while the block runs; "finished" when it ends, "failed" with
                    "ExcType: message" when it raises (the exception still propagates),
                    "stopped" on KeyboardInterrupt. The partial last window is written first.

config.json, status.json and the snapshots are written to a temp file and renamed (rundir's
atomic writes); metrics.jsonl is append-only and a torn last line is skipped by its readers.

No host sync per step: indices are counted on their device (index_add_ into a (K,) counter:
unlike torch.bincount, it needs no max() read back from a GPU) and tensor scalars are summed
on their device. Values are read to the host only when a row is written. The codebook is kept
by reference and copied only when a snapshot is taken.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import time
from pathlib import Path

import torch

from . import rundir as rd
from .quantizers import count_codes_, perplexity_of_counts

RESERVED = ("step", "wall_time", "elapsed", "perplexity", "dead_codes")
DECODER, CODES = "decoder.pt2", "codes.safetensors"


class RunLogger:
    """Log a training loop's metrics, code usage and codebook into a run directory.

    out_dir         the run directory to write: new, or a directory without a run in it (e.g.
                    runs/NAME: the app lists the runs under $SQVAE_RUNS, default runs/).
    codebook_size   K, the number of codes; logged indices must lie in [0, K).
    config          optional JSON-able dict of your settings, stored in config.json as-is
                    (values JSON cannot hold are stored as their str()); a "dataset" string in
                    it is also shown as the run's dataset by the app.
    log_every       calls of log() per metrics row (default 10).
    snapshot_every  calls of log() per codebook/usage snapshot (default 100); a multiple of
                    log_every, so every snapshot's usage is made of whole logged windows.
    overwrite       if out_dir already holds a run written by RunLogger, replace it (its metrics,
                    snapshots, status and decoder are deleted). Never replaces a run of `sqvae train`.

    Use it as a context manager (above), or call close() yourself when the loop ends
    (close(error=exc) marks the run failed). Under DistributedDataParallel make one on rank 0
    only: it counts the codes of that rank's batches (gather the indices first for all ranks').
    """

    def __init__(self, out_dir: str | os.PathLike, codebook_size: int, config: dict | None = None, *,
                 log_every: int = 10, snapshot_every: int = 100, overwrite: bool = False):
        for name, v in (("codebook_size", codebook_size), ("log_every", log_every),
                        ("snapshot_every", snapshot_every)):
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if snapshot_every % log_every:
            raise ValueError(f"snapshot_every ({snapshot_every}) must be a multiple of log_every ({log_every})")
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        self.path = Path(out_dir)
        self.codebook_size, self.log_every, self.snapshot_every = int(codebook_size), int(log_every), int(snapshot_every)
        self.user_config = json.loads(json.dumps(config or {}, default=str))
        self.code_dim: int | None = None
        self.decoder_info: dict | None = None
        self._prepare_dir(overwrite)

        self.step: int | None = None          # the step of the last log() call
        self._calls = 0                       # log() calls so far
        self._window: dict[str, list] = {}    # key -> [host sum, device sum or None, n]
        self._counts: torch.Tensor | None = None      # (K,) long, on the indices' device
        self._snap_usage = torch.zeros(self.codebook_size, dtype=torch.long)   # host, since last snapshot
        self._codebook: torch.Tensor | None = None
        self._snapshot_calls = self._row_calls = 0   # _calls at the last snapshot / row
        self._t0 = time.time()
        self.closed = False

        self._write_config()
        self._writer = rd.RunWriter(self.path)      # the rows, status and snapshots of `sqvae train`
        self._writer.open()
        self._status("running")

    # ------------------------------------------------------------------ the public calls
    def log(self, step: int, *, indices: torch.Tensor | None = None, codebook: torch.Tensor | None = None,
            **scalars) -> None:
        """Record one training step.

        step      your step counter (a Python int; the row of a window carries its last step).
        indices   integer tensor of the code chosen at each latent position, any shape, on any
                  device (e.g. VectorQuantize's second output); counted for perplexity,
                  dead codes and the usage snapshots.
        codebook  the (K, d) codebook tensor (e.g. `vq.codebook`); kept by reference, copied
                  only at snapshots. Pass it every step or now and then: the last one is used.
        scalars   name=value: Python numbers or one-element tensors on any device (loss=loss,
                  commit=commit_loss, lr=...). Averaged over the calls of the window that passed
                  them; a non-finite mean is written as null.
        """
        if self.closed:
            raise RuntimeError(f"RunLogger for {self.path} is closed")
        if not isinstance(step, numbers.Integral) or isinstance(step, bool):
            raise TypeError(f"step must be a Python int, got {type(step).__name__}")
        self.step = int(step)
        if indices is not None:
            self._count(indices)
        if codebook is not None:
            self._set_codebook(codebook)
        for key, value in scalars.items():
            self._add(key, value)
        self._calls += 1
        if self._calls % self.log_every == 0:
            self._write_row()
            if self._calls % self.snapshot_every == 0:
                self._write_snapshot()
                self._status("running")

    def close(self, error: BaseException | None = None) -> None:
        """Write the partial last window and snapshot, then status finished / failed / stopped."""
        if self.closed:
            return
        self.closed = True
        flush_error = None
        try:
            if self._calls > self._row_calls:
                self._write_row()
            if self._calls > self._snapshot_calls:
                self._write_snapshot()
        except Exception as e:    # noqa: BLE001 - e.g. the device died with the loop; keep the status honest
            flush_error = e
        finally:
            self._writer.close()
        if error is None and flush_error is None:
            self._status("finished")
        elif isinstance(error, KeyboardInterrupt):
            self._status("stopped", f"stopped by KeyboardInterrupt at step {self.step}")
        else:
            e = error if error is not None else flush_error
            msg = " ".join(str(e).split())
            self._status("failed", f"{e.__class__.__name__}: {msg}" if msg else e.__class__.__name__)
        if flush_error is not None and error is None:
            raise flush_error

    def save_decoder(self, decode: torch.nn.Module, indices: torch.Tensor, images: torch.Tensor | None = None) -> None:
        """Make the run's codes decodable: export `decode` and keep example code grids beside it.

        decode   an nn.Module mapping an int64 tensor of code indices (B, *code_shape) to images
                 (B, C, S, S) in [0, 1]: typically the codebook lookup followed by your decoder.
                 A CPU copy of it, in eval mode, is exported with torch.export (batch dimension
                 dynamic) to decoder.pt2: it must be traceable by torch.export (no Python branch
                 on tensor values). Your module itself is not changed.
        indices  example code grids (B >= 2, *code_shape), e.g. the codes of held-out images: the
                 export's example input, and saved to codes.safetensors for editing.
        images   optional (B, C, S, S): the images those codes came from, saved with them.

        The exported program is run on `indices` and compared with your module's output; a
        mismatch above 1e-4 or a failed export raises ValueError and writes nothing. Call it
        whenever the decoder is worth keeping (typically after training); a later call replaces
        the files. Load with load_decoder(run_dir).
        """
        import copy
        import io
        if not isinstance(decode, torch.nn.Module):
            raise TypeError(f"decode must be an nn.Module (wrap a function in one), got {type(decode).__name__}")
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.ndim < 2 or len(indices) < 2:
            raise ValueError("indices must be an integer tensor of at least 2 code grids (B >= 2, *code_shape)")
        codes = indices.detach().to("cpu", torch.long)
        if int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size:
            raise ValueError(f"indices must be codes in [0, {self.codebook_size})")
        module = copy.deepcopy(decode).to("cpu").eval()
        try:
            with torch.no_grad():
                expected = module(codes)
                program = torch.export.export(module, (codes,),
                                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
                got = program.module()(codes)
            buf = io.BytesIO()
            torch.export.save(program, buf)
        except Exception as e:  # noqa: BLE001 - torch.export raises many kinds; one clear message
            msg = " ".join(str(e).split())[:300]
            raise ValueError(f"could not export the decoder with torch.export ({e.__class__.__name__}: {msg})") from None
        if not (isinstance(expected, torch.Tensor) and expected.ndim == 4 and len(expected) == len(codes)):
            raise ValueError(f"decode must return images (B, C, S, S), got "
                             f"{tuple(expected.shape) if isinstance(expected, torch.Tensor) else type(expected).__name__}")
        diff = float((got - expected).abs().max())
        if not diff <= 1e-4:
            raise ValueError(f"the exported decoder differs from the module by {diff:.3g} on the example codes")
        tensors = {"indices": codes}
        if images is not None:
            tensors["images"] = images.detach().to("cpu", torch.float32)
        if self._codebook is not None:
            tensors["codebook"] = self._codebook.to("cpu", torch.float32)
        rd.atomic_write_bytes(self.path / DECODER, buf.getvalue())
        rd.save_weights(self.path / CODES, tensors, metadata={"step": str(self.step)})
        self.decoder_info = {"file": DECODER, "format": "torch.export", "codes": CODES,
                             "code_shape": list(codes.shape[1:]), "image_shape": list(expected.shape[1:]),
                             "export_max_abs_diff": diff, "step": self.step}
        self._write_config()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(exc)
        return False          # an exception of the block propagates

    # ------------------------------------------------------------------ accumulation (no sync)
    def _count(self, indices: torch.Tensor) -> None:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a tensor, got {type(indices).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        idx = indices.detach().reshape(-1).long()
        if self._counts is None:
            self._counts = torch.zeros(self.codebook_size, dtype=torch.long, device=idx.device)
        elif idx.device != self._counts.device:
            raise ValueError(f"indices moved from {self._counts.device} to {idx.device}; log them on one device")
        try:
            count_codes_(self._counts, idx)
        except IndexError:        # raised at once on the CPU; a GPU reports it asynchronously
            raise ValueError(f"indices must be codes in [0, {self.codebook_size}) "
                             f"(codebook_size={self.codebook_size})") from None

    def _set_codebook(self, codebook: torch.Tensor) -> None:
        if not isinstance(codebook, torch.Tensor) or codebook.ndim != 2 or codebook.shape[0] != self.codebook_size:
            shape = tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__
            raise ValueError(f"codebook must be a ({self.codebook_size}, d) tensor, got {shape}")
        self._codebook = codebook.detach()
        if self.code_dim is None:
            self.code_dim = int(codebook.shape[1])
            self._write_config()

    def _add(self, key: str, value) -> None:
        if key in RESERVED:
            raise ValueError(f"{key!r} is written by RunLogger itself; log your value under another name")
        acc = self._window.setdefault(key, [0.0, None, 0])
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"scalar {key!r} must have one element, got shape {tuple(value.shape)}")
            v = value.detach().reshape(())
            if acc[1] is None:
                acc[1] = torch.zeros((), dtype=torch.float32, device=v.device)
            acc[1] += v
        elif isinstance(value, numbers.Real):
            acc[0] += float(value)
        else:
            raise TypeError(f"scalar {key!r} must be a number or a one-element tensor, got {type(value).__name__}")
        acc[2] += 1

    # ------------------------------------------------------------------ log points (reads)
    def _write_row(self) -> None:
        row = {"step": self.step, "wall_time": time.time(), "elapsed": round(time.time() - self._t0, 3)}
        for key, (host, dev, n) in self._window.items():
            if n:
                total = host + (dev.item() if dev is not None else 0.0)
                row[key] = total / n if math.isfinite(total) else None
        if self._counts is not None:
            counts = self._counts.to("cpu", copy=True)   # the one read of the window's usage (a copy:
            #                                   on a CPU, .cpu() would alias the counter zeroed next)
            self._counts.zero_()
            self._snap_usage += counts
            row.update(window_usage_stats(counts))
        self._writer.metrics(row)
        for acc in self._window.values():
            acc[0], acc[2] = 0.0, 0
            if acc[1] is not None:
                acc[1].zero_()
        self._row_calls = self._calls

    def _write_snapshot(self) -> None:
        if self._codebook is not None:
            self._writer.snapshot(self.step, self._codebook, self._snap_usage.clone())
        self._snap_usage.zero_()
        self._snapshot_calls = self._calls

    # ------------------------------------------------------------------ files
    def _prepare_dir(self, overwrite: bool) -> None:
        if (self.path / rd.CONFIG).exists():
            if not rd.RunDir(self.path).is_logged:
                raise ValueError(f"{self.path} already holds a run that RunLogger did not write; choose another out_dir")
            if not overwrite:
                raise ValueError(f"{self.path} already holds a logged run; pass overwrite=True to replace it "
                                 f"or choose another out_dir")
            for name in (rd.METRICS, rd.STATUS, DECODER, CODES):
                (self.path / name).unlink(missing_ok=True)
            shutil.rmtree(self.path / rd.SNAPSHOTS, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)

    def _write_config(self) -> None:
        doc = {"source": rd.LOGGED_SOURCE,
               "logged": {"codebook_size": self.codebook_size, "code_dim": self.code_dim,
                          "log_every": self.log_every, "snapshot_every": self.snapshot_every},
               "config": self.user_config, "code_version": rd.CODE_VERSION, "torch_version": torch.__version__}
        if isinstance(self.user_config.get("dataset"), str):
            doc["dataset"] = self.user_config["dataset"]
        if self.decoder_info:
            doc["decoder"] = self.decoder_info
        rd.atomic_write_json(self.path / rd.CONFIG, doc)

    def _status(self, state: str, error: str | None = None) -> None:
        self._writer.status(state, self.step, error, elapsed=round(time.time() - self._t0, 3))


def window_usage_stats(counts: torch.Tensor) -> dict:
    """{"perplexity": exp(H(counts / sum)), "dead_codes": #codes with count 0} of a (K,) count vector."""
    counts = counts.double()
    total = float(counts.sum())
    if total <= 0:
        return {"perplexity": None, "dead_codes": int(counts.numel())}
    return {"perplexity": float(perplexity_of_counts(counts)), "dead_codes": int((counts == 0).sum())}


# ----------------------------------------------------------------------------- decoders
class LoggedDecoder:
    """What save_decoder() kept: `decode(indices) -> images`, and the example `indices`
    (B, *code_shape), `images` (or None) and `codebook` (K, d) (or None) saved with it.

    A codespace.CodeSpace: the edits of sqvae_core.edits (Neighbor-k, one-cell edits, nearest codes)
    work on it as on a model, with Euclidean distances in the saved codebook."""
    metric = "euclidean"

    def __init__(self, program, tensors: dict, info: dict, codebook_size: int | None = None):
        self._module = program.module()
        self.indices, self.images, self._codebook = tensors["indices"], tensors.get("images"), tensors.get("codebook")
        self.info = info
        self.codebook_size = int(codebook_size or (len(self._codebook) if self._codebook is not None
                                                   else int(self.indices.max()) + 1))
        self.grid_shape = tuple(self.indices.shape[1:])

    @property
    def codebook(self) -> torch.Tensor | None:
        """The codebook (K, d) saved with the decoder, or None (log() got no codebook= before save_decoder)."""
        return self._codebook

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) of code grids (B, *code_shape), on the CPU."""
        return self._module(indices.to("cpu", torch.long))

    @property
    def example_grids(self) -> torch.Tensor:
        return self.indices

    @property
    def example_images(self) -> torch.Tensor | None:
        return self.images


def load_decoder(run_dir: str | os.PathLike) -> LoggedDecoder:
    """The decoder a logged run saved with RunLogger.save_decoder, ready to decode edited codes.

    Only for run directories you trust (your own): torch.export.load may unpickle parts of
    decoder.pt2, which a hostile file could abuse. The app's bundle upload never accepts the file.
    Raises BundleError (one line) if the run has no decoder or its files do not load.
    """
    run_dir = Path(run_dir)
    cfg = rd.RunDir(run_dir).config
    if not cfg.logged or cfg.decoder is None:
        raise rd.BundleError(f"{run_dir} has no decoder saved by RunLogger.save_decoder")
    tensors, _ = rd.load_weights(run_dir / CODES)
    if "indices" not in tensors:
        raise rd.BundleError(f"{run_dir / CODES} holds no 'indices'")
    path = run_dir / DECODER
    if not path.is_file():
        raise rd.BundleError(f"decoder not found: {path}")
    try:
        program = torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file
        raise rd.BundleError(f"decoder file does not load ({e.__class__.__name__}): {path}") from None
    return LoggedDecoder(program, tensors, dict(cfg.decoder), cfg.codebook_size)
