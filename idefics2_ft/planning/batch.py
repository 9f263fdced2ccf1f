"""``data.batch_size=auto``: the largest per-device batch the plan fits in the device's memory."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from idefics2_ft.config import ConfigError, num_devices
from idefics2_ft.planning.shapes import setup_from_cfg, workload_from_cfg
from idefics2_ft.planning.verdict import Plan, plan_run

CANDIDATES = (64, 32, 16, 8, 4, 2, 1)


def largest_batch(cfg: DictConfig, config, device: str, memory_gb: float) -> tuple[int, Plan]:
    """The largest batch of ``CANDIDATES`` whose plan fits in ``memory_gb``, and its plan.

    With ``trainer.global_batch_size`` set, only the batches that divide it across the devices and
    nodes are tried: the accumulation then keeps the global batch.

    Args:
        cfg: the config (its data settings give the largest pages and texts the batch can hold).
        config: the model's ``Idefics2Config`` (``base_config``).
        device: ``cuda`` or ``cpu``.
        memory_gb: what one device offers.

    Raises:
        ConfigError: not even a batch of 1 fits (naming what it needs, what the device offers and the
            plan's cheapest change), or no candidate divides ``trainer.global_batch_size``.
    """
    t = cfg.trainer
    ranks = num_devices(cfg) * t.num_nodes
    plan = None
    for batch in CANDIDATES:
        if t.global_batch_size is not None and t.global_batch_size % (batch * ranks):
            continue
        trial = OmegaConf.merge(cfg, {"data": {"batch_size": batch}})
        plan = plan_run(config, workload_from_cfg(trial, config), setup_from_cfg(trial, device), memory_gb)
        if plan.total_gb <= memory_gb:
            return batch, plan
    if plan is None:
        raise ConfigError(
            [
                f"data.batch_size=auto with trainer.global_batch_size={t.global_batch_size}: no per-device batch "
                f"divides it across {ranks} device(s); give a global batch that is a multiple of {ranks}."
            ]
        )
    raise ConfigError([batch_one_does_not_fit(plan, memory_gb)])


def batch_one_does_not_fit(plan: Plan, memory_gb: float) -> str:
    """What ``data.batch_size=auto`` says when not even a batch of 1 fits: the need, the memory, the fix."""
    if plan.fix and plan.fix != "no single change makes it fit":
        change = f"The cheapest change that fits, by the plan: {plan.fix}."
    else:
        change = "No single change makes it fit: `idefics2-ft plan` with this config lists what holds the memory."
    return (
        f"data.batch_size=auto: not even a batch of 1 fits: its plan needs {_gb(plan.total_gb)} GB and the device "
        f"offers {_gb(memory_gb)} GB (plan.gpu_gb, or what the device reports). {change}"
    )


def _gb(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"
