"""Strategies: ``auto``, DDP, FSDP2 (sharded QLoRA) and DeepSpeed ZeRO, built from ``strategy.*``.

Why and how: ``docs/scaling-out.md#why-fsdp-here-is-fsdp2``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from idefics2_ft.models import WRAP_CLASSES, resolve_dtype
from idefics2_ft.ranks import world_size

log = logging.getLogger(__name__)

# The model's methods that run a forward of their own (past the root unit's hook): FSDP2 gathers the
# root's weights around each. ``pair_passes``: training/pair_forward.attach_pair_passes.
FORWARD_METHODS = ("generate", "pair_passes")


def is_sharded(cfg: DictConfig) -> bool:
    """True when ranks hold shards of the weights (FSDP, or DeepSpeed ZeRO-3)."""
    s = cfg.strategy
    return s.name == "fsdp" or (s.name == "deepspeed" and s.zero_stage == 3)


def quant_storage_for(cfg: DictConfig) -> str | None:
    """The ``bnb_4bit_quant_storage`` dtype name: ``peft.quant_storage`` if set; under a sharded
    strategy the compute dtype (so 4-bit weights shard like every other weight); else uint8."""
    if cfg.peft.quant_storage:
        return cfg.peft.quant_storage
    if cfg.peft.quantize is None or not is_sharded(cfg):
        return None
    return str(resolve_dtype(cfg.model.dtype)).removeprefix("torch.")


# ---------------------------------------------------------------------------- FSDP2
def shard_idefics2(model: torch.nn.Module, mesh: Any, reshard_after_forward: bool = True) -> int:
    """``fully_shard`` every decoder, encoder and perceiver layer, then the whole model.

    The root unit owns what lies outside the layers (embeddings, norms, patch embedding, the
    connector's projection, the head). It is the outermost module, the PEFT wrapper when there is
    one: PEFT calls the inner model's ``forward`` directly, past any hook on it. ``generate`` and a
    preference run's ``pair_passes`` (which runs the tower and the connector directly) are registered as
    forward methods, so the root weights are gathered for the whole call.
    Idempotent (Lightning calls ``configure_model`` for every ``fit`` and ``validate``). Returns
    the number of units.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        return 0
    keep_cpu_4bit_layout(model)
    units = 0
    for module in model.modules():
        if type(module).__name__ in WRAP_CLASSES:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
            units += 1
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for method in FORWARD_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return units + 1


def keep_cpu_4bit_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    In eval mode on a CPU with AVX512-BF16, ``Linear4bit.forward`` rewrites ``weight.data`` into
    another layout and flags the (shared) quant state. Under FSDP that rewrite lands in the
    gathered copy, which is freed after the forward, while the flag stays: the next gather reads
    the original layout as the repacked one, and generation returns garbage. (No effect on CUDA.)

    Raises:
        RuntimeError: a 4-bit weight was already repacked (the model ran on the CPU before sharding).
    """
    for name, module in model.named_modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            raise RuntimeError(
                f"{name}: this 4-bit weight was repacked for CPU inference before sharding; shard the "
                "model before its first forward (FSDP is applied in configure_model)."
            )
        module.support_avx512bf16_for_cpu = False


def full_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights as ordinary full CPU tensors, keyed as in ``model.state_dict()``.

    Under FSDP each rank holds a shard (a DTensor): every rank must call this (it all-gathers).
    """
    from torch.distributed.tensor import DTensor

    state = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tensor = param.detach()
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        state[name] = tensor.to("cpu", copy=True)
    return state


def check_ranks_in_sync(state: dict[str, torch.Tensor]) -> bool:
    """True if every rank holds the same trainable weights (``full_trainable_state``; always true on
    one process).

    Raises:
        RuntimeError: if the ranks diverged (data-parallel training has a bug).
    """
    import torch.distributed as dist

    if world_size() == 1:
        return True
    checksum = sum(float(t.double().sum()) + float(t.double().abs().sum()) for t in state.values())
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, checksum)
    if max(gathered) - min(gathered) > 1e-6 * max(1.0, abs(gathered[0])):
        raise RuntimeError(f"The ranks' trainable weights differ after training: checksums {gathered}.")
    return True


def _fsdp2_strategy_class():
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2Strategy(ModelParallelStrategy):
        """``ModelParallelStrategy`` as pure FSDP2: every rank is a data-parallel rank, and
        checkpoints hold the gathered trainable weights in one file written by rank 0 (the frozen
        base is never gathered: it is reloaded from its source on resume)."""

        def __init__(self, process_group_backend: str | None = None) -> None:
            super().__init__(save_distributed_checkpoint=False, process_group_backend=process_group_backend)

        def setup_environment(self) -> None:
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
            super().setup_environment()

        def lightning_module_state_dict(self) -> dict[str, Any]:
            # Collective: all ranks gather, only rank 0 writes the file.
            return full_trainable_state(self.lightning_module)

    return FSDP2Strategy


# ---------------------------------------------------------------------------- DeepSpeed
def deepspeed_config(cfg: DictConfig) -> dict[str, Any]:
    """The DeepSpeed config dict for ``strategy=deepspeed_*`` (validated by DeepSpeed in the tests).

    Batch sizes are left to Lightning, which fills them from ``data.batch_size`` and
    ``trainer.accumulate_grad_batches``; clipping likewise comes from ``trainer.gradient_clip_val``.
    """
    s = cfg.strategy
    zero: dict[str, Any] = {
        "stage": s.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": s.bucket_size,
    }
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = s.bucket_size
        zero["stage3_param_persistence_threshold"] = 10 * 4096
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if s.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        # Our optimizer (AdamW) is not one of DeepSpeed's own; ZeRO shards its state all the same.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }


# ---------------------------------------------------------------------------- the factory
def make_strategy(cfg: DictConfig) -> str | Any:
    """The Lightning strategy for ``strategy.name``: ``auto``, DDP, FSDP2 or DeepSpeed."""
    s = cfg.strategy
    if s.name == "auto":
        return "auto"
    backend = s.process_group_backend or (
        "nccl" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "gloo"
    )
    if s.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=s.find_unused_parameters, process_group_backend=backend)
    if s.name == "fsdp":
        return _fsdp2_strategy_class()(process_group_backend=backend)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(config=deepspeed_config(cfg), process_group_backend=backend)


def make_shard_fn(cfg: DictConfig) -> Callable[[torch.nn.Module, Any], int] | None:
    """What ``Idefics2Module.configure_model`` applies to the model under ``strategy=fsdp``."""
    if cfg.strategy.name != "fsdp":
        return None
    reshard = cfg.strategy.reshard_after_forward

    def shard(model: torch.nn.Module, mesh: Any) -> int:
        units = shard_idefics2(model, mesh, reshard_after_forward=reshard)
        if units:
            log.info("FSDP2: %d units over %d ranks (%s + the model)", units, mesh.size(), ", ".join(WRAP_CLASSES))
        return units

    return shard
