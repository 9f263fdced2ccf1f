"""Does reading a mixture of three formats keep up with one source?

    python scripts/benchmarks/mixture.py     # make bench-mixed runs it after mixed_pages.py

The DocVQA-like pages of ``mixed_pages.py`` are written a third each as our JSONL, a LLaVA JSON array
and a TRL parquet table with the images inside. One run trains on all the pages as one JSONL
source, the other on the three-source mixture (equal weights), both with ``data.group_by=aspect``,
in alternating order: samples/s and the share of the time the loop waits on its loader. Then
``record_shapes`` (what ``data.group_by`` reads before training) over a mixture of ``--shape-rows``
rows, timed.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from mixed_pages import mixed_overrides
from shared import OUT, ROOT, Clock, common_arguments, compose_cfg, run, run_ours, spread

from idefics2_ft.config import accumulation
from idefics2_ft.data import Idefics2DataModule, record_shapes
from idefics2_ft.data.synthetic import write_docs
from idefics2_ft.models import load_processor, resolve_base

log = logging.getLogger("bench")


def _question_answer(row: dict) -> tuple[str, str]:
    user = next(m for m in row["messages"] if m["role"] == "user")
    answer = next(m for m in row["messages"] if m["role"] == "assistant")
    text = "".join(p.get("text", "") for p in user["content"] if p.get("type") == "text")
    return text, answer["content"][0]["text"]


def write_three(rows: list[dict], folder: Path, image_root: Path, inline: bool = True) -> dict[str, Path]:
    """The rows a third each as our JSONL, a LLaVA JSON array and a TRL parquet table."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    a, b, c = rows[0::3], rows[1::3], rows[2::3]
    ours = folder / "ours.jsonl"
    ours.write_text("".join(json.dumps({**r, "images": [str(image_root / p) for p in r["images"]]}) + "\n" for r in a))
    llava = []
    for r in b:
        q, ans = _question_answer(r)
        llava.append({"image": str(image_root / r["images"][0]),
                      "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": ans}]})  # fmt: skip
    (folder / "llava.json").write_text(json.dumps(llava))
    messages, images = [], []
    for r in c:
        q, ans = _question_answer(r)
        messages.append([{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": q}]},
                         {"role": "assistant", "content": [{"type": "text", "text": ans}]}])  # fmt: skip
        path = image_root / r["images"][0]
        images.append([{"bytes": path.read_bytes() if inline else None, "path": None if inline else str(path)}])
    table = datasets.Dataset.from_dict({"messages": messages, "images": images})
    table = table.cast_column("images", datasets.List(datasets.Image()))
    (folder / "trl").mkdir(exist_ok=True)
    table.to_parquet(str(folder / "trl" / "train.parquet"))
    table.select(range(min(8, len(table)))).to_parquet(str(folder / "trl" / "validation.parquet"))
    return {"ours": ours, "llava": folder / "llava.json", "trl": folder / "trl"}


def mixture_overrides(files: dict[str, Path]) -> str:
    return (
        f"+data.mixture=[{{name: ours, source: jsonl, train_file: '{files['ours']}', weight: 0.34}},"
        f" {{name: llava, path: '{files['llava']}', weight: 0.33}}, {{name: trl, path: '{files['trl']}', weight: 0.33}}]"
    )


def overrides(docs: dict[str, Path], args) -> list[str]:
    return [*mixed_overrides(docs, args), "data.group_by=aspect"]


def mixture(args, extra) -> str:
    docs_dir = OUT / f"mixed_docs_{args.n_train}"
    if not (docs_dir / "val.jsonl").is_file():
        log.info("Rendering %d DocVQA-like pages into %s", args.n_train + 64, docs_dir)
        write_docs(docs_dir, args.n_train, 64, seed=1, long_answers=True)
    docs = {"train": docs_dir / "train.jsonl", "val": docs_dir / "val.jsonl"}
    rows = [json.loads(line) for line in docs["train"].read_text().splitlines() if line.strip()]
    files = write_three(rows, OUT / f"mixture_{args.n_train}", docs_dir)
    base = compose_cfg(args, overrides(docs, args) + extra)
    path = resolve_base(base)
    processor = load_processor(path, base.data, base.model.revision)
    runs = {"one source (JSONL)": [], "three sources (JSONL, LLaVA JSON, TRL parquet)": [mixture_overrides(files)]}
    results: dict[str, dict[str, list[float]]] = {}
    for repeat in range(args.repeats):
        for name in list(runs)[repeat % 2 :] + list(runs)[: repeat % 2]:
            cfg = compose_cfg(args, [*overrides(docs, args), *runs[name], *extra])
            datamodule = Idefics2DataModule(
                cfg.data, processor, seed=cfg.seed, max_steps=cfg.trainer.max_steps, accumulate=accumulation(cfg)
            )
            datamodule.setup("fit")
            clock = Clock(args.warmup, args.warmup + args.steps)
            run_ours(cfg, path, args.device, clock, datamodule=datamodule)
            timed = clock.stats[args.warmup : args.warmup + args.steps]
            r = results.setdefault(name, {"samples/s": [], "wait": []})
            r["samples/s"].append(sum(s["samples"] for s in timed) / clock.seconds)
            r["wait"].append(clock.wait / clock.seconds)
            log.info("repeat %d, %s: %s", repeat + 1, name, {k: round(v[-1], 4) for k, v in r.items()})
    table = ["| run | samples/s (min / median / max) | data wait (median) |", "|---|---|---|"]
    for name, r in results.items():
        table.append(f"| {name} | {spread(r['samples/s'])} | {statistics.median(r['wait']):.1%} |")
    one, three = (statistics.median(r["samples/s"]) for r in results.values())
    head = (
        f"{args.n_train} DocVQA-like pages, image splitting on, longest edge {args.longest_edge} px, batch "
        f"{args.batch_size}, data.group_by=aspect, {args.workers} loader workers, {args.steps} timed steps after "
        f"{args.warmup}, {args.repeats} repeats, {args.device}, {torch.get_num_threads()} threads"
    )
    return "\n".join([head, "", *table, "", f"three sources / one source = {three / one:.2f}x samples/s", "",
                      shapes_line(args, docs, rows, docs_dir, processor, base)])  # fmt: skip


def shapes_line(args, docs, rows, docs_dir, processor, base) -> str:
    """``record_shapes`` over a mixture of ``--shape-rows`` rows (the pages repeated), timed."""
    n = args.shape_rows
    repeated = [rows[i % len(rows)] for i in range(n)]
    files = write_three(repeated, OUT / f"mixture_shapes_{n}", docs_dir, inline=False)
    cfg = compose_cfg(args, [*overrides(docs, args), mixture_overrides(files)])
    datamodule = Idefics2DataModule(cfg.data, processor, seed=cfg.seed, max_steps=1)
    datamodule.cfg.group_by = "none"  # set up the sources only: the shapes are timed here
    datamodule.setup("fit")
    train = datamodule.train_set
    started = time.perf_counter()
    record_shapes([train.row(i) for i in range(len(train))], datamodule.train_collator(), 256, 16)
    seconds = time.perf_counter() - started
    return (
        f"record_shapes over a {len(train):,}-row mixture (the three formats, images as files): {seconds:.1f} s "
        f"({seconds / len(train) * 1e3:.2f} ms a row: tokenizing each and reading its image's header)"
    )


def main(argv: list[str]) -> int:
    parser = common_arguments(__doc__.split("\n")[0], ROOT / "outputs" / "bench_mixture.md")
    parser.add_argument("--n-train", type=int, default=1024, help="training pages")
    parser.add_argument("--batch-size", type=int, default=8, help="records per batch")
    parser.add_argument("--longest-edge", type=int, default=256, help="pixels")
    parser.add_argument("--workers", type=int, default=0, help="loader workers")
    parser.add_argument("--shape-rows", type=int, default=100_000, help="rows of the mixture record_shapes reads")
    return run(parser, argv, mixture, "mixture.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
