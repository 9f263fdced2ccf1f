"""Does ``data.group_by`` pay on mixed pages, against HF Trainer's ``group_by_length``?

    python scripts/benchmarks/mixed_pages.py     # make bench-mixed

It trains on DocVQA-like pages rendered here (portrait and landscape, several sizes, short
and long questions and answers, image splitting on) through the real DataModule, once per
``data.group_by``, and through HF Trainer with ``train_sampling_strategy=group_by_length`` given our
token lengths: samples/s, padding of tokens and pixels, and the validation loss after the same
number of steps. Against HF Trainer the ratio is the user-visible one: our loss runs the LM head only
where some sample learns, HF Trainer's on every position (``loops.py`` measures the two apart).
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from shared import (
    OUT,
    ROOT,
    Clock,
    common_arguments,
    compose_cfg,
    fresh_model,
    hf_trainer,
    model_inputs,
    run,
    run_ours,
    spread,
)

from idefics2_ft.config import accumulation
from idefics2_ft.data import Idefics2DataModule, record_shapes
from idefics2_ft.data.synthetic import write_docs
from idefics2_ft.models import load_processor, resolve_base

log = logging.getLogger("bench")


def mixed_overrides(docs: dict[str, Path], args) -> list[str]:
    return [
        "data=jsonl",
        f"data.train_file={docs['train']}",
        f"data.val_file={docs['val']}",
        "data.do_image_splitting=true",
        f"data.longest_edge={args.longest_edge}",
        "data.shortest_edge=16",
        f"data.batch_size={args.batch_size}",
        "data.max_length=null",
        "data.metric=anls",
        "model.tiny.vision_layers=1",
        "model.tiny.text_layers=1",
        f"data.num_workers={args.workers}",
    ]


@torch.no_grad()
def val_loss(model, val_batches, device) -> float:
    model.eval()
    total = count = 0.0
    for batch in val_batches:
        inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**inputs).loss) * n
        count += n
    model.train()
    return total / count


def mixed(args, extra) -> str:
    docs_dir = OUT / f"mixed_docs_{args.n_train}"
    if not (docs_dir / "val.jsonl").is_file():
        log.info("Rendering %d DocVQA-like pages into %s", args.n_train + 64, docs_dir)
        write_docs(docs_dir, args.n_train, 64, seed=1, long_answers=True)
    docs = {"train": docs_dir / "train.jsonl", "val": docs_dir / "val.jsonl"}
    base = compose_cfg(args, mixed_overrides(docs, args) + extra)
    path = resolve_base(base)
    processor = load_processor(path, base.data, base.model.revision)
    plain = Idefics2DataModule(base.data, processor, seed=base.seed, max_steps=base.trainer.max_steps)
    plain.setup("fit")
    val_batches = [
        plain.train_collator()([plain.val_set[j] for j in range(i, min(i + 8, len(plain.val_set)))])
        for i in range(0, len(plain.val_set), 8)
    ]
    shapes = record_shapes(
        [plain.train_set.row(i) for i in range(len(plain.train_set))],
        plain.train_collator(),
        base.data.longest_edge,
        base.data.shortest_edge,
    )

    results: dict[str, dict[str, list[float]]] = {}
    names = ["group_by=none", "group_by=length", "group_by=aspect", "HF Trainer, group_by_length"]
    for repeat in range(args.repeats):
        for name in names[repeat % 4 :] + names[: repeat % 4]:
            clock = Clock(args.warmup, args.warmup + args.steps)
            if name.startswith("HF"):
                model = run_hf_grouped(base, path, args.device, clock, plain, shapes)
            else:
                cfg = compose_cfg(args, [*mixed_overrides(docs, args), f"data.{name}", *extra])
                datamodule = Idefics2DataModule(
                    cfg.data, processor, seed=cfg.seed, max_steps=cfg.trainer.max_steps, accumulate=accumulation(cfg)
                )
                datamodule.setup("fit")
                model = run_ours(cfg, path, args.device, clock, datamodule=datamodule)
            stats, timed = clock.stats, clock.stats[args.warmup : args.warmup + args.steps]
            r = results.setdefault(name, {"samples/s": [], "wait": [], "pad": [], "pixel pad": [], "val loss": []})
            r["samples/s"].append(sum(s["samples"] for s in timed) / clock.seconds)
            r["wait"].append(clock.wait / clock.seconds)
            r["pad"].append(1 - sum(s["tokens"] for s in stats) / sum(s["token_slots"] for s in stats))
            r["pixel pad"].append(1 - sum(s["pixels"] for s in stats) / sum(s["pixel_slots"] for s in stats))
            r["val loss"].append(val_loss(model, val_batches, args.device))
            log.info("repeat %d, %s: %s", repeat + 1, name, {k: round(v[-1], 4) for k, v in r.items()})
    none = statistics.median(results["group_by=none"]["samples/s"])
    rows = [
        "| run | samples/s (min / median / max) | vs none | data wait | token padding | pixel padding | val loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = results[name]
        speed = statistics.median(r["samples/s"])
        rows.append(
            f"| {name} | {spread(r['samples/s'])} | {speed / none:.2f}x | {statistics.median(r['wait']):.1%} | "
            f"{statistics.median(r['pad']):.1%} | "
            f"{statistics.median(r['pixel pad']):.1%} | {statistics.median(r['val loss']):.4f} |"
        )
    ours = statistics.median(results["group_by=aspect"]["samples/s"])
    hf = statistics.median(results["HF Trainer, group_by_length"]["samples/s"])
    head = (
        f"{args.n_train} DocVQA-like pages (6 sizes, portrait and landscape, short and long questions and answers), "
        f"longest edge {base.data.longest_edge} px, image splitting on, batch {base.data.batch_size}, "
        f"{args.workers} loader workers, "
        f"{args.steps} timed steps after {args.warmup} of {args.warmup + args.steps}, {args.repeats} repeats, "
        f"{args.device}, {torch.get_num_threads()} threads"
    )
    ratios = [
        f"user-visible: group_by=aspect / HF group_by_length = {ours / hf:.2f}x samples/s (ours with the LM head only "
        "where some sample learns, HF Trainer with the full head and its default loss, as users run it)",
        f"of which group_by: group_by=aspect / group_by=none = {ours / none:.2f}x (both ours)",
    ]
    return "\n".join([head, "", *rows, "", *ratios])


def run_hf_grouped(cfg, path, device, clock, datamodule, shapes) -> torch.nn.Module:
    """HF Trainer at its best on the mixed set: its LengthGroupedSampler, given our exact lengths."""
    import datasets

    lengths = [s.tokens for s in shapes]
    dataset = datasets.Dataset.from_dict({"index": list(range(len(lengths))), "length": lengths})
    collate = datamodule.train_collator()

    def collate_records(items):
        batch = collate([datamodule.train_set[item["index"]] for item in items])
        return {**model_inputs(batch), "stats": batch["stats"]}

    model = fresh_model(cfg, path, device)
    with tempfile.TemporaryDirectory() as run_dir:
        return hf_trainer(
            cfg,
            model,
            device,
            clock,
            dataset,
            collate_records,
            run_dir,
            batch_size=cfg.data.batch_size,
            workers=cfg.data.num_workers,
            train_sampling_strategy="group_by_length",
            length_column_name="length",
        )


def main(argv: list[str]) -> int:
    parser = common_arguments(__doc__.split("\n")[0], ROOT / "outputs" / "bench_mixed.md")
    parser.add_argument("--n-train", type=int, default=1024, help="training pages")
    parser.add_argument("--batch-size", type=int, default=8, help="records per batch")
    parser.add_argument(
        "--longest-edge", type=int, default=256, help="pixels (the tiny vision tower reads 8-px patches)"
    )
    parser.add_argument("--workers", type=int, default=0, help="loader workers (ours and HF's)")
    return run(parser, argv, mixed, "mixed_pages.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
