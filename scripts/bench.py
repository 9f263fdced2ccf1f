"""Is our training loop as fast as a bare PyTorch loop, and as HF Trainer? The same batches, one process.

    python scripts/bench.py                      # make bench: the tiny QLoRA model on the CPU
    python scripts/bench.py --mixed              # make bench-mixed: data.group_by on mixed pages, and HF's group_by_length
    python scripts/bench.py --device cuda --model PATH [--recipe docvqa_qlora] [overrides ...]
    python scripts/bench.py --steps 3 --warmup 1 --repeats 1     # the fast test's smoke run

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

``--mixed`` trains on DocVQA-like pages rendered here (portrait and landscape, several sizes, short
and long questions and answers, image splitting on) through the real DataModule, once per
``data.group_by``, and through HF Trainer with ``train_sampling_strategy=group_by_length`` given our
token lengths: samples/s, padding of tokens and pixels, and the validation loss after the same
number of steps.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from idefics2_ft import demo
from idefics2_ft.config import CONF_DIR, accumulation, register_configs
from idefics2_ft.data import Idefics2DataModule, record_shapes
from idefics2_ft.data.synthetic import write_docs
from idefics2_ft.models import apply_peft, load_idefics2, load_processor, resolve_base
from idefics2_ft.training import make_trainer
from idefics2_ft.training.lightning_module import MODEL_INPUTS, Idefics2Module
from idefics2_ft.training.optim import make_optimizer_factory, make_schedule

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench"
LOOPS = ("ours", "bare", "hf")
log = logging.getLogger("bench")


def compose_cfg(args: argparse.Namespace, extra: list[str]):
    overrides = [
        f"recipe={args.recipe}",
        f"trainer.max_steps={args.warmup + args.steps}",
        f"optim.warmup_steps={min(args.warmup, args.warmup + args.steps - 1)}",
        "trainer.val_check_interval=null",
        "trainer.limit_val_batches=0",
        "eval.at_end=false",
        "eval.before_training=false",
        "logger=csv",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"run_dir={OUT / 'run'}",
    ]
    if args.model:
        overrides.append(f"model.name_or_path={args.model}")
    elif args.recipe == "easyvqa_tiny":  # speed does not depend on what stage 1 taught: skip it
        overrides += ["model.tiny.vision_pretrain_steps=0", "model.tiny.pretrain_steps=0"]
        overrides.append(f"model.tiny.cache_dir={OUT / 'tiny'}")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides + extra)


def fresh_model(cfg, path: str, device: str) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    model = apply_peft(load_idefics2(path, cfg.model, cfg.peft), cfg.peft, cfg.model.gradient_checkpointing)
    if next(model.parameters()).device.type != device:  # a 4-bit base on CUDA is placed at load
        model.to(device)
    return model.train()


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


class Clock:
    """Times steps ``first + 1 .. last`` (CUDA synchronized at the two marks), and within them the
    time from the end of a step to the start of the next: the loop waiting on its loader."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.marks: dict[int, float] = {}
        self.wait = 0.0
        self._end = 0.0
        self.stats: list[dict] = []  # each step's padding counts, in the loop's process (workers or not)

    def begin(self, step: int) -> None:  # step: the steps done before this one
        if self.first <= step < self.last:
            self.wait += time.perf_counter() - self._end

    def tick(self, step: int) -> None:  # step: the steps done after this one
        if step in (self.first, self.last):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks[step] = time.perf_counter()
        self._end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.marks[self.last] - self.marks.get(self.first, self.marks[self.last])


class LightningClock(Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.begin(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.stats.append(batch["stats"])
        self.clock.tick(trainer.global_step)


# ---------------------------------------------------------------------------------------- loops
def run_ours(cfg, path, device, clock, batches=None, datamodule=None) -> torch.nn.Module:
    processor_tokenizer = load_processor(path, cfg.data, cfg.model.revision).tokenizer
    model = fresh_model(cfg, path, device)
    module = Idefics2Module(model, processor_tokenizer, make_optimizer_factory(cfg), make_schedule(cfg))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = make_trainer(cfg, Path(run_dir))
        trainer.callbacks.append(LightningClock(clock))
        if datamodule is not None:
            trainer.fit(module, datamodule=datamodule)
        else:
            trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return model


def run_bare(cfg, path, device, clock, batches) -> torch.nn.Module:
    model = fresh_model(cfg, path, device)
    optimizer = make_optimizer_factory(cfg)([p for p in model.parameters() if p.requires_grad])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule(cfg))
    bf16 = device == "cuda"
    for step, batch in enumerate(batches, 1):
        inputs = {k: v.to(device, non_blocking=True) for k, v in model_inputs(batch).items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick(step)
    return model


def hf_trainer(cfg, model, device, clock, dataset, collate, run_dir: str, **extra):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class HFClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # called once the batch is fetched
            clock.begin(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            clock.tick(state.global_step)

    o, t = cfg.optim, cfg.trainer
    args = TrainingArguments(
        output_dir=run_dir,
        per_device_train_batch_size=extra.pop("batch_size", 1),
        max_steps=t.max_steps,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.betas[0],
        adam_beta2=o.betas[1],
        warmup_steps=o.warmup_steps,
        lr_scheduler_type="cosine" if o.scheduler == "cosine" else "constant_with_warmup",
        optim="adamw_torch",
        max_grad_norm=t.gradient_clip_val or 0.0,
        logging_steps=t.log_every_n_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        dataloader_num_workers=extra.pop("workers", 0),
        dataloader_persistent_workers=False,
        remove_unused_columns=False,
        disable_tqdm=not sys.stdout.isatty(),
        seed=cfg.seed,
        **extra,
    )

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if "stats" in inputs:
                clock.stats.append(inputs.pop("stats"))
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = CountingTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[HFClock()]
    )
    trainer.train()
    return model


def run_hf(cfg, path, device, clock, batches) -> torch.nn.Module:
    model = fresh_model(cfg, path, device)
    with tempfile.TemporaryDirectory() as run_dir:
        # one pre-collated batch per item, in order
        return hf_trainer(
            cfg,
            model,
            device,
            clock,
            batches,
            lambda items: model_inputs(items[0]),
            run_dir,
            train_sampling_strategy="sequential",
        )


# ---------------------------------------------------------------------------------------- reports
def spread(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"


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


# ---------------------------------------------------------------------------------------- mixed
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
    return "\n".join([head, "", *rows, "", f"group_by=aspect / HF group_by_length = {ours / hf:.2f}x samples/s"])


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
    demo.register()  # model.name_or_path=tiny
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", help="a checkpoint folder or Hub id (default: the recipe's model)")
    parser.add_argument("--recipe", default="easyvqa_tiny")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mixed", action="store_true", help="data.group_by on mixed DocVQA-like pages, and HF's")
    parser.add_argument("--n-train", type=int, default=1024, help="--mixed: training pages")
    parser.add_argument("--batch-size", type=int, default=8, help="--mixed: records per batch")
    parser.add_argument(
        "--longest-edge", type=int, default=256, help="--mixed: pixels (the tiny vision tower reads 8-px patches)"
    )
    parser.add_argument("--workers", type=int, default=0, help="--mixed: loader workers (ours and HF's)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench.md"))
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    table = mixed(args, extra) if args.mixed else three_loops(args, extra)
    stamp = f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s"
    text = f"{table}\n\n({stamp}; python scripts/bench.py {' '.join(argv)})\n"
    out = Path(
        args.out
        if not args.mixed or args.out != parser.get_default("out")
        else str(ROOT / "outputs" / "bench_mixed.md")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"Written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
