"""Our DPO against TRL's DPOTrainer on the same 4-bit QLoRA Idefics2, the same pairs and batch.

    python scripts/benchmarks/dpo.py                       # make bench-dpo: the tiny model and the 8B's shapes
    python scripts/benchmarks/dpo.py --shapes 8b --steps-8b 2 --longest-edge 980   # the recipes' page size
    python scripts/benchmarks/dpo.py --shapes tiny --steps 2 --warmup 1 --repeats 1   # the fast test's smoke run

Three runs train a freshly loaded model (the same base, seed, adapters and gradient checkpointing:
``load_idefics2`` + ``apply_peft``, as ``train.py`` builds them) on the same pairs, each in its own
process (``MALLOC_MMAP_THRESHOLD_=65536``, so that the RSS follows the live tensors and the peaks of
one run do not mix with another's), interleaved and repeated (these machines are noisy: compare the
ratios, not the seconds):

- ``ours DPO``: ``PreferenceModule`` (sigmoid, beta 0.1, the base as reference) under ``make_trainer``,
  the pairs collated by ``PairCollator``;
- ``TRL DPO``: TRL's ``DPOTrainer`` (``trl`` 1.16, the ``oracle`` extra) given the same PEFT model and a
  ``datasets.Dataset`` of the same pairs in TRL's preference form (``prompt``, ``chosen``, ``rejected``,
  ``images``), the same per-device batch, ``max_length``, learning rate and schedule,
  ``precompute_ref_log_probs=False``; its ``gradient_checkpointing=False`` because the model already
  checkpoints what ours does (``apply_peft``); fp32 on the CPU (``bf16=False``) as ours;
- ``ours SFT``: ``Idefics2Module`` on the chosen answers of the same pairs (the same pictures and
  prompts): the cost of a DPO step over an SFT step.

Each run is timed from the end of ``--warmup`` steps to the end of the last. Peak memory is the
process's RSS peak while it trains (the kernel's VmHWM, ``planning/profiling.py``'s ``Phases``) above
its RSS before the model loaded: the weights plus what training adds. A forward hook on the vision
tower counts the pictures it sees, over the pairs trained. Shapes:

- ``tiny``: the demo's tiny Idefics2 (``recipe=easyvqa_tiny``: LoRA r 16 on the text model, no
  checkpointing), easy-VQA pairs (64 px pictures, the rejected answer a wrong colour or shape);
- ``8b``: idefics2-8b's shapes (SigLIP-so400m at full size, the perceiver, Mistral-7B's width and
  vocabulary) with 2 decoder layers, random init (``write_random_checkpoint``), ``recipe=rlaifv_dpo``
  (LoRA r 8 on the text model and the connector, gradient checkpointing), DocVQA-like pages
  (``write_docs``, 760x980) at ``--longest-edge`` without image splitting, a pair per step.

Writes the table to ``outputs/bench_dpo.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from shared import OUT, ROOT, Clock, LightningClock, compose_cfg, fresh_model, hf_arguments, hf_clock, spread

log = logging.getLogger("bench")

SIDES = ("ours", "trl", "sft")
NAMES = {"ours": "ours DPO", "trl": "TRL DPO", "sft": "ours SFT (chosen answers)"}
RECIPES = {"tiny": "easyvqa_tiny", "8b": "rlaifv_dpo"}
PAGE = (760, 980)  # a portrait page (width, height), the size docvqa-like pages have most


# ---------------------------------------------------------------------------------------- the inputs
def shape_cfg(args, shape: str, checkpoint: str | None):
    """The config of one shape: its recipe, batch and pages; no validation, accumulation or checkpoint cadence."""
    ns = argparse.Namespace(recipe=RECIPES[shape], model=checkpoint, warmup=args.warmup, steps=args.steps, device="cpu")
    extra = [f"data.batch_size={batch_size(args, shape)}", "trainer.accumulate_grad_batches=1"]
    if shape == "8b":
        extra += ["data.do_image_splitting=false", f"data.longest_edge={args.longest_edge}"]
    return compose_cfg(ns, extra)


def batch_size(args, shape: str) -> int:
    return args.batch_size or (4 if shape == "tiny" else 1)


def prepare(args, shape: str, folder: Path) -> dict:
    """The base checkpoint and the pairs (a ``datasets`` folder in TRL's preference form), written once."""
    import datasets

    from idefics2_ft.demo.formats import easyvqa_items, trl_pair_rows

    folder.mkdir(parents=True, exist_ok=True)
    n = batch_size(args, shape) * (args.warmup + args.steps)
    if shape == "tiny":
        from idefics2_ft.models import resolve_base

        checkpoint = None
        resolve_base(shape_cfg(args, shape, None))  # builds the tiny base once (stage 1 skipped: speed only)
        rows = trl_pair_rows(easyvqa_items("train", n))
    else:
        from idefics2_ft.data.synthetic import write_docs
        from idefics2_ft.models import write_random_checkpoint
        from idefics2_ft.models.random_checkpoint import default_cache_dir
        from idefics2_ft.models.reference import idefics2_8b_config

        config = idefics2_8b_config()
        config.text_config.num_hidden_layers = 2  # the folder scripts/build_8b.py --text-layers 2 writes
        checkpoint = str(write_random_checkpoint(default_cache_dir() / "idefics2-8b-random-L2", config))
        rows = doc_pairs(write_docs(folder / f"docs_{n}", n, 0, sizes=(PAGE,))["train"])
    pairs = datasets.Dataset.from_dict(rows).cast_column("images", datasets.List(datasets.Image()))
    pairs.save_to_disk(str(folder / "pairs"))
    return {"checkpoint": checkpoint, "pairs": str(folder / "pairs"), "n": n}


def doc_pairs(jsonl: Path) -> dict[str, list]:
    """DocVQA-like pages as TRL preference rows: the page's answer chosen, the next page's answer rejected."""
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "images": []}
    for i, r in enumerate(records):
        right = r["messages"][1]["content"][0]["text"]
        wrong = records[(i + 1) % len(records)]["messages"][1]["content"][0]["text"]
        wrong = wrong if wrong != right else f"not {right}"
        rows["prompt"].append([r["messages"][0]])
        rows["chosen"].append([{"role": "assistant", "content": [{"type": "text", "text": right}]}])
        rows["rejected"].append([{"role": "assistant", "content": [{"type": "text", "text": wrong}]}])
        rows["images"].append([{"bytes": (jsonl.parent / r["images"][0]).read_bytes(), "path": None}])
    return rows


def records_of(pairs) -> list[dict]:
    """The pairs as our pair records: the chosen conversation, the rejected one, the prompt's pictures."""

    def clean(turns):  # an Arrow column of content parts holds every key in every part (None where unused)
        return [
            {"role": t["role"], "content": [{k: v for k, v in p.items() if v is not None} for p in t["content"]]}
            for t in turns
        ]

    return [
        {"messages": clean(r["prompt"] + r["chosen"]), "rejected": clean(r["prompt"] + r["rejected"]),
         "images": r["images"], "index": i}
        for i, r in enumerate(pairs)
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------- one run (a process)
class CpuClock(Clock):
    """``Clock``, with the process's CPU time at the same marks: on a shared machine the CPU seconds of
    a step move less than its wall time when other jobs take the cores (threads wait passively:
    ``OMP_WAIT_POLICY=PASSIVE``, so that a thread waiting for another does not count as work)."""

    def __init__(self, first: int, last: int) -> None:
        super().__init__(first, last)
        self.cpu: dict[int, float] = {}

    def tick(self, step: int) -> None:
        super().tick(step)
        if step in (self.first, self.last):
            self.cpu[step] = time.process_time()

    @property
    def cpu_seconds(self) -> float:
        return self.cpu[self.last] - self.cpu.get(self.first, self.cpu[self.last])


class VisionCount:
    """Counts the pictures the vision tower sees (a forward hook on ``Idefics2VisionTransformer``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from idefics2_ft.training.pair_forward import part_of

        self.calls = self.images = 0
        self.handle = part_of(model, "Idefics2Model").vision_model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs, output) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        self.calls += 1
        self.images += int(pixels.shape[0])


def run_one(args) -> int:
    """Train one side for warmup + steps in this process; write its timings, peak and counts as JSON."""
    from torch.utils.data import DataLoader

    from idefics2_ft import demo
    from idefics2_ft.data.collator import Idefics2Collator
    from idefics2_ft.data.pairs import PairCollator
    from idefics2_ft.models import load_processor, resolve_base
    from idefics2_ft.planning.profiling import Phases
    from idefics2_ft.training import make_trainer
    from idefics2_ft.training.lightning_module import Idefics2Module
    from idefics2_ft.training.optim import make_optimizer_factory, make_schedule
    from idefics2_ft.training.preference_module import PreferenceModule

    if args.side == "trl":  # imported before the peaks are measured, as ours is
        import trl  # noqa: F401
        import trl.trainer.dpo_trainer  # noqa: F401
    demo.register()
    prepared = json.loads(Path(args.prepared).read_text())
    cfg = shape_cfg(args, args.shape, prepared["checkpoint"])
    path = resolve_base(cfg)
    processor = load_processor(path, cfg.data, cfg.model.revision)
    import datasets

    pairs = datasets.load_from_disk(prepared["pairs"])
    clock = CpuClock(args.warmup, args.warmup + args.steps)
    phases = Phases()
    b = cfg.data.batch_size
    with tempfile.TemporaryDirectory() as run_dir:
        with phases("load"):
            model = fresh_model(cfg, path, "cpu")
            if args.side == "trl":
                trainer = trl_trainer(cfg, model, processor, pairs, clock, run_dir)
            else:
                records = records_of(pairs)
                if args.side == "ours":
                    collate = PairCollator(processor, cfg.data.max_length)
                    module = PreferenceModule(
                        model, processor.tokenizer, make_optimizer_factory(cfg), make_schedule(cfg), reference="base"
                    )
                else:
                    records = [{k: v for k, v in r.items() if k != "rejected"} for r in records]  # the chosen side
                    collate = Idefics2Collator(processor, cfg.data.max_length, "right")
                    module = Idefics2Module(model, processor.tokenizer, make_optimizer_factory(cfg), make_schedule(cfg))
                loader = DataLoader(records, batch_size=b, shuffle=False, collate_fn=collate)  # collated as it trains
                trainer = make_trainer(cfg, Path(run_dir))
                trainer.callbacks.append(LightningClock(clock))
            count = VisionCount(model)
        with phases("train"):
            if args.side == "trl":
                trainer.train()
            else:
                trainer.fit(module, train_dataloaders=loader)
    steps = args.warmup + args.steps
    result = {
        "side": args.side,
        "seconds": clock.seconds,
        "cpu_seconds": clock.cpu_seconds,
        "steps": args.steps,
        "pairs_per_step": b,
        "peak_gb": phases.peak_gb("train", since="load"),
        "train_gb": round(phases.records["train"]["rss_peak_gb"] - phases.records["train"]["rss_start_gb"], 3),
        "vision_calls": count.calls,
        "vision_images": count.images,
        "pairs": b * steps,
        "threads": torch.get_num_threads(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
    Path(args.result).write_text(json.dumps(result))
    return 0


def trl_trainer(cfg, model, processor, pairs, clock, run_dir: str):
    """TRL's DPOTrainer over ``model`` (already PEFT-wrapped as ours), with our optimizer settings."""
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        **hf_arguments(cfg, run_dir),
        per_device_train_batch_size=cfg.data.batch_size,
        gradient_accumulation_steps=1,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=cfg.data.max_length,
        precompute_ref_log_probs=False,
        gradient_checkpointing=False,  # the model checkpoints what ours does already (apply_peft)
        bf16=False,
        use_cpu=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
    )
    return DPOTrainer(
        model=model, args=config, train_dataset=pairs, processing_class=processor, callbacks=[hf_clock(clock)]
    )


# ---------------------------------------------------------------------------------------- the benchmark
def spawn(args, shape: str, side: str, prepared: Path, result: Path) -> dict:
    command = [
        sys.executable, __file__, "--worker", side, "--shape", shape, "--prepared", str(prepared),
        "--result", str(result), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--longest-edge", str(args.longest_edge),
    ]  # fmt: skip
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_WAIT_POLICY": "PASSIVE"}
    log_file = result.with_suffix(".log")
    with log_file.open("w") as out:
        code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        raise RuntimeError(f"{shape}/{side} failed ({log_file}):\n{log_file.read_text()[-4000:]}")
    return json.loads(result.read_text())


def one_shape(args, shape: str) -> str:
    if shape == "8b":  # minutes a step on the CPU
        args = argparse.Namespace(**{**vars(args), "steps": args.steps_8b, "repeats": args.repeats_8b})
    folder = OUT / "dpo" / shape
    prepared = folder / "prepared.json"
    prepared.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    prepared.write_text(json.dumps(prepare(args, shape, folder)))
    log.info("%s: checkpoint and pairs ready (%.0f s)", shape, time.perf_counter() - started)
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    for repeat in range(args.repeats):
        order = SIDES[repeat % 3 :] + SIDES[: repeat % 3]  # each side goes first in turn
        for side in order:
            r = spawn(args, shape, side, prepared, folder / f"{side}.json")
            results[side].append(r)
            log.info(
                "%s, repeat %d, %s: %.3f pairs/s, peak %.2f GB, %d pictures through the vision tower for %d pairs",
                shape, repeat + 1, side, r["steps"] * r["pairs_per_step"] / r["seconds"], r["peak_gb"],
                r["vision_images"], r["pairs"],
            )  # fmt: skip
    return table(args, shape, results)


def table(args, shape: str, results: dict[str, list[dict]]) -> str:
    rate = {s: [r["steps"] * r["pairs_per_step"] / r["seconds"] for r in results[s]] for s in SIDES}
    cpu = {s: statistics.median(r["steps"] * r["pairs_per_step"] / r["cpu_seconds"] for r in results[s]) for s in SIDES}
    peak = {s: statistics.median(r["peak_gb"] for r in results[s]) for s in SIDES}
    own = {s: statistics.median(r["train_gb"] for r in results[s]) for s in SIDES}
    images = {s: results[s][0]["vision_images"] / results[s][0]["pairs"] for s in SIDES}
    median = {s: statistics.median(rate[s]) for s in SIDES}
    unit = {"ours": "pairs", "trl": "pairs", "sft": "samples"}
    rows = [
        "| run | pairs/s (min / median / max) | pairs per CPU-second (median) | peak RSS GB (weights + training) | "
        "of which training GB | pictures through the vision tower per pair |",
        "|---|---|---|---|---|---|",
    ]
    for s in SIDES:
        note = " (samples/s)" if unit[s] == "samples" else ""
        rows.append(
            f"| {NAMES[s]} | {spread3(rate[s])}{note} | {cpu[s]:.3f} | {peak[s]:.3f} | {own[s]:.3f} | {images[s]:g} |"
        )
    b = results["ours"][0]["pairs_per_step"]
    ratios = (
        f"ours/TRL pairs/s = {median['ours'] / median['trl']:.2f}, "
        f"ours/TRL peak = {peak['ours'] / peak['trl']:.2f}, "
        f"DPO/SFT step time = {median['sft'] / median['ours']:.2f}; in CPU time: "
        f"ours/TRL pairs per CPU-second = {cpu['ours'] / cpu['trl']:.2f}, DPO/SFT step = {cpu['sft'] / cpu['ours']:.2f}"
    )
    what = {
        "tiny": "the tiny Idefics2 (easyvqa_tiny: LoRA r 16 on the text model, no checkpointing), 64 px pictures",
        "8b": (
            "idefics2-8b's shapes with 2 decoder layers (rlaifv_dpo: LoRA r 8 on the text model and the connector, "
            f"gradient checkpointing), 760x980 pages at longest edge {args.longest_edge}, no image splitting"
        ),
    }[shape]
    head = (
        f"{shape}: {what}; 4-bit NF4 base, cpu, {b} pair(s) per step, {args.steps} timed steps after {args.warmup}, "
        f"{args.repeats} repeat(s), {results['ours'][0]['threads']} threads, each run in its own process "
        f"(MALLOC_MMAP_THRESHOLD_={results['ours'][0]['malloc_mmap_threshold']})"
    )
    return "\n".join([head, "", *rows, "", ratios])


def spread3(values: list[float]) -> str:
    return (
        spread(values)
        if min(values) >= 10
        else " / ".join(f"{v:.3f}" for v in (min(values), statistics.median(values), max(values)))
    )


def benchmark(args) -> str:
    return "\n\n".join(one_shape(args, shape) for shape in args.shapes.split(","))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,8b", help="tiny, 8b or both (comma-separated)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (tiny)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="repeats (tiny)")
    parser.add_argument("--steps-8b", type=int, default=1, help="timed steps per run on the 8b shape")
    parser.add_argument("--repeats-8b", type=int, default=1, help="repeats on the 8b shape")
    parser.add_argument("--batch-size", type=int, help="pairs per step (default: 4 on tiny, 1 on 8b)")
    parser.add_argument(
        "--longest-edge",
        type=int,
        default=490,
        help="the 8b shape's pages, longest edge in px (980: the 8B recipes' size, 4x the patches)",
    )
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench_dpo.md"))
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--prepared", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.worker:
        args.side = args.worker
        return run_one(args)
    from idefics2_ft import demo

    demo.register()
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    text = benchmark(args)
    stamp = f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s"
    text = f"{text}\n\n({stamp}; python scripts/benchmarks/dpo.py {' '.join(argv)})\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"Written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
