"""The plan: what one optimizer step holds at its peak on one device, the verdict against a GPU's
memory and the cheapest change that makes it fit, and the time per step at an assumed MFU.

How each term is counted, and how the plan is checked against measured peaks: ``docs/memory.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from transformers import Idefics2Config

from idefics2_ft.hardware import GB, GPUS
from idefics2_ft.models import COMPONENTS
from idefics2_ft.planning.activations import activation_terms, reference_terms, step_flops
from idefics2_ft.planning.shapes import Setup, Workload
from idefics2_ft.planning.weights import _meta_model, inventory, parts_summary, per_gpu_gb

MFU = 0.3  # assumed for QLoRA (dequantizing NF4 costs time): an assumption, measured by make bench-gpu
CUDA_CONTEXT_GB = 0.6  # CUDA context and kernels, outside the allocator
ALLOCATOR_SLACK = 0.10  # reserved beyond allocated (fragmentation), of the allocated peak
# What a CPU run holds beyond the terms (module objects, quantization states, kernels, autograd's
# bookkeeping): 0.05-0.06 GB after loading on three model sizes, and with the connector recomputed
# and the head on the learned positions only, the eight configurations of tests/runs/test_plan.py
# measured 0.00-0.09 GB (most 0.03) above the terms.
CPU_RUNTIME_GB = 0.09


@dataclass
class Plan:
    rows: dict[str, float]  # GB per term
    total_gb: float
    parts: list[dict[str, Any]]
    workload: Workload
    setup: Setup
    flops: float  # per optimizer step
    gpu_gb: float | None = None
    verdict: str = ""
    fix: str | None = None
    times: dict[str, float] = field(default_factory=dict)  # GPU name -> seconds per optimizer step
    off_peak: dict[str, float] = field(default_factory=dict)  # GB held at another moment than the peak
    peak_at: str = ""  # the moment of the peak

    @property
    def flops_per_token(self) -> float:
        """FLOPs per (padded) token of a step, to turn a measured tokens/s into MFU."""
        return self.flops / max(self.workload.tokens * self.setup.accumulate, 1)

    @property
    def allocated_gb(self) -> float:
        """What the process holds at the peak beyond what it held before loading: the total less
        the CUDA context and the allocator's slack (on the CPU, the total)."""
        return self.total_gb - sum(v for k, v in self.rows.items() if k.startswith("CUDA"))

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "allocated_gb": round(self.allocated_gb, 3),
            "fix": self.fix,
            "total_gb": round(self.total_gb, 3),
            "gpu_gb": self.gpu_gb,
            "peak_at": self.peak_at,
            "rows_gb": {k: round(v, 4) for k, v in self.rows.items()},
            "off_peak_gb": {k: round(v, 4) for k, v in self.off_peak.items()},
            "parts": self.parts,
            "workload": asdict(self.workload),
            "setup": asdict(self.setup),
            "tflop_per_step": round(self.flops / 1e12, 3),
            "seconds_per_step": {k: round(v, 2) for k, v in self.times.items()},
            "mfu_assumed": MFU,
        }


def plan_run(config: Idefics2Config, w: Workload, s: Setup, gpu_gb: float | None = None) -> Plan:
    """The plan for one device: GB by term, the total, a verdict against ``gpu_gb`` and the cheapest fix."""
    model = _meta_model(config)
    skip = list(s.skip_modules) if s.quantize else []
    inv = inventory(model, skip, s.target, s.r)
    a = s.act_bytes
    adam = {"adamw": 8, "paged_adamw_8bit": 2, "deepspeed_cpu_adam": 0}.get(s.optimizer, 8)
    if s.method == "full":
        static = (inv.quantizable + inv.frozen_other) * (4 + 4 + adam)
        rows = {"weights, gradients, optimizer (full)": static}
    else:
        gb = per_gpu_gb(inv, s.strategy, s.gpus, s.quantize, frozen_bytes=a, adam_bytes=adam)
        if gb is None:
            raise ValueError(f"strategy {s.strategy} cannot shard 4-bit weights (use fsdp or deepspeed_zero2)")
        lora_state = inv.lora * (4 + 4 + adam)
        rows = {"weights (NF4 + unquantized)": gb * GB - lora_state, "LoRA weights, gradients, optimizer": lora_state}
        if s.reference == "adapter":  # objective=dpo from an SFT run: its adapter loaded again, frozen (fp32)
            rows["LoRA weights of the reference (frozen)"] = inv.lora * 4
    pixels, vision_transient, saved, connector_grads = activation_terms(config, w, s)
    t = config.text_config
    largest = max(t.hidden_size * t.intermediate_size, t.vocab_size * t.hidden_size * (not s.quantize))
    dequant = 2 * t.hidden_size * t.intermediate_size * a if s.quantize else 0
    optimizer_step = 2 * inv.lora * 4 if s.method != "full" else 2 * largest * 4
    # The peak is at one of four moments (six with a reference's passes, objective=dpo); the terms of
    # the others are listed as not at the peak.
    inputs = {"inputs: pixel values": pixels}
    moments = {
        "the vision tower's largest layer": {**inputs, "activations: vision tower's largest layer": vision_transient},
        "the start of backward": {**inputs, **saved, "temporaries: NF4 dequantization": dequant},
        "the connector's backward": {
            **inputs,
            "activations: vision tower": saved["activations: vision tower"],
            "activations: connector": saved["activations: connector"],
            "gradients through the connector's projection": connector_grads,
        },
        "the optimizer step": {"temporaries: optimizer step": optimizer_step},
    }
    if s.reference is not None:  # objective=dpo: the reference's connector, then its text pass (no grad)
        kept, text, transient, connector = reference_terms(config, w, s)
        moments["the reference's connector"] = {
            **inputs,
            "activations: vision tower": saved["activations: vision tower"],
            "activations: connector": saved["activations: connector"],
            "temporaries: the reference's connector (no grad)": connector,
        }
        moments["the reference's text pass"] = {
            **inputs,
            **saved,
            "activations: text model": text,
            "activations: logits and loss": kept,
            "temporaries: NF4 dequantization": dequant,
            "temporaries: the reference's text pass (no grad)": transient,
        }
    peak = max(moments, key=lambda m: sum(moments[m].values()))
    rows.update(moments[peak])
    off_peak = {}
    for terms in moments.values():
        off_peak.update({k: max(v, off_peak.get(k, 0)) for k, v in terms.items() if k not in rows})
    allocated = sum(rows.values())
    if s.device == "cuda":
        rows["CUDA: allocator slack (10%)"] = allocated * ALLOCATOR_SLACK
        rows["CUDA: context"] = CUDA_CONTEXT_GB * GB
    else:
        rows["CPU: runtime (modules, quantization states, kernels)"] = CPU_RUNTIME_GB * GB
    rows = {k: v / GB for k, v in rows.items()}
    params = {part: _count(model, prefix) for part, prefix in COMPONENTS}
    plan = Plan(rows, sum(rows.values()), parts_summary(config, s), w, s, step_flops(config, w, s, params), gpu_gb)
    plan.off_peak = {k: v / GB for k, v in off_peak.items()}
    plan.peak_at = peak
    plan.times = {name: plan.flops / (tflops * 1e12 * MFU) for name, (_, tflops) in GPUS.items()}
    if gpu_gb is not None:
        plan.verdict, plan.fix = verdict(config, w, s, plan.total_gb, gpu_gb)
    return plan


def _count(model: torch.nn.Module, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def _total(config: Idefics2Config, w: Workload, s: Setup) -> float:
    return plan_run(config, w, s).total_gb


def candidate_fixes(w: Workload, s: Setup, patch: int):
    """Changes that lower the peak, cheapest first: ``(description, workload, setup)``."""
    if not s.recompute_connector and (s.method == "full" or s.target in ("text+connector", "all")):
        yield (
            "model.checkpoint_connector=true",
            w,
            replace(s, recompute_connector=True),
        )  # the connector once more: a few % of a step
    if w.samples > 1:
        b = w.samples // 2
        yield (
            f"data.batch_size={b} trainer.accumulate_grad_batches={s.accumulate * 2} (the same effective batch)",
            replace(w, batch=b * w.rows_per_sample, images=max(1, w.images // 2)),
            replace(s, accumulate=s.accumulate * 2),
        )
    if not s.checkpointing:
        yield "model.gradient_checkpointing=true", w, replace(s, checkpointing=True)
    if s.optimizer == "adamw" and s.device == "cuda" and s.strategy == "ddp":
        yield "optim.optimizer=paged_adamw_8bit", w, replace(s, optimizer="paged_adamw_8bit")
    if s.attn == "eager":
        yield "model.attn_implementation=sdpa", w, replace(s, attn="sdpa")
    if w.crops > 1:
        yield "data.do_image_splitting=false", replace(w, images=w.images // w.crops, crops=1), s
    for edge in (768, 490):
        if edge < w.longest_edge:
            patches = (edge // patch) ** 2
            yield f"data.longest_edge={edge}", replace(w, patches=min(w.patches, patches), longest_edge=edge), s
    if w.seq_len > 512:  # long samples: truncation (answers cut short are skipped and counted)
        yield f"data.max_length={w.seq_len // 2}", replace(w, seq_len=w.seq_len // 2), s
    for n in (2, 4, 8):
        if s.gpus < n and s.method != "full":
            yield f"strategy=fsdp trainer.devices={n}", w, replace(s, strategy="fsdp", gpus=n, optimizer="adamw")


def verdict(config: Idefics2Config, w: Workload, s: Setup, total: float, gpu_gb: float) -> tuple[str, str | None]:
    if total <= gpu_gb:
        return f"fits: {total:.1f} of {gpu_gb:.0f} GB", None
    for text, w2, s2 in candidate_fixes(w, s, config.vision_config.patch_size):
        # halving the batch may need doing more than once
        while True:
            needed = _total(config, w2, s2)
            if needed <= gpu_gb or not text.startswith("data.batch_size") or w2.samples == 1:
                break
            b = w2.samples // 2
            w2 = replace(w2, batch=b * w2.rows_per_sample, images=max(1, w2.images // 2))
            s2 = replace(s2, accumulate=s2.accumulate * 2)
            text = f"data.batch_size={b} trainer.accumulate_grad_batches={s2.accumulate} (the same effective batch)"
        if needed <= gpu_gb:
            return (
                f"does not fit by {total - gpu_gb:.1f} GB ({total:.1f} of {gpu_gb:.0f} GB)",
                f"{text}: {needed:.1f} GB",
            )
    return f"does not fit by {total - gpu_gb:.1f} GB ({total:.1f} of {gpu_gb:.0f} GB)", "no single change makes it fit"
