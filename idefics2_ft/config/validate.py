"""One validation pass over a composed config: every problem is listed at once, each with its fix."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import get_args

from omegaconf import DictConfig, OmegaConf

from idefics2_ft.config.choices import DataFormat, DataSource, Metric, choices_of
from idefics2_ft.config.derived import cuda_available, num_devices, strategy_variant
from idefics2_ft.config.schema import TrainConfig


class ConfigError(ValueError):
    """A config that cannot work. ``problems`` lists each one with its fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:  # one line, as logs are read (grep, SLURM files)
            super().__init__(f"1 problem in the config: {problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the config:\n{lines}")


def choice_problems(cfg: DictConfig) -> list[str]:
    """Every key declared with ``choice`` in the schema whose value is not one of its choices."""
    problems = []
    for key, (allowed, optional) in choices_of(TrainConfig).items():
        value = OmegaConf.select(cfg, key)
        if value is None and optional:
            continue
        if value not in allowed and str(value) not in map(str, allowed):
            listed = ", ".join(map(str, allowed)) + (", or null" if optional else "")
            problems.append(f"{key}={value!r} is not one of {listed}.")
    return problems


def _strategy_problems(cfg: DictConfig, on_gpu: bool) -> list[str]:
    problems: list[str] = []
    s, p, o = cfg.strategy, cfg.peft, cfg.optim
    if s.name in ("fsdp", "deepspeed") and o.optimizer == "paged_adamw_8bit":
        problems.append(
            f"optim.optimizer=paged_adamw_8bit with strategy={s.name}: the strategy shards the optimizer "
            "state itself; use optim.optimizer=adamw (or auto)."
        )
    if s.name != "deepspeed":
        return problems
    variant = strategy_variant(cfg)
    if s.offload_params and s.zero_stage != 3:
        problems.append("strategy.offload_params=true needs ZeRO-3: use strategy=deepspeed_zero3_offload.")
    if s.zero_stage == 3 and p.quantize is not None:
        problems.append(
            f"strategy={variant} with peft.quantize={p.quantize}: ZeRO-3 partitions weights in flat fp16/bf16 "
            "buffers and cannot partition bitsandbytes 4-bit weights. For sharded QLoRA use strategy=fsdp; "
            "or keep 4-bit with strategy=deepspeed_zero2; or use ZeRO-3 with peft=lora (bf16 base)."
        )
    if importlib.util.find_spec("deepspeed") is None:
        problems.append(f"strategy={variant} needs DeepSpeed: pip install 'idefics2-ft[deepspeed]'.")
    if not on_gpu:
        problems.append(
            f"strategy={variant} needs CUDA GPUs (DeepSpeed does not train on the CPU): "
            "use strategy=ddp or strategy=fsdp here."
        )
    return problems


def slurm_problems(cfg: DictConfig, env: dict[str, str] | None = None) -> list[str]:
    """Mismatches between a SLURM allocation and the config, each with its fix (none outside SLURM)."""
    env = dict(os.environ if env is None else env)
    if "SLURM_JOB_ID" not in env:
        return []
    problems = []
    t = cfg.trainer
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        problems.append(
            f"SLURM job name {env['SLURM_JOB_NAME']!r} hides SLURM from Lightning (each task would start its own "
            "workers): submit with `sbatch --job-name=idefics2-ft` or `srun -J idefics2-ft`."
        )
    if not per_node:
        problems.append(
            "SLURM_NTASKS_PER_NODE is not set: launch with --ntasks-per-node=<GPUs per node> (Lightning refuses -n alone)."
        )
    elif per_node.isdigit() and str(t.devices).isdigit() and int(per_node) != int(t.devices):
        problems.append(
            f"--ntasks-per-node={per_node} but trainer.devices={t.devices}: the job would stall waiting for "
            f"ranks. Set trainer.devices={per_node} or #SBATCH --ntasks-per-node={t.devices}."
        )
    nnodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if nnodes and nnodes.isdigit() and int(nnodes) != t.num_nodes:
        problems.append(
            f"SLURM allocated {nnodes} node(s) but trainer.num_nodes={t.num_nodes}: set trainer.num_nodes={nnodes}."
        )
    return problems


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys the schema does not know (Hydra's ``+key=value`` adds them, and nothing would read them),
    each with the nearest valid key."""
    import difflib

    problems: list[str] = []

    def walk(node: DictConfig, schema: DictConfig, prefix: str) -> None:
        known = list(schema.keys())
        for key in node.keys():
            full = f"{prefix}{key}"
            if key not in known:
                near = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
                hint = (
                    f"did you mean {prefix}{near[0]}?"
                    if near
                    else f"the keys of {prefix.rstrip('.') or 'the root'} are {known}."
                )
                problems.append(f"{full} is not a config key, so nothing would read it: {hint}")
                continue
            child = schema._get_node(key)  # the node itself: reading a MISSING value would raise
            if isinstance(child, DictConfig) and isinstance(node._get_node(key), DictConfig):
                walk(node._get_node(key), child, f"{full}.")

    walk(cfg, OmegaConf.structured(TrainConfig), "")
    return [p for p in problems if not p.startswith("hydra")]


def mixture_entry_problems(entries: object) -> list[str]:
    """The keys of ``data.mixture`` entries (as given, before composition) that a mixture entry does not
    have, each with the nearest one: Hydra refuses them in a block whose ``+data.mixture`` hint fails
    the same way."""
    import dataclasses
    import difflib

    from idefics2_ft.config.schema import MixtureSource

    if not isinstance(entries, list):
        return []
    known = [f.name for f in dataclasses.fields(MixtureSource)]
    renamed = {"max_train_samples": "max_samples"}  # data.* keys an entry names otherwise
    problems = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        where = f"data.mixture[{i}]" + (f" ({entry['name']})" if "name" in entry else "")
        for key in entry:
            if key in known:
                continue
            near = [renamed[key]] if key in renamed else difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}?" if near else f"the keys of an entry are {', '.join(known)}."
            problems.append(f"{where}.{key} is not a key of a mixture entry: {hint}")
    return problems


def _peft_problems(cfg: DictConfig) -> list[str]:
    problems: list[str] = []
    p = cfg.peft
    if p.quantize is not None:
        if p.method == "full":
            problems.append(
                "peft.method=full with peft.quantize="
                f"{p.quantize}: 4-bit weights cannot be trained in full. Use peft=qlora, or peft=full "
                "with peft.quantize=null."
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(f"peft.quantize={p.quantize} needs bitsandbytes: pip install bitsandbytes.")
    if p.method != "full" and p.r <= 0:
        problems.append(f"peft.r={p.r}: the LoRA rank must be positive (e.g. peft.r=8).")
    if not 0.0 <= p.dropout < 1.0:
        problems.append(f"peft.dropout={p.dropout}: must be in [0, 1).")
    return problems


def _model_problems(cfg: DictConfig, on_gpu: bool) -> list[str]:
    problems: list[str] = []
    m = cfg.model
    if m.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            problems.append(
                "model.attn_implementation=flash_attention_2 but flash-attn is not installed: "
                "pip install 'idefics2-ft[flash-attn]', or use model.attn_implementation=sdpa."
            )
        elif not on_gpu:
            problems.append(
                "model.attn_implementation=flash_attention_2 needs a CUDA GPU, and none is used here: "
                "use model.attn_implementation=sdpa."
            )
    if m.name_or_path.startswith((".", "/")) and not Path(m.name_or_path).is_dir():
        problems.append(f"model.name_or_path={m.name_or_path!r}: no such folder.")
    return problems


def _data_problems(cfg: DictConfig) -> list[str]:
    """The data group's problems: what the data room checks (``data/checks.py``), and the mixture
    entries' values that must be one of a few (the schema's other choices are in ``choice_problems``)."""
    from idefics2_ft.data.checks import data_problems

    problems: list[str] = []
    for i, entry in enumerate(cfg.data.mixture or []):
        name = entry.name if not OmegaConf.is_missing(entry, "name") else "?"
        for key, allowed in (("source", DataSource), ("format", DataFormat), ("metric", Metric)):
            if entry[key] is not None and entry[key] not in get_args(allowed):
                problems.append(
                    f"data.mixture[{i}] ({name}).{key}={entry[key]!r} is not one of {', '.join(get_args(allowed))}."
                )
    return problems + data_problems(cfg.data)


def _optim_problems(cfg: DictConfig, on_gpu: bool) -> list[str]:
    problems: list[str] = []
    o = cfg.optim
    if o.optimizer == "paged_adamw_8bit" and not on_gpu:
        problems.append("optim.optimizer=paged_adamw_8bit needs a CUDA GPU: use optim.optimizer=adamw (or auto).")
    if o.lr <= 0:
        problems.append(f"optim.lr={o.lr}: must be positive.")
    if o.warmup_steps >= cfg.trainer.max_steps:
        problems.append(
            f"optim.warmup_steps={o.warmup_steps} >= trainer.max_steps={cfg.trainer.max_steps}: lower the warm-up."
        )
    return problems


def _trainer_problems(cfg: DictConfig) -> list[str]:
    problems: list[str] = []
    t, d = cfg.trainer, cfg.data
    if t.max_steps <= 0:
        problems.append(f"trainer.max_steps={t.max_steps}: must be positive.")
    if t.global_batch_size is not None and isinstance(d.batch_size, int):  # auto: chosen to divide it
        per_step = d.batch_size * num_devices(cfg) * t.num_nodes
        if t.global_batch_size <= 0 or t.global_batch_size % per_step:
            problems.append(
                f"trainer.global_batch_size={t.global_batch_size} is not a multiple of data.batch_size x devices x "
                f"nodes = {d.batch_size} x {num_devices(cfg)} x {t.num_nodes} = {per_step}: use a multiple of "
                f"{per_step}, or change data.batch_size."
            )
    return problems


def _logger_problems(cfg: DictConfig) -> list[str]:
    if cfg.logger.type != "wandb":
        return []
    if importlib.util.find_spec("wandb") is None:
        return ["logger.type=wandb needs wandb: pip install wandb, or use logger=csv."]
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return []
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return []
    return [
        "logger=wandb but no W&B credentials were found: run `wandb login`, set WANDB_API_KEY, "
        "set WANDB_MODE=offline, or use logger=csv."
    ]


def _export_problems(cfg: DictConfig) -> list[str]:
    problems: list[str] = []
    e = cfg.export
    if e.push_to_hub and not e.hub.repo_id:
        problems.append("export.push_to_hub=true needs export.hub.repo_id=USER/NAME.")
    if e.adapter_only and cfg.peft.method == "full":
        problems.append("export.adapter_only=true with peft.method=full: there is no adapter; drop adapter_only.")
    if e.agreement_questions < 0:
        problems.append(
            f"export.agreement_questions={e.agreement_questions}: the number of validation questions the merged model "
            "and the model as trained both answer must be 0 (no answer check) or more (e.g. "
            "export.agreement_questions=200)."
        )
    return problems


def _run_problems(cfg: DictConfig) -> list[str]:
    problems: list[str] = []
    if cfg.resume and not (Path(cfg.run_dir) / "checkpoints" / "last.ckpt").is_file():
        problems.append(
            f"resume=true but {cfg.run_dir}/checkpoints/last.ckpt does not exist: point run_dir at the "
            "folder of the run to continue, or drop resume=true."
        )
    if cfg.resume and cfg.overwrite:
        problems.append(
            "resume=true and overwrite=true: continue the run (resume) or replace it (overwrite), not both."
        )
    return problems


def validate(cfg: DictConfig) -> None:
    """Check everything that can be checked before any weight loads: unknown keys, every choice,
    then each group, then a SLURM allocation against the config.

    Args:
        cfg: the composed config.

    Raises:
        ConfigError: listing every problem found, each with what to do.
    """
    on_gpu = cuda_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    problems = [
        *unknown_keys(cfg),
        *choice_problems(cfg),
        *_peft_problems(cfg),
        *_model_problems(cfg, on_gpu),
        *_data_problems(cfg),
        *_optim_problems(cfg, on_gpu),
        *_trainer_problems(cfg),
        *_strategy_problems(cfg, on_gpu),
        *_logger_problems(cfg),
        *_export_problems(cfg),
        *_run_problems(cfg),
        *slurm_problems(cfg),
    ]
    if problems:
        raise ConfigError(problems)
