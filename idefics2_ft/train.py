"""``train(cfg) -> metrics``: compose the parts, fit, validate, save. The root ``train.py`` wraps it in Hydra."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from idefics2_ft.config import accumulation, validate
from idefics2_ft.data.collator import IGNORE_INDEX
from idefics2_ft.data.datamodule import Idefics2DataModule
from idefics2_ft.data.sources import build_rows
from idefics2_ft.distributed import full_trainable_state, make_shard_fn, make_strategy, quant_storage_for
from idefics2_ft.models import apply_peft, load_idefics2, load_processor, trainable_parameters
from idefics2_ft.module import Idefics2Module, warmup_cosine
from idefics2_ft.versions import check_versions

log = logging.getLogger(__name__)

# Keys such as `token`, `hf_token`, `api_key`, `password` (not `max_new_tokens`).
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key|key)$")


def _is_rank_zero() -> bool:
    return (
        int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0
        and int(os.environ.get("LOCAL_RANK", "0")) == 0
    )


def redacted(cfg: DictConfig) -> dict:
    """The resolved config as a dict, with any secret-looking value replaced."""

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: ("<redacted>" if SECRET_KEY.search(str(k).lower()) and isinstance(v, str) and v else scrub(v))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return scrub(OmegaConf.to_container(cfg, resolve=True))


# ---------------------------------------------------------------------------- tiny base
def tiny_base_key(cfg: DictConfig) -> str:
    """A folder name that changes whenever anything the tiny base is built from changes."""
    d = cfg.data
    from idefics2_ft.tiny import STAGE1_VERSION

    payload = {
        "stage1_version": STAGE1_VERSION,
        "tiny": OmegaConf.to_container(cfg.model.tiny, resolve=True),
        "image": [cfg.data.longest_edge, cfg.data.do_image_splitting],
        "data": [d.source, d.path, d.train_split, d.train_file, d.max_train_samples, d.system_prompt],
    }
    payload["tiny"].pop("cache_dir")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def ensure_tiny_base(cfg: DictConfig) -> Path:
    """Build (once) and cache the tiny base: random init from the seed, then stage 1 if configured.

    The folder is an ordinary ``save_pretrained`` folder (model + processor), so the tiny model
    then goes through the same ``from_pretrained`` path as a Hub checkpoint.
    """
    from idefics2_ft.tiny import build_processor, build_tiny_model, pretrain_tiny_base, tiny_config

    t = cfg.model.tiny
    folder = (Path(t.cache_dir) / tiny_base_key(cfg)).resolve()
    if (folder / "config.json").is_file():
        log.info("Tiny base: using the cached %s", folder)
        return folder
    if not _is_rank_zero():
        return _wait_for_base(folder)
    start = time.perf_counter()
    config = tiny_config(
        image_size=t.image_size,
        patch_size=t.patch_size,
        vision_hidden=t.vision_hidden,
        vision_layers=t.vision_layers,
        text_hidden=t.text_hidden,
        text_layers=t.text_layers,
        n_latents=t.n_latents,
        resampler_depth=t.resampler_depth,
        initializer_range=t.initializer_range,
    )
    processor = build_processor(t.n_latents, cfg.data.longest_edge, cfg.data.do_image_splitting)
    model = build_tiny_model(config, seed=t.seed, latent_std=t.latent_std)
    report: dict[str, float] = {}
    if t.vision_pretrain_steps or t.pretrain_steps:
        log.info(
            "Tiny base, stage 1 (a stand-in for a pretrained checkpoint): %d vision-tower steps, "
            "then %d steps of full training on %s",
            t.vision_pretrain_steps,
            t.pretrain_steps,
            cfg.data.source,
        )
        rows = build_rows(cfg.data, "train")
        if cfg.data.max_train_samples is not None:
            rows = rows[: cfg.data.max_train_samples]
        report = pretrain_tiny_base(model, processor, rows, t, progress=cfg.trainer.enable_progress_bar)
    report["stage1/wall_s"] = time.perf_counter() - start
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "stage1.json").write_text(json.dumps(report, indent=2))
    tmp.rename(folder)  # a half-written base never looks complete
    log.info("Tiny base saved to %s (%.0f s)", folder, report["stage1/wall_s"])
    return folder


def _wait_for_base(folder: Path, timeout_s: float = 3600.0) -> Path:
    """Other ranks wait for rank 0 to build the tiny base (no process group exists yet)."""
    start = time.perf_counter()
    while not (folder / "config.json").is_file():
        waited = time.perf_counter() - start
        if waited > timeout_s:
            raise TimeoutError(f"Rank 0 did not build the tiny base {folder} within {timeout_s:.0f} s.")
        if int(waited) % 60 == 0:
            log.info("Waiting for rank 0 to build the tiny base %s (%.0f s)", folder, waited)
        time.sleep(1.0)
    return folder


def resolve_model_path(cfg: DictConfig, use_record: bool = True) -> str:
    """The base to load: the run's recorded base (``use_record``) if it has one, else the Hub id or
    folder, or the tiny base (built and cached if needed).

    Raises:
        FileNotFoundError / RuntimeError: the recorded tiny base is gone or was replaced.
    """
    record = Path(cfg.run_dir) / BASE_RECORD
    if use_record and record.is_file():
        recorded = json.loads(record.read_text())
        if cfg.model.name_or_path != "tiny":
            return recorded["path"]
        folder = Path(recorded["path"])
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"The tiny base this run was trained on ({folder}) is gone; its adapter only fits that base. "
                "Restore the folder, or train again."
            )
        if _fingerprint(folder) != recorded["fingerprint"]:
            raise RuntimeError(f"The tiny base at {folder} is not the one this run was trained on.")
        return str(folder)
    return str(ensure_tiny_base(cfg)) if cfg.model.name_or_path == "tiny" else cfg.model.name_or_path


BASE_RECORD = "base_model.json"


def _fingerprint(folder: Path) -> str:
    """A hash of a local base's weight files (cheap for the tiny model)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def record_base(cfg: DictConfig, model_path: str) -> None:
    """Write which base the run trains on, so evaluation and export load exactly that one."""
    entry = {"path": model_path}
    if Path(model_path).is_dir():
        entry["path"] = str(Path(model_path).resolve())
        if cfg.model.name_or_path == "tiny":
            entry["fingerprint"] = _fingerprint(Path(model_path))
    if cfg.model.revision:
        entry["revision"] = cfg.model.revision
    (Path(cfg.run_dir) / BASE_RECORD).write_text(json.dumps(entry, indent=2))


# ---------------------------------------------------------------------------- pieces
def make_optimizer_factory(cfg: DictConfig):
    o = cfg.optim
    name = o.optimizer
    if name == "auto":
        # paged 8-bit AdamW on one GPU or DDP; FSDP and ZeRO shard a plain AdamW's state instead
        replicated = cfg.strategy.name in ("auto", "ddp")
        name = "paged_adamw_8bit" if torch.cuda.is_available() and replicated else "adamw"
    if cfg.strategy.name == "deepspeed" and cfg.strategy.offload_optimizer:
        name = "deepspeed_cpu_adam"  # the optimizer step runs where the offloaded state lives

    def factory(params):
        if name == "deepspeed_cpu_adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        if name == "paged_adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)

    return factory


def make_logger(cfg: DictConfig, run_dir: Path):
    kind = cfg.logger.type
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="logs", version="")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name="logs", version="")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, name=cfg.name, save_dir=str(run_dir))


class RehearsedCrash(RuntimeError):
    """Raised by ``debug.crash_at_step``."""


def _crash_callback(step: int):
    from lightning.pytorch.callbacks import Callback

    class CrashAt(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == step:
                raise RehearsedCrash(f"debug.crash_at_step={step}: stopping on purpose (resume with resume=true).")

    return CrashAt()


class Preempted(RuntimeError):
    """SLURM signalled the job before a preemption or its time limit; the run stopped at a step
    boundary with ``checkpoints/last.ckpt`` written, and the job is requeued."""


def _preemption_callback():
    """Stop every rank at the same optimizer-step boundary when SLURM signals (SIGUSR1 from
    ``#SBATCH --signal``, SIGUSR2 from submitit).

    Lightning's own handler saves a checkpoint inside the signal handler, wherever each rank
    happens to be: a rank inside an all-reduce meets the other's barrier and the job hangs (seen
    on the test cluster). Here the handler only raises a flag; the ranks agree on it at the next
    step boundary, and stop together (``save_on_exception`` writes last.ckpt on the way out).
    """
    import signal

    from lightning.pytorch.callbacks import Callback

    class StopOnSlurmSignal(Callback):
        def __init__(self) -> None:
            self.signalled = False
            self._step = -1

        def setup(self, trainer, pl_module, stage: str) -> None:
            if stage == "fit":
                for signum in (signal.SIGUSR1, signal.SIGUSR2):
                    signal.signal(signum, self._flag)

        def _flag(self, signum, frame) -> None:
            self.signalled = True

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._step = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == self._step:
                return  # mid-accumulation: not a step boundary
            if trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
                raise Preempted(f"SLURM signalled the job: stopped after step {trainer.global_step}.")

    return StopOnSlurmSignal()


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this job (rank 0 only): SLURM restarts it and ``train`` resumes."""
    import subprocess

    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job or not _is_rank_zero():
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.warning("Requeued SLURM job %s: it continues from the run folder's last checkpoint.", job)
    else:
        log.error(
            "scontrol requeue %s failed (%s): resubmit with run_dir=SAME resume=true.", job, result.stderr.strip()
        )


def make_trainer(cfg: DictConfig, run_dir: Path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    t = cfg.trainer
    precision = t.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    checkpoint = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        save_last=True,
        save_top_k=0,
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_on_train_epoch_end=True,
        save_on_exception=True,  # nothing lost on a crash or Ctrl-C: resume=true continues from it
    )
    callbacks = [checkpoint]
    if cfg.debug.crash_at_step:
        callbacks.append(_crash_callback(cfg.debug.crash_at_step))
    plugins = []
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        # our step-boundary handling replaces Lightning's in-handler checkpoint and requeue
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(_preemption_callback())
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(cfg),
        precision=precision,
        max_steps=t.max_steps,
        accumulate_grad_batches=accumulation(cfg),
        gradient_clip_val=t.gradient_clip_val,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None if t.val_check_interval else 1,
        limit_val_batches=t.limit_val_batches if t.val_check_interval else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        logger=make_logger(cfg, run_dir),
        callbacks=callbacks,
        plugins=plugins,
        enable_progress_bar=t.enable_progress_bar,
        default_root_dir=str(run_dir),
        deterministic=t.deterministic,
        use_distributed_sampler=False,  # the DataModule shards the data itself (resumable)
    )


def format_labels(batch: dict, tokenizer, limit: int = 2) -> str:
    """The first samples of a batch, one token per item, learned tokens in [brackets]."""
    lines = []
    for row in range(min(limit, batch["input_ids"].shape[0])):
        ids = batch["input_ids"][row].tolist()
        labels = batch["labels"][row].tolist()
        mask = batch["attention_mask"][row].tolist()
        pieces = []
        for tok, lab, m in zip(ids, labels, mask, strict=True):
            if not m:
                continue
            text = tokenizer.convert_ids_to_tokens(tok)
            pieces.append(f"[{text}]" if lab != IGNORE_INDEX else text)
        learned = sum(1 for x in labels if x != IGNORE_INDEX)
        lines.append(f"sample {row}: {learned} learned tokens of {sum(mask)}\n  " + " ".join(pieces))
    return "\n".join(lines)


def _sum_across_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Bad-sample counts of every rank added up (each rank saw its own shard of the data)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return counts
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, counts)
    total: dict[str, int] = {}
    for part in gathered:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def _ranks_in_sync(state: dict[str, torch.Tensor]) -> bool:
    """True if every rank holds the same trainable weights (``full_trainable_state``; always true on
    one process).

    Raises:
        RuntimeError: if the ranks diverged (data-parallel training has a bug).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return True
    checksum = sum(float(t.double().sum()) + float(t.double().abs().sum()) for t in state.values())
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, checksum)
    if max(gathered) - min(gathered) > 1e-6 * max(1.0, abs(gathered[0])):
        raise RuntimeError(f"The ranks' trainable weights differ after training: checksums {gathered}.")
    return True


def _validate_now(trainer, module, datamodule, limit) -> dict[str, float]:
    trainer.limit_val_batches = limit if limit is not None else 1.0
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return dict(module.val_metrics)


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """``checkpoints/last.ckpt`` with ``resume=true``, or when SLURM restarted a requeued job
    (``SLURM_RESTART_COUNT`` > 0, after a preemption signal: see ``Preempted``); else None."""
    restarted = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    last = run_dir / "checkpoints" / "last.ckpt"
    if not (cfg.resume or restarted) or not last.is_file():
        return None
    log.info("Resuming from %s%s", last, " (SLURM restarted the job)" if restarted and not cfg.resume else "")
    return str(last)


# ---------------------------------------------------------------------------- train
def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune as the config says and return the final metrics (also written to metrics.json).

    Raises:
        ConfigError: before any weight loads, listing every problem in the config.
    """
    import lightning as L

    check_versions()
    validate(cfg)
    storage = quant_storage_for(cfg)
    if storage != cfg.peft.quant_storage:
        log.info("strategy=%s shards the 4-bit base: peft.quant_storage=%s", cfg.strategy.name, storage)
        cfg.peft.quant_storage = storage
    if cfg.export.push_to_hub and not cfg.debug.show_labels:
        from idefics2_ft.hub import check_write_access

        check_write_access(cfg.export.hub.repo_id)  # a missing token fails now, not after training
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if _is_rank_zero():
        OmegaConf.save(OmegaConf.create(redacted(cfg)), run_dir / "config.yaml")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.perf_counter()

    model_path = resolve_model_path(cfg, use_record=cfg.resume)
    base_s = time.perf_counter() - started  # the tiny base's stage 1 when it was built just now
    if _is_rank_zero():
        record_base(cfg, model_path)
    processor = load_processor(model_path, cfg.data, cfg.model.revision)
    crops = 5 if cfg.data.do_image_splitting else 1
    log.info(
        "Images: longest edge %d px, splitting %s -> %d image tokens per image (%d crop(s) of %d).",
        cfg.data.longest_edge,
        "on" if crops > 1 else "off",
        crops * processor.image_seq_len,
        crops,
        processor.image_seq_len,
    )
    accumulate = accumulation(cfg)
    datamodule = Idefics2DataModule(
        cfg.data,
        processor,
        seed=cfg.seed,
        max_steps=cfg.trainer.max_steps,
        accumulate=accumulate,
    )
    datamodule.setup("fit")
    # Fail early: read and collate a first batch before any weight loads.
    first = datamodule.train_collator()(
        [datamodule.train_set[i] for i in range(min(cfg.data.batch_size, len(datamodule.train_set)))]
    )
    if "input_ids" not in first:
        raise ValueError(
            f"The first {cfg.data.batch_size} training records are all bad ({first['bad_samples'][:2]}...): "
            "check data.* paths and column names."
        )
    if cfg.debug.show_labels:
        text = format_labels(first, processor.tokenizer)
        log.info("Learned tokens are in [brackets]:\n%s", text)
        return {"debug/show_labels": text}

    model = load_idefics2(model_path, cfg.model, cfg.peft)
    model = apply_peft(model, cfg.peft, cfg.model.gradient_checkpointing)
    model.train()  # from_pretrained returns eval mode; Lightning keeps each submodule's mode
    counts = trainable_parameters(model)
    log.info("Trainable parameters: %s", ", ".join(f"{k} {v:,}" for k, v in counts.items()))

    module = Idefics2Module(
        model,
        processor.tokenizer,
        make_optimizer_factory(cfg),
        warmup_cosine(
            cfg.optim.warmup_steps, cfg.trainer.max_steps, cfg.optim.min_lr_ratio, cfg.optim.scheduler == "cosine"
        ),
        metric=cfg.data.metric,
        max_new_tokens=cfg.eval.max_new_tokens,
        shard=make_shard_fn(cfg),
    )
    trainer = make_trainer(cfg, run_dir)
    effective_batch = cfg.data.batch_size * trainer.world_size * accumulate
    log.info(
        "Effective batch: %d per device x %d device(s) x %d node(s) x %d accumulation = %d",
        cfg.data.batch_size,
        trainer.num_devices,
        trainer.num_nodes,
        accumulate,
        effective_batch,
    )
    metrics: dict[str, Any] = {f"params/trainable/{k}": v for k, v in counts.items()}
    stage1 = Path(model_path) / "stage1.json"
    if stage1.is_file():
        metrics.update(json.loads(stage1.read_text()))
    resume_from = resume_checkpoint(cfg, run_dir)
    if cfg.eval.before_training and resume_from is None:
        before = _validate_now(trainer, module, datamodule, cfg.trainer.limit_val_batches)
        metrics.update({k.replace("val/", "before/val/", 1): v for k, v in before.items()})
        trainer.limit_val_batches = cfg.trainer.limit_val_batches if cfg.trainer.val_check_interval else 0
    fit_start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    except Preempted:
        requeue_slurm_job()
        raise
    metrics["train/wall_s"] = time.perf_counter() - fit_start
    metrics["train/steps"] = trainer.global_step
    metrics["train/world_size"] = trainer.world_size
    metrics["train/effective_batch"] = effective_batch
    metrics["train/accumulate_grad_batches"] = accumulate
    trained = full_trainable_state(module.model)  # every rank: under FSDP this gathers the shards
    metrics["train/ranks_in_sync"] = _ranks_in_sync(trained)
    if cfg.eval.at_end:
        metrics.update(_validate_now(trainer, module, datamodule, cfg.trainer.limit_val_batches))
    skipped = _sum_across_ranks(dict(module.skipped))
    metrics["data/skipped"] = sum(skipped.values())
    metrics.update({f"data/skipped/{k}": v for k, v in sorted(skipped.items())})
    if skipped:
        log.warning("Skipped %d bad records: %s", metrics["data/skipped"], skipped)
    metrics["wall_s"] = time.perf_counter() - started
    metrics["base/wall_s"] = base_s
    metrics["hardware"] = (
        f"{trainer.world_size} x {torch.cuda.get_device_name(0)}"
        if torch.cuda.is_available() and trainer.on_gpu
        else f"CPU, {torch.get_num_threads()} threads"
    )
    if trainer.is_global_zero:
        out = run_dir / ("model" if cfg.peft.method == "full" else "adapter")
        module.model.save_pretrained(out, state_dict=trained)  # one ordinary adapter, whatever the strategy
        processor.save_pretrained(out)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        if getattr(module, "val_predictions", None):
            with open(run_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
                for row in module.val_predictions:
                    f.write(json.dumps(row) + "\n")
        if cfg.export.at_end or cfg.export.push_to_hub:
            from idefics2_ft.export import export_run

            folder, report = export_run(cfg, metrics)
            metrics.update({k: v for k, v in report.items() if isinstance(v, (int, float))})
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
            log.info("Export: %s", folder)
        log.info("Run folder: %s", run_dir)
    return metrics
