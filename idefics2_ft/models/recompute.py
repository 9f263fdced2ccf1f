"""Recompute the connector in the backward instead of keeping its activations.

The connector's projection is an MLP that runs on every patch of every picture (about 4,900 per
980-px picture, 5 pictures per page with image splitting) before the perceiver pools them to 64
tokens. With LoRA in it, autograd keeps several ``intermediate_size``-wide tensors per patch for the
backward: most of a splitting run's peak. Here the projection runs in chunks of patches under
non-reentrant activation checkpointing, and each perceiver layer likewise: the backward recomputes
one chunk (or one layer) at a time, so neither the activations nor their gradient temporaries are
held for the whole picture at once. The results are the same as without (tested); the cost is the
connector's forward once more.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_PATCHES = 256  # patches of each picture recomputed together (a 980-px picture has 4,900)


def _chunked(forward: Callable, chunk: int) -> Callable:
    """``forward`` over ``[images, patches, D]`` in checkpointed chunks of ``chunk`` patches."""

    @functools.wraps(forward)
    def run(x: torch.Tensor) -> torch.Tensor:  # [images, patches, vision hidden] -> [images, patches, text hidden]
        if not torch.is_grad_enabled():  # generation, validation: nothing is kept anyway
            return forward(x)
        parts = [checkpoint(forward, x[:, i : i + chunk], use_reentrant=False) for i in range(0, x.shape[1], chunk)]
        return torch.cat(parts, dim=1)

    return run


def _checkpointed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def connector_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ``Idefics2Connector`` inside a model, PEFT-wrapped or not."""
    for module in model.modules():
        if type(module).__name__ == "Idefics2Connector":
            return module
    raise ValueError("no Idefics2Connector in this model")


def recompute_connector(model: torch.nn.Module, chunk_patches: int = CHUNK_PATCHES) -> torch.nn.Module:
    """Make the connector's projection and perceiver layers recompute in the backward (idempotent).

    Args:
        model: an Idefics2, PEFT-wrapped or not.
        chunk_patches: patches of a picture recomputed together in the projection.

    Returns:
        The same model.
    """
    connector = connector_of(model)
    if getattr(connector, "_recomputed", False):
        return model
    projection = connector.modality_projection
    projection.forward = _chunked(projection.forward, chunk_patches)
    for layer in connector.perceiver_resampler.layers:
        layer.forward = _checkpointed(layer.forward)
    connector._recomputed = True
    return model


def connector_trains(model: torch.nn.Module) -> bool:
    """True when any weight of the connector trains (only then is anything kept for its backward)."""
    return any(p.requires_grad for p in connector_of(model).parameters())
