"""The forward of a batch of preference pairs: each picture through the vision tower once.

A pair is one prompt (with its pictures) and two answers. Run as two ordinary batches, as the
peers do, the vision tower and the connector would see every picture four times per step: chosen
and rejected, policy and reference. Here:

- the vision tower runs once per pair (``see``): its weights are the same for both answers, and for
  the reference too unless adapters sit in it (no recipe puts any there);
- the connector runs once for the policy (``connect``), and once more for the reference only when
  adapters sit in it (the reference's connector then differs);
- the text model runs once over chosen and rejected stacked (``[2B, L]``), the pictures' 64 tokens
  each handed in as ``mm_encoder_outputs`` rather than recomputed from pixels;
- the reference pass runs under ``torch.no_grad``: it keeps no activations.

``tests/unit/test_pair_forward.py`` counts the vision tower's calls and checks the log-probabilities
against plain forwards with the pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from types import MethodType

import torch

IGNORE_INDEX = -100


def part_of(model: torch.nn.Module, class_name: str) -> torch.nn.Module:
    """The first submodule of type ``class_name`` (``Idefics2Model``, ``Idefics2Connector``), PEFT-wrapped or not."""
    for module in model.modules():
        if type(module).__name__ == class_name:
            return module
    raise ValueError(f"no {class_name} in this model")


def has_adapters(module: torch.nn.Module) -> bool:
    """Whether LoRA (or DoRA) layers sit inside ``module``: its output then depends on the active adapter."""
    return any("lora_" in name for name, _ in module.named_parameters())


@dataclass
class Pictures:
    """What the vision tower made of a batch's real pictures (padding pictures are left out)."""

    hidden: torch.Tensor  # [pictures, patches, vision hidden]
    patch_mask: torch.Tensor  # [pictures, patches per side, patches per side] bool
    per_row: list[int]  # real pictures of each batch row


def see(model: torch.nn.Module, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None) -> Pictures:
    """The vision tower over a batch's pictures, once: ``[B, n, 3, H, W]`` with all-zero padding pictures.

    The same selection of real pictures and patch mask as Idefics2's own ``get_image_features``, so
    the connector's output equals what ``forward(pixel_values=...)`` would compute.
    """
    inner = part_of(model, "Idefics2Model")
    rows, n = pixel_values.shape[:2]
    pixels = pixel_values.to(dtype=inner.dtype).flatten(0, 1)  # [B * n, 3, H, W]
    real = (pixels == 0.0).flatten(1).sum(dim=1) != pixels[0].numel()
    per_row = real.view(rows, n).sum(dim=1).tolist()
    pixels = pixels[real].contiguous()
    if pixel_attention_mask is None:
        mask = torch.ones((pixels.shape[0], *pixels.shape[2:]), dtype=torch.bool, device=pixels.device)
    else:
        mask = pixel_attention_mask.flatten(0, 1)[real].contiguous()
    size = inner.config.vision_config.patch_size
    grid = mask.unfold(1, size, size).unfold(2, size, size)
    patch_mask = grid.sum(dim=(-1, -2)) == size * size
    hidden = inner.vision_model(pixel_values=pixels, patch_attention_mask=patch_mask).last_hidden_state
    return Pictures(hidden, patch_mask, per_row)


def connect(model: torch.nn.Module, pictures: Pictures) -> list[torch.Tensor]:
    """The connector over the pictures: per batch row, its pictures' tokens ``[pictures x 64, text hidden]``."""
    inner = part_of(model, "Idefics2Model")
    hidden = pictures.hidden
    features = inner.connector(hidden, attention_mask=pictures.patch_mask.view(hidden.shape[0], -1))
    return [f.reshape(-1, f.shape[-1]) for f in features.split(pictures.per_row)]


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    features: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its labelled tokens, and how many there are.

    Args:
        features: per row, the connector's tokens of its pictures (``connect``), in row order.

    Returns:
        ``(logps [N], tokens [N])``; the head runs only where some row learns the next token.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    pictures = [f for f in features if f.numel()]
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "logits_to_keep": keep}
    if pictures:
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(pictures))}
    logits = model(**inputs).logits  # [N, K, vocab]
    picked = targets[:, keep]
    learned = picked != IGNORE_INDEX
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, picked.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logps * learned).sum(dim=1), learned.sum(dim=1)


@dataclass
class AnswerLogps:
    """Per pair, under one model: the summed log-probabilities of the chosen and rejected answers and
    their numbers of tokens."""

    chosen: torch.Tensor  # [B]
    rejected: torch.Tensor  # [B]
    chosen_tokens: torch.Tensor  # [B]
    rejected_tokens: torch.Tensor  # [B]


def stacked(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows, ``[2B, L]``: input ids, attention mask, labels."""
    return tuple(
        torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "attention_mask", "labels")
    )


def pair_features(model: torch.nn.Module, batch: dict, pictures: Pictures | None, rejected: Pictures | None):
    """Per row of the stacked batch, its pictures' tokens: the chosen side's for both answers, or the
    rejected side's own pictures where a pair shows the rejected answer other pictures."""
    rows = batch["chosen_input_ids"].shape[0]
    chosen = connect(model, pictures) if pictures is not None else [batch["chosen_input_ids"].new_zeros(0)] * rows
    if rejected is None:
        return chosen + chosen
    own = connect(model, rejected)
    flags = batch["rejected_own_images"].tolist()
    return chosen + [own[i] if flags[i] else chosen[i] for i in range(rows)]


def pair_logps(model: torch.nn.Module, batch: dict, features: list[torch.Tensor]) -> AnswerLogps:
    """The pair's log-probabilities under ``model`` as its adapters are now (policy or reference), the
    pictures' tokens given (``pair_features``): one text pass over chosen and rejected stacked."""
    ids, mask, labels = stacked(batch)
    logps, tokens = sequence_logps(model, ids, mask, labels, features)
    rows = batch["chosen_input_ids"].shape[0]
    return AnswerLogps(logps[:rows], logps[rows:], tokens[:rows], tokens[rows:])


def see_pair(model: torch.nn.Module, batch: dict) -> tuple[Pictures | None, Pictures | None]:
    """The vision tower over a batch of pairs: the prompts' pictures once, and the rejected sides' own
    pictures where some pair has them. Without grad unless adapters sit in the tower."""
    tower = part_of(model, "Idefics2Model").vision_model
    trains = any(p.requires_grad for p in tower.parameters())
    with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
        pictures = (
            see(model, batch["pixel_values"], batch.get("pixel_attention_mask")) if "pixel_values" in batch else None
        )
        rejected = None
        if "rejected_pixel_values" in batch:
            rejected = see(model, batch["rejected_pixel_values"], batch.get("rejected_pixel_attention_mask"))
    return pictures, rejected


def pair_passes(
    model: torch.nn.Module, batch: dict, as_reference: Callable[[], ContextManager] | None
) -> tuple[AnswerLogps, AnswerLogps | None]:
    """The policy's log-probabilities of a batch of pairs and, given ``as_reference`` (a context in which
    the model is the reference), the reference's, without grad: each picture through the tower once.

    One call is one forward of the whole model: under FSDP2 it is registered as the root unit's
    forward method (``strategies.shard_idefics2``), so the weights outside the layers (the patch
    embedding, the connector's projection, the head) are gathered for the tower and the connector,
    which run here directly, and their gradients reduced after the backward.
    """
    pictures, rejected = see_pair(model, batch)
    features = pair_features(model, batch, pictures, rejected)
    reference_features = None
    if as_reference is not None:
        # The tower and the connector (which run here directly) before either text pass: a nested
        # forward of the whole model gathers the root's weights again for itself, and under FSDP2 they
        # are sharded again when it returns.
        inner = part_of(model, "Idefics2Model")
        reference_features = [f.detach() for f in features]
        if has_adapters(inner.vision_model) or has_adapters(inner.connector):
            with torch.no_grad(), as_reference():
                if has_adapters(inner.vision_model):  # the reference's tower differs (no recipe does this)
                    pictures, rejected = see_pair(model, batch)
                reference_features = pair_features(model, batch, pictures, rejected)
    policy = pair_logps(model, batch, features)
    if reference_features is None:
        return policy, None
    with torch.no_grad(), as_reference():
        reference = pair_logps(model, batch, reference_features)
    return policy, reference


PAIR_PASSES = "pair_passes"  # the name of the forward method ``attach_pair_passes`` gives the model


def attach_pair_passes(model: torch.nn.Module) -> None:
    """Give ``model`` the method ``pair_passes`` (this module's function bound to it), so that a sharding
    strategy can register it as a forward of the whole model. Idempotent."""
    if PAIR_PASSES not in vars(model):
        model.__dict__[PAIR_PASSES] = MethodType(pair_passes, model)
