"""Optimizers and learning-rate schedules, built from ``optim.*``.

The LightningModule receives what these return (``params -> Optimizer`` and ``step -> multiplier``)
and never reads the config itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from idefics2_ft.config import optimizer_name


def make_optimizer_factory(cfg: DictConfig) -> Callable[[list], torch.optim.Optimizer]:
    """The optimizer ``optim.*`` asks for, as a factory the LightningModule calls with its parameters.

    Args:
        cfg: the whole config (the optimizer resolves by strategy and machine: ``optimizer_name``).

    Returns:
        ``params -> torch.optim.Optimizer`` (AdamW, paged 8-bit AdamW, or DeepSpeed's CPU Adam).
    """
    o = cfg.optim
    name = optimizer_name(cfg)

    def factory(params):
        kwargs = {"lr": o.lr, "betas": tuple(o.betas), "weight_decay": o.weight_decay}
        if name == "deepspeed_cpu_adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, **kwargs)
        if name == "paged_adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.PagedAdamW8bit(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    return factory


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0, cosine: bool = True) -> Callable:
    """The learning-rate multiplier of a step: linear warm-up to 1, then cosine decay to ``min_ratio``.

    Args:
        warmup_steps: steps of linear warm-up.
        total_steps: the last step (``trainer.max_steps``).
        min_ratio: the multiplier the decay ends at.
        cosine: False keeps the multiplier at 1 after the warm-up.

    Returns:
        ``step -> multiplier``.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_schedule(cfg: DictConfig) -> Callable[[int], float]:
    """The per-step multiplier ``optim.scheduler`` asks for, over ``trainer.max_steps``."""
    o = cfg.optim
    return warmup_cosine(o.warmup_steps, cfg.trainer.max_steps, o.min_lr_ratio, o.scheduler == "cosine")
