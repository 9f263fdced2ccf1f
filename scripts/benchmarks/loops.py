"""Is our training loop as fast as a bare PyTorch loop doing the same work, and how does it compare with HF Trainer? The same batches, one process.

    python scripts/benchmarks/loops.py                      # make bench: the tiny QLoRA model on the CPU
    python scripts/benchmarks/loops.py --device cuda --model PATH [--recipe docvqa_qlora] [overrides ...]
    python scripts/benchmarks/loops.py --steps 3 --warmup 1 --repeats 1     # the fast test's smoke run

Four loops train a freshly loaded model (the same base, seed and adapters) on the same
pre-collated batches, interleaved and repeated in one process (these machines are noisy: compare
the ratios, not the seconds):

- ``ours``: ``Idefics2Module`` under ``make_trainer``, exactly as ``train.py`` builds them (its
  callbacks, loggers, progress, checkpoint at the end); its loss runs the LM head only at the
  positions where some sample learns (``Idefics2Module.learned_loss``, ``logits_to_keep``);
- ``bare, same work``: forward and loss through ``Idefics2Module.learned_loss`` itself, backward,
  clipping, step, schedule, zero_grad, nothing else;
- ``bare, full head``: the same bare loop with ``model(**inputs).loss`` (transformers' forward and
  loss: the head on every position);
- ``HF Trainer``: ``transformers.Trainer`` as users run it (the model's own loss, full head) with the
  same optimizer, schedule, clipping and precision.

Two ratios of medians, each named for what it measures: the **loop overhead** (ours / bare, same
work: what Lightning and our callbacks cost; goal >= 0.95) and the **user-visible ratio** (ours / HF
Trainer: what a user sees, the head where learned included). The other two split the second into
the head's part on this model and HF Trainer's own loop. Each loop's first-step loss is printed: the
four train the same model on the same batch with the same objective, so they agree.

Each run is timed from the end of ``--warmup`` steps to the end of the last (CUDA is synchronized
at both marks). It prints samples/s and tokens/s (real tokens) for each loop, min / median / max
over the repeats, the ratios, and what the head where learned is worth at idefics2-8b's shapes (the
planner's FLOPs and memory; no model is run for it), and writes them to ``outputs/bench.md``.
"""

from __future__ import annotations

import functools
import logging
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
from shared import (
    LOOPS,
    OUT,
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

# (name, numerator, denominator, what it measures)
RATIOS = (
    (
        "loop overhead",
        "ours",
        "bare, same work",
        "our Lightning loop against a bare loop doing the same forward, loss, clipping and step (goal >= 0.95)",
    ),
    (
        "user-visible",
        "ours",
        "HF Trainer",
        "what a user sees against HF Trainer as users run it (full head, its default loss), on this model",
    ),
    (
        "of which the head where learned",
        "bare, same work",
        "bare, full head",
        "the head only where learned against the full head, both in a bare loop: this model's share, not the 8B's",
    ),
    ("of which HF Trainer's loop", "bare, full head", "HF Trainer", "a bare loop against HF Trainer, both full head"),
)


def four_loops(args, extra) -> str:
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
    runners = {
        "ours": run_ours,
        "bare, same work": functools.partial(run_bare, head="learned"),
        "bare, full head": functools.partial(run_bare, head="full"),
        "HF Trainer": run_hf,
    }
    rates: dict[str, list[float]] = {name: [] for name in LOOPS}
    losses: dict[str, list[float]] = {name: [] for name in LOOPS}
    n = len(LOOPS)
    for repeat in range(args.repeats):
        order = LOOPS[repeat % n :] + LOOPS[: repeat % n]  # each loop goes first in turn
        for name in order:
            clock = Clock(args.warmup, args.warmup + args.steps)
            runners[name](cfg, path, args.device, clock, batches=batches)
            rates[name].append(len(timed) / clock.seconds)
            losses[name].append(clock.first_loss)
            log.info(
                "repeat %d, %s: %.2f steps/s, first loss %.6f", repeat + 1, name, rates[name][-1], losses[name][-1]
            )
    per_step_samples, per_step_tokens = samples / len(timed), tokens / len(timed)
    what = {
        "ours": "Idefics2Module under make_trainer: the head where some sample learns, our loss",
        "bare, same work": "forward, loss (Idefics2Module.learned_loss), backward, clip, step",
        "bare, full head": "the same with model(**inputs).loss: the head on every position",
        "HF Trainer": "transformers.Trainer as users run it: the model's loss, full head",
    }
    rows = [
        "| loop | what it runs | first-step loss | samples/s (min / median / max) | tokens/s (min / median / max) |",
        "|---|---|---|---|---|",
    ]
    for name in LOOPS:
        s = [r * per_step_samples for r in rates[name]]
        k = [r * per_step_tokens for r in rates[name]]
        rows.append(f"| {name} | {what[name]} | {losses[name][0]:.6f} | {spread(s)} | {spread(k)} |")
    median = {name: statistics.median(rates[name]) for name in LOOPS}
    ratio_rows = [
        "| ratio | of the medians | per repeat (min / median / max) | what it measures |",
        "|---|---|---|---|",
    ]
    for label, top, bottom, meaning in RATIOS:
        per_repeat = [a / b for a, b in zip(rates[top], rates[bottom], strict=True)]
        ratio_rows.append(
            f"| {label}: {top} / {bottom} | {median[top] / median[bottom]:.3f} | {spread(per_repeat, 3)} | {meaning} |"
        )
    summary = (
        f"loop overhead (ours / bare, same work) = {median['ours'] / median['bare, same work']:.3f}; "
        f"user-visible (ours / HF Trainer) = {median['ours'] / median['HF Trainer']:.3f}"
    )
    head = (
        f"{args.recipe} ({Path(path).name}), {args.device}, batch {cfg.data.batch_size}, {args.steps} timed steps after "
        f"{args.warmup}, {args.repeats} interleaved repeats, {torch.get_num_threads()} threads; "
        f"positions through the head per step: {positions(batches)}"
    )
    return "\n".join([head, "", *rows, "", *ratio_rows, "", summary, "", *head_at_8b_shapes()])


def positions(batches: list[dict]) -> str:
    """Where the loss keeps the head, as ``Idefics2Module.learned_loss`` picks it, against every position."""
    kept = full = 0
    for batch in batches:
        targets = batch["labels"][:, 1:]
        kept += int((targets != -100).any(dim=0).sum()) * targets.shape[0]
        full += batch["labels"].shape[0] * batch["labels"].shape[1]
    return f"{kept / len(batches):.0f} learned of {full / len(batches):.0f} ({kept / full:.0%})"


# ------------------------------------------------------------------------------ the 8B's shapes
def head_at_8b_shapes() -> list[str]:
    """What the head where learned is worth on idefics2-8b (hidden 4096, vocab 32003, 32 layers), from
    the planner (``idefics2_ft.planning``, as ``idefics2-ft plan recipe=docvqa_qlora`` computes it):
    the head's share of a step's FLOPs and the logits' memory, with the head on every position and
    only where some sample learns; for the plan's DocVQA sample, with image splitting on, for the
    longest sample the recipe keeps, and for collated DocVQA-like pages where the 8B's processor is in
    the cache (``make checkpoint-8b``, or its 2-layer copy)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from idefics2_ft.config import CONF_DIR, register_configs
    from idefics2_ft.models.reference import idefics2_8b_config
    from idefics2_ft.planning import setup_from_cfg, workload_from_cfg

    register_configs()

    def recipe(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=["recipe=docvqa_qlora", *overrides])

    config = idefics2_8b_config()
    t = config.text_config
    cfg = recipe()
    setup = setup_from_cfg(cfg, "cuda")
    plain = workload_from_cfg(cfg, config)
    rows = [
        "What the head where learned is worth at idefics2-8b's shapes (the planner, `idefics2_ft/planning`, as "
        f"`idefics2-ft plan recipe=docvqa_qlora` counts it: hidden {t.hidden_size}, vocab {t.vocab_size}, "
        f"{t.num_hidden_layers} layers, batch {cfg.data.batch_size}, NF4 + LoRA on {setup.target}, checkpointing, "
        "bf16 on CUDA; no model is run):",
        "",
        "| 8B workload | tokens per sample (image + text) | positions through the head per micro-batch (full / learned) "
        "| head's share of a step's FLOPs (full / learned) | step FLOPs saved | fp32 logits (full / learned) "
        "| plan's logits-and-loss term (full / learned) | plan's peak (full / learned) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    image_tokens = config.perceiver_config.resampler_n_latents
    rows.append(
        worth_row(
            config,
            setup,
            [plain],
            f"the plan's DocVQA sample: {image_tokens} image + 128 text tokens, 32 of them learned",
        )
    )
    split = recipe("data.do_image_splitting=true")
    rows.append(
        worth_row(
            config,
            setup_from_cfg(split, "cuda"),
            [workload_from_cfg(split, config)],
            "the same, image splitting on (5 pictures a page)",
        )
    )
    longest = workload_from_cfg(cfg, config, text_tokens=cfg.data.max_length)
    rows.append(
        worth_row(
            config, setup, [longest], f"the longest sample the recipe keeps (data.max_length={cfg.data.max_length})"
        )
    )
    pages = docvqa_like_workloads(recipe, config)
    if pages:
        rows.append(
            worth_row(
                config,
                setup,
                pages,
                f"{sum(w.samples for w in pages)} DocVQA-like pages, collated (the 8B's processor)",
            )
        )
    head = next(p["params"] for p in plan_of(config, plain, setup).parts if p["part"] == "head")
    text = next(p["params"] for p in plan_of(config, plain, setup).parts if p["part"] == "text")
    rows += [
        "",
        f"The head is {head / 1e6:,.1f} M parameters against the text model's {text / 1e6:,.1f} M: {head / text:.1%} of "
        "the text model's FLOPs per position. A step's FLOPs are mostly the vision tower and the connector on "
        f"{plain.patches:,} patches a picture; a run's time goes with FLOPs (the plan's time per step is its FLOPs "
        "at an assumed MFU).",
    ]
    if not pages:
        rows.append(
            "(No collated DocVQA-like row: the 8B's processor is not in the cache; `make checkpoint-8b` or "
            "`python scripts/build_8b.py --text-layers 2` writes it.)"
        )
    return rows


def plan_of(config, workload, setup):
    from idefics2_ft.planning import plan_run

    return plan_run(config, workload, setup)


def worth_row(config, setup, workloads, label: str) -> str:
    """One row over ``workloads`` (micro-batches): FLOPs summed over them, memory at the largest."""
    t = config.text_config
    backward = 2 if setup.method == "full" else 1
    flops = {"full": 0.0, "learned": 0.0}
    head = {"full": 0.0, "learned": 0.0}
    logits = {"full": 0.0, "learned": 0.0}
    term = {"full": 0.0, "learned": 0.0}
    peak = {"full": 0.0, "learned": 0.0}
    pos = {"full": 0, "learned": 0}
    for w in workloads:
        for kind, workload in (("full", replace(w, learned=None)), ("learned", w)):
            plan = plan_of(config, workload, setup)
            n = workload.learned if workload.learned is not None else workload.seq_len
            # the planner's head (step_flops): forward and the input gradient at each position it runs on
            h = 2 * t.vocab_size * t.hidden_size * workload.batch * n * (1 + backward) * setup.accumulate
            flops[kind] += plan.flops
            head[kind] += h
            pos[kind] = max(pos[kind], workload.batch * n)
            logits[kind] = max(logits[kind], workload.batch * n * t.vocab_size * 4)
            terms = {**plan.rows, **plan.off_peak}
            term[kind] = max(term[kind], terms["activations: logits and loss"])
            peak[kind] = max(peak[kind], plan.total_gb)
    # the planner's own difference is the head's: if its formula moves, this table must follow
    assert abs((flops["full"] - flops["learned"]) - (head["full"] - head["learned"])) <= 1e-6 * flops["full"]
    longest = max(workloads, key=lambda w: w.seq_len)
    seq, image = longest.seq_len, config.perceiver_config.resampler_n_latents * longest.images // longest.samples
    return (
        f"| {label} | {seq} ({image} + {seq - image}) | {pos['full']} / {pos['learned']} "
        f"| {head['full'] / flops['full']:.2%} / {head['learned'] / flops['learned']:.2%} "
        f"| {1 - flops['learned'] / flops['full']:.2%} "
        f"| {logits['full'] / 1e6:,.0f} MB / {logits['learned'] / 1e6:,.0f} MB "
        f"| {term['full']:.3f} GB / {term['learned']:.3f} GB | {peak['full']:.2f} GB / {peak['learned']:.2f} GB |"
    )


def docvqa_like_workloads(recipe, config, pages: int = 16) -> list:
    """Micro-batches of DocVQA-like pages (``write_docs``: forms at up to 980 px, a question and a short
    answer each) collated by the recipe's collator with the 8B's processor, as the planner reads a batch;
    [] where that processor is not in the cache."""
    from idefics2_ft.data.synthetic import write_docs
    from idefics2_ft.models.random_checkpoint import default_cache_dir
    from idefics2_ft.planning import workload_from_batch

    found = [
        default_cache_dir() / name
        for name in ("idefics2-8b-random", "idefics2-8b-random-L2")
        if (default_cache_dir() / name / "processor_config.json").is_file()
    ]
    if not found:
        return []
    docs_dir = OUT / f"docvqa_like_{pages}"
    if not (docs_dir / "val.jsonl").is_file():
        write_docs(docs_dir, pages, 2, seed=0)
    cfg = recipe(
        "data=jsonl",
        f"data.train_file={docs_dir / 'train.jsonl'}",
        f"data.val_file={docs_dir / 'val.jsonl'}",
        "data.metric=anls",
    )
    processor = load_processor(str(found[0]), cfg.data, None)
    datamodule = Idefics2DataModule(cfg.data, processor, seed=cfg.seed, max_steps=1)
    datamodule.setup("fit")
    collate = datamodule.train_collator()
    b = cfg.data.batch_size
    return [
        workload_from_batch(collate([datamodule.train_set[j] for j in range(i, i + b)]), config, cfg)
        for i in range(0, pages - b + 1, b)
    ]


def main(argv: list[str]) -> int:
    parser = common_arguments(__doc__.split("\n")[0], ROOT / "outputs" / "bench.md")
    return run(parser, argv, four_loops, "loops.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
