"""Broken and hostile files, killed runs, full disks: clear errors, nothing saved is lost."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sqvae_core import rundir as rd
from sqvae_core.config import ModelConfig
from sqvae_core.models import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(kind="gaussian_1", codebook_size=16, code_dim=16, num_rb=1)


def make_bundle(path: Path, cfg: ModelConfig = TINY) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg)
    state = model.state_dict()
    rd.save_weights(path / rd.WEIGHTS, state)
    (path / rd.CONFIG).write_text(json.dumps({"model": cfg.to_dict(), "dataset": "fashion-mnist"}))
    return state


class Evil:
    """Unpickling this would create a sentinel file: proof of code execution."""
    sentinel = None

    def __reduce__(self):
        return (os.system, (f"touch {Evil.sentinel}",))


def corruptions(good: Path, rng: random.Random):
    """(name, mutate(bundle_dir)) pairs covering every class of fault."""
    weights = (good / rd.WEIGHTS).read_bytes()
    config = json.loads((good / rd.CONFIG).read_text())
    state, _ = rd.load_weights(good / rd.WEIGHTS)

    def write_weights(tensors):
        return lambda d: rd.save_weights(d / rd.WEIGHTS, tensors)

    def write_config(obj):
        return lambda d: (d / rd.CONFIG).write_text(obj if isinstance(obj, str) else json.dumps(obj))

    def write_bytes(data):
        return lambda d: (d / rd.WEIGHTS).write_bytes(data)

    out = []
    for i in range(80):                                    # truncated at random lengths
        n = rng.randrange(0, len(weights))
        out.append((f"truncated@{n}", write_bytes(weights[:n])))
    for i in range(30):                                    # random bytes, sometimes a valid-looking header
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096)))
        if i % 2:
            blob = (len(blob)).to_bytes(8, "little") + blob
        out.append((f"random{i}", write_bytes(blob)))
    for i in range(30):                                    # flipped bytes inside the header / data
        b = bytearray(weights)
        for _ in range(rng.randrange(1, 20)):
            b[rng.randrange(0, min(len(b), 400))] = rng.randrange(256)
        out.append((f"flipped{i}", write_bytes(bytes(b))))
    keys = sorted(state)
    for i in range(20):                                    # missing tensors
        drop = rng.sample(keys, rng.randrange(1, 4))
        out.append((f"missing{i}", write_weights({k: v for k, v in state.items() if k not in drop})))
    for i in range(20):                                    # wrong shapes
        k = rng.choice([k for k in keys if state[k].ndim > 0])
        bad = dict(state)
        bad[k] = torch.zeros(*[s + rng.randrange(1, 3) for s in state[k].shape])
        out.append((f"shape{i}", write_weights(bad)))
    for i in range(10):                                    # wrong dtypes, NaN weights, extra tensors
        k = rng.choice([k for k in keys if state[k].is_floating_point()])
        bad = dict(state)
        bad[k] = [state[k].to(torch.int32), torch.full_like(state[k], float("nan")),
                  state[k]][i % 3]
        if i % 3 == 2:
            bad["extra.weight"] = torch.zeros(3)
        out.append((f"dtype_nan_extra{i}", write_weights(bad)))
    out += [                                               # configs: missing, absurd, wrong types, not JSON
        ("config_missing_model", write_config({"dataset": "x"})),
        ("config_not_json", write_config("{not json")),
        ("config_list", write_config([1, 2])),
        ("config_huge_K", write_config({**config, "model": {**config["model"], "codebook_size": 10 ** 9}})),
        ("config_huge_d", write_config({**config, "model": {**config["model"], "code_dim": 10 ** 6}})),
        ("config_neg_rb", write_config({**config, "model": {**config["model"], "num_rb": -1}})),
        ("config_str_K", write_config({**config, "model": {**config["model"], "codebook_size": "256"}})),
        ("config_bool_d", write_config({**config, "model": {**config["model"], "code_dim": True}})),
        ("config_kind_code", write_config({**config, "model": {**config["model"], "kind": "__import__('os').system('x')"}})),
        ("config_unknown_key", write_config({**config, "model": {**config["model"], "evil": 1}})),
        ("config_nan", write_config(json.dumps({**config, "model": {**config["model"], "var_q_init": float("nan")}}))),
        ("config_big_file", write_config(" " * (rd.MAX_JSON_BYTES + 10) + "{}")),
        ("config_K_mismatch", write_config({**config, "model": {**config["model"], "codebook_size": 32}})),
        ("config_binary", lambda d: (d / rd.CONFIG).write_bytes(b"\xff\xfe\x00garbage")),
        ("weights_missing", lambda d: (d / rd.WEIGHTS).unlink()),
        ("config_missing", lambda d: (d / rd.CONFIG).unlink()),
        ("weights_is_dir", lambda d: ((d / rd.WEIGHTS).unlink(), (d / rd.WEIGHTS).mkdir())),
    ]
    return out


def test_fuzzed_bundles_give_clear_errors_and_never_run_code(tmp_path):
    good = tmp_path / "good"
    make_bundle(good)
    rd.load_bundle(good)                                   # the original is fine
    Evil.sentinel = tmp_path / "pwned"
    rng = random.Random(1234)
    cases = corruptions(good, rng)

    def pickle_weights(d):
        torch.save({"x": Evil()}, d / rd.WEIGHTS)
    cases.append(("pickle_payload_weights", pickle_weights))
    cases.append(("pickle_payload_raw", lambda d: (d / rd.WEIGHTS).write_bytes(
        __import__("pickle").dumps(Evil()))))
    assert len(cases) >= 200
    outcomes = {}
    for i, (name, mutate) in enumerate(cases):
        d = tmp_path / f"case{i}"
        d.mkdir()
        for f in (rd.WEIGHTS, rd.CONFIG):
            (d / f).write_bytes((good / f).read_bytes())
        mutate(d)
        try:
            rd.load_bundle(d)
            outcomes[name] = "loaded"
        except rd.BundleError as e:
            msg = str(e)
            assert "\n" not in msg and len(msg) < 400, (name, msg)
            assert str(d) in msg or "config" in msg, (name, msg)
            outcomes[name] = "error"
        # anything other than BundleError propagates and fails the test
    assert not Evil.sentinel.exists(), "a pickle payload was executed"
    # flipped bytes may land in unused header padding; every other case must be refused
    loaded = [n for n, o in outcomes.items() if o == "loaded"]
    assert all(n.startswith("flipped") for n in loaded), loaded
    print(f"FUZZ: {len(cases)} bundles, {len(cases) - len(loaded)} refused with BundleError, "
          f"{len(loaded)} harmless byte flips loaded")


def test_pickle_checkpoint_is_refused_on_resume(tmp_path):
    from sqvae_core.train import TrainConfig, train
    out = tmp_path / "run"
    cfg = TrainConfig(model=ModelConfig(**{**TINY.to_dict()}), out=str(out), steps=5, batch_size=8,
                      val_max_images=50, log_every=5)
    train(cfg, progress=False)
    Evil.sentinel = tmp_path / "pwned"
    torch.save({"model": Evil()}, out / rd.CHECKPOINT)
    with pytest.raises(rd.BundleError, match="checkpoint is unreadable"):
        train(TrainConfig(**{**cfg.__dict__, "steps": 10}), resume=True, progress=False)
    assert not Evil.sentinel.exists()


def test_cli_reports_a_corrupt_bundle_in_one_line(tmp_path):
    d = tmp_path / "b"
    make_bundle(d)
    (d / rd.WEIGHTS).write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "sqvae_core", "eval", str(d), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "corrupt" in r.stderr


@pytest.mark.slow
def test_twenty_kill_9_never_lose_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "sqvae_core", "train", "--model", "vq_ema", "--out", str(out),
            "--steps", "100000", "--no-compile", "--codebook-size", "16", "--code-dim", "16", "--num-rb", "1",
            "--batch-size", "8", "--checkpoint-every", "3", "--snapshot-every", "2", "--val-every", "50",
            "--val-max-images", "50", "--log-every", "1", "--quiet"]
    rng = random.Random(7)
    last_step = 0
    survived = 0
    for i in range(20):
        p = subprocess.Popen(args + (["--resume"] if (out / rd.CHECKPOINT).exists() else []), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until this process has trained a little past where it started, then kill at a random moment
        deadline = time.time() + 60
        while time.time() < deadline and (rd.RunDir(out).status.step or -1) < last_step + 3 and p.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.4))
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert rd.RunDir(out).status.state == "interrupted"     # running, but its process is gone
        ck = torch.load(out / rd.CHECKPOINT, weights_only=True)   # always readable
        assert ck["step"] >= last_step
        rd.load_bundle(out)
        last_step = ck["step"]
        survived += 1
    assert last_step > 0
    leftovers = list(out.glob(".*.tmp"))
    # a kill during a write may leave a temp file behind; it never replaces the real one
    r = subprocess.run(args[:args.index("--steps")] + ["--steps", str(last_step + 5), "--resume", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert rd.RunDir(out).status.state == "finished"
    print(f"KILL9: {survived}/20 kills survived, reached step {last_step}, {len(leftovers)} stray temp files")


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import resource, sys
        from sqvae_core.config import ModelConfig
        from sqvae_core.train import TrainConfig, train
        cfg = TrainConfig(model=ModelConfig(kind="gaussian_1", codebook_size=16, code_dim=16, num_rb=1),
                          out={str(out)!r}, steps=10, batch_size=8, val_max_images=50, log_every=5,
                          checkpoint_every=5, snapshot_every=5, val_every=10)
        train(cfg, progress=False)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))   # files may not grow past 20 kB
        cfg.steps = 20
        try:
            train(cfg, resume=True, progress=False)
        except OSError as e:
            print("ERR", e)
            sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "could not write the checkpoint" in r.stdout and "previous checkpoint is kept" in r.stdout
    ck = torch.load(out / rd.CHECKPOINT, weights_only=True)
    assert ck["step"] == 10
    rd.load_bundle(out)
    assert not list(out.glob(".*.tmp")), "failed writes must clean up their temp files"


def test_uploaded_zip_bundle_is_validated_and_sandboxed(tmp_path):
    import io
    import zipfile
    src = tmp_path / "src"
    make_bundle(src)

    def zipped(extra=None, folder="mybundle/"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for f in (rd.CONFIG, rd.WEIGHTS):
                z.write(src / f, folder + f)
            for name, data in (extra or {}).items():
                z.writestr(name, data)
        return buf.getvalue()

    root = tmp_path / "uploads"
    root.mkdir()
    out = rd.import_bundle_zip(zipped({"../../evil.py": "x", "mybundle/run.sh": "rm -rf /"}), root, "ok")
    assert sorted(p.name for p in out.iterdir()) == [rd.CONFIG, rd.WEIGHTS]
    assert not (tmp_path / "evil.py").exists()
    rd.load_bundle(out)
    with pytest.raises(rd.BundleError, match="not a valid .zip"):
        rd.import_bundle_zip(b"garbage", root, "bad1")
    with pytest.raises(rd.BundleError, match="invalid bundle name"):
        rd.import_bundle_zip(zipped(), root, "../escape")
    broken = io.BytesIO()
    with zipfile.ZipFile(broken, "w") as z:
        z.write(src / rd.CONFIG, rd.CONFIG)
        z.writestr(rd.WEIGHTS, b"not weights")
    with pytest.raises(rd.BundleError, match="corrupt"):
        rd.import_bundle_zip(broken.getvalue(), root, "bad2")
    assert not (root / "bad2").exists()          # nothing left behind


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """Pickles start with byte 0x80, and so does a valid file whose header is 128 bytes mod 256:
    only a file that is not safetensors-shaped is refused as a pickle."""
    path = tmp_path / "w.safetensors"
    pad = next(p for p in range(256) if (rd.save_weights(path, {"t": torch.ones(2)}, {"x": "a" * p}),
                                          path.read_bytes()[0])[1] == 0x80)
    tensors, meta = rd.load_weights(path)
    assert meta == {"x": "a" * pad} and torch.equal(tensors["t"], torch.ones(2))
    path.write_bytes(__import__("pickle").dumps({"x": 1}, protocol=4))
    with pytest.raises(rd.BundleError, match="pickle"):
        rd.load_weights(path)


def test_one_error_type_for_bad_files_of_runs_priors_and_classifiers(tmp_path):
    """Weights, priors and FD classifiers go through rundir's one safetensors layer: a bad file is a
    BundleError whatever reads it, and a missing one is also a FileNotFoundError."""
    from sqvae_core.fd import ClassifierConfig, FeatureClassifier, load_classifier, save_classifier
    from sqvae_core.prior import load_prior
    save_classifier(FeatureClassifier(ClassifierConfig(1, 28, 10, 16, width=4)), tmp_path / "c.safetensors")
    assert (tmp_path / "c.safetensors").stat().st_mode & 0o777 == 0o644     # not mkstemp's 0600
    for load in (rd.load_weights, load_prior, load_classifier):
        with pytest.raises(rd.MissingFileError) as e:
            load(tmp_path / "nope.safetensors")
        assert isinstance(e.value, FileNotFoundError) and "not found" in str(e.value)
        (tmp_path / "torn.safetensors").write_bytes((tmp_path / "c.safetensors").read_bytes()[:100])
        with pytest.raises(rd.BundleError, match="corrupt or not safetensors"):
            load(tmp_path / "torn.safetensors")
    with pytest.raises(rd.BundleError, match="format 'sqvae_core.fd.FeatureClassifier', expected 'sqvae_core.prior"):
        load_prior(tmp_path / "c.safetensors")
    assert isinstance(load_classifier(tmp_path / "c.safetensors"), FeatureClassifier)


def test_weights_metadata_is_read_from_the_header_alone(tmp_path):
    """rd.weights_metadata (the step and best_by of a run's weights) equals load_weights' metadata
    without reading the tensors: a file torn after its header still gives it (load_weights refuses
    that file); a file torn inside its header, an empty file or a pickle is a BundleError."""
    import pickle
    path = tmp_path / "w.safetensors"
    rd.save_weights(path, {"x": torch.zeros(1000)}, {"step": "7", "best_by": "loss"})
    data = path.read_bytes()
    assert rd.weights_metadata(path) == rd.load_weights(path)[1] == {"step": "7", "best_by": "loss"}
    end = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[:end + 10])                       # the tensors torn off
    assert rd.weights_metadata(path)["step"] == "7"
    with pytest.raises(rd.BundleError):
        rd.load_weights(path)
    for bad in (data[:end - 5], b"", pickle.dumps({"step": 7})):
        path.write_bytes(bad)
        with pytest.raises(rd.BundleError):
            rd.weights_metadata(path)
