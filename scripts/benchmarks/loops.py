"""Is our training loop as fast as a bare PyTorch loop, and as HF Trainer? The same batches, one process.

    python scripts/benchmarks/loops.py                      # make bench: the tiny QLoRA model on the CPU
    python scripts/benchmarks/loops.py --device cuda --model PATH [--recipe docvqa_qlora] [overrides ...]
    python scripts/benchmarks/loops.py --steps 3 --warmup 1 --repeats 1     # the fast test's smoke run

Three loops train a freshly loaded model (the same base, seed and adapters) on the same
pre-collated batches, interleaved and repeated in one process (these machines are noisy: compare
the ratios, not the seconds):

- ``ours``: ``Idefics2Module`` under ``make_trainer``, exactly as ``train.py`` builds them (its
  callbacks, loggers, progress, checkpoint at the end);
- ``bare``: forward, backward, step, schedule, zero_grad, nothing else;
- ``hf``: ``transformers.Trainer`` with the same optimizer, schedule, clipping and precision.

Each run is timed from the end of ``--warmup`` steps to the end of the last (CUDA is synchronized
at both marks). It prints samples/s and tokens/s (real tokens) for each loop, min / median / max
over the repeats, and the ratios of the medians, and writes them to ``outputs/bench.md``.
"""

from __future__ import annotations

import logging
import statistics
import sys
from pathlib import Path

import torch
from shared import (
    LOOPS,
    ROOT,
    Clock,
    common_arguments,
    compose_cfg,
    run,
    run_bare,
    run_hf,
    run_ours,
    spread,
)

from idefics2_ft.data import Idefics2DataModule
from idefics2_ft.models import load_processor, resolve_base

log = logging.getLogger("bench")


def three_loops(args, extra) -> str:
    cfg = compose_cfg(args, extra)
    path = resolve_base(cfg)
    processor = load_processor(path, cfg.data, cfg.model.revision)
    datamodule = Idefics2DataModule(cfg.data, processor, seed=cfg.seed, max_steps=cfg.trainer.max_steps)
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batch.pop("bad_samples", None)
        batches.append(batch)
        if len(batches) == cfg.trainer.max_steps:
            break
    timed = batches[args.warmup :]
    samples = sum(b["stats"]["samples"] for b in timed)
    tokens = sum(b["stats"]["tokens"] for b in timed)
    runners = {"ours": run_ours, "bare": run_bare, "hf": run_hf}
    rates: dict[str, list[float]] = {name: [] for name in LOOPS}
    for repeat in range(args.repeats):
        order = LOOPS[repeat % 3 :] + LOOPS[: repeat % 3]  # each loop goes first in turn
        for name in order:
            clock = Clock(args.warmup, args.warmup + args.steps)
            runners[name](cfg, path, args.device, clock, batches=batches)
            rates[name].append(len(timed) / clock.seconds)
            log.info("repeat %d, %s: %.2f steps/s", repeat + 1, name, rates[name][-1])
    per_step_samples, per_step_tokens = samples / len(timed), tokens / len(timed)
    rows = [
        "| loop | samples/s (min / median / max) | tokens/s (min / median / max) |",
        "|---|---|---|",
    ]
    for name in LOOPS:
        s = [r * per_step_samples for r in rates[name]]
        k = [r * per_step_tokens for r in rates[name]]
        rows.append(f"| {name} | {spread(s)} | {spread(k)} |")
    median = {name: statistics.median(rates[name]) for name in LOOPS}
    ratios = f"ours/bare = {median['ours'] / median['bare']:.3f}, ours/hf = {median['ours'] / median['hf']:.3f}"
    head = (
        f"{args.recipe} ({Path(path).name}), {args.device}, batch {cfg.data.batch_size}, {args.steps} timed steps after "
        f"{args.warmup}, {args.repeats} repeats, {torch.get_num_threads()} threads"
    )
    return "\n".join([head, "", *rows, "", ratios])


def main(argv: list[str]) -> int:
    parser = common_arguments(__doc__.split("\n")[0], ROOT / "outputs" / "bench.md")
    return run(parser, argv, three_loops, "loops.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
