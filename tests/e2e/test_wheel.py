"""dpkit as users get it from a wheel: built, installed (not editable) into a fresh virtual
environment, and run from a directory outside the checkout — shipped files (DeepSpeed templates,
the tiny tokenizer, bundled data) must come from the installed package, not from the checkout."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT, rank_env

pytestmark = pytest.mark.distributed  # it trains 2 steps on 2 ranks

QUICKSTART = ROOT / "recipes" / "quickstart" / "instruct-full-zero2.yaml"


def run(cmd, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_installed_elsewhere_validates_and_trains(tmp_path):
    # A copy of what the wheel is built from, so building leaves nothing in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "dpkit", src / "dpkit",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = rank_env()
    env.pop("PYTHONPATH", None)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", tmp_path / "dist", src], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("dpkit-*.whl")

    # A fresh environment that reuses this one's dependencies (torch, deepspeed, ...) through a
    # .pth path entry: .pth files found there are not run, so this environment's editable dpkit
    # stays invisible and only the wheel provides `dpkit`.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path, env)
    py = venv / "bin" / "python"
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    tmp_path, env).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path, env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([py, "-c", "import dpkit; print(dpkit.__file__)"], elsewhere, env).stdout
    assert str(venv) in where, where
    dpkit = venv / "bin" / "dpkit"
    out = run([dpkit, "validate", QUICKSTART], elsewhere, env).stdout
    assert "OK for 2 ranks" in out, out
    run([dpkit, "train", QUICKSTART, "train.max_steps=2", "train.epochs=1", "output.dir=run"],
        elsewhere, env, timeout=400)
    run_dir = elsewhere / "run"
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert (run_dir / "model" / "tokenizer.json").is_file()
    config = (run_dir / "ds_config.json").read_text()
    assert '"stage": 2' in config
    assert not (ROOT / "run").exists()
