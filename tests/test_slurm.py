"""A real single-node SLURM cluster (tier `slurm`: `make test-slurm`, root and Debian's packages).

Brings slurmctld + slurmd up with scripts/slurm/cluster.sh, submits the tiny recipe with
scripts/slurm/train.sbatch as 2 tasks of DDP on the CPU, and takes the cluster down by PID.
"""

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT, TINY_RUN

CLUSTER = ROOT / "scripts" / "slurm" / "cluster.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_TEST_DIR": str(state)}
    subprocess.run(["bash", str(CLUSTER), "up"], env=env, check=True, timeout=300)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["bash", str(CLUSTER), "down"], env=env, timeout=60)


def tiny(tmp_path):
    return [
        *TINY_RUN,
        f"model.tiny.cache_dir={tmp_path / 'tiny'}",
        "data.batch_size=2",
        "peft.dropout=0",
        "strategy=ddp",
        "trainer.accelerator=cpu",
    ]


@pytest.mark.slurm
def test_sbatch_trains_two_ranks_in_sync_into_one_run_folder(slurm, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--gpus-per-node=0",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            f"--output={tmp_path}/job-%j.out",
            str(ROOT / "scripts" / "slurm" / "train.sbatch"),
            *tiny(tmp_path),
        ],
        env={**slurm, "RUN_DIR": str(run_dir), "PY": str(ROOT / ".venv" / "bin" / "python")},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert out.returncode == 0, out.stderr + logs[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/world_size"] == 2 and metrics["train/ranks_in_sync"] is True
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["run", "tiny"]  # one run folder


@pytest.mark.slurm
def test_a_mismatched_allocation_fails_before_loading(slurm, tmp_path):
    out = subprocess.run(
        [
            "srun",
            "-J",
            "idefics2-ft",
            "-N1",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            str(ROOT / ".venv" / "bin" / "python"),
            "train.py",
            *tiny(tmp_path),
            "trainer.devices=1",
            f"run_dir={tmp_path / 'run'}",
        ],
        env=slurm,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "--ntasks-per-node=2 but trainer.devices=1" in out.stdout + out.stderr
    assert not (tmp_path / "tiny").exists()  # failed before building or loading anything
