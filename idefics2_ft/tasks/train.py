"""``train(cfg) -> metrics``: validate, build the data, build the model, fit, evaluate, save.

Orchestration only: each step is a call into the room that owns it (``config``, ``data``,
``models``, ``training``, ``planning``, ``reporting``, ``hub``, ``run_folder``). The root
``train.py`` and ``idefics2-ft train`` wrap it in ``@hydra.main``.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import AutoConfig

from idefics2_ft.config import ConfigError, accumulation, validate
from idefics2_ft.data import Idefics2DataModule, check_sources, format_labels
from idefics2_ft.data.sources import data_fingerprint
from idefics2_ft.hardware import GB, available_gb
from idefics2_ft.models import (
    apply_peft,
    base_config,
    frozen_fingerprint,
    load_idefics2,
    load_processor,
    non_finite_parameters,
    resolve_base,
    start_from_adapter,
    trainable_parameters,
)
from idefics2_ft.models.bases import base_record
from idefics2_ft.planning import Phases, Plan, format_parts, plan_run, setup_from_cfg, workload_from_batch
from idefics2_ft.planning.batch import largest_batch
from idefics2_ft.ranks import is_rank_zero
from idefics2_ft.reporting import TrackerRecord
from idefics2_ft.run_folder import (
    FolderLock,
    RunFolder,
    atomic_write_text,
    hydra_arg,
    log_to_file,
    read_base_record,
    resume_checkpoint,
    save_config,
    slurm_restarted,
    starting_adapter,
    weights_output,
    write_base_record,
    write_results,
)
from idefics2_ft.stops import StopPolicy, active
from idefics2_ft.tasks.claim import check_resume, claim_run_dir, in_use, previous_config, record_resume
from idefics2_ft.training import (
    Diverged,
    Idefics2Module,
    OnFirstStep,
    Preempted,
    checkpoint_step,
    describe_run,
    log_adapter_artifact,
    make_optimizer_factory,
    make_schedule,
    make_trainer,
    offline_sync_hint,
    requeue_slurm_job,
)
from idefics2_ft.training.preference_module import PreferenceModule, objective_problems, reference_of
from idefics2_ft.training.strategies import (
    check_ranks_in_sync,
    full_trainable_state,
    make_shard_fn,
    quant_storage_for,
)
from idefics2_ft.versions import check_versions

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune as the config says and return the final metrics (also written to metrics.json).

    Args:
        cfg: a config composed from ``idefics2_ft/conf`` (``train.yaml``, a recipe, overrides).

    Returns:
        The final metrics, flat: ``val/*``, ``train/*``, ``params/trainable/*``, ``memory/*``, ...

    Raises:
        ConfigError: before any weight loads, listing every problem in the config.
        DataError: a source cannot be read, or (``data.on_bad_sample=raise``) a record is bad, naming
            the file and line; before any weight loads.
        HubError: ``export.push_to_hub`` without a token or write access, or no network and a cache
            that lacks the model or the data; before any weight loads.
        Preempted: SLURM signalled the job; ``last.ckpt`` is written and the job requeued.
        Diverged: a non-finite loss or gradient norm; nothing is saved after the last good checkpoint.
    """
    # the signal policy first: a stop in any phase below exits 143/130 with one line (stops.py)
    policy = active()
    owned = policy is None
    if owned:
        policy = StopPolicy("train").install()
    policy.rehearse(cfg.debug.stop_at)
    cfg.data.pairs = cfg.objective.name == "dpo"  # what the data room reads: pairs, or one answer a row
    try:
        # 1. validate: everything that can be checked before a weight loads
        with policy.phase_of("checks"):
            check_versions()
            resolve_batch_size(cfg)
            validate_all(cfg)
            if cfg.model.adapter:
                starting_adapter(cfg.model.adapter)  # an unfinished run or no adapter: refused here
        lock = FolderLock(cfg.run_dir)
        if is_rank_zero():  # the other ranks of this run are the same owner
            try:
                holder = lock.acquire()
            except OSError as err:  # EROFS, EACCES: a snapshot, a colleague's run
                raise ConfigError(
                    [
                        f"run_dir={cfg.run_dir} cannot be written ({err.strerror}): a read-only run folder can be "
                        "evaluated (idefics2-ft evaluate ... out_dir=ELSEWHERE) but not trained in; copy it to a "
                        "folder you can write to continue it."
                    ]
                ) from None
            if holder is not None:
                raise ConfigError([in_use(cfg.run_dir, holder)])
        try:
            return _checked_and_run(cfg, policy)
        finally:
            lock.release()
    finally:
        if owned:
            policy.uninstall()


def _checked_and_run(cfg: DictConfig, policy: StopPolicy) -> dict[str, Any]:
    with policy.phase_of("checks"):
        storage = quant_storage_for(cfg)
        if storage != cfg.peft.quant_storage:
            log.info("strategy=%s shards the 4-bit base: peft.quant_storage=%s", cfg.strategy.name, storage)
            cfg.peft.quant_storage = storage
        if cfg.export.push_to_hub and not cfg.debug.show_labels:
            from idefics2_ft.hub import check_write_access, push_targets

            for repo_id in push_targets(cfg.export):
                check_write_access(repo_id)  # a missing token fails now, not after training
        # without a network, the cache must hold the model and the data: say so in seconds, with the fix
        from idefics2_ft.hub import preflight

        log.info("Hub: %s", preflight(cfg, prefetch_command(cfg)))
        # every record of both splits read and checked (before the demo's stage 1 trains for minutes)
        check_sources(cfg.data)
        claim_run_dir(cfg)  # a folder holding another run: refused unless resume=true or overwrite=true
        run_dir = Path(cfg.run_dir)
        if cfg.export.at_end or cfg.export.push_to_hub:
            from idefics2_ft.tasks.export import export_targets

            export_targets(cfg)  # an export.out_dir that may not be written is refused now, not after training
        fingerprint = data_fingerprint(cfg.data)
        last = RunFolder(run_dir).last_checkpoint
        resuming = (cfg.resume or slurm_restarted()) and last.is_file()
        # a resume that would mix two experiments, or that cannot continue its checkpoint, is refused
        # here, before anything is written
        changed = check_resume(cfg, run_dir, fingerprint) if resuming else None
        step = _check_checkpoint(cfg, last) if resuming else None
    if not run_dir.is_dir():
        run_dir.mkdir(parents=True)
    if is_rank_zero() and changed is None:
        save_config(cfg, run_dir)  # config.yaml: the first part's config, never rewritten by a resume
        atomic_write_text(RunFolder(run_dir).command, train_command(cfg) + "\n")
    # the command that continues from here: this command's own overrides (a resume's new ones included)
    if resuming:
        policy.completed(f"{last} still holds step {step}; this resume trained nothing", train_command(cfg))
    else:
        policy.completed("nothing trained yet", train_command(cfg, resume=last.is_file()))
    with log_to_file(run_dir) if is_rank_zero() else nullcontext():
        return _run(cfg, run_dir, fingerprint, policy, changed)


def _check_checkpoint(cfg: DictConfig, last: Path) -> int:
    """The step ``last`` holds, once it reads back whole (else it is named, with an intact older one)
    and the schedule goes on from it.

    Raises:
        ConfigError: ``trainer.max_steps`` is below the checkpoint's step.
    """
    step = checkpoint_step(last)
    if cfg.trainer.max_steps >= 0 and cfg.trainer.max_steps < step:
        raise ConfigError(
            [
                f"resume=true with trainer.max_steps={cfg.trainer.max_steps}, below the step {last} holds ({step}): "
                f"it cannot go back. Set trainer.max_steps={step} or more (the same to only finish the run), or "
                "start a new run_dir."
            ]
        )
    return step


# The phases of a training as phases.json names them, and as a stop's line names them
PHASES = {
    "base": "the base build",
    "data": "data loading",
    "load": "model loading",
    "validate_before": "the validation before training",
    "fit": "fit",
    "validate": "the final validation",
    "save": "the adapter save",
    "report": "the report",
    "export": "the export",
}
# ``with phase(name) as record``: one of PHASES, timed and measured, and named by a stop's line
Phase = Callable[[str], AbstractContextManager[dict]]


def _run(cfg: DictConfig, run_dir: Path, fingerprint: dict, policy: StopPolicy, changed: dict | None) -> dict[str, Any]:
    started = time.perf_counter()
    # wall time and peak memory of each phase; a resume writes phases.json (and plan.json) once it trains
    profile = Phases(RunFolder(run_dir).phases if is_rank_zero() and changed is None else None)
    phase = _phase_in(profile, policy)

    # 2. the base and the data: a first batch collated before any weight loads
    with phase("base"):  # a stand-in base built just now (the demo's stage 1); else nothing
        model_path = base_path(cfg)
    base_s = time.perf_counter() - started
    record = _seed_and_record(cfg, run_dir, model_path, fingerprint, changed)
    processor, datamodule, first = _data(cfg, model_path, phase)
    if cfg.debug.show_labels:
        return _show_labels(first, processor)
    # the plan: memory and time per step from the real shapes and this first batch (plan.json)
    plan = _plan(cfg, model_path, first, run_dir, write=changed is None)

    # 3. the model: load (4-bit for QLoRA), attach adapters, wrap in the LightningModule
    model, counts = _load(cfg, model_path, phase)
    module = _module(cfg, model, processor, datamodule)
    trainer = _trainer(cfg, run_dir, plan, changed, record, profile)
    metrics = _model_metrics(counts, model_path)
    if isinstance(module, PreferenceModule):  # objective.reference as resolved: the report and the card name it
        metrics["objective/reference"] = module.reference

    # 4. fit, with a validation pass before (fresh runs) and after
    resume_from = resume_checkpoint(cfg, run_dir)
    if cfg.eval.before_training and resume_from is None:
        metrics.update(_validate_before(cfg, trainer, module, datamodule, phase))
    trained = _fit(cfg, run_dir, trainer, module, datamodule, resume_from, plan, profile, phase, policy, metrics)
    _validate_at_end(cfg, trainer, module, datamodule, metrics, phase)
    metrics.update(_data_metrics(cfg, trainer, module, datamodule))
    metrics["wall_s"] = time.perf_counter() - started
    metrics["base/wall_s"] = base_s

    # 5. save: one ordinary adapter whatever the strategy, the metrics, the predictions; export
    if trainer.is_global_zero:
        _save(cfg, run_dir, module, processor, trained, metrics, phase, policy)
        with phase("report"):
            _report(cfg, run_dir, metrics, module, datamodule)
        _publish(cfg, run_dir, trainer, metrics, phase)
        log.info("Phases: %s (phases.json)", profile.line())
        log.info("Run folder: %s", run_dir)
    return metrics


def _phase_in(profile: Phases, policy: StopPolicy) -> Phase:
    """``with phase(name) as record``: the phase's wall time and peak memory go to ``profile``
    (phases.json), and a stop during it is named by ``PHASES[name]``."""

    @contextmanager
    def phase(name: str) -> Iterator[dict]:
        with profile(name) as record, policy.phase_of(PHASES[name], name):
            yield record

    return phase


def _seed_and_record(cfg: DictConfig, run_dir: Path, model_path: str, fingerprint: dict, changed: dict | None) -> dict:
    """Seed, then the record of the base and the data (written now, unless a resume: it writes it
    once it trains a step)."""
    # Seeded after the base: the run then starts from the same random state whether a stand-in base
    # was just built in this process or read from its cache (same seed, same adapter).
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    record = {**base_record(cfg, model_path), "data": fingerprint}
    if is_rank_zero() and changed is None:  # a resume records its base and data once it trains a step
        write_base_record(run_dir, record)
    return record


def validate_all(cfg: DictConfig) -> None:
    """``validate`` and the objective's checks, every problem listed at once.

    Raises:
        ConfigError: with each problem and its fix.
    """
    problems: list[str] = []
    try:
        validate(cfg)
    except ConfigError as err:
        problems = list(err.problems)
    problems += objective_problems(cfg)
    if problems:
        raise ConfigError(problems)


def _data(cfg: DictConfig, model_path: str, phase: Phase) -> tuple[Any, Idefics2DataModule, dict]:
    """The processor, the data set up for the fit and its first batch, collated before any weight loads."""
    with phase("data"):
        processor = load_processor(model_path, cfg.data, cfg.model.revision)
        datamodule = Idefics2DataModule(
            cfg.data, processor, seed=cfg.seed, max_steps=cfg.trainer.max_steps, accumulate=accumulation(cfg)
        )
        datamodule.setup("fit")
        first = datamodule.first_batch()  # raises DataError if every record of it is bad
    return processor, datamodule, first


def _show_labels(first: dict, processor) -> dict[str, str]:
    """``debug.show_labels=true``: the first batch with its learned tokens in brackets, and nothing trained."""
    text = format_labels(first, processor.tokenizer)
    log.info("Learned tokens are in [brackets]:\n%s", text)
    return {"debug/show_labels": text}


def _load(cfg: DictConfig, model_path: str, phase: Phase) -> tuple[torch.nn.Module, dict[str, int]]:
    """The model with its adapters, in train mode, and its trainable parameters (logged)."""
    with phase("load"):  # read the shards, quantize to NF4, attach the adapters
        model = load_idefics2(model_path, cfg.model, cfg.peft)
        if cfg.model.adapter:  # go on from a trained adapter; with objective=dpo, also the reference
            adapter = starting_adapter(cfg.model.adapter)
            check_adapter_base(adapter, model_path)
            reference = cfg.objective.name == "dpo" and reference_of(cfg.objective, cfg.model.adapter) == "adapter"
            model = start_from_adapter(
                model, str(adapter), cfg.model.gradient_checkpointing, cfg.model.checkpoint_connector, reference
            )
        else:
            model = apply_peft(model, cfg.peft, cfg.model.gradient_checkpointing, cfg.model.checkpoint_connector)
    model.train()  # from_pretrained returns eval mode; Lightning keeps each submodule's mode
    counts = trainable_parameters(model)
    log.info("Trainable parameters: %s", ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return model, counts


def check_adapter_base(adapter: Path, model_path: str) -> None:
    """An adapter trained on another base does not fit this one: refused, naming both.

    Raises:
        ConfigError: the adapter's ``base_model_name_or_path`` is not this run's base.
    """
    recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if recorded and str(recorded) != str(model_path):
        raise ConfigError(
            [
                f"model.adapter={adapter} was trained on {recorded}, and this run loads {model_path}: an adapter "
                f"fits the base it was trained on. Set model.name_or_path to that base, or train an adapter on this one."
            ]
        )


def _module(cfg: DictConfig, model: torch.nn.Module, processor, datamodule: Idefics2DataModule) -> Idefics2Module:
    if cfg.objective.name == "dpo":
        o = cfg.objective
        return PreferenceModule.from_objective(
            model,
            processor.tokenizer,
            o,
            reference_of(o, cfg.model.adapter),
            make_optimizer_factory(cfg),
            make_schedule(cfg),
            shard=make_shard_fn(cfg),
        )
    return Idefics2Module(
        model,
        processor.tokenizer,
        make_optimizer_factory(cfg),
        make_schedule(cfg),
        metric=cfg.data.metric,
        max_new_tokens=cfg.eval.max_new_tokens,
        shard=make_shard_fn(cfg),
        source_metrics={s.name: s.cfg.metric for s in datamodule.sources if s.name},
    )


def _trainer(
    cfg: DictConfig, run_dir: Path, plan: Plan | None, changed: dict | None, record: dict, profile: Phases
) -> L.Trainer:
    """The Trainer, with the trackers' record and (a resume) its history written once it trains a step."""
    flops = plan.flops_per_token if plan is not None else None
    callbacks: list = [TrackerRecord(cfg, run_dir)]
    if changed is not None:  # the resume's history: written once it has trained its first step
        callbacks.append(OnFirstStep(lambda: _record_resume(cfg, run_dir, changed, record, profile, plan)))
    return make_trainer(cfg, run_dir, flops, callbacks=callbacks)


def _model_metrics(counts: dict[str, int], model_path: str) -> dict[str, Any]:
    """The trainable parameters and what building a stand-in base measured (the demo's stage 1)."""
    metrics: dict[str, Any] = {f"params/trainable/{k}": v for k, v in counts.items()}
    built = Path(model_path) / "stage1.json"
    if built.is_file():
        metrics.update(json.loads(built.read_text()))
    return metrics


def _validate_before(cfg: DictConfig, trainer: L.Trainer, module: Idefics2Module, datamodule, phase: Phase) -> dict:
    """A fresh run's validation before training, as ``before/val/*``; the fit then validates every
    ``trainer.val_check_interval`` (or never)."""
    with phase("validate_before"):
        before = _validate(trainer, module, datamodule, cfg.trainer.limit_val_batches)
    metrics = {k.replace("val/", "before/val/", 1): v for k, v in before.items()}
    trainer.limit_val_batches = cfg.trainer.limit_val_batches if cfg.trainer.val_check_interval else 0
    return metrics


def _fit(
    cfg: DictConfig,
    run_dir: Path,
    trainer: L.Trainer,
    module: Idefics2Module,
    datamodule,
    resume_from: str | None,
    plan: Plan | None,
    profile: Phases,
    phase: Phase,
    policy: StopPolicy,
    metrics: dict,
) -> dict:
    """Fit; add what it measured to ``metrics`` and return the trainable weights, gathered from every
    rank, checked finite and the same on every rank.

    Raises:
        Preempted: the SLURM job is requeued first.
        OutOfMemory: with the plan's figure and the batch to use.
        Diverged: the trained weights are not finite.
    """
    frozen_before = frozen_fingerprint(module.model)
    try:
        with phase("fit") as fit, policy.deferred():  # a signal stops at the next step boundary, saved
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
            fit["steps"] = trainer.global_step - module.first_step
    except Preempted:
        requeue_slurm_job()
        raise
    except torch.cuda.OutOfMemoryError as err:  # one line with the figures and the batch to use; no retry
        raise OutOfMemory(out_of_memory_message(cfg, plan, trainer.global_step)) from err
    last = RunFolder(run_dir).last_checkpoint
    policy.completed(f"{last} holds the last step ({trainer.global_step}); no adapter was saved")
    fit["s_per_step"] = round(fit["wall_s"] / max(fit["steps"], 1), 3)
    metrics["train/wall_s"] = fit["wall_s"]
    metrics["train/frozen_base_unchanged"] = int(_unchanged(frozen_before, frozen_fingerprint(module.model)))
    metrics.update(_measured_against_plan(plan, profile, run_dir))
    metrics.update(describe_run(cfg, trainer))
    trained = full_trainable_state(module.model)  # every rank: under FSDP this gathers the shards
    if non_finite_parameters(trained):  # the divergence guard stops before this; never save such weights
        raise Diverged(f"Trainable weights are not finite after training ({non_finite_parameters(trained)[:3]}).")
    metrics["train/ranks_in_sync"] = check_ranks_in_sync(trained)
    return trained


def _validate_at_end(
    cfg: DictConfig, trainer: L.Trainer, module: Idefics2Module, datamodule, metrics: dict, phase: Phase
) -> None:
    """The final validation (``eval.at_end``) into ``metrics``; a run that never validated says so
    there (``validation``) and in the log."""
    if cfg.eval.at_end:
        with phase("validate"):
            metrics.update(_validate(trainer, module, datamodule, cfg.trainer.limit_val_batches))
        if metrics.get("val/n_questions"):  # what the validation score depends on beside the weights
            from idefics2_ft.presets import score_card

            card = score_card(cfg, None, cfg.data.val_split, module.model, metrics["val/n_questions"])
            metrics.update({f"val/{k}": v for k, v in card.items()})
    scored = ("val/n_questions", "val/pairs")  # questions answered, or held-out pairs (objective=dpo)
    if not any(m.get(key) for m in (metrics, module.val_metrics) for key in scored):
        reason = (
            "eval.at_end=false"
            if not cfg.eval.at_end
            else "no usable validation record (data.val_* or its bad records)"
        )
        metrics["validation"] = f"never validated: {reason}"
        log.warning("This run was never validated: %s.", reason)


def _data_metrics(cfg: DictConfig, trainer: L.Trainer, module: Idefics2Module, datamodule) -> dict[str, Any]:
    """What the run read: validation on the training data, bad records, samples drawn per source (logged)."""
    metrics: dict[str, Any] = {}
    if datamodule.val_is_train:
        metrics["data/val_is_train"] = 1
    metrics.update(module.skipped_metrics())  # bad records of every rank, each counted once
    given = datamodule.samples_per_source(trainer.global_step * accumulation(cfg), trainer.world_size)
    if given:
        metrics.update({f"data/samples/{name}": n for name, n in given.items()})
        log.info("Samples drawn per source: %s.", ", ".join(f"{k} {v:,}" for k, v in given.items()))
    return metrics


def _publish(cfg: DictConfig, run_dir: Path, trainer: L.Trainer, metrics: dict, phase: Phase) -> None:
    """Rank 0, once saved: the W&B adapter artifact, the offline-sync hint, the export (``export.*``)."""
    if cfg.logger.type == "wandb" and cfg.logger.log_model:
        out = RunFolder(run_dir).weights(full=cfg.peft.method == "full")
        log.info("W&B: the adapter is the artifact %s", log_adapter_artifact(trainer, out, cfg.name))
    hint = offline_sync_hint(trainer)
    if hint:
        log.info(hint)
    if cfg.export.at_end or cfg.export.push_to_hub:
        from idefics2_ft.tasks.export import export_run

        with phase("export"):
            folder, report = export_run(cfg, metrics)
        metrics.update({k: v for k, v in report.items() if isinstance(v, (int, float))})
        write_results(run_dir, metrics)
        log.info("Export: %s", folder)


def _save(
    cfg, run_dir: Path, module, processor, trained: dict, metrics: dict, phase: Phase, policy: StopPolicy
) -> None:
    """The adapter (``model/`` for ``peft=full``) written whole or not at all, then the predictions
    and ``metrics.json``; the stop line says from here that the run is trained."""
    full = cfg.peft.method == "full"
    target = weights_output(run_dir, full)
    with phase("save"), target.writing() as folder:
        extra = {} if full else {"selected_adapters": ["default"]}  # not objective=dpo's frozen reference
        module.model.save_pretrained(folder, state_dict=trained, **extra)
        processor.save_pretrained(folder)
    write_results(run_dir, metrics, module.val_predictions)
    policy.completed(f"{target.path.name}/ and metrics.json are saved: the run is trained", train_command(cfg))


def _record_resume(cfg: DictConfig, run_dir: Path, changed: dict, record: dict, profile: Phases, plan) -> None:
    """A resume that trained its first step: its config and changes, the base and data it trains on,
    its plan and its phases so far."""
    record_resume(cfg, run_dir, changed)
    write_base_record(run_dir, record)
    profile.path = RunFolder(run_dir).phases
    profile.write(profile.path)
    if plan is not None:
        atomic_write_text(RunFolder(run_dir).plan, json.dumps(plan.to_json(), indent=2) + "\n")
    atomic_write_text(RunFolder(run_dir).command, train_command(cfg) + "\n")  # the newest part's command


class OutOfMemory(RuntimeError):
    """The device ran out of memory in training; the message gives the plan's figure and the batch to use."""


def out_of_memory_message(cfg: DictConfig, plan: Plan | None, step: int) -> str:
    batch = cfg.data.batch_size
    peak = torch.cuda.max_memory_allocated() / GB if torch.cuda.is_available() else float("nan")
    planned = f"the plan predicted {plan.total_gb:.1f} GB" if plan is not None else "there was no plan"
    return (
        f"Out of memory at step {step} with data.batch_size={batch}: {planned}, {peak:.1f} GB were allocated at "
        f"the peak. Use data.batch_size={max(1, batch // 2)} (trainer.global_batch_size keeps the effective "
        "batch), or model.checkpoint_connector=true / model.gradient_checkpointing=true; the run folder is kept."
    )


def resolve_batch_size(cfg: DictConfig) -> None:
    """``data.batch_size=auto``: the largest batch the plan fits in the device's memory (``plan.gpu_gb``,
    the CUDA device's, or what Linux says is available), recorded in ``config.yaml`` as the number.
    A resume keeps the batch the run was trained with."""
    if cfg.data.batch_size != "auto":
        return
    previous = previous_config(Path(cfg.run_dir)) if cfg.resume else None
    if previous is not None:
        cfg.data.batch_size = previous["data"]["batch_size"]
        log.info("data.batch_size=auto: %d, as the run was trained", cfg.data.batch_size)
        return
    device = "cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu"
    memory = cfg.plan.gpu_gb or available_gb(device)
    if memory is None:
        raise ConfigError(["data.batch_size=auto: this machine's memory is unknown; set plan.gpu_gb=GB."])
    try:
        config = base_config(cfg)
    except OSError as err:  # a Hub id whose config.json is neither reachable nor cached
        raise ConfigError([f"data.batch_size=auto needs the model's config.json: {err}"]) from None
    batch, plan = largest_batch(cfg, config, device, memory)
    cfg.data.batch_size = batch
    log.info(
        "data.batch_size=auto: %d per device, the largest whose plan fits (%.1f of %.1f GB; accumulation %d)",
        *(batch, plan.total_gb, memory, accumulation(cfg)),
    )


def _task_overrides(cfg: DictConfig) -> list[str]:
    """The command line's overrides (through Hydra), or the few that name the model and the data."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # called as a library, not through Hydra
        overrides = [f"model.name_or_path={cfg.model.name_or_path}", f"data.source={cfg.data.source}"]
        if cfg.data.path:
            overrides.append(f"data.path={cfg.data.path}")
        return overrides


def train_command(cfg: DictConfig, resume: bool = True) -> str:
    """``idefics2-ft train`` with this run's overrides, ``run_dir`` and ``resume=true``: what continues it
    (``resume=False``: what starts it again, before it holds a checkpoint)."""
    skip = ("run_dir=", "resume=", "overwrite=", "hydra.", "debug.stop_at=", "debug.crash_at_step=")
    kept = [shlex.quote(o) for o in _task_overrides(cfg) if not o.startswith(skip)]
    return " ".join(
        ["idefics2-ft train", *kept, hydra_arg("run_dir", cfg.run_dir), *(["resume=true"] if resume else [])]
    )


def prefetch_command(cfg: DictConfig) -> str:
    """``idefics2-ft prefetch`` with this run's overrides: it fetches what this run needs."""
    skip = ("run_dir=", "resume=", "overwrite=", "hydra.")
    return " ".join(["idefics2-ft prefetch", *(shlex.quote(o) for o in _task_overrides(cfg) if not o.startswith(skip))])


def base_path(cfg: DictConfig) -> str:
    """The base to train on: the run's recorded base when resuming; the base the adapter it starts from
    was trained on (``model.adapter``, a run folder that records it); else what ``model.name_or_path``
    resolves to (a stand-in is built and cached if needed)."""
    if cfg.resume:
        return resolve_base(cfg, read_base_record(cfg.run_dir))
    if cfg.model.adapter:
        adapter = starting_adapter(cfg.model.adapter)
        record = read_base_record(adapter.parent) if adapter.name == "adapter" else None
        if record is not None:
            return resolve_base(cfg, record)
    return resolve_base(cfg, None)


def _plan(cfg: DictConfig, model_path: str, first: dict, run_dir: Path, write: bool = True) -> Plan | None:
    """Plan this run (rank 0 writes plan.json, if ``write``) and log the verdict and the model by part."""
    try:
        config = AutoConfig.from_pretrained(model_path, revision=cfg.model.revision)
    except (OSError, ValueError) as err:  # a Hub id without network: from_pretrained will say more
        log.warning("No plan: the model's config could not be read (%s).", err)
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_run(config, workload_from_batch(first, config, cfg), setup_from_cfg(cfg, device), available_gb(device))
    log.info("Plan (first batch): %s; %s", plan.verdict, plan.fix or "details in plan.json")
    log.info("The model by part:\n%s", format_parts(plan))
    if is_rank_zero() and write:
        atomic_write_text(RunFolder(run_dir).plan, json.dumps(plan.to_json(), indent=2) + "\n")
    return plan


def _measured_against_plan(plan: Plan | None, phases: Phases, run_dir: Path) -> dict[str, float]:
    """The fit's measured peak beside the plan's (logged, and added to plan.json and the metrics)."""
    measured = phases.peak_gb("fit")
    if plan is None or measured is None:
        return {}
    planned = plan.allocated_gb
    log.info(
        "Memory: planned %.2f GB, measured %.2f GB (%+.0f%%; %s)",
        *(planned, measured, 100 * (planned - measured) / measured),
        "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "peak RSS above the process before loading",
    )
    if is_rank_zero():
        record = {**plan.to_json(), "measured_gb": measured}
        atomic_write_text(RunFolder(run_dir).plan, json.dumps(record, indent=2) + "\n")
    return {"memory/planned_gb": round(planned, 3), "memory/measured_gb": measured}


def _unchanged(before: dict, after: dict) -> bool:
    """Every frozen parameter fingerprinted before the fit is unchanged after it (an error names those that moved)."""
    moved = [name for name, value in before.items() if name in after and after[name] != value]
    if moved:
        log.error("Frozen weights changed during training (a bug, not a setting): %s", ", ".join(moved[:5]))
    return not moved


def _report(cfg: DictConfig, run_dir: Path, metrics: dict, module: Idefics2Module, datamodule) -> None:
    """Write report.html; a failure there is logged, never lost weights (they are saved before)."""
    from idefics2_ft.reporting import training_report

    try:
        path = training_report(cfg, run_dir, metrics, module.val_predictions, datamodule.val_set.rows)
    except Exception as err:  # the report is a view of what is saved; the run itself succeeded
        log.warning("report.html not written: %s: %s", type(err).__name__, err)
        return
    log.info("Report: %s", path)


def _validate(trainer: L.Trainer, module: Idefics2Module, datamodule, limit) -> dict[str, float]:
    trainer.limit_val_batches = limit if limit is not None else 1.0
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return dict(module.val_metrics)
