"""Per-GPU memory estimates for each strategy, from a model's real shapes on the meta device.

An estimate, not a measurement: weights, gradients, optimizer state and (under FSDP) the layers
gathered at one time. Activations, the CUDA context and allocator fragmentation come on top.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from idefics2_ft.models.loading import lora_target_regex

GB = 1e9
# NF4 with double quantization: 4 bits per weight, plus one 8-bit absmax per 64 weights and one
# fp32 absmax per 256 of those. The quant state is not a parameter: FSDP does not shard it.
NF4_PACKED = 0.5
NF4_STATE = 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class Inventory:
    """Parameter counts of a model, split as a QLoRA run treats them."""

    quantizable: int  # Linear weights outside the skip modules: NF4 under QLoRA
    frozen_other: int  # everything else frozen (vision tower, connector, embeddings, norms, head)
    lora: int  # adapter weights for the LoRA target preset
    largest_layer: int  # the biggest FSDP unit (a decoder layer)
    root: int  # what the root FSDP unit holds (embeddings, head, patch embedding, projection)


def inventory(model: torch.nn.Module, skip_modules: list[str], target: str, r: int, prefix: str = "") -> Inventory:
    """Count parameters by role on a (meta-device) Idefics2, for LoRA rank ``r`` on ``target``;
    with ``prefix``, only those of the modules under it (``model.vision_model.``)."""
    from idefics2_ft.distributed import WRAP_CLASSES

    pattern = re.compile(lora_target_regex(target))
    quantizable = frozen_other = lora = 0
    for name, module in model.named_modules():
        if not (name + ".").startswith(prefix):
            continue
        for pname, param in module.named_parameters(recurse=False):
            skipped = any(name == s or name.startswith(s + ".") for s in skip_modules)
            if isinstance(module, torch.nn.Linear) and pname == "weight" and not skipped:
                quantizable += param.numel()
            else:
                frozen_other += param.numel()
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name):
            lora += r * (module.in_features + module.out_features)
    layers = [m for m in model.modules() if type(m).__name__ in WRAP_CLASSES]
    in_layers = sum(p.numel() for m in layers for p in m.parameters())
    largest = max(sum(p.numel() for p in m.parameters()) for m in layers)
    root = sum(p.numel() for p in model.parameters()) - in_layers
    return Inventory(quantizable, frozen_other, lora, largest, root)


def per_gpu_gb(
    inv: Inventory, strategy: str, gpus: int, four_bit: bool, frozen_bytes: int = 2, adam_bytes: int | None = None
) -> float | None:
    """Estimated GB per GPU for weights, gradients and optimizer state (None: refused).

    ``strategy``: ddp (``gpus=1``: one GPU), fsdp, deepspeed_zero2(_offload), deepspeed_zero3(_offload).
    LoRA weights and gradients are fp32; AdamW keeps two fp32 states (paged 8-bit AdamW, two
    bytes, on one GPU or DDP; ``adam_bytes`` per weight says otherwise); the frozen base is in
    ``frozen_bytes`` (bf16: 2; fp32 on the CPU: 4), or NF4 for the quantizable weights.
    """
    n = gpus
    base_packed = inv.quantizable * (NF4_PACKED if four_bit else frozen_bytes)
    base_state = inv.quantizable * NF4_STATE if four_bit else 0
    frozen = inv.frozen_other * frozen_bytes
    lora_w, lora_g = inv.lora * 4, inv.lora * 4
    adam_fp32 = inv.lora * (8 if adam_bytes is None else adam_bytes)
    adam_8bit = inv.lora * (2 if adam_bytes is None else adam_bytes)
    layer = inv.largest_layer * (NF4_PACKED if four_bit else frozen_bytes)
    if strategy == "ddp":
        buckets = lora_g if n > 1 else 0  # DDP's gradient buckets
        total = base_packed + base_state + frozen + lora_w + lora_g + adam_8bit + buckets
    elif strategy == "fsdp":
        gathered = inv.root * frozen_bytes + 2 * layer  # root unit + the layer in use + the one prefetched
        total = (base_packed + frozen + lora_w + lora_g + adam_fp32) / n + base_state + gathered
    elif strategy.startswith("deepspeed_zero2"):
        optimizer = 0 if strategy.endswith("offload") else adam_fp32 / n
        total = base_packed + base_state + frozen + lora_w + lora_g / n + optimizer
    elif strategy.startswith("deepspeed_zero3"):
        if four_bit:
            return None  # refused: ZeRO-3 cannot partition bitsandbytes 4-bit weights
        if strategy.endswith("offload"):
            total = lora_g / n + 2 * layer  # weights and optimizer state live in CPU memory
        else:
            total = (base_packed + frozen + lora_w + lora_g + adam_fp32) / n + 2 * layer
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return total / GB
