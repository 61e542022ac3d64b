"""`sqvae sweep` on Ray Tune: bad grids refused in one line, a two-node cluster runs a grid on
both nodes, a node removed mid-sweep loses nothing (its trial resumes and ends with the weights of
an uninterrupted run), ASHA stops a bad trial and leaves it resumable, a re-run keeps what is over,
Ctrl-C leaves every run resumable.

One Ray test cluster (ray.cluster_utils.Cluster: a head and a second node, one CPU each) serves
the whole module: starting one costs ~10 s and CI has 2 cores. Trials are tiny (K=16, d=8, one
residual block, 40-200 steps, 200 validation images). Every wait has a timeout.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sqvae_core import rundir as rd
from sqvae_core.sweep import SweepSpec, parse_grid, plan_trials, read_sweep, run_sweep, trial_config

ROOT = Path(__file__).resolve().parents[1]
TINY = {"codebook_size": 16, "code_dim": 8, "num_rb": 1, "steps": 40, "val_every": 20, "checkpoint_every": 20,
        "snapshot_every": 20, "log_every": 10, "val_max_images": 200}
TINY_ARGS = ["--codebook-size", "16", "--code-dim", "8", "--num-rb", "1", "--val-every", "20",
             "--checkpoint-every", "20", "--snapshot-every", "20", "--val-max-images", "200"]


def sweep_cli(*args, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sqvae_core", "sweep", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


# ------------------------------------------------------------------------ bad grids, no Ray
@pytest.mark.parametrize("grid, message", [
    (["nope=1,2"], "unknown train flag 'nope'"),
    (["lr=0.1,abc"], "'abc' is not a number"),
    (["codebook-size=16,1.5"], "'1.5' is not an integer"),
    (["model=vq,vqq"], "unknown model kind 'vqq'"),
    (["lr="], "empty value"),
    (["seed=1,,2"], "empty value"),
    (["lr"], "expected FLAG=V1,V2"),
    (["lr=0.1", "lr=0.2"], "given twice"),
])
def test_parse_grid_refuses(grid, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(grid)


def test_grid_flags_take_train_types_and_model_kinds_from_config():
    from sqvae_core.config import MODEL_KINDS
    g = parse_grid(["codebook_size=16,32", "lr=1e-3", f"model={','.join(MODEL_KINDS)}"])
    assert g == {"codebook-size": [16, 32], "lr": [0.001], "model": list(MODEL_KINDS)}


@pytest.mark.parametrize("changes, message", [
    (dict(grid={}), "at least one --grid"),
    (dict(grid={"lr": [-1.0, 0.1]}), r"trial lr=-1.0: learning rate must be a positive number"),
    (dict(grid={"lr-schedule": ["cosine", "linear"]}), "lr schedule must be one of"),
    (dict(grid={"preset": ["fast"]}), "unknown preset 'fast'"),
    (dict(search="bayes"), "unknown search 'bayes'; choose one of grid, random, optuna"),
    (dict(scheduler="hyperband"), "unknown scheduler 'hyperband'"),
    (dict(metric="mse"), "metric must be a validation figure"),
    (dict(samples=0), "samples must be an integer >= 1"),
    (dict(grid={"seed": [1, 1]}), "repeated"),
])
def test_spec_validate_refuses_in_one_line(changes, message):
    spec = SweepSpec(out="x", **{"grid": {"lr": [0.001]}, **changes})
    with pytest.raises(ValueError, match=message) as e:
        spec.validate()
    assert "\n" not in str(e.value)


def test_trials_config_is_sqvae_trains(tmp_path):
    """A trial's TrainConfig is what `sqvae train` makes of the same flags (preset included)."""
    from sqvae_core.cli import build_parser, train_config
    argv = ["train", "--out", str(tmp_path / "r"), "--preset", "demo", "--model", "vq", "--lr", "0.003"]
    expected = train_config(vars(build_parser().parse_args(argv)), tmp_path / "r")
    got = trial_config({"preset": "demo"}, {"model": "vq", "lr": 0.003}, tmp_path / "r")
    assert got == expected and got.lr == 0.003 and got.model.codebook_size == 128   # the demo preset's K


def test_plan_names_are_unique_run_names_and_random_is_reproducible():
    spec = SweepSpec(out="x", grid={"lr": [0.001, 0.002], "model": ["vq", "gaussian_1"]}, samples=2)
    names = [t["name"] for t in plan_trials(spec)]
    assert len(names) == 8 == len(set(names)) and all(rd.valid_run_name(n) for n in names)
    rnd = SweepSpec(out="x", grid={"lr": [0.001, 0.002, 0.004], "seed": [0, 1, 2]}, search="random", samples=5)
    assert plan_trials(rnd) == plan_trials(rnd) and len(plan_trials(rnd)) == 5


def test_cli_bad_grid_one_line_exit_2_before_ray(tmp_path):
    r = sweep_cli("--out", str(tmp_path / "s"), "--grid", "codebook-size=16,abc", "--steps", "5")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --grid codebook-size: 'abc' is not an integer"
    assert not (tmp_path / "s").exists()        # refused before anything (or Ray) started
    h = sweep_cli("--help")
    assert h.returncode == 0 and all(o in h.stdout for o in ("--grid", "--scheduler", "--address", "--max-failures",
                                                             "--codebook-size"))


def test_optuna_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)      # import optuna -> ImportError
    with pytest.raises(ValueError, match="pip install optuna"):
        SweepSpec(out="x", grid={"lr": [0.001]}, search="optuna").validate()


# --------------------------------------------------------------------------- the cluster
@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    args = dict(num_cpus=1, object_store_memory=80 << 20)
    c = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    worker = c.add_node(**args)
    c.wait_for_nodes(timeout=60)
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers do not import tests/
    # the workers run the code under test, not another installed copy
    import sqvae_core
    where = ray.get(ray.remote(lambda: __import__("sqvae_core").__file__).remote(), timeout=60)
    assert where == sqvae_core.__file__
    yield {"cluster": c, "worker": worker, "head": c.head_node}
    ray.shutdown()
    c.shutdown()


def spec_for(out, grid, **kw) -> SweepSpec:
    return SweepSpec(out=str(out), grid=grid, train_flags={**TINY, **kw.pop("flags", {})}, **kw).validate()


@pytest.mark.slow
def test_grid_runs_on_both_nodes_and_rerun_keeps_it(cluster, tmp_path):
    spec = spec_for(tmp_path / "sw", {"lr": [0.002, 0.001], "seed": [0, 1]})
    t0 = time.time()
    summary = run_sweep(spec)
    assert summary == {"state": "finished", "counts": {"pending": 0, "running": 0, "finished": 4, "stopped": 0,
                                                       "failed": 0}}
    doc = read_sweep(tmp_path / "sw")
    nodes = {cluster["head"].node_id, cluster["worker"].node_id}
    assert {t["node"] for t in doc["trials"]} == nodes                     # both nodes trained
    for t in doc["trials"]:
        run = tmp_path / "sw" / t["name"]
        assert rd.RunDir(run).status.state == "finished"
        vals = [r for r in rd.read_metrics(run) if "val_mse" in r]
        assert t["metrics"] == {k: v for k, v in vals[-1].items() if k != "wall_time"} and t["metrics"]["step"] == 40
        assert t["params"] == dict(zip(("lr", "seed"), (t["params"]["lr"], t["params"]["seed"])))
    assert sorted(p.name for p in rd.list_runs(tmp_path / "sw")) == sorted(t["name"] for t in doc["trials"])
    listed = subprocess.run([sys.executable, "-m", "sqvae_core", "list", str(tmp_path / "sw")], capture_output=True,
                            text=True, timeout=60)
    assert listed.stdout.count("finished") == 4
    # the same sweep again: everything is over, nothing retrains
    before = {t["name"]: (tmp_path / "sw" / t["name"] / rd.WEIGHTS).stat().st_mtime_ns for t in doc["trials"]}
    assert run_sweep(spec)["counts"]["finished"] == 4
    assert {n: (tmp_path / "sw" / n / rd.WEIGHTS).stat().st_mtime_ns for n in before} == before
    print(f"\n4-trial grid on 2 nodes: {time.time() - t0:.1f} s")


def _uninterrupted(cfg_dict: dict) -> dict:
    """The same training without interruption, in a Ray worker (same threads as a trial)."""
    import torch

    from sqvae_core.train import TrainConfig, train
    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(cfg_dict)
    train(cfg, progress=False)
    return _test_mse(cfg.out)


def _test_mse(run_dir) -> dict:
    import torch

    from sqvae_core.evaluate import evaluate_model
    from sqvae_core.scores import bundle_split
    torch.set_num_threads(1)
    b = rd.load_bundle(run_dir)
    images, _, _ = bundle_split(b, "test", None, 500)
    state = {k: v.clone() for k, v in b.model.state_dict().items()}
    return {"mse": evaluate_model(b.model, images)["mse"], "state": state}


@pytest.mark.slow
def test_node_removed_mid_sweep_trial_resumes_to_the_same_weights(cluster, tmp_path):
    import ray
    out = tmp_path / "fault"
    flags = {"steps": 200, "checkpoint_every": 20, "val_every": 40}
    spec = spec_for(out, {"seed": [0, 1]}, flags=flags, max_failures=2)
    worker_id = cluster["worker"].node_id
    seen = {}

    def remove_worker_after_first_checkpoint():
        deadline = time.time() + 120
        while time.time() < deadline:
            doc = read_sweep(out) or {"trials": []}
            for t in doc["trials"]:
                run = out / t["name"]
                step = rd.Weights(run).step if (run / rd.CHECKPOINT).exists() else None
                if t.get("node") == worker_id and step and step < 200:
                    seen.update(name=t["name"], step=step)
                    cluster["cluster"].remove_node(cluster["worker"], allow_graceful=False)
                    seen["removed_at"] = rd.Weights(run).step
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=remove_worker_after_first_checkpoint, daemon=True)
    killer.start()
    summary = run_sweep(spec)
    killer.join(timeout=10)
    cluster["worker"] = cluster["cluster"].add_node(num_cpus=1, object_store_memory=80 << 20)   # for later tests
    assert seen, "no trial ran on the worker node"
    assert summary["counts"]["finished"] == 2
    doc = read_sweep(out)
    t = next(t for t in doc["trials"] if t["name"] == seen["name"])
    assert t["state"] == "finished" and t["failures"] >= 1 and t["node"] == cluster["head"].node_id
    run = out / seen["name"]
    cfg = json.loads((run / rd.CONFIG).read_text())
    assert cfg["resumed_from_step"] >= seen["step"] and cfg["resumed_from_step"] < 200
    steps = [r["step"] for r in rd.read_metrics(run) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 200       # no duplicated or lost rows
    ref_cfg = trial_config(spec.train_flags, t["params"], tmp_path / "reference").to_dict()
    ref = ray.get(ray.remote(num_cpus=1)(_uninterrupted).remote(ref_cfg), timeout=300)
    got = ray.get(ray.remote(num_cpus=1)(_test_mse).remote(str(run)), timeout=300)
    diff = max(float((got["state"][k].float() - v.float()).abs().max()) for k, v in ref["state"].items())
    print(f"\nnode removed at step {seen['removed_at']} (checkpoint), resumed from {cfg['resumed_from_step']}; "
          f"test MSE {got['mse']:.6f} vs uninterrupted {ref['mse']:.6f}; max |weight diff| {diff:.3g}")
    # exact resume on the same kind of worker (one thread, same kernels): the same weights; the
    # tolerance only covers float rounding in the evaluation
    assert diff == 0.0
    assert abs(got["mse"] - ref["mse"]) <= 1e-6 * ref["mse"]


@pytest.mark.slow
def test_asha_stops_the_bad_trial_which_stays_resumable(cluster, tmp_path):
    from sqvae_core.train import train
    out = tmp_path / "asha"
    # one at a time, the good one first: at the first rung the bad one meets the good one's figure
    spec = spec_for(out, {"lr": [0.003, 1e-7]}, flags={"steps": 60}, scheduler="asha", grace=1, max_concurrent=1)
    summary = run_sweep(spec)
    assert summary["counts"]["finished"] == 1 and summary["counts"]["stopped"] == 1
    doc = read_sweep(out)
    good, bad = doc["trials"]
    assert good["state"] == "finished" and good["metrics"]["step"] == 60
    assert bad["state"] == "stopped" and bad["metrics"]["step"] == 20 and "asha" in bad["error"]
    assert bad["metrics"]["val_mse"] > good["metrics"]["val_mse"]
    run = out / bad["name"]
    st = rd.RunDir(run).status
    assert st.state == "stopped" and st.step == 20
    assert rd.Weights(run).step == 20 and (run / rd.CHECKPOINT).exists()
    # resumable: it continues from its checkpoint to the end
    res = train(trial_config(spec.train_flags, bad["params"], run), resume=True, progress=False)
    assert res["state"] == "finished" and res["step"] == 60
    assert json.loads((run / rd.CONFIG).read_text())["resumed_from_step"] == 20


@pytest.mark.slow
def test_ctrl_c_leaves_runs_resumable_and_rerun_continues(tmp_path):
    """The command on its own local Ray: SIGINT mid-sweep, then the same command finishes it."""
    pytest.importorskip("ray")
    out = tmp_path / "cc"
    argv = ["--out", str(out), "--grid", "seed=0,1", "--steps", "400", "--max-concurrent", "1", *TINY_ARGS]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "sqvae_core", "sweep", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "wb"), start_new_session=True)
    try:
        deadline = time.time() + 120
        first = None
        while time.time() < deadline and first is None:
            doc = read_sweep(out) if (out / "sweep.json").exists() else None
            for t in (doc or {}).get("trials", []):
                if t["state"] == "running" and (rd.Weights(out / t["name"]).step or 0) >= 20 \
                        if (out / t["name"] / rd.WEIGHTS).exists() else False:
                    first = t["name"]
            time.sleep(0.1)
        assert first, (tmp_path / "log").read_text()[-2000:]
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=90) == 130, (tmp_path / "log").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    doc = read_sweep(out)
    assert doc["state"] == "interrupted"
    t = next(t for t in doc["trials"] if t["name"] == first)
    assert t["state"] == "pending"
    st = rd.RunDir(out / first).status
    assert st.state == "stopped" and (out / first / rd.CHECKPOINT).exists() and st.step < 400
    r = sweep_cli(*argv, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = read_sweep(out)
    assert doc["state"] == "finished" and all(t["state"] == "finished" for t in doc["trials"])
    cfg = json.loads((out / first / rd.CONFIG).read_text())
    assert cfg["resumed_from_step"] == st.step


@pytest.mark.slow
def test_optuna_search_names_its_trials_and_a_rerun_keeps_them(cluster, tmp_path):
    pytest.importorskip("optuna")
    out = tmp_path / "tpe"
    spec = spec_for(out, {"lr": [0.0005, 0.001, 0.002, 0.004], "code-dim": [4, 8]}, search="optuna", samples=3)
    assert run_sweep(spec)["counts"]["finished"] == 3
    doc = read_sweep(out)
    assert len(doc["trials"]) == 3 and all(t["name"].startswith("optuna_") for t in doc["trials"])
    for t in doc["trials"]:
        assert t["params"]["lr"] in spec.grid["lr"] and t["params"]["code-dim"] in spec.grid["code-dim"]
        assert json.loads((out / t["name"] / rd.CONFIG).read_text())["model"]["code_dim"] == t["params"]["code-dim"]
    assert run_sweep(spec)["counts"]["finished"] == 3 and len(read_sweep(out)["trials"]) == 3
