"""Measure idefics2-8b QLoRA on a CUDA GPU against the plan: memory, tokens/s, samples/s, MFU.

    python scripts/bench_gpu.py [--steps 8] [--out outputs/bench_gpu.md]    # make bench-gpu
    python scripts/bench_gpu.py --dry-run                                   # the CPU rehearsal (make test)

Builds what it needs from nothing but the project (``scripts/build_8b.py``: a random-init 8B of the
published architecture and DocVQA-like pages, in the cache), then runs ``train.py
recipe=docvqa_qlora`` for each configuration: batch 1 and 2, image splitting off and on, sdpa and
flash_attention_2 (where flash-attn is installed), ``strategy=auto`` and ``deepspeed_zero2`` (where
DeepSpeed is installed), one GPU. Each row gives the plan (``plan.json``), the measured peaks
(``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``), whether the plan's verdict
held, tokens/s, samples/s and MFU (the plan's FLOPs per step over the measured time per step and
the GPU's dense bf16 peak). Times per step include the first step (warm-up) over ``--steps`` steps.

Image splitting runs with the connector recomputed (``model.checkpoint_connector``, on by default
when it trains) and, at batch 1 and 2, without it: the table's last lines give each one's peak per
sample (batch 2's peak less batch 1's) and the time per step of recompute against without.

Without CUDA it says so and exits 0. ``--dry-run`` runs the same code on the CPU with 2 decoder
layers, 490-px pages and batch 1 and 2 only, so the script is exercised where no GPU is;
``--dry-run --recompute`` measures the recompute rows alone there (splitting on, recompute on and
off, batch 1 and 2: the figures in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_8b import build  # noqa: E402

from idefics2_ft.hardware import peak_tflops  # noqa: E402
from idefics2_ft.models.random_checkpoint import default_cache_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


RECOMPUTE = "model.checkpoint_connector"


def recompute_rows() -> list[dict[str, str]]:
    """Splitting on, the connector recomputed and not, batch 1 and 2."""
    return [
        {"data.batch_size": b, "data.do_image_splitting": "true", RECOMPUTE: c}
        for c, b in itertools.product(("true", "false"), ("1", "2"))
    ]


def configurations(dry_run: bool, recompute: bool = False) -> list[dict[str, str]]:
    batches = ("1", "2")
    if recompute:
        return recompute_rows()
    if dry_run:
        return [{"data.batch_size": b} for b in batches]
    splitting = ("false", "true")
    attention = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    strategies = ["auto"] + (["deepspeed_zero2"] if importlib.util.find_spec("deepspeed") else [])
    rows = [
        {"data.batch_size": b, "data.do_image_splitting": s, "model.attn_implementation": a, "strategy": st}
        for b, s, a, st in itertools.product(batches, splitting, attention, strategies)
    ]
    return rows + [r for r in recompute_rows() if r[RECOMPUTE] == "false"]  # the rest are rows above


def gpu_peak_tflops() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "CPU", None
    name = torch.cuda.get_device_name(0)
    return name, peak_tflops(name)


def run_one(config: dict[str, str], data: list[str], run_dir: Path, steps: int, dry_run: bool) -> dict:
    overrides = [
        "recipe=docvqa_qlora",
        *data,
        *(f"{k}={v}" for k, v in config.items()),
        f"trainer.max_steps={steps}",
        "optim.warmup_steps=0",
        "trainer.accumulate_grad_batches=1",
        "eval.at_end=false",
        "logger=csv",
        f"trainer.checkpoint_every_n_steps={steps + 1}",  # the final last.ckpt only
        "trainer.checkpoint_every_n_minutes=null",
        "data.num_workers=2",
        f"run_dir={run_dir}",
    ]
    if dry_run:
        overrides += ["data.longest_edge=490", "data.num_workers=0"]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if dry_run:  # glibc then returns each freed tensor at once: RSS follows the live tensors (docs/memory.md)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    log = run_dir.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.run(
            [sys.executable, "train.py", *overrides], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
        ).returncode
    row = {"config": config, "rc": rc, "wall_s": round(time.perf_counter() - start, 1), "log": str(log)}
    for name in ("plan", "phases"):  # the plan is written before the weights load: there even after an OOM
        path = run_dir / f"{name}.json"
        row[name] = json.loads(path.read_text()) if path.is_file() else None
    if rc != 0:
        row["error"] = (log.read_text().strip().splitlines() or ["?"])[-1][-200:]
    return row


def table(rows: list[dict], device: str, peak_tflops: float | None) -> str:
    lines = [
        f"GPU: {device}; dense bf16 peak {peak_tflops or '?'} TFLOP/s; {time.strftime('%Y-%m-%d')}",
        "",
        "| batch | splitting | recompute | attention | strategy | plan GB (allocated / total) | "
        "measured GB (allocated / reserved) | verdict | held | tokens/s | samples/s | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = row["config"]
        cells = [
            c.get("data.batch_size", ""),
            c.get("data.do_image_splitting", "false"),
            c.get(RECOMPUTE, "default"),
            c.get("model.attn_implementation", "sdpa"),
            c.get("strategy", "auto"),
        ]
        plan = row["plan"]
        if plan is None or row["rc"] != 0:
            verdict = plan["verdict"].split(":")[0] if plan else "no plan"
            held = "yes" if plan and not plan["verdict"].startswith("fits") else "NO"
            lines.append(
                "| " + " | ".join(cells) + f" | | failed (rc {row['rc']}): {row['error']} | {verdict} | {held} | | | |"
            )
            continue
        w, fit = plan["workload"], row["phases"]["phases"]["fit"]
        s_per_step = fit["s_per_step"]
        tokens = w["batch"] * w["seq_len"] / s_per_step
        samples = w["batch"] / s_per_step
        mfu = plan["tflop_per_step"] / s_per_step / peak_tflops if peak_tflops else None
        if "cuda_max_allocated_gb" in fit:
            measured = f"{fit['cuda_max_allocated_gb']:.1f} / {fit['cuda_max_reserved_gb']:.1f}"
        else:  # the CPU dry run: RSS above the process before loading
            measured = f"{plan.get('measured_gb', float('nan')):.2f} (RSS)"
        held = plan["verdict"].startswith("fits")  # and it ran: the verdict held
        lines.append(
            "| " + " | ".join(cells) + f" | {plan['allocated_gb']:.1f} / {plan['total_gb']:.1f} | {measured} | "
            f"{plan['verdict'].split(':')[0]} | {'yes' if held else 'NO'} | {tokens:.0f} | {samples:.2f} | "
            + (f"{mfu:.0%}" if mfu is not None else "n/a")
            + " |"
        )
    return "\n".join(lines + recompute_summary(rows))


def _measured(row: dict) -> float | None:
    fit = (row.get("phases") or {}).get("phases", {}).get("fit", {})
    if "cuda_max_allocated_gb" in fit:
        return fit["cuda_max_allocated_gb"]
    plan = row.get("plan") or {}
    return plan.get("measured_gb")


def recompute_summary(rows: list[dict]) -> list[str]:
    """Per sample (batch 2 less batch 1) with splitting, recompute on and off: planned and measured
    peaks, and the time per step of on against off at each batch."""
    found: dict[tuple[str, str], dict] = {}
    for row in rows:
        c = row["config"]
        if row["rc"] == 0 and c.get("data.do_image_splitting") == "true":
            found[(c.get(RECOMPUTE, "true"), c["data.batch_size"])] = row
    if not all((r, b) in found for r in ("true", "false") for b in ("1", "2")):
        return []
    lines = ["", "With image splitting, per sample (the peak at batch 2 less the peak at batch 1):", ""]
    lines += ["| connector | planned GB per sample | measured GB per sample | plan vs measured |", "|---|---|---|---|"]
    per_sample = {}
    for r in ("false", "true"):
        planned = found[(r, "2")]["plan"]["total_gb"] - found[(r, "1")]["plan"]["total_gb"]
        measured = _measured(found[(r, "2")]) - _measured(found[(r, "1")])
        per_sample[r] = measured
        name = "recomputed" if r == "true" else "kept (not recomputed)"
        lines.append(f"| {name} | {planned:.2f} | {measured:.2f} | {planned / measured - 1:+.0%} |")
    lines += [
        "",
        f"Measured per sample, recomputed against kept: {1 - per_sample['true'] / per_sample['false']:.0%} lower.",
    ]
    for b in ("1", "2"):
        on = found[("true", b)]["phases"]["phases"]["fit"]["s_per_step"]
        off = found[("false", b)]["phases"]["phases"]["fit"]["s_per_step"]
        lines.append(f"Time per step at batch {b}, recomputed / kept: {on:.1f} s / {off:.1f} s = {on / off:.2f}x.")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, 2 decoder layers, 490-px pages")
    parser.add_argument("--recompute", action="store_true", help="only the recompute rows (splitting, on and off)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_gpu.md")
    parser.add_argument("--cache", type=Path, default=default_cache_dir())
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run:
        print(
            "bench-gpu: no CUDA GPU here, nothing to measure (run it on a CUDA machine; --dry-run rehearses on the CPU)."
        )
        return 0
    steps = (2 if args.recompute else 1) if args.dry_run else args.steps
    checkpoint, docs = build(args.cache, text_layers=2 if args.dry_run else None)
    data = [
        f"model.name_or_path={checkpoint}",
        "data=jsonl",
        "data.metric=anls",
        f"data.train_file={docs['train']}",
        f"data.val_file={docs['val']}",
    ]
    runs = args.out.parent / ("bench_gpu_runs" + ("_dry" if args.dry_run else ""))
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, config in enumerate(configurations(args.dry_run, args.recompute)):
        print(f"[{i + 1}] {' '.join(f'{k}={v}' for k, v in config.items())}", flush=True)
        run_dir = runs / f"run{i}-{time.strftime('%H%M%S')}"
        rows.append(run_one(config, data, run_dir, steps, args.dry_run))
        print(f"    rc {rows[-1]['rc']} in {rows[-1]['wall_s']:.0f} s ({rows[-1]['log']})", flush=True)
    device, peak = gpu_peak_tflops()
    text = table(rows, device, peak)
    args.out.write_text(text + "\n")
    (args.out.with_suffix(".json")).write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    print(f"\nwritten to {args.out}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
