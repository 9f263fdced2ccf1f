"""A real single-node SLURM cluster (tier `slurm`: `make test-slurm`, root and Debian's packages).

Brings slurmctld + slurmd up with scripts/slurm/cluster.sh, submits the tiny recipe with
scripts/slurm/train.sbatch as 2 tasks of DDP on the CPU, preempts and requeues a job, runs a sweep
through the Hydra submitit launcher, and takes the cluster down by PID.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, TINY_RUN, assert_same_adapters, run_train

CLUSTER = ROOT / "scripts" / "slurm" / "cluster.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_TEST_DIR": str(state)}
    subprocess.run(["bash", str(CLUSTER), "up"], env=env, check=True, timeout=300)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    env["PATH"] = f"{state / 'bin'}:{env['PATH']}"  # the sacct stand-in (no accounting here)
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


def sbatch(slurm: dict, tmp_path, run_dir, how: str, *overrides: str, **run) -> subprocess.CompletedProcess:
    """scripts/slurm/train.sbatch as 2 tasks on the CPU; ``how`` is --wait or --parsable."""
    return subprocess.run(
        [
            "sbatch",
            how,
            "--gpus-per-node=0",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            f"--output={tmp_path}/job-%j.out",
            str(ROOT / "scripts" / "slurm" / "train.sbatch"),
            *overrides,
        ],
        env={**slurm, "RUN_DIR": str(run_dir), "PY": str(ROOT / ".venv" / "bin" / "python")},
        cwd=ROOT,
        capture_output=True,
        text=True,
        **run,
    )


def sweep_command(tmp_path, sweep, *overrides: str) -> list[str]:
    """``train.py -m`` through the submitit launcher, 2 CPU tasks per job."""
    return [
        sys.executable,
        "train.py",
        "-m",
        "hydra/launcher=slurm",
        *tiny(tmp_path),
        "trainer.devices=2",
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.cpus_per_task=1",
        f"hydra.sweep.dir={sweep}",
        *overrides,
    ]


@pytest.mark.slurm
def test_sbatch_trains_two_ranks_in_sync_into_one_run_folder(slurm, tmp_path):
    run_dir = tmp_path / "run"
    out = sbatch(slurm, tmp_path, run_dir, "--wait", *tiny(tmp_path), timeout=900)
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


def scontrol_job(job_id: str, env: dict) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True)
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def wait_until(condition, what: str, timeout_s: float = 600, log=None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        context = log.read_text()[-3000:] if log is not None and log.is_file() else ""
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {context}"
        time.sleep(1)


def signal_and_restart(job_id: str, signal: str, slurm: dict, log=None) -> None:
    """Send ``signal`` to the job's tasks, wait until it has requeued itself, and let it start
    again at once (SLURM holds a requeued job for about two minutes)."""
    subprocess.run(["scancel", f"--signal={signal}", job_id], env=slurm, check=True)
    wait_until(lambda: scontrol_job(job_id, slurm).get("Restarts", "0") != "0", "the requeue", log=log)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm, check=True)


def steps_logged(run_dir) -> int:
    metrics = run_dir / "logs" / "metrics.csv"
    return len(metrics.read_text().splitlines()) - 1 if metrics.is_file() else 0


@pytest.mark.slurm
def test_a_preempted_job_checkpoints_requeues_and_finishes_as_if_uninterrupted(slurm, tmp_path):
    """SIGUSR1 (what `--signal=SIGUSR1@90` sends before a preemption or the time limit): both ranks
    stop at a step boundary, last.ckpt is written, the job requeues itself, and the restarted job
    resumes and ends with the adapter of an uninterrupted run."""
    overrides = [*tiny(tmp_path), "trainer.log_every_n_steps=1", "trainer.max_steps=150"]
    run_train(*overrides, "trainer.devices=2", f"run_dir={tmp_path / 'straight'}")  # not under SLURM
    run_dir = tmp_path / "run"
    job_id = sbatch(slurm, tmp_path, run_dir, "--parsable", *overrides, check=True).stdout.strip()
    log = tmp_path / f"job-{job_id}.out"
    wait_until(lambda: steps_logged(run_dir) > 10, "a few steps", log=log)
    signal_and_restart(job_id, "USR1", slurm, log=log)
    done = ("COMPLETED", "FAILED", "CANCELLED")
    wait_until(lambda: scontrol_job(job_id, slurm)["JobState"] in done, "the end", log=log)
    text = log.read_text()
    assert scontrol_job(job_id, slurm)["JobState"] == "COMPLETED", text[-3000:]
    stopped = [int(x) for x in re.findall(r"SLURM signalled the job: stopped after step (\d+)", text)]
    assert stopped and 0 < stopped[0] < 150
    assert f"Requeued SLURM job {job_id}" in text and "(SLURM restarted the job)" in text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 150 and metrics["train/ranks_in_sync"] is True
    assert_same_adapters(tmp_path / "straight", run_dir)


@pytest.mark.slurm
def test_a_hydra_sweep_runs_one_slurm_job_per_combination(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        sweep_command(tmp_path, sweep, "peft.r=4,8"), env=slurm, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    submission = next((sweep / ".submitit").glob(".submission_file_*.sh")).read_text()
    assert "#SBATCH --ntasks-per-node=2" in submission and "#SBATCH --job-name=idefics2-ft" in submission
    for job, rank in (("0", 4), ("1", 8)):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["train/world_size"] == 2 and metrics["train/ranks_in_sync"] is True
        config = (sweep / job / "adapter" / "adapter_config.json").read_text()
        assert json.loads(config)["r"] == rank


@pytest.mark.slurm
def test_a_sweep_job_signalled_as_submitit_signals_requeues_and_finishes(slurm, tmp_path):
    """submitit asks for SIGUSR2 before the time limit: the job stops at a step boundary,
    requeues itself, resumes, and the sweep still returns with the finished run."""
    sweep = tmp_path / "sweep"
    command = sweep_command(tmp_path, sweep, "trainer.log_every_n_steps=1", "trainer.max_steps=300")
    with open(tmp_path / "sweep.log", "w") as output:
        launcher = subprocess.Popen(command, env=slurm, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        wait_until(lambda: steps_logged(sweep / "0") > 10, "a few steps")
        (job_id,) = subprocess.run(
            ["squeue", "-h", "-o", "%i"], env=slurm, capture_output=True, text=True, check=True
        ).stdout.split()
        signal_and_restart(job_id, "USR2", slurm)
        returncode = launcher.wait(timeout=900)
    assert returncode == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_0_log.*"))
    assert "SLURM signalled the job: stopped after step" in logs and "(SLURM restarted the job)" in logs
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["train/steps"] == 300 and metrics["train/ranks_in_sync"] is True
