"""``pip install idefics2-ft`` from a wheel (not ``-e .``): the wheel is built from a clean clone,
installed into a fresh venv, and its ``idefics2-ft`` command trains, exports and plans from a folder
with no checkout in sight (`make test-wheel`, about 3 minutes: the dependencies come from the registry)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY_RUN

pytestmark = pytest.mark.wheel


def sh(*args, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, args))}\n{(out.stdout + out.stderr)[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding torch (this environment's version) and the wheel of a clean clone of HEAD."""
    import torch

    root = tmp_path_factory.mktemp("wheel")
    sh("git", "clone", "-q", ROOT, root / "src", cwd=root)
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", root / "dist", root / "src", cwd=root)
    [wheel] = list((root / "dist").glob("idefics2_ft-*.whl"))
    sh(sys.executable, "-m", "venv", root / "venv", cwd=root)
    python = root / "venv" / "bin" / "python"
    sh(python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}", cwd=root)
    sh(python, "-m", "pip", "install", "-q", wheel, cwd=root)
    work = root / "work"  # no checkout here: conf/, recipes/ and train.py are out of reach
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{root / 'venv' / 'bin'}:{env['PATH']}"
    return {"wheel": wheel, "python": python, "work": work, "env": env}


def test_the_wheel_carries_the_configs_and_recipes(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "idefics2_ft/conf/train.yaml" in names
    assert {"idefics2_ft/conf/recipe/docvqa_qlora.yaml", "idefics2_ft/conf/recipe/easyvqa_tiny.yaml"} <= set(names)
    assert "idefics2_ft/conf/hydra/launcher/slurm.yaml" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "idefics2-ft = idefics2_ft.cli:main" in zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()


def test_the_installed_command_trains_exports_and_plans(installed):
    work, env = installed["work"], installed["env"]
    where = sh(installed["python"], "-c", "import idefics2_ft; print(idefics2_ft.__file__)", cwd=work, env=env)
    assert "site-packages" in where.stdout  # the wheel, not the checkout

    assert "prefetch" in sh("idefics2-ft", "--help", cwd=work, env=env).stdout
    help_text = sh("idefics2-ft", "train", "--help", cwd=work, env=env).stdout
    assert "docvqa_qlora" in help_text and "easyvqa_tiny" in help_text and "strategy=" in help_text

    run = work / "run"
    args = [*TINY_RUN, f"model.tiny.cache_dir={work / 'tiny'}", f"run_dir={run}", "trainer.max_steps=2"]
    sh("idefics2-ft", "train", "recipe=easyvqa_tiny", *args, cwd=work, env=env)
    assert (run / "metrics.json").is_file() and (run / "report.html").is_file()

    sh("idefics2-ft", "export", f"run_dir={run}", "export.adapter_only=true", cwd=work, env=env)
    assert (run / "export" / "adapter_model.safetensors").is_file()

    plan = sh("idefics2-ft", "plan", "recipe=docvqa_qlora", cwd=work, env=env).stdout
    assert "| H100 80GB |" in plan or "H100" in plan


def test_make_install_keeps_a_users_torch(tmp_path):
    """A venv whose torch is older than ours (a user's CUDA 2.8, say): `make install` keeps it, and
    pip is held to it; raising our floor above it would make this fail instead of replacing it."""
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    [site] = list((venv / "lib").glob("python3*/site-packages"))
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text('__version__ = "2.8.0"  # stands in for a CUDA build\n')
    dist = site / "torch-2.8.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.8.0\n")
    (dist / "INSTALLER").write_text("pip\n")
    (dist / "RECORD").write_text("")
    out = sh("make", "install", f"VENV={venv}", "EXTRAS=dev", "PIP_FLAGS=--dry-run", cwd=ROOT)
    assert "keeping torch 2.8.0" in out.stdout
    would = next(line for line in out.stdout.splitlines() if line.startswith("Would install"))
    assert "transformers-" in would and " torch-" not in would
    assert (venv / "keep-torch.txt").read_text().strip() == "torch==2.8.0"
