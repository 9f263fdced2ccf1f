"""Values a config implies but does not state: devices, accumulation, the strategy's variant, the optimizer."""

from __future__ import annotations

from omegaconf import DictConfig


def cuda_available() -> bool:
    import torch  # here: `train.py --help` and the config checks need no torch (1.5 s of import)

    return torch.cuda.is_available()


def strategy_variant(cfg: DictConfig) -> str:
    """The strategy as ``conf/strategy/`` names it: ``deepspeed_zero3_offload`` for DeepSpeed, else its name."""
    s = cfg.strategy
    if s.name != "deepspeed":
        return s.name
    return f"deepspeed_zero{s.zero_stage}" + ("_offload" if s.offload_optimizer or s.offload_params else "")


def num_devices(cfg: DictConfig) -> int:
    """Devices per node as the trainer will use them."""
    devices = cfg.trainer.devices
    if isinstance(devices, int) or str(devices).lstrip("-").isdigit():
        n = int(devices)
        if n > 0:
            return n
    elif not isinstance(devices, str):  # a list of device ids
        return len(devices)
    # "auto" or -1: every GPU, or one process on the CPU
    on_gpu = cuda_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    if not on_gpu:
        return 1
    import torch

    return torch.cuda.device_count()


def accumulation(cfg: DictConfig) -> int:
    """Micro-batches per optimizer step: ``trainer.accumulate_grad_batches``, or what keeps
    ``trainer.global_batch_size`` fixed across devices and nodes (``validate`` checks it divides)."""
    t = cfg.trainer
    if t.global_batch_size is None:
        return t.accumulate_grad_batches
    per_step = cfg.data.batch_size * num_devices(cfg) * t.num_nodes
    return max(1, t.global_batch_size // per_step)


def optimizer_name(cfg: DictConfig, on_gpu: bool | None = None) -> str:
    """The optimizer ``optim.optimizer`` resolves to for this strategy and machine (``on_gpu``:
    this machine has CUDA when None)."""
    name = cfg.optim.optimizer
    if name == "auto":
        # paged 8-bit AdamW on one GPU or DDP; FSDP and ZeRO shard a plain AdamW's state instead
        replicated = cfg.strategy.name in ("auto", "ddp")
        on_gpu = cuda_available() if on_gpu is None else on_gpu
        name = "paged_adamw_8bit" if on_gpu and replicated else "adamw"
    if cfg.strategy.name == "deepspeed" and cfg.strategy.offload_optimizer:
        name = "deepspeed_cpu_adam"  # the optimizer step runs where the offloaded state lives
    return name
