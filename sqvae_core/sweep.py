"""Hyperparameter sweeps on Ray Tune: `sqvae sweep`, one run directory per trial.

    SweepSpec      what to sweep (grid, search, scheduler, resources, shared train flags);
                   from_args / validate refuse a bad grid in one line, before Ray starts
    plan_trials    the trials of a grid or random search, named and fixed in advance
    _trial         one trial inside a Ray worker: `sqvae train`'s config and loop, validation
                   rows reported to Tune, resumed from its own checkpoint after any restart
    SweepRecorder  the driver's Tune callback that keeps DIR/sweep.json (atomic) up to date
    run_sweep      local Ray or a cluster, Tuner.fit, and what an interrupted sweep leaves

Trials are ordinary run directories, DIR/<trial name>/, written by the same `train()` as
`sqvae train`, so `sqvae list DIR`, eval, explore and the app read them unchanged. They must live
on a filesystem every node and the app see; Ray's own state (DIR/.ray) is Ray's business only.

Why the run directory, not Ray, holds the checkpoints: `train()` already checkpoints atomically
and resumes exactly (same weights as a run never stopped). A trial restarted by Tune (its worker
or node died, up to max_failures times) simply calls train(resume=True) on its directory. Each
validation row is checkpointed before it is reported, so a scheduler that stops a trial at a
report leaves it resumable at that very step.

Why a re-run continues by our own bookkeeping rather than Tuner.restore: the grid (and a random
search, drawn with a fixed seed) is planned here, trial names included, so running the same
command again reads DIR/sweep.json, keeps the trials that are over (finished, or stopped by the
scheduler) and launches the others, which resume from their checkpoints. Nothing depends on
Ray's experiment state surviving (a killed driver, a new Ray version, a deleted DIR/.ray). With
optuna the searcher proposes trials as it goes: a re-run tells it the finished ones
(evaluated_rewards), proposes the unfinished ones again first, and resumes them under their names.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cli import SWITCH_FLAGS, TRAIN_FLAGS, flag_dest, train_config
from .config import MODEL_KINDS

SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
MODES = ("min", "max")
SWEEP_FILE = "sweep.json"
RAY_DIR = ".ray"                 # Ray Tune's own storage inside DIR (hidden: run listings skip it)
TRIAL_STATES = ("pending", "running", "finished", "stopped", "failed")
OVER = ("finished", "stopped")   # trials a re-run keeps
GRID_FLAGS = {flag[2:]: typ for flag, (_, typ, _) in TRAIN_FLAGS.items()}   # "codebook-size" -> int
# what defines the trials: a re-run with other values is another sweep
IDENTITY = ("grid", "samples", "search", "scheduler", "metric", "mode", "grace", "train_flags")
RANDOM_SEED = 0                  # random search draws its trials with this seed: a re-run draws the same


@dataclass
class SweepSpec:
    out: str
    grid: dict[str, list] = field(default_factory=dict)    # flag without dashes -> values
    samples: int = 1                # grid: repeats of each point; random/optuna: number of trials
    search: str = "grid"
    scheduler: str = "fifo"
    metric: str = "val_mse"
    mode: str = "min"
    grace: int = 1                  # asha: validation passes before a trial can be stopped
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2
    max_concurrent: int | None = None
    train_flags: dict = field(default_factory=dict)        # argparse dests shared by every trial

    @classmethod
    def from_args(cls, args) -> "SweepSpec":
        """From `sqvae sweep`'s argparse namespace; grid values parsed by the train flag's type."""
        shared = {flag_dest(f): getattr(args, flag_dest(f)) for f in TRAIN_FLAGS}
        shared.update({d: getattr(args, d) for d in SWITCH_FLAGS})
        shared["compile"] = args.compile
        grid = parse_grid(args.grid)
        for flag in grid:
            if shared.get(flag_dest(flag)) is not None:
                raise ValueError(f"--{flag} is given both as a train flag and in --grid; give it once")
        return cls(out=args.out, grid=grid, samples=args.samples, search=args.search, scheduler=args.scheduler,
                   metric=args.metric, mode=args.mode, grace=args.grace, cpus_per_trial=args.cpus_per_trial,
                   gpus_per_trial=args.gpus_per_trial, max_failures=args.max_failures,
                   max_concurrent=args.max_concurrent,
                   train_flags={k: v for k, v in shared.items() if v is not None})

    def validate(self) -> "SweepSpec":
        """One line naming the bad value and what is allowed; every trial's TrainConfig is built
        and validated here, so a value the trainer would refuse is refused before Ray starts."""
        if not self.grid:
            raise ValueError("give at least one --grid FLAG=V1,V2 (e.g. --grid lr=0.001,0.002)")
        for flag, values in self.grid.items():
            check_grid_values(flag, values)
        choose("search", self.search, SEARCHES)
        choose("scheduler", self.scheduler, SCHEDULERS)
        choose("mode", self.mode, MODES)
        if not (isinstance(self.metric, str) and self.metric.startswith("val_")):
            raise ValueError(f"metric must be a validation figure (val_mse, val_loss, val_perplexity, "
                             f"val_entropy, val_dead_codes), got {self.metric!r}")
        for name, lo in (("samples", 1), ("grace", 1), ("max_failures", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max-concurrent must be >= 1, got {self.max_concurrent}")
        if not self.cpus_per_trial > 0 or self.gpus_per_trial < 0:
            raise ValueError(f"cpus-per-trial must be > 0 and gpus-per-trial >= 0, got "
                             f"{self.cpus_per_trial} and {self.gpus_per_trial}")
        if self.search == "optuna":
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise ValueError("--search optuna needs optuna: pip install optuna") from None
        if self.search == "grid" and self.n_trials() > 1000:
            raise ValueError(f"the grid makes {self.n_trials()} trials; at most 1000 (use --search random)")
        points = itertools.islice(itertools.product(*self.grid.values()), 1000)
        for point in points:     # every combination (the first 1000) through `sqvae train`'s own checks
            params = dict(zip(self.grid, point))
            try:
                trial_config(self.train_flags, params, Path(self.out) / "check").validate()
            except ValueError as e:
                shown = " ".join(f"{k}={v}" for k, v in params.items())
                raise ValueError(f"trial {shown}: {e}") from None
        return self

    def n_trials(self) -> int:
        return math.prod(len(v) for v in self.grid.values()) * self.samples if self.search == "grid" else self.samples

    def identity(self) -> dict:
        d = asdict(self)
        return json.loads(json.dumps({k: d[k] for k in IDENTITY}))


def choose(what: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")


def parse_grid(items: list[str]) -> dict[str, list]:
    """["lr=0.001,0.002", "model=vq,gaussian_1"] -> {"lr": [0.001, 0.002], "model": ["vq", "gaussian_1"]}."""
    grid = {}
    for item in items:
        flag, eq, raw = item.partition("=")
        flag = flag.strip().lstrip("-").replace("_", "-")
        if not eq:
            raise ValueError(f"--grid {item!r}: expected FLAG=V1,V2,... (e.g. lr=0.001,0.002)")
        if flag not in GRID_FLAGS:
            raise ValueError(f"--grid: unknown train flag {flag!r}; choose from {', '.join(GRID_FLAGS)}")
        if flag in grid:
            raise ValueError(f"--grid: {flag} is given twice; put all its values in one list")
        values = [v.strip() for v in raw.split(",")]
        if not raw.strip() or not all(values):
            raise ValueError(f"--grid {flag}: empty value in {raw!r}; give a comma-separated list such as "
                             f"{flag}=V1,V2")
        typ = GRID_FLAGS[flag]
        parsed = []
        for v in values:
            try:
                parsed.append(typ(v))
            except ValueError:
                raise ValueError(f"--grid {flag}: {v!r} is not {'an' if typ is int else 'a'} "
                                 f"{ {int: 'integer', float: 'number', str: 'string'}[typ]}") from None
        check_grid_values(flag, parsed)
        grid[flag] = parsed
    return grid


def check_grid_values(flag: str, values) -> None:
    if flag not in GRID_FLAGS:
        raise ValueError(f"--grid: unknown train flag {flag!r}; choose from {', '.join(GRID_FLAGS)}")
    if not isinstance(values, list) or not values:
        raise ValueError(f"--grid {flag}: empty list of values")
    if len(set(map(str, values))) != len(values):
        raise ValueError(f"--grid {flag}: a value is repeated in {values}")
    typ = GRID_FLAGS[flag]
    for v in values:
        if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
            raise ValueError(f"--grid {flag}: {v!r} is not of type {typ.__name__}")
    if flag == "model":
        bad = [v for v in values if v not in MODEL_KINDS]
        if bad:
            raise ValueError(f"--grid model: unknown model kind {bad[0]!r}; choose from {', '.join(MODEL_KINDS)}")


def trial_config(shared: dict, params: dict, run_dir: Path):
    """A trial's TrainConfig: `sqvae train` with the shared flags and this trial's grid values."""
    return train_config({**shared, **{flag_dest(k): v for k, v in params.items()}}, run_dir)


def trial_name(index: int, params: dict, sample: int | None = None) -> str:
    """"t003_lr-0.002_model-vq" (+ "_s1" for the repeats of a grid point): sortable, unique, a valid
    run name (rundir.RUN_NAME_RE), and readable in `sqvae list`."""
    parts = [f"t{index:03d}"] + [f"{k}-{re.sub(r'[^A-Za-z0-9.-]', '-', str(v))}" for k, v in params.items()]
    if sample is not None:
        parts.append(f"s{sample}")
    return "_".join(parts)[:100]


def plan_trials(spec: SweepSpec) -> list[dict]:
    """Grid: every point x samples, in order. Random: `samples` points drawn with a fixed seed.
    (Optuna trials are proposed by its searcher while the sweep runs.)"""
    if spec.search == "grid":
        points = [dict(zip(spec.grid, p)) for p in itertools.product(*spec.grid.values())]
        reps = [(p, s if spec.samples > 1 else None) for p in points for s in range(spec.samples)]
    else:
        rng = random.Random(RANDOM_SEED)
        reps = [({k: rng.choice(v) for k, v in spec.grid.items()}, None) for _ in range(spec.samples)]
    return [{"name": trial_name(i, p, s), "params": p} for i, (p, s) in enumerate(reps)]


# --------------------------------------------------------------------- inside a Ray worker
def _trial(config: dict) -> None:
    """One trial: train (resuming whatever its run directory holds) and report each validation
    row to Tune with the node it ran on. A trial Tune ends at a report (scheduler stop, end of the
    sweep) leaves train() through on_validation: checkpoint, status "stopped", then a clean exit."""
    import ray
    import torch

    from .train import train
    try:
        from ray.tune import get_context, report
    except ImportError:                       # Ray < 2.10
        from ray.train import get_context, report
    name = resolve_name(config, get_context().get_trial_id())
    params = config.get("_params") or {k: v for k, v in config.items() if not k.startswith("_")}
    run_dir = Path(config["_out"]) / name
    cfg = trial_config(config["_shared"], params, run_dir)
    torch.set_num_threads(max(1, int(config["_cpus"])))
    node = ray.get_runtime_context().get_node_id()
    tune_ended, reported = [], []

    def on_validation(row: dict):
        try:
            reported.append(row["step"])
            report({**row, "node": node, "run": name})
        except SystemExit:                    # Tune stops the trial inside report
            tune_ended.append(row["step"])
            return f"stopped by the sweep at step {row['step']} (the scheduler, or the sweep's end)"
        return None

    result = train(cfg, resume=True, progress=False, on_validation=on_validation)
    if result["state"] == "failed":
        raise RuntimeError(result["error"])
    if tune_ended:
        raise SystemExit(0)                   # Tune's own way out of a stopped trial
    if not reported:                          # it had finished before (a driver killed before it knew)
        from . import rundir as rd
        rows = [r for r in rd.read_metrics(run_dir) if spec_metric(config) in r]
        report({**(rows[-1] if rows else {"step": result["step"]}), "node": node, "run": name})


def spec_metric(config: dict) -> str:
    return config.get("_metric", "val_mse")


# ----------------------------------------------------------------------------- sweep.json
def read_sweep(out: str | Path) -> dict | None:
    p = Path(out) / SWEEP_FILE
    if not p.is_file():
        return None
    with open(p) as f:
        return json.load(f)


def _write_run_status(run_dir: Path, state: str, step, error: str) -> None:
    """status.json of a trial whose worker could not write it (killed in the meantime): the same
    fields as rundir.RunWriter.status."""
    from . import rundir as rd
    rd.atomic_write_json(run_dir / rd.STATUS, {"state": state, "step": step, "error": error, "pid": None,
                                               "host": socket.gethostname(), "updated": time.time()})


def _run_step(run_dir: Path):
    from . import rundir as rd
    try:
        return rd.Weights(run_dir).step
    except Exception:      # noqa: BLE001  (no weights yet)
        return None


class SweepRecorder:
    """Keeps DIR/sweep.json: the spec, the sweep's state and one entry per trial (name, params,
    state, node, metrics = its last validation row, error, failures). Written atomically on every
    change of a trial, by the driver only. Made a ray.tune.Callback by _recorder_class()."""

    def __init__(self, spec: SweepSpec, doc: dict, stopped_ids: set):
        self.spec, self.doc, self.stopped_ids = spec, doc, stopped_ids
        self.out = Path(spec.out)
        self.by_name = {t["name"]: t for t in doc["trials"]}

    def save(self) -> None:
        from . import rundir as rd
        self.doc["updated"] = time.time()
        rd.atomic_write_json(self.out / SWEEP_FILE, self.doc)

    def entry(self, trial) -> dict:
        name = resolve_name(trial.config, trial.trial_id)
        if name not in self.by_name:
            params = {k: v for k, v in trial.config.items() if not k.startswith("_")}
            self.by_name[name] = {"name": name, "params": params, "state": "pending", "node": None,
                                  "metrics": None, "error": None, "failures": 0}
            self.doc["trials"].append(self.by_name[name])
        return self.by_name[name]

    def set(self, trial, **changes) -> None:
        self.entry(trial).update(changes, updated=time.time())
        self.save()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.set(trial, state="running", error=None)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: v for k, v in result.items() if k == "step" or k.startswith("val_")}
        self.set(trial, state="running", node=result.get("node"), metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        e = self.entry(trial)
        if trial.trial_id in self.stopped_ids:
            step = (e.get("metrics") or {}).get("step")
            run = self.out / e["name"]
            from . import rundir as rd
            if rd.RunDir(run).status.state != "stopped":   # its worker was ended before writing it
                _write_run_status(run, "stopped", _run_step(run) or step,
                                  f"stopped by the {self.spec.scheduler} scheduler at step {step}")
            self.set(trial, state="stopped", error=f"stopped by the {self.spec.scheduler} scheduler at step {step}")
        else:
            from . import rundir as rd
            run_state = rd.RunDir(self.out / e["name"]).status.state
            if run_state == "finished":
                self.set(trial, state="finished")
            else:       # Tune ended it without a scheduler's decision (the sweep's end): not over
                self.set(trial, state="pending", error=f"ended {run_state} before its last step")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.set(trial, state="pending", failures=trial.num_failures, error=_error_line(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.set(trial, state="failed", failures=trial.num_failures, error=_error_line(trial))


def _error_line(trial) -> str:
    try:
        err = trial.get_error()
    except Exception:      # noqa: BLE001
        err = None
    text = str(err) if err else "the trial's worker failed"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # Ray wraps the trial's exception in its traceback: the last line names it
    return (lines[-1] if lines else text)[:500]


_CLASSES: dict = {}


def _recorder_class():
    """SweepRecorder as a ray.tune.Callback (made on first use: importing this module needs no Ray)."""
    if "recorder" not in _CLASSES:
        from ray.tune import Callback
        _CLASSES["recorder"] = type("TuneSweepRecorder", (SweepRecorder, Callback), {})
    return _CLASSES["recorder"]


def _scheduler(spec: SweepSpec, stopped_ids: set):
    """FIFO, or ASHA over validation passes (training_iteration counts reports) that records
    the trials it stops, so that sweep.json can tell them from finished ones."""
    if spec.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        def on_trial_result(self, *args, **kwargs):
            decision = super().on_trial_result(*args, **kwargs)
            trial = args[1] if len(args) > 1 else kwargs["trial"]
            if decision == TrialScheduler.STOP:
                stopped_ids.add(trial.trial_id)
            return decision

    return RecordingASHA(time_attr="training_iteration", grace_period=spec.grace, reduction_factor=2,
                         max_t=max(10_000, spec.grace + 1))


# ---------------------------------------------------------------------------------- driver
def _absolute_flags(flags: dict) -> dict:
    """Trials run with Ray's working directory: paths in the shared flags become absolute."""
    flags = dict(flags)
    if flags.get("data_dir"):
        flags["data_dir"] = os.path.abspath(flags["data_dir"])
    ds = flags.get("dataset")
    if isinstance(ds, str) and ds.startswith("folder:"):
        flags["dataset"] = "folder:" + os.path.abspath(ds[len("folder:"):])
    return flags


def _open_doc(spec: SweepSpec) -> dict:
    """sweep.json as found (same spec: a re-run) or new; another spec in the same DIR is refused."""
    out = Path(spec.out)
    old = read_sweep(out)
    if old is not None:
        was = {k: (old.get("spec") or {}).get(k) for k in IDENTITY}
        if was != spec.identity():
            diff = [k for k in IDENTITY if was[k] != spec.identity()[k]]
            raise ValueError(f"{out} holds another sweep (its {', '.join(diff) or 'spec'} differ); "
                             f"choose another --out or run that sweep's command again")
        for t in old["trials"]:
            if t["state"] not in OVER:
                t.update(state="pending")
        return old
    trials = [] if spec.search == "optuna" else plan_trials(spec)
    for t in trials:
        t.update(state="pending", node=None, metrics=None, error=None, failures=0)
    return {"spec": json.loads(json.dumps(asdict(spec))), "trials": trials}


def run_sweep(spec: SweepSpec, address: str | None = None, log=print) -> dict:
    """Run (or continue) the sweep; returns {"state": finished|interrupted, "counts": {state: n}}.

    Without an address a local Ray starts (or the cluster in $RAY_ADDRESS is joined; "auto": the
    running one). If Ray is already initialised in this process (tests), it is used as it is."""
    import ray
    from ray import tune
    try:
        from ray.tune import FailureConfig, RunConfig
    except ImportError:                       # Ray < 2.41
        from ray.train import FailureConfig, RunConfig

    spec = SweepSpec(**{**asdict(spec), "out": os.path.abspath(spec.out), "train_flags": _absolute_flags(spec.train_flags)})
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = _open_doc(spec)
    doc.update(state="running", pid=os.getpid(), host=socket.gethostname(), started=time.time())
    stopped_ids: set = set()
    recorder = _recorder_class()(spec, doc, stopped_ids)
    recorder.save()
    todo = [t for t in doc["trials"] if t["state"] not in OVER]
    kept = len(doc["trials"]) - len(todo)
    n_new = spec.samples - len(doc["trials"]) if spec.search == "optuna" else 0
    if kept:
        log(f"continuing the sweep in {out}: {kept} trial(s) already over are kept")
    base = {"_out": str(out), "_shared": spec.train_flags, "_cpus": spec.cpus_per_trial, "_metric": spec.metric}
    interrupted = False
    if todo or n_new > 0:
        started_ray = False
        if not ray.is_initialized():
            env = {k: os.environ[k] for k in ("PYTHONPATH", "SQVAE_DATA", "SQVAE_OFFLINE") if k in os.environ}
            if "SQVAE_DATA" in env:        # trials run in Ray's working directory
                env["SQVAE_DATA"] = os.path.abspath(env["SQVAE_DATA"])
            local = address is None and not os.environ.get("RAY_ADDRESS")
            # "local": a new Ray of our own, never a cluster ray.init would find running on this machine
            kwargs = dict(address="local", include_dashboard=False, object_store_memory=200 << 20) if local \
                else dict(address=address)
            ray.init(runtime_env={"env_vars": env} if env else None, log_to_driver=True, logging_level="WARNING",
                     **kwargs)
            started_ray = True
        try:
            if spec.search == "optuna":
                search_alg, n = _optuna(spec, doc, todo), len(todo) + max(n_new, 0)
                param_space = {**base, "_resume_names": {params_key(t["params"]): t["name"] for t in todo}}
            else:
                search_alg, n = None, 1
                param_space = {**base, "_trial": tune.grid_search([{"name": t["name"], "params": t["params"]}
                                                                   for t in todo])}
            tuner = tune.Tuner(
                tune.with_resources(_trial_entry, {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial}),
                param_space=param_space,
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=search_alg,
                                            scheduler=_scheduler(spec, stopped_ids), num_samples=n,
                                            max_concurrent_trials=spec.max_concurrent, reuse_actors=False),
                run_config=RunConfig(name="tune", storage_path=str(out / RAY_DIR), callbacks=[recorder],
                                     failure_config=FailureConfig(max_failures=spec.max_failures), verbose=0))
            tuner.fit()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            with _no_interrupts():   # a second Ctrl-C (or Ray's own on shutdown) must not skip the wrap-up
                if started_ray:
                    ray.shutdown()
                interrupted = _wrap_up(doc, out, recorder, interrupted)
    else:
        interrupted = _wrap_up(doc, out, recorder, interrupted)
    counts = {s: sum(t["state"] == s for t in doc["trials"]) for s in TRIAL_STATES}
    return {"state": doc["state"], "counts": counts}


def _wrap_up(doc: dict, out: Path, recorder, interrupted: bool) -> bool:
    """After Tune: trials not over were stopped by a Ctrl-C (or the driver's end); their run
    directories say "stopped" at their checkpoint, which a re-run of the command resumes."""
    from . import rundir as rd
    unfinished = [t for t in doc["trials"] if t["state"] in ("pending", "running")]
    interrupted = interrupted or bool(unfinished)
    for t in unfinished:
        run = out / t["name"]
        if (run / rd.STATUS).is_file() and rd.RunDir(run).status.active:
            step = _run_step(run)
            _write_run_status(run, "stopped", step, f"the sweep was interrupted; its checkpoint at step {step} "
                                                     f"resumes when the sweep command runs again")
        t.update(state="pending", error="interrupted: run the sweep command again to continue")
    doc.update(state="interrupted" if interrupted else "finished", finished=time.time())
    recorder.save()
    return interrupted


class _no_interrupts:
    """SIGINT ignored inside the block (main thread only; elsewhere nothing changes)."""

    def __enter__(self):
        import signal
        import threading
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc):
        import signal
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False


def _trial_entry(config: dict) -> None:
    """Tune's view of a trial: the grid entry unpacked into name and params, then _trial."""
    entry = config.get("_trial")
    if entry is not None:
        config = {**config, "_name": entry["name"], "_params": entry["params"]}
    _trial(config)


def _optuna(spec: SweepSpec, doc: dict, todo: list[dict]):
    """OptunaSearch (TPE) over the grid's values as categorical choices, told the trials already
    over and proposing the unfinished ones first (they resume under their names: _resume_names)."""
    from optuna.distributions import CategoricalDistribution
    from ray.tune.search.optuna import OptunaSearch
    search = OptunaSearch(space={k: CategoricalDistribution(v) for k, v in spec.grid.items()}, metric=spec.metric,
                          mode=spec.mode, seed=RANDOM_SEED,
                          points_to_evaluate=[t["params"] for t in todo] or None)
    for t in doc["trials"]:
        value = (t.get("metrics") or {}).get(spec.metric)
        if t["state"] in OVER and value is not None:
            search.add_evaluated_point(t["params"], value)
    return search


def params_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def resolve_name(config: dict, trial_id: str) -> str:
    """A trial's name: the planned one (grid, random); for optuna the unfinished trial of a
    previous run with the same params (to resume it), else "optuna_<Tune's trial id>"."""
    if config.get("_name"):
        return config["_name"]
    if config.get("_trial"):
        return config["_trial"]["name"]
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    return (config.get("_resume_names") or {}).get(params_key(params)) or f"optuna_{trial_id}"
