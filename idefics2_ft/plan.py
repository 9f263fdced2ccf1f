"""Will it fit, and how long will it take? Memory and time per step, activations included.

``plan_run`` counts, from an Idefics2 config's real shapes (on the meta device) and the shapes of a
batch, what one optimizer step holds at its peak on one device:

- weights: the NF4 codes and their quantization state, the parts kept unquantized (vision tower,
  connector, embeddings, head) in the compute dtype; LoRA weights, gradients and optimizer state;
- activations, from the tensors autograd saves, counted layer by layer (``activation_terms``):
  the frozen vision tower's largest layer (nothing is saved there: no adapter sits below it), the
  connector's (LoRA on its projection and perceiver: saved for every patch of every image), the
  text model's per token (all layers, or with checkpointing one boundary per layer plus one layer
  recomputed), attention by implementation, and the fp32 log-softmax of ``seq x vocab`` for the loss;
- temporaries: a dequantized NF4 weight, the connector's gradients in its backward, the optimizer
  step; on CUDA the context and the allocator's slack.

The peak is the largest of four moments: the vision tower running, the start of the backward, the
connector's backward, the optimizer step.

Compared with measurements on the CPU in ``tests/test_plan.py`` and the README (within 15%).
Times are FLOPs at a stated model-FLOPs utilisation: an order of magnitude to plan with, not a
benchmark.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import Any

import torch
from omegaconf import DictConfig
from transformers import Idefics2Config, Idefics2ForConditionalGeneration

from idefics2_ft.config import accumulation, num_devices, strategy_variant
from idefics2_ft.memory import GB, NF4_PACKED, NF4_STATE, inventory, per_gpu_gb
from idefics2_ft.optim import optimizer_name

PARTS = (
    ("vision", "model.vision_model."),
    ("connector", "model.connector."),
    ("text", "model.text_model."),
    ("head", "lm_head."),
)
# GPUs: memory (GB) and dense bf16 tensor-core peak (TFLOP/s) from the vendors' data sheets.
GPUS = {
    "A100-40": (40, 312),
    "A100-80": (80, 312),
    "H100": (80, 989),
    "L4": (24, 121),
    "RTX 4090": (24, 165),
    "RTX 3090": (24, 71),
}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named as ``torch.cuda.get_device_name`` names it (None if unknown)."""
    for name, (_, tflops) in GPUS.items():
        if name.split("-")[0].replace("RTX ", "") in device_name:  # "NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090"
            return tflops
    return None


MFU = 0.3  # assumed for QLoRA (dequantizing NF4 costs time): an assumption, measured by make bench-gpu
CUDA_CONTEXT_GB = 0.6  # CUDA context and kernels, outside the allocator
ALLOCATOR_SLACK = 0.10  # reserved beyond allocated (fragmentation), of the allocated peak
# What loading adds on the CPU beyond the weights (module objects, quantization states, kernels):
# measured as 0.05-0.06 GB on three model sizes (tests/test_plan.py).
CPU_RUNTIME_GB = 0.06


@dataclass(frozen=True)
class Workload:
    """The shapes of one micro-batch."""

    batch: int  # samples
    images: int  # images in the batch after splitting (crops count as images)
    patches: int  # patches per image, padded: (H // patch) * (W // patch)
    seq_len: int  # tokens per sample, image tokens included (padded)
    crops: int = 1  # images per picture: 5 with do_image_splitting (4 crops and the whole)
    longest_edge: int = 980

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


@dataclass(frozen=True)
class Setup:
    """How the run trains, as far as memory and time are concerned."""

    device: str = "cuda"  # cuda | cpu
    dtype: str = "auto"  # the compute dtype (model.dtype): auto is bfloat16 on CUDA, float32 on the CPU
    quantize: bool = True
    method: str = "lora"  # lora | dora | full
    target: str = "text+connector"
    r: int = 8
    dropout: bool = True
    skip_modules: tuple[str, ...] = ("model.vision_model", "model.connector", "lm_head")
    checkpointing: bool = True
    attn: str = "sdpa"  # eager | sdpa | flash_attention_2
    optimizer: str = "paged_adamw_8bit"  # adamw | paged_adamw_8bit | deepspeed_cpu_adam
    strategy: str = "ddp"  # ddp (one device too) | fsdp | deepspeed_zero2(_offload) | deepspeed_zero3(_offload)
    gpus: int = 1
    accumulate: int = 1

    @property
    def act_bytes(self) -> int:  # activations and the unquantized weights: the compute dtype's size
        if self.dtype == "auto":
            return 2 if self.device == "cuda" else 4
        return 4 if self.dtype == "float32" else 2


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


def setup_from_cfg(cfg: DictConfig, device: str) -> Setup:
    """The ``Setup`` a training config gives on ``device`` (cuda | cpu)."""
    strategy = strategy_variant(cfg)
    if strategy == "auto":
        strategy = "ddp"
    return Setup(
        device=device,
        dtype=cfg.model.dtype,
        quantize=bool(cfg.peft.quantize) and cfg.peft.method != "full",
        method=cfg.peft.method,
        target=cfg.peft.target,
        r=cfg.peft.r,
        dropout=cfg.peft.dropout > 0,
        skip_modules=tuple(cfg.peft.skip_modules),
        checkpointing=cfg.model.gradient_checkpointing,
        attn=cfg.model.attn_implementation,
        optimizer=optimizer_name(cfg, on_gpu=device == "cuda"),
        strategy=strategy,
        gpus=num_devices(cfg) * cfg.trainer.num_nodes,
        accumulate=accumulation(cfg),
    )


def workload_from_cfg(cfg: DictConfig, config: Idefics2Config, text_tokens: int = 128, images: int = 1) -> Workload:
    """The largest batch the data settings allow: square pages at ``longest_edge``, ``images`` per
    sample, and ``text_tokens`` of text besides the image tokens (capped by ``max_length``)."""
    d = cfg.data
    crops = 5 if d.do_image_splitting else 1
    side = d.longest_edge // config.vision_config.patch_size
    image_tokens = images * crops * config.perceiver_config.resampler_n_latents
    seq = image_tokens + text_tokens
    if d.max_length:
        seq = min(seq, d.max_length)
    return Workload(d.batch_size, d.batch_size * images * crops, side * side, seq, crops, d.longest_edge)


def workload_from_batch(batch: dict, config: Idefics2Config, cfg: DictConfig) -> Workload:
    """The shapes of a collated batch (its padded sizes, as the model sees them)."""
    pixels = batch["pixel_values"]  # (batch, images, 3, H, W), padded
    patch = config.vision_config.patch_size
    real = int((pixels.flatten(2).abs().sum(-1) > 0).sum())  # the model drops all-zero padding images
    patches = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)  # the patch embedding's stride
    crops = 5 if cfg.data.do_image_splitting else 1
    return Workload(pixels.shape[0], real, patches, batch["input_ids"].shape[1], crops, cfg.data.longest_edge)


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
    for part, prefix in PARTS:
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
def _text_layer_bytes(D: int, inter: int, heads: int, T: int, s: Setup, lora: bool) -> float:
    """One decoder layer, per sample of T tokens, nothing recomputed."""
    a, drop = s.act_bytes, int(s.dropout and lora)
    per_token = (
        2 * D * 4  # the two RMSNorms' fp32 inputs
        + a * D * (2 + 3 + 1)  # normed inputs (attention, MLP), q, k and v expanded to all heads, attention output
        + a * D * lora * (3 * drop + 1 * drop + 2 * drop)  # dropout copies for q/k/v, o, gate/up
        + D * (3 + 1 + 2) * drop  # their masks (1 byte)
        + a * inter * 4  # gate, up, act(gate), act(gate) * up
        + (a + 1) * inter * drop  # down_proj's dropout copy and mask
    )
    attention = heads * T * T * a * 2 if s.attn == "eager" else 0  # scores and probabilities
    return per_token * T + attention


def activation_terms(config: Idefics2Config, w: Workload, s: Setup) -> tuple[float, float, dict[str, float], float]:
    """Bytes of the batch's pixels, of the vision tower's largest layer (transient: it runs before
    anything else is saved), of what is saved for backward by part, and of the gradients alive in
    the connector's backward."""
    v, p, t = config.vision_config, config.perceiver_config, config.text_config
    a = s.act_bytes
    targets = {"text": True, "connector": "connector" in s.target or s.target == "all", "vision": s.target == "all"}
    if s.method == "full":
        targets = dict.fromkeys(targets, True)
    N, S = w.images, w.patches
    drop = int(s.dropout)
    # vision tower: frozen, so one layer's tensors at a time (its output stays, the connector reads it)
    vision_layer = N * S * (4 * v.hidden_size + 2 * v.intermediate_size) * a
    if s.attn == "eager":
        vision_layer += N * v.num_attention_heads * S * S * a * 2
    if targets["vision"]:  # adapters in the vision tower: its graph is kept (checkpointed or not)
        per_layer = S * N * (8 * v.hidden_size + 3 * v.intermediate_size) * a
        vision_saved = v.num_hidden_layers * (N * S * v.hidden_size * a if s.checkpointing else per_layer)
    else:
        vision_saved = 0
    # connector: the modality projection (an MLP on every patch) and the perceiver, whose keys and
    # values read every patch and its latents. With LoRA in them, per patch: the vision output
    # (read by the LoRA branches) and a dropped-out copy for gate and up; gate, up, act(gate),
    # their product and down's dropped-out copy; the projection output (the context). Per perceiver
    # layer, per patch and latent: the context concatenated with the latents, dropped-out copies for
    # k and v, one more copy, and k and v. (Counted against autograd's saved tensors.)
    D, inter = t.hidden_size, t.intermediate_size
    kv_heads = p.num_key_value_heads * p.resampler_head_dim
    n_lat = p.resampler_n_latents
    if targets["connector"]:
        vision_out = 2 * N * S * v.hidden_size * a
        projection = (2 * drop * v.hidden_size + (4 + drop) * inter + D) * a
        perceiver = p.resampler_depth * ((2 + 2 * drop) * D + 2 * kv_heads) * a
        connector = N * S * projection + N * (S + n_lat) * perceiver
    else:
        vision_out = 0
        connector = N * S * (3 * inter + 3 * D) * a  # transient, one block at a time
    # text
    T, B, L = w.seq_len, w.batch, t.num_hidden_layers
    layer = B * _text_layer_bytes(D, inter, t.num_attention_heads, T, s, lora=True)
    if s.checkpointing:
        text = L * B * T * D * a + layer + B * T * (2 * D + 2 * inter) * a  # boundaries, one layer, its gradients
    else:
        text = L * layer + B * T * (2 * D + 2 * inter) * a
    # the loss's backward: log-softmax saved (fp32), the gradient it receives and the one it gives
    logits = B * T * t.vocab_size * 12
    # the batch's pixels (fp32), the model's mask of padding images and its copy of the real ones
    pixels = N * S * v.patch_size**2 * 3 * (4 + 1 + a)
    saved = {
        "activations: vision tower": vision_saved + vision_out,
        "activations: connector": connector,
        "activations: text model": text,
        "activations: logits and loss": logits,
    }
    # the projection's backward: gradients of gate, up and act(gate) beside what is still saved
    connector_grads = 3 * N * S * inter * a if targets["connector"] else 0
    return pixels, vision_layer, saved, connector_grads


def step_flops(config: Idefics2Config, w: Workload, s: Setup, params: dict[str, int]) -> float:
    """FLOPs of one optimizer step as executed: forward, backward (input gradients only through
    frozen weights), the text model's recomputation under checkpointing."""
    v, t = config.vision_config, config.text_config
    N, S, tokens = w.images, w.patches, w.tokens
    vision = 2 * params["vision"] * N * S + 4 * N * S * S * v.hidden_size * v.num_hidden_layers
    connector = 2 * params["connector"] * N * S
    text = 2 * params["text"] * tokens + 4 * w.batch * w.seq_len**2 * t.hidden_size * t.num_hidden_layers
    head = 2 * params["head"] * tokens
    backward = 2 if s.method == "full" else 1  # weight gradients only for full fine-tuning
    recompute = text if s.checkpointing else 0
    vision_backward = vision * backward if s.target == "all" or s.method == "full" else 0
    micro = vision + vision_backward + (connector + text + head) * (1 + backward) + recompute
    return micro * s.accumulate


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
    pixels, vision_transient, saved, connector_grads = activation_terms(config, w, s)
    t = config.text_config
    largest = max(t.hidden_size * t.intermediate_size, t.vocab_size * t.hidden_size * (not s.quantize))
    dequant = 2 * t.hidden_size * t.intermediate_size * a if s.quantize else 0
    optimizer_step = 2 * inv.lora * 4 if s.method != "full" else 2 * largest * 4
    # The peak is at one of four moments; the terms of the others are listed as not at the peak.
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
    params = {part: _count(model, prefix) for part, prefix in PARTS}
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
    if w.batch > 1:
        b = w.batch // 2
        yield (
            f"data.batch_size={b} trainer.accumulate_grad_batches={s.accumulate * 2} (the same effective batch)",
            replace(w, batch=b, images=max(1, w.images // 2)),
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
            if needed <= gpu_gb or not text.startswith("data.batch_size") or w2.batch == 1:
                break
            b = w2.batch // 2
            w2, s2 = replace(w2, batch=b, images=max(1, w2.images // 2)), replace(s2, accumulate=s2.accumulate * 2)
            text = f"data.batch_size={b} trainer.accumulate_grad_batches={s2.accumulate} (the same effective batch)"
        if needed <= gpu_gb:
            return (
                f"does not fit by {total - gpu_gb:.1f} GB ({total:.1f} of {gpu_gb:.0f} GB)",
                f"{text}: {needed:.1f} GB",
            )
    return f"does not fit by {total - gpu_gb:.1f} GB ({total:.1f} of {gpu_gb:.0f} GB)", "no single change makes it fit"


def available_gb(device: str) -> float | None:
    """What this machine offers a run: the GPU's memory, or the memory Linux says is available."""
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GB
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None


def format_parts(plan: Plan) -> str:
    lines = ["| part | parameters | stored as | GB |", "|---|---|---|---|"]
    for row in plan.parts:
        lines.append(f"| {row['part']} | {row['params'] / 1e6:,.1f} M | {row['storage']} | {row['bytes'] / GB:.2f} |")
    return "\n".join(lines)


def format_plan(plan: Plan) -> str:
    """The plan as a Markdown report: the parts, the terms, the verdict, the time per step."""
    w, s = plan.workload, plan.setup
    lines = [
        f"Batch: {w.batch} sample(s) x {w.seq_len} tokens, {w.images} image(s) of {w.patches} patches; "
        f"{s.device}, {'NF4 ' if s.quantize else ''}{s.method} r={s.r} on {s.target}, checkpointing "
        f"{'on' if s.checkpointing else 'off'}, attention {s.attn}, {s.optimizer}, {s.strategy} x {s.gpus}",
        "",
        format_parts(plan),
        "",
        "| term | GB |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.2f} |" for k, v in plan.rows.items()]
    lines.append(f"| **total at the peak ({plan.peak_at})** | **{plan.total_gb:.2f}** |")
    lines += [f"| ({k}: not at the peak) | ({v:.2f}) |" for k, v in plan.off_peak.items()]
    if plan.verdict:
        lines += ["", f"Verdict: {plan.verdict}" + (f"; cheapest change: {plan.fix}" if plan.fix else "")]
    times = ", ".join(f"{name} {sec:.1f} s" for name, sec in plan.times.items())
    lines += ["", f"Time per optimizer step at {MFU:.0%} MFU ({plan.flops / 1e12:.1f} TFLOP): {times}"]
    return "\n".join(lines)
