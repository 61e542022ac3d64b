"""House rules that keep the project's outside working."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, re.S)


def test_readme_opens_with_app_and_test_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:15])
    cmds = readme_commands()
    assert cmds[0] in head and cmds[1] in head
    assert "streamlit run app/main.py" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_core_never_imports_streamlit_or_hardcodes_a_device():
    for py in (ROOT / "sqvae_core").rglob("*.py"):
        src = py.read_text()
        assert not re.search(r"^\s*(import|from)\s+streamlit", src, re.M), py
        for line in src.splitlines():
            if re.search(r"[\"']cuda[\"']|\.cuda\(\)", line):
                assert re.search(r"is_available|==|in \(|DEVICE_CHOICES|\"cuda\", \"mps\"", line), f"{py}: {line}"


def test_torch_range_admits_the_ci_build():
    req = (ROOT / "requirements.txt").read_text()
    m = re.search(r"^torch>=([\d.]+),<([\d.]+)", req, re.M)
    lo, hi = (tuple(int(p) for p in v.split(".")) for v in m.groups())
    assert lo <= (2, 13, 0) < hi


def test_dockerfile_lints_clean_and_matches_requirements():
    import shutil
    import subprocess
    docker = (ROOT / "Dockerfile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    pinned = re.search(r"torch==([\d.]+)", ci).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in docker, "Dockerfile and CI must install the same torch"
    assert "pip install -r requirements.txt" in docker
    assert "HEALTHCHECK" in docker and "/_stcore/health" in docker and "EXPOSE 8501" in docker
    assert re.search(r"^USER (?!root|0\b)", docker, re.M), "the container must not run as root"
    assert "--server.address=0.0.0.0" in docker
    config = (ROOT / ".streamlit" / "config.toml").read_text()
    assert 'address = "127.0.0.1"' in config, "outside Docker the app binds to localhost only"
    hadolint = shutil.which("hadolint")
    if hadolint:
        r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_checkpoints_fit_their_40_mb_budget():
    files = [p for p in (ROOT / "checkpoints").rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    biggest = sorted(files, key=lambda p: p.stat().st_size)[-3:]
    assert total <= 40_000_000, (f"checkpoints/ holds {total / 1e6:.1f} MB, over its 40 MB budget; "
                                 f"largest files: {[(str(p.relative_to(ROOT)), p.stat().st_size) for p in biggest]}")
