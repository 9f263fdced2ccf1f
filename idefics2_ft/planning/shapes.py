"""The shapes a plan reads: one micro-batch (``Workload``) and how the run trains (``Setup``)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig
from transformers import Idefics2Config

from idefics2_ft.config import accumulation, num_devices, optimizer_name, strategy_variant
from idefics2_ft.data.images import pictures_per_image


@dataclass(frozen=True)
class Workload:
    """The shapes of one micro-batch."""

    batch: int  # samples
    images: int  # images in the batch after splitting (crops count as images)
    patches: int  # patches per image, padded: (H // patch) * (W // patch)
    seq_len: int  # tokens per sample, image tokens included (padded)
    crops: int = 1  # images per picture: 5 with do_image_splitting (4 crops and the whole)
    longest_edge: int = 980
    learned: int | None = None  # positions whose logits are computed (where some sample learns); None: all
    rows_per_sample: int = 1  # text rows per sample: 2 for a preference pair (chosen and rejected stacked)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def samples(self) -> int:
        """Samples (pairs for objective=dpo) in the batch: ``data.batch_size``."""
        return self.batch // self.rows_per_sample


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
    recompute_connector: bool = True  # model.checkpoint_connector (on when the connector trains)
    # objective=dpo: the reference's pass without grad, "base" (the adapters off) or "adapter" (a frozen
    # second adapter, model.adapter); None: none (SFT, or a reference-free loss)
    reference: str | None = None

    @property
    def act_bytes(self) -> int:  # activations and the unquantized weights: the compute dtype's size
        if self.dtype == "auto":
            return 2 if self.device == "cuda" else 4
        return 4 if self.dtype == "float32" else 2


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
        recompute_connector=connector_recomputed(cfg),
        reference=reference_pass(cfg),
    )


def connector_recomputed(cfg: DictConfig) -> bool:
    """``model.checkpoint_connector`` as the run resolves it: on when anything in the connector trains."""
    if cfg.model.checkpoint_connector is not None:
        return bool(cfg.model.checkpoint_connector)
    return cfg.peft.method == "full" or cfg.peft.target in ("text+connector", "all")


def is_dpo(cfg: DictConfig) -> bool:
    return cfg.get("objective") is not None and cfg.objective.name == "dpo"


# The losses that need no reference (``reference="free"`` in training/preference.py's LOSSES; planning
# sits beside training and does not import it: tests/unit/test_batch_auto.py pins the two agree), and
# those that work with or without one.
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo"})
REFERENCE_OPTIONAL_LOSSES = frozenset({"sft"})


def reference_pass(cfg: DictConfig) -> str | None:
    """The reference a DPO run passes its pairs through (``objective.reference`` resolved as
    ``preference_module.reference_of`` does), or None where there is no reference pass."""
    if not is_dpo(cfg):
        return None
    o = cfg.objective
    reference = o.reference
    if reference == "auto":
        losses = set(o.loss)
        free = losses & REFERENCE_FREE_LOSSES
        if free and not losses - REFERENCE_FREE_LOSSES - REFERENCE_OPTIONAL_LOSSES:
            reference = "none"
        else:
            reference = "adapter" if cfg.model.adapter else "base"
    return None if reference == "none" else reference


def workload_from_cfg(
    cfg: DictConfig, config: Idefics2Config, text_tokens: int = 128, images: int = 1, answer_tokens: int = 32
) -> Workload:
    """The largest batch the data settings allow: square pages at ``longest_edge``, ``images`` per
    sample, ``text_tokens`` of text besides the image tokens (capped by ``max_length``), of which
    ``answer_tokens`` are learned (the logits are computed there only). A batch of pairs is 2 rows a
    pair for the text model, its pictures once; the reference's pass, without activations, is not counted."""
    d = cfg.data
    crops = pictures_per_image(d.do_image_splitting)
    side = d.longest_edge // config.vision_config.patch_size
    image_tokens = images * crops * config.perceiver_config.resampler_n_latents
    seq = image_tokens + text_tokens
    if d.max_length:
        seq = min(seq, d.max_length)
    # objective=dpo: a pair is two text rows (chosen and rejected) and its pictures once
    per_sample = 2 if is_dpo(cfg) else 1
    rows = d.batch_size * per_sample
    learned = min(seq, answer_tokens * rows)  # the union over the batch, at most
    pictures = d.batch_size * images * crops
    return Workload(rows, pictures, side * side, seq, crops, d.longest_edge, learned, per_sample)


def workload_from_batch(batch: dict, config: Idefics2Config, cfg: DictConfig) -> Workload:
    """The shapes of a collated batch (its padded sizes, as the model sees them). A batch of B pairs is
    2B rows for the text model (chosen and rejected stacked) and its pictures once (the vision tower's
    share), the rejected sides' own pictures besides where some pair has them; the reference's pass is
    the ``Setup``'s (``reference_pass``)."""
    per_sample = 1
    if "chosen_input_ids" in batch:
        import torch

        per_sample = 2
        pixels = batch["pixel_values"]
        if "rejected_pixel_values" in batch and batch["rejected_pixel_values"].shape[-2:] == pixels.shape[-2:]:
            pixels = torch.cat([pixels.flatten(0, 1), batch["rejected_pixel_values"].flatten(0, 1)]).unsqueeze(0)
        batch = {
            "pixel_values": pixels,
            "labels": torch.cat([batch["chosen_labels"], batch["rejected_labels"]]),
            "input_ids": torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
        }
    pixels = batch["pixel_values"]  # (batch, images, 3, H, W), padded
    patch = config.vision_config.patch_size
    real = int((pixels.flatten(2).abs().sum(-1) > 0).sum())  # the model drops all-zero padding images
    patches = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)  # the patch embedding's stride
    crops = pictures_per_image(cfg.data.do_image_splitting)
    learned = int((batch["labels"][:, 1:] != -100).any(dim=0).sum())  # the positions the loss keeps
    seq = batch["input_ids"].shape[1]
    rows = batch["input_ids"].shape[0]
    return Workload(rows, real, patches, seq, crops, cfg.data.longest_edge, learned, per_sample)
