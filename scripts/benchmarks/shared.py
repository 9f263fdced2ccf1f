"""What the benchmarks share: the config, a fresh model, the clocks, and our loop, a bare loop (with
our head-where-learned loss or transformers' full head) and HF Trainer on the same batches.
``loops.py``, ``mixed_pages.py``, ``mixture.py`` and ``dpo.py`` are the benchmarks."""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from idefics2_ft.config import CONF_DIR, register_configs
from idefics2_ft.models import apply_peft, load_idefics2, load_processor
from idefics2_ft.training import make_trainer
from idefics2_ft.training.lightning_module import MODEL_INPUTS, Idefics2Module
from idefics2_ft.training.optim import make_optimizer_factory, make_schedule

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "outputs" / "bench"
# ours: Idefics2Module under make_trainer (the LM head only where some sample learns); bare, same work:
# a bare loop with our module's forward and loss; bare, full head: a bare loop with transformers' forward
# and loss (the head on every position); HF Trainer: transformers.Trainer as users run it (full head)
LOOPS = ("ours", "bare, same work", "bare, full head", "HF Trainer")
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
    model = apply_peft(
        load_idefics2(path, cfg.model, cfg.peft),
        cfg.peft,
        cfg.model.gradient_checkpointing,
        cfg.model.checkpoint_connector,
    )
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
        self.first_loss: float | None = None  # the loss of the first step (before any update)

    def loss(self, value) -> None:
        """The loss a step returned; the first one is kept (read at a warm-up step, outside the timing)."""
        if self.first_loss is None:
            self.first_loss = float(value)

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
        if self.clock.first_loss is None and outputs is not None:
            self.clock.loss(outputs["loss"] if isinstance(outputs, dict) else outputs)
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


def run_bare(cfg, path, device, clock, batches, head: str = "learned") -> torch.nn.Module:
    """Forward, backward, clipping (``trainer.gradient_clip_val``, as Lightning and HF Trainer clip),
    step, schedule, zero_grad, nothing else. ``head="learned"``: the forward and loss of
    ``Idefics2Module.learned_loss`` (the LM head only at the positions where some sample learns, the
    summed cross-entropy over the supervised tokens divided by their count): our module's work.
    ``head="full"``: ``model(**inputs).loss``, transformers' forward and loss (the head on every position)."""
    model = fresh_model(cfg, path, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer_factory(cfg)(trainable)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule(cfg))
    clip = cfg.trainer.gradient_clip_val
    bf16 = device == "cuda"
    module = SimpleNamespace(model=model)  # learned_loss reads only self.model: the module's code, unwrapped
    for step, batch in enumerate(batches, 1):
        inputs = {k: v.to(device, non_blocking=True) for k, v in model_inputs(batch).items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if head == "learned":
                loss = Idefics2Module.learned_loss(module, inputs)
            else:
                loss = model(**inputs).loss
        loss.backward()
        if step == 1:
            clock.loss(loss.detach())
        if clip:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick(step)
    return model


def hf_clock(clock: Clock):
    """A ``transformers`` callback that times each step on ``clock`` (HF Trainer and TRL's trainers)."""
    from transformers import TrainerCallback

    class HFClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # called once the batch is fetched
            clock.begin(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            clock.tick(state.global_step)

    return HFClock()


def hf_arguments(cfg, run_dir: str) -> dict:
    """Our ``optim.*`` and ``trainer.*`` as ``TrainingArguments`` keys (also ``DPOConfig``'s): the same
    optimizer, schedule, clipping and steps; no saving, evaluation or reporting."""
    o, t = cfg.optim, cfg.trainer
    return dict(
        output_dir=run_dir,
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
        seed=cfg.seed,
    )


def hf_trainer(cfg, model, device, clock, dataset, collate, run_dir: str, **extra):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        **hf_arguments(cfg, run_dir),
        per_device_train_batch_size=extra.pop("batch_size", 1),
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        dataloader_num_workers=extra.pop("workers", 0),
        dataloader_persistent_workers=False,
        remove_unused_columns=False,
        disable_tqdm=not sys.stdout.isatty(),
        **extra,
    )

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if "stats" in inputs:
                clock.stats.append(inputs.pop("stats"))
            loss = super().training_step(model, inputs, num_items_in_batch)
            if clock.first_loss is None:
                clock.loss(loss)
            return loss

    trainer = CountingTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[hf_clock(clock)]
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
def spread(values: list[float], digits: int = 1) -> str:
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}"


def run(parser: argparse.ArgumentParser, argv: list[str], benchmark, script: str) -> int:
    """Parse the arguments, run ``benchmark(args, extra_overrides) -> table`` and write the table
    with the date, the wall time and the command, to ``--out`` and stdout."""
    from idefics2_ft import demo

    demo.register()  # model.name_or_path=tiny
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    table = benchmark(args, extra)
    stamp = f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s"
    text = f"{table}\n\n({stamp}; python scripts/benchmarks/{script} {' '.join(argv)})\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"Written to {out}")
    return 0


def common_arguments(description: str, out: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", help="a checkpoint folder or Hub id (default: the recipe's model)")
    parser.add_argument("--recipe", default="easyvqa_tiny")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(out))
    return parser
