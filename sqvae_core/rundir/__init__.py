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

One module a concern, all names re-exported here (`from sqvae_core import rundir as rd`):
  io.py       atomic writes, JSON and safetensors reads, models that carry their config
  weights.py  Weights(run, which): the file, step and kept-by figures of the last or best weights
  reader.py   RunDir(path): config, status, metrics, eval, prior summary as frozen dataclasses; Bundle
  writer.py   RunWriter (what a training process writes), pid_alive
  listing.py  list_runs, the one lister of `sqvae list` and the app
  upload.py   import_bundle_zip
"""
from __future__ import annotations

from .io import (BEST, CHECKPOINT, CODE_VERSION, CONFIG, EVAL, LOGGED_SOURCE, MAPS, MAX_HEADER_BYTES,
                 MAX_JSON_BYTES, MAX_WEIGHTS_BYTES, METRICS, PRIOR, PRIOR_SUMMARY, SAMPLES, SNAPSHOTS, STATES,
                 STATUS, TAGGED_VERSION, WEIGHTS, BundleError, MissingFileError, atomic_torch_save,
                 atomic_write_bytes, atomic_write_json, check_state_dict, check_tensors, load_tagged, load_weights,
                 read_json, read_metrics, save_tagged, save_weights, weights_metadata)
from .listing import CHECKPOINTS_ENV, RUN_NAME_RE, RUNS_ENV, default_run_dirs, list_runs, valid_run_name
from .reader import (DEFAULT_DATASET, Bundle, DataOptions, Metrics, PriorSummary, RunConfig, RunDir, RunEval, RunStatus,
                     load_bundle)
from .upload import MAX_UPLOAD_BYTES, UPLOAD_FILES, import_bundle_zip
from .weights import WHICH, BestChoice, Weights, best_choice, figures_text
from .writer import RunWriter, pid_alive

__all__ = [
    "BEST", "CHECKPOINT", "CODE_VERSION", "CONFIG", "EVAL", "LOGGED_SOURCE", "MAPS", "MAX_HEADER_BYTES",
    "MAX_JSON_BYTES", "MAX_WEIGHTS_BYTES", "METRICS", "PRIOR", "PRIOR_SUMMARY", "SAMPLES", "SNAPSHOTS", "STATES",
    "STATUS", "TAGGED_VERSION", "WEIGHTS", "BundleError", "MissingFileError", "atomic_torch_save",
    "atomic_write_bytes", "atomic_write_json", "check_state_dict", "check_tensors", "load_tagged", "load_weights",
    "read_json", "read_metrics", "save_tagged", "save_weights", "weights_metadata",
    "CHECKPOINTS_ENV", "RUN_NAME_RE", "RUNS_ENV", "default_run_dirs", "list_runs", "valid_run_name",
    "DEFAULT_DATASET", "DataOptions", "Bundle", "Metrics", "PriorSummary", "RunConfig", "RunDir", "RunEval", "RunStatus", "load_bundle",
    "MAX_UPLOAD_BYTES", "UPLOAD_FILES", "import_bundle_zip",
    "WHICH", "BestChoice", "Weights", "best_choice", "figures_text",
    "RunWriter", "pid_alive",
]

