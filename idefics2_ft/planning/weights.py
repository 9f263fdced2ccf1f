"""Per-GPU memory estimates for each strategy, from a model's real shapes on the meta device.

An estimate, not a measurement: weights, gradients, optimizer state and (under FSDP) the layers
gathered at one time. Activations, the CUDA context and allocator fragmentation come on top.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from transformers import Idefics2Config, Idefics2ForConditionalGeneration

from idefics2_ft.hardware import GB
from idefics2_ft.models import COMPONENTS, WRAP_CLASSES, lora_target_regex
from idefics2_ft.planning.shapes import Setup

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


def _meta_model(config: Idefics2Config) -> Idefics2ForConditionalGeneration:
    """The model on the meta device, built once per config (a plan and its candidate fixes share it)."""
    return _meta_model_of(config.to_json_string())


@lru_cache(maxsize=4)
def _meta_model_of(config_json: str) -> Idefics2ForConditionalGeneration:
    with torch.device("meta"):
        return Idefics2ForConditionalGeneration(Idefics2Config.from_dict(json.loads(config_json)))


def parts_summary(config: Idefics2Config, setup: Setup) -> list[dict[str, Any]]:
    """Per part: parameters, how they are stored, bytes. What Lightning's summary gets wrong at
    this size (it counts packed 4-bit bytes as parameters and sizes everything as fp32)."""
    model = _meta_model(config)
    frozen_bytes = setup.act_bytes
    rows = []
    for part, prefix in COMPONENTS:
        inv = inventory(model, list(setup.skip_modules) if setup.quantize else [], setup.target, setup.r, prefix)
        if setup.method == "full":
            params = inv.quantizable + inv.frozen_other
            rows.append({"part": part, "params": params, "storage": "fp32, trainable", "bytes": params * 4})
            continue
        nf4 = inv.quantizable if setup.quantize else 0
        plain = inv.quantizable + inv.frozen_other - nf4
        dtype = {"float16": "fp16", "float32": "fp32"}.get(setup.dtype, "bf16" if frozen_bytes == 2 else "fp32")
        storage = ", ".join(
            s
            for s in (
                f"{nf4 / 1e6:,.0f} M NF4" if nf4 else "",
                f"{plain / 1e6:,.1f} M {dtype} frozen" if plain else "",
                f"{inv.lora / 1e6:,.1f} M fp32 trainable" if inv.lora else "",
            )
            if s
        )
        nbytes = nf4 * (NF4_PACKED + NF4_STATE) + plain * frozen_bytes + inv.lora * 4
        rows.append({"part": part, "params": nf4 + plain + inv.lora, "storage": storage, "bytes": int(nbytes)})
    return rows


# Activations saved for backward, per token (elements of the activation dtype, ``a`` bytes), counted
# from transformers' modelling code with autograd's rules: a frozen linear saves nothing for its
# weight, a LoRA branch saves its (dropped-out) input, RMSNorm saves its fp32 input.
