"""The real idefics2-8b architecture through the recipe's own path, on the CPU (`make test-8b`).

A random-init checkpoint of the published architecture (8.40 B parameters, bf16 shards, the real
processor) is built once into the cache by `scripts/build_8b.py`, with DocVQA-like 980-px pages.
Then `python train.py recipe=docvqa_qlora` runs on it, unchanged but for the sizes a CPU can
afford: NF4 double-quant text model, LoRA on text+connector, gradient checkpointing, 2 optimizer
steps at batch 1 with a checkpoint after each, generation-based validation on 2 questions, and
`idefics2-ft export export.adapter_only=true`. A second run starts from the first run's step-1
checkpoint and must end with the same adapter, bit for bit. About 25 minutes on 2 cores; each
run's log is written beside its run folder (printed at the start).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idefics2_ft.models.random_checkpoint import default_cache_dir
from idefics2_ft.run_folder import BASE_RECORD, CHECKPOINT_DIR, CONFIG_FILE, LAST_CHECKPOINT, LOG_DIR
from tests.helpers import IDEFICS2_FT, ROOT

pytestmark = pytest.mark.big8b

# What the CPU can afford; everything else is the recipe's (docvqa_qlora).
CPU_SIZES = [
    "trainer.max_steps=2",
    "optim.warmup_steps=1",  # the recipe's 50 would refuse 2 steps
    "data.batch_size=1",
    "trainer.accumulate_grad_batches=1",
    "data.eval_batch_size=2",
    "data.max_val_samples=2",
    "trainer.limit_val_batches=1",
    "trainer.val_check_interval=null",
    "trainer.checkpoint_every_n_steps=1",
    "trainer.keep_step_checkpoints=true",
    "eval.max_new_tokens=4",
    "data.num_workers=0",
    "logger=csv",
    "trainer.progress_every_s=60",  # one line a minute in the log
]
TIMINGS: dict[str, float] = {}


def command(args: list[str], log: Path, timeout: float = 1500) -> str:
    """Run a command with its output in ``log`` (watch it with tail -f); fail with its tail."""
    start = time.perf_counter()
    print(f"\n$ {' '.join(args)}\n  log: {log}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as f:
        proc = subprocess.run(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    TIMINGS[log.stem] = time.perf_counter() - start
    out = log.read_text()
    assert proc.returncode == 0, f"rc {proc.returncode}; the end of {log}:\n" + "\n".join(out.splitlines()[-40:])
    return out


@pytest.fixture(scope="module", autouse=True)
def report():
    """After the module: each command's time and each run's phases, in outputs/test_8b.md."""
    runs: dict[str, Path] = {}
    yield runs
    lines = ["| step | wall s | peak RSS GB | notes |", "|---|---|---|---|"]
    lines += [f"| `{name}` (command) | {sec:.0f} | | |" for name, sec in TIMINGS.items()]
    for label, run_dir in runs.items():
        path = run_dir / "phases.json"
        if not path.is_file():
            continue
        for phase, r in json.loads(path.read_text())["phases"].items():
            notes = f"{r['steps']} step(s), {r['s_per_step']:.0f} s/step" if "steps" in r else ""
            lines.append(
                f"| {label}: {phase} | {r['wall_s']:.0f} | {r.get('rss_peak_gb', float('nan')):.2f} | {notes} |"
            )
        plan = run_dir / "plan.json"
        if plan.is_file():
            p = json.loads(plan.read_text())
            lines.append(
                f"| {label}: plan vs measured (fit) | | {p['allocated_gb']:.2f} vs {p.get('measured_gb', float('nan')):.2f} | {p['peak_at']} |"
            )
    out = ROOT / "outputs" / "test_8b.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = Path(os.environ.get("IDEFICS2_FT_CACHE", default_cache_dir()))
    out = command(
        [sys.executable, "scripts/build_8b.py", "--cache", str(cache)], tmp_path_factory.mktemp("logs") / "build.log"
    )
    overrides = next(line for line in out.splitlines() if line.startswith("overrides:")).split()[1:]
    return overrides


@pytest.fixture(scope="module")
def run_a(built, tmp_path_factory, report):
    """Two steps, validation on 2 questions, the adapter; then the adapter-only export."""
    root = tmp_path_factory.mktemp("big8b")
    run_dir = root / "a"
    args = [sys.executable, "train.py", "recipe=docvqa_qlora", *built, *CPU_SIZES, f"run_dir={run_dir}"]
    report["run A"] = run_dir
    out = command(args, root / "run_a.log")
    command([IDEFICS2_FT, "export", f"run_dir={run_dir}", "export.adapter_only=true"], root / "export.log")
    return run_dir, out


@pytest.fixture(scope="module")
def run_b(built, run_a, report):
    """The same run, resumed from run A's step-1 checkpoint."""
    a, _ = run_a
    b = a.with_name("b")
    b.mkdir()
    for name in (CONFIG_FILE, BASE_RECORD, LOG_DIR):
        src = a / name
        if src.is_dir():
            shutil.copytree(src, b / name)
        elif src.exists():
            shutil.copy(src, b / name)
    (b / CHECKPOINT_DIR).mkdir()
    shutil.copy(a / CHECKPOINT_DIR / "epoch=0-step=1.ckpt", b / CHECKPOINT_DIR / LAST_CHECKPOINT)
    args = [sys.executable, "train.py", "recipe=docvqa_qlora", *built, *CPU_SIZES, f"run_dir={b}"]
    report["run B (resumed)"] = b
    out = command([*args, "resume=true", "eval.at_end=false"], b.parent / "run_b.log")
    return b, out


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_the_8b_recipe_trains_validates_and_saves(run_a):
    run_dir, out = run_a
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 2
    assert metrics["params/trainable/total"] > 20_000_000  # LoRA r=8 on text+connector: 23.3 M
    assert "val/anls" in metrics and "val/loss" in metrics
    predictions = (run_dir / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 2
    phases = json.loads((run_dir / "phases.json").read_text())["phases"]
    assert {"data", "load", "fit", "validate", "save"} <= phases.keys()
    assert phases["fit"]["steps"] == 2
    assert all(p["rss_anon_peak_gb"] < 22 for p in phases.values())  # on a 24 GB machine
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["verdict"].startswith("fits")
    # the plan against the measured peak of the fit (RSS above the process before loading)
    assert abs(plan["allocated_gb"] - plan["measured_gb"]) <= 0.15 * plan["measured_gb"], plan
    card = (run_dir / "export" / "README.md").read_text()
    assert "library_name: peft" in card
    assert (run_dir / "export" / "adapter_model.safetensors").is_file()


def test_the_lora_weights_moved_and_the_4bit_base_did_not(run_a):
    run_dir, _ = run_a
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/frozen_base_unchanged"] == 1  # every frozen weight, NF4 codes included
    weights = adapter(run_dir)
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # lora_B starts at zero


def test_a_resumed_run_ends_with_the_same_adapter(run_a, run_b):
    a, b = run_a[0], run_b[0]
    assert json.loads((b / "metrics.json").read_text())["train/steps"] == 2
    phases = json.loads((b / "phases.json").read_text())["phases"]
    assert phases["fit"]["steps"] == 1  # it started at step 1
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} adapter tensors differ after resuming, e.g. {different[:3]}"
