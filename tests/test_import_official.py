"""`sqvae import-official`: checkpoints of the official SQ-VAE trainer (sony/sqvae, vision/) as bundles.

The official files are made here from our official-equivalent nets: our keys renamed to the
official names by a table written out below (independent of sqvae_core.official), wrapped in
`module.` as nn.DataParallel does, saved with torch.save as the official trainer does, next to
a YAML written like the official configs/*.yaml. The official code itself is never imported.
"""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqvae_core import rundir as rd
from sqvae_core.cli import main
from sqvae_core.config import ModelConfig
from sqvae_core.evaluate import evaluate_model
from sqvae_core.models import build_model

SHIPPED_FMNIST = Path(__file__).resolve().parents[1] / "sqvae_core" / "datasets_shipped" / "fashion-mnist"

# official dataset name -> (channels, size, network name)
OFFICIAL_DATA = {"MNIST": (1, 28, "resnet"), "FashionMNIST": (1, 28, "resnet"), "CIFAR10": (3, 32, "resnet"),
                 "CelebA": (3, 64, "resnet"), "CelebAMask_HQ": (1, 64, "resnet_label")}


def official_yaml(dataset: str, variant: str, size_dict: int, dim_dict: int, num_rb: int, *,
                  log_q: float = 2.302585092994046, arelbo: bool | None = None, num_class: int = 19,
                  saved_configs_json: bool = False) -> str:
    """A config written the way the official configs/*.yaml are (dim_dict before main.py's +1 for vMF)."""
    c, s, net = OFFICIAL_DATA[dataset]
    vmf = variant == "vmf"
    lines = [f'path_specific: "{dataset.lower()}_sqvae_{variant}/"', "  ", "dataset:", f"  name: '{dataset}'",
             f"  shape: ({c}, {s}, {s})", f"  dim_x: {c * s * s} # {c} * {s} * {s}", "", "model:",
             f'  name: "{"VmfSQVAE" if vmf else "GaussianSQVAE"}"']
    if vmf:
        lines.append("  log_kappa_inv: -4.605170185988091 # log(0.01)")
    lines += [f"  log_param_q_init: {log_q} # log(10.0)", f'  param_var_q: "{variant}"', "", "network:",
              f'  name: "{net}"', f"  num_rb: {num_rb}"]
    if vmf:
        lines += [f"  num_class: {num_class}", '  act_decoder: "exp"']
    lines += ["", "quantization:", f"  size_dict: {size_dict}", f"  dim_dict: {dim_dict}"]
    flags = {}
    if arelbo is not None:
        flags["arelbo"] = arelbo
    if saved_configs_json:          # main.py sets flags.var_q before the trainer writes configs.json
        flags["var_q"] = variant not in ("gaussian_1", "vmf")
    if flags:
        lines += ["", "flags:"] + [f"  {k}: {str(v).lower()}" for k, v in flags.items()]
    return "\n".join(lines) + "\n"


def our_equivalent(dataset: str, variant: str, size_dict: int, dim_dict: int, num_rb: int, *,
                   arelbo: bool = True, num_class: int = 19, seed: int = 0):
    """Our official-equivalent model with every weight and statistic moved off its initial value."""
    c, s, _ = OFFICIAL_DATA[dataset]
    vmf = variant == "vmf"
    cfg = ModelConfig(kind=variant, image_channels=c, image_size=s, codebook_size=size_dict,
                      code_dim=dim_dict + 1 if vmf else dim_dict, num_rb=num_rb, net="official", arelbo=arelbo,
                      var_q_floor=1.0 if variant == "gaussian_1" else 0.0, var_q_init=11.0,
                      kappa_q_floor=1.0, kappa_q_init=1.05, num_levels=num_class if vmf else 8, kappa_x_init=100.0)
    torch.manual_seed(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(1234)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
    return model.eval()


def official_state_dict(model) -> dict:
    """Our keys -> the official trainer's: nn.DataParallel(model).state_dict() of sony/sqvae."""
    design64 = model.cfg.image_size == 64 and not model.cfg.categorical
    out = {}
    for key, t in model.state_dict().items():
        name = {"quantizer.codebook": "codebook", "quantizer.log_var_q": "log_param_q_scalar",
                "quantizer.log_kappa_q": "log_param_q_scalar", "likelihood.log_var_x": "logvar_x"}.get(key, key)
        name = name.replace("encoder.res_mean.", "encoder.res_m.").replace("encoder.res_log_var.", "encoder.res_v.")
        if design64 and name.startswith("encoder.conv.0."):
            name = "encoder.conv.0.0." + name[len("encoder.conv.0."):]
        if key == "log_kappa_x":      # official κ = 1/(exp(u) + 1e-9), a (1,) tensor; ours κ = exp(t)
            name, t = "log_kappa_inv", torch.log(torch.exp(-t.double()) - 1e-9).float().reshape(1)
        out["module." + name] = t.clone()
    return out


def write_official(tmp_path: Path, model, yaml_text: str, name: str = "official") -> tuple[Path, Path]:
    folder = tmp_path / name
    folder.mkdir()
    ckpt, yaml_path = folder / "best.pt", folder / "config.yaml"
    torch.save(official_state_dict(model), ckpt)
    yaml_path.write_text(yaml_text)
    return ckpt, yaml_path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def no_leftovers(folder: Path) -> bool:
    return not any(p.name.endswith(".import") for p in folder.iterdir())


# ------------------------------------------------------------------------------- import
CASES = {   # id -> (dataset, variant, size_dict, dim_dict, num_rb)
    "fmnist-gaussian_1": ("FashionMNIST", "gaussian_1", 32, 16, 2),
    "cifar10-gaussian_2": ("CIFAR10", "gaussian_2", 32, 16, 1),
    "cifar10-gaussian_3": ("CIFAR10", "gaussian_3", 32, 16, 2),
    "celeba-gaussian_4": ("CelebA", "gaussian_4", 32, 16, 2),
    "celebamask-vmf": ("CelebAMask_HQ", "vmf", 32, 15, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_gives_the_same_tensors_and_reconstructions(tmp_path, capsys, case):
    dataset, variant, k, d, rb = CASES[case]
    model = our_equivalent(dataset, variant, k, d, rb)
    ckpt, yaml_path = write_official(tmp_path, model, official_yaml(dataset, variant, k, d, rb))
    extra = ["--dataset", f"folder:{tmp_path}"] if dataset in ("CelebA", "CelebAMask_HQ") else []
    code, _, err = run_cli(capsys, "import-official", ckpt, "--config", yaml_path, "--out", tmp_path / "run", *extra)
    assert code == 0, err
    assert "imported" in err and err.count("\n") == 1

    b = rd.load_bundle(tmp_path / "run")
    assert b.config["source"] == "official" and rd.RunDir(b.path).status.state == "finished"
    assert b.model_cfg.kind == variant and b.model_cfg.net == "official"
    assert b.dataset == ({"FashionMNIST": "fashion-mnist", "CIFAR10": "cifar10"}.get(dataset) or f"folder:{tmp_path}")
    ref, got = model.state_dict(), b.model.state_dict()
    assert set(ref) == set(got)
    for key in ref:       # tensor by tensor; κ went through 1/(exp(u) + 1e-9) and back
        if key == "log_kappa_x":
            assert math.isclose(float(got[key]), float(ref[key]), abs_tol=1e-6)
        else:
            assert torch.equal(got[key], ref[key]), key

    c, s = b.model_cfg.image_channels, b.model_cfg.image_size
    x = torch.rand(6, c, s, s, generator=torch.Generator().manual_seed(3))
    if variant == "vmf":
        x = torch.round(x * 18) / 18
    with torch.no_grad():
        assert torch.allclose(b.model.reconstruct(x), model.reconstruct(x), atol=1e-6, rtol=0)
        assert torch.equal(b.model.codes(x), model.codes(x))
        mine, theirs = b.model(x, mode="argmax"), model(x, mode="argmax")
    assert math.isclose(float(mine.loss), float(theirs.loss), rel_tol=1e-5)
    for key in theirs.stats:
        assert math.isclose(float(mine.stats[key]), float(theirs.stats[key]), rel_tol=1e-5, abs_tol=1e-6), key


def test_the_official_fashion_mnist_layout_has_its_76_keys_and_imports(tmp_path, capsys):
    """The official config as shipped (K=256, d=64, 2 blocks): the 76 keys the issue names."""
    model = our_equivalent("FashionMNIST", "gaussian_1", 256, 64, 2)
    state = official_state_dict(model)
    assert len(state) == 76
    assert {"module.codebook", "module.log_param_q_scalar", "module.encoder.conv.0.weight",
            "module.decoder.convt.3.bias", "module.encoder.res_m.block.4.weight",
            "module.encoder.conv.1.running_var"} <= set(state)
    ckpt, yaml_path = write_official(tmp_path, model, official_yaml("FashionMNIST", "gaussian_1", 256, 64, 2))
    code, _, err = run_cli(capsys, "import-official", ckpt, "--config", yaml_path, "--out", tmp_path / "run")
    assert code == 0, err
    b = rd.load_bundle(tmp_path / "run")
    # official σ²_φ = exp(0) + exp(s) for variant I: our floor of 1, s copied as is
    assert b.model_cfg.var_q_floor == 1.0 and b.model_cfg.var_q_init == pytest.approx(11.0)
    assert torch.equal(b.model.quantizer.log_var_q, state["module.log_param_q_scalar"])


def test_uploaded_bytes_import_like_files(tmp_path):
    """What an upload hands over: the two files' bytes (the app's sidebar can call this)."""
    from sqvae_core.official import import_official
    model = our_equivalent("FashionMNIST", "gaussian_2", 16, 8, 1)
    ckpt, yaml_path = write_official(tmp_path, model, official_yaml("FashionMNIST", "gaussian_2", 16, 8, 1))
    out = import_official(ckpt.read_bytes(), yaml_path.read_bytes(), tmp_path / "up", checkpoint_name="best.pt")
    b = rd.load_bundle(out)
    assert b.config["official"]["checkpoint"] == "best.pt" and b.model_cfg.kind == "gaussian_2"
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(b.model.reconstruct(x), model.reconstruct(x))


def test_no_arelbo_imports_the_learned_decoder_variance(tmp_path, capsys):
    model = our_equivalent("FashionMNIST", "gaussian_1", 16, 8, 1, arelbo=False)
    state = official_state_dict(model)
    assert "module.logvar_x" in state
    ckpt, yaml_path = write_official(tmp_path, model, official_yaml("FashionMNIST", "gaussian_1", 16, 8, 1,
                                                                    arelbo=False))
    assert run_cli(capsys, "import-official", ckpt, "--config", yaml_path, "--out", tmp_path / "run")[0] == 0
    b = rd.load_bundle(tmp_path / "run")
    assert b.model_cfg.arelbo is False
    assert torch.equal(b.model.likelihood.log_var_x, model.likelihood.log_var_x)


def test_the_trainers_configs_json_already_holds_the_vmf_plus_one(tmp_path, capsys):
    """The official trainer writes configs.json beside best.pt after main.py added 1 to dim_dict (vMF)."""
    model = our_equivalent("CelebAMask_HQ", "vmf", 16, 7, 1)
    ckpt, yaml_path = write_official(tmp_path, model, official_yaml("CelebAMask_HQ", "vmf", 16, 8, 1,
                                                                    saved_configs_json=True))
    code, _, err = run_cli(capsys, "import-official", ckpt, "--config", yaml_path, "--out", tmp_path / "run",
                           "--dataset", f"folder:{tmp_path}")
    assert code == 0, err
    assert rd.load_bundle(tmp_path / "run").model_cfg.code_dim == 8


@pytest.mark.slow
def test_eval_prior_and_explore_work_on_an_imported_bundle(tmp_path, capsys):
    """Through the CLI, on the Fashion-MNIST subset shipped in the package: the same test numbers
    as the model that was exported."""
    model = our_equivalent("FashionMNIST", "gaussian_1", 32, 16, 1)
    ckpt, yaml_path = write_official(tmp_path, model, official_yaml("FashionMNIST", "gaussian_1", 32, 16, 1))
    run = tmp_path / "run"
    assert run_cli(capsys, "import-official", ckpt, "--config", yaml_path, "--out", run)[0] == 0
    code, out, err = run_cli(capsys, "eval", run, "--json", "--data-dir", SHIPPED_FMNIST)
    assert code == 0, err
    import json

    from sqvae_core.data import load_dataset
    res = json.loads(out)
    images = load_dataset("fashion-mnist", "test", str(SHIPPED_FMNIST)).images
    ref = evaluate_model(model, images)
    assert res["n_images"] == len(images) == 1000
    assert res["mse"] == pytest.approx(ref["mse"], rel=1e-6)
    assert res["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-9)
    assert res["dead_codes"] == ref["dead_codes"]

    code, _, err = run_cli(capsys, "prior", "train", run, "--steps", "3", "--hidden", "8", "--layers", "2",
                           "--max-images", "200", "--data-dir", SHIPPED_FMNIST, "--json")
    assert code == 0, err
    assert (run / rd.PRIOR).is_file()
    code, out, err = run_cli(capsys, "explore", run, "--umap", "--pca", "--json", "--max-images", "100",
                             "--data-dir", SHIPPED_FMNIST)
    assert code == 0, err
    assert len(json.loads(out)) == 32
    code, out, _ = run_cli(capsys, "list", tmp_path)
    assert "gaussian_1" in out and "finished" in out


# ------------------------------------------------------------------------------ refusals
def refused(capsys, tmp_path, *argv, out_name="run") -> str:
    """Runs the import, expects one error line, exit 2 and nothing left in or beside RUN_DIR."""
    code, out, err = run_cli(capsys, "import-official", *argv, "--out", tmp_path / out_name)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / out_name).exists() and no_leftovers(tmp_path)
    return err


@pytest.fixture
def fmnist_pair(tmp_path):
    model = our_equivalent("FashionMNIST", "gaussian_1", 16, 8, 1)
    return write_official(tmp_path, model, official_yaml("FashionMNIST", "gaussian_1", 16, 8, 1))


def test_junk_and_pickles_are_refused_in_one_line(tmp_path, capsys, fmnist_pair):
    _, yaml_path = fmnist_pair
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint" * 100)
    err = refused(capsys, tmp_path, junk, "--config", yaml_path)
    assert "torch.load(weights_only=True)" in err
    import argparse
    pickled = tmp_path / "object.pt"
    torch.save(argparse.Namespace(weights=torch.zeros(2)), pickled)    # not a plain state dict
    assert "torch.load(weights_only=True)" in refused(capsys, tmp_path, pickled, "--config", yaml_path)
    nested = tmp_path / "nested.pt"
    torch.save({"model": {"codebook": torch.zeros(2)}, "epoch": 3}, nested)
    assert "not a plain state dict" in refused(capsys, tmp_path, nested, "--config", yaml_path)
    assert "not found" in refused(capsys, tmp_path, tmp_path / "missing.pt", "--config", yaml_path)


def test_a_state_dict_of_other_shapes_names_the_key_and_both_shapes(tmp_path, capsys, fmnist_pair):
    ckpt, _ = fmnist_pair
    other = tmp_path / "k32.yaml"
    other.write_text(official_yaml("FashionMNIST", "gaussian_1", 32, 8, 1))
    err = refused(capsys, tmp_path, ckpt, "--config", other)
    assert "module.codebook has shape (16, 8), the config gives (32, 8)" in err
    four = tmp_path / "g4.yaml"                 # variant IV has a log-variance head the file lacks
    four.write_text(official_yaml("FashionMNIST", "gaussian_4", 16, 8, 1))
    assert "missing module.encoder.res_v." in refused(capsys, tmp_path, ckpt, "--config", four)
    deeper = tmp_path / "rb2.yaml"
    deeper.write_text(official_yaml("FashionMNIST", "gaussian_1", 16, 8, 2))
    assert "missing module.encoder.res.0.block.1.weight" in refused(capsys, tmp_path, ckpt, "--config", deeper)


def test_unknown_dataset_variant_and_bad_configs_are_refused(tmp_path, capsys, fmnist_pair):
    ckpt, yaml_path = fmnist_pair
    text = yaml_path.read_text()

    def config(name, body):
        p = tmp_path / name
        p.write_text(body)
        return p

    err = refused(capsys, tmp_path, ckpt, "--config", config("svhn.yaml", text.replace("'FashionMNIST'", "'SVHN'")))
    assert "unknown dataset.name 'SVHN'" in err
    err = refused(capsys, tmp_path, ckpt, "--config", config("g5.yaml", text.replace('"gaussian_1"', '"gaussian_5"')))
    assert "unknown variant" in err and "gaussian_5" in err
    # the official cifar10_vmf.yaml: a vMF quantizer under a Gaussian decoder
    err = refused(capsys, tmp_path, ckpt, "--config", config("gv.yaml", text.replace('"gaussian_1"', '"vmf"')))
    assert "unknown variant" in err
    err = refused(capsys, tmp_path, ckpt, "--config", config("junk.yaml", "::: [not yaml"))
    assert "not valid YAML" in err
    err = refused(capsys, tmp_path, ckpt, "--config", config("list.yaml", "- 1\n- 2\n"))
    assert "not an official SQ-VAE YAML" in err
    err = refused(capsys, tmp_path, ckpt, "--config", config("noq.yaml", text.split("quantization:")[0]))
    assert "quantization.size_dict" in err
    err = refused(capsys, tmp_path, ckpt, "--config", config("bn.yaml", text + "flags:\n  bn: false\n"))
    assert "flags.bn" in err
    err = refused(capsys, tmp_path, ckpt, "--config", yaml_path, "--dataset", "cifar10")
    assert "(3, 32, 32)" in err
    err = refused(capsys, tmp_path, ckpt, "--config", yaml_path, "--dataset", "imagenet")
    assert "unknown dataset" in err


def test_celeba_needs_a_dataset_folder_and_keeps_the_official_crop(tmp_path, capsys):
    model = our_equivalent("CelebA", "gaussian_1", 16, 8, 1)
    ckpt, yaml_path = write_official(tmp_path, model, official_yaml("CelebA", "gaussian_1", 16, 8, 1))
    assert "--dataset folder:PATH" in refused(capsys, tmp_path, ckpt, "--config", yaml_path)
    err = refused(capsys, tmp_path, ckpt, "--config", yaml_path, "--dataset", f"folder:{tmp_path / 'nope'}")
    assert "no such folder" in err
    err = refused(capsys, tmp_path, ckpt, "--config", yaml_path, "--dataset", f"folder:{tmp_path}", "--center-crop", "0")
    assert "positive" in err
    faces = tmp_path / "faces"           # photos of CelebA's 178x218: crop 140, resize to 64, as the official loader
    faces.mkdir()
    from PIL import Image
    for i in range(10):
        Image.new("RGB", (178, 218), (20 * i, 100, 200)).save(faces / f"{i:06d}.jpg")
    code, _, err = run_cli(capsys, "import-official", ckpt, "--config", yaml_path, "--out", tmp_path / "run",
                           "--dataset", f"folder:{faces}", "--center-crop", "140")
    assert code == 0, err
    assert rd.load_bundle(tmp_path / "run").config["train"]["center_crop"] == 140
    code, out, err = run_cli(capsys, "eval", tmp_path / "run", "--json")
    assert code == 0, err
    assert '"n_images": 1' in out
    err = refused(capsys, tmp_path, ckpt, "--config", official_yaml_path(tmp_path), "--center-crop", "140",
                  out_name="run2")
    assert "folder: datasets only" in err


def official_yaml_path(tmp_path: Path) -> Path:
    p = tmp_path / "fm.yaml"
    p.write_text(official_yaml("FashionMNIST", "gaussian_1", 16, 8, 1))
    return p


def test_an_existing_run_dir_is_left_alone(tmp_path, capsys, fmnist_pair):
    ckpt, yaml_path = fmnist_pair
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "import-official", ckpt, "--config", yaml_path, "--out", run)
    assert code == 2 and "not empty" in err
    assert [p.name for p in run.iterdir()] == ["notes.txt"]
    (run / "notes.txt").unlink()            # an empty directory is filled
    assert run_cli(capsys, "import-official", ckpt, "--config", yaml_path, "--out", run)[0] == 0
    assert rd.load_bundle(run).model_cfg.kind == "gaussian_1"


def test_a_failure_while_writing_leaves_nothing(tmp_path, capsys, fmnist_pair, monkeypatch):
    ckpt, yaml_path = fmnist_pair

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(rd, "save_weights", disk_full)
    err = refused(capsys, tmp_path, ckpt, "--config", yaml_path)
    assert "No space left" in err


@pytest.mark.slow
def test_the_real_command_exits_non_zero_without_a_traceback(tmp_path, fmnist_pair):
    _, yaml_path = fmnist_pair
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 truncated zip")
    p = subprocess.run([sys.executable, "-m", "sqvae_core", "import-official", str(junk), "--config", str(yaml_path),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()
