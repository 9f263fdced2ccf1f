"""``data.batch_size=auto``: the largest per-device batch the plan fits in the device's memory."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from idefics2_ft.config import num_devices
from idefics2_ft.planning.shapes import setup_from_cfg, workload_from_cfg
from idefics2_ft.planning.verdict import Plan, plan_run

CANDIDATES = (64, 32, 16, 8, 4, 2, 1)


def largest_batch(cfg: DictConfig, config, device: str, memory_gb: float) -> tuple[int, Plan]:
    """The largest batch of ``CANDIDATES`` whose plan fits in ``memory_gb`` (1 if none does), and its plan.

    With ``trainer.global_batch_size`` set, only the batches that divide it across the devices and
    nodes are tried: the accumulation then keeps the global batch.

    Args:
        cfg: the config (its data settings give the largest pages and texts the batch can hold).
        config: the model's ``Idefics2Config`` (``base_config``).
        device: ``cuda`` or ``cpu``.
        memory_gb: what one device offers.
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
    return 1, plan
