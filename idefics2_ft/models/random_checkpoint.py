"""A random-init checkpoint of the real idefics2-8b architecture, written as the Hub holds it.

``write_random_checkpoint`` writes sharded safetensors, ``model.safetensors.index.json``,
``config.json`` and the processor into a folder that ``from_pretrained`` reads like a Hub download.
The model never exists in memory: its shapes come from the meta device and each tensor is drawn
just before its shard is written, so at most one shard (about ``shard_gb``) is held at a time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Idefics2Config, Idefics2ForConditionalGeneration

from idefics2_ft.models.processor import build_processor
from idefics2_ft.models.reference import idefics2_8b_config

log = logging.getLogger(__name__)

# Bump when what is written changes: a folder written by another version is rebuilt.
CHECKPOINT_VERSION = 1
MARKER = "random_init.json"


def default_cache_dir() -> Path:
    """``$IDEFICS2_FT_CACHE`` or ``~/.cache/idefics2-ft``: where built checkpoints live (never in the repo)."""
    return Path(os.environ.get("IDEFICS2_FT_CACHE", Path.home() / ".cache" / "idefics2-ft"))


def draw(name: str, shape: torch.Size, generator: torch.Generator, std: float, dtype: torch.dtype) -> torch.Tensor:
    """One tensor as the model's own init would draw it: norms 1, biases 0, the rest N(0, std)."""
    if len(shape) == 1:
        fill = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        return torch.full(shape, fill, dtype=dtype)
    return torch.randn(shape, generator=generator).mul_(std).to(dtype)


def plan_shards(shapes: dict[str, torch.Size], bytes_per_value: int, shard_bytes: float) -> list[list[str]]:
    """Tensor names grouped into shards of at most ``shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * bytes_per_value
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def is_complete(folder: Path, config: Idefics2Config, seed: int) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    meta = json.loads(marker.read_text())
    wanted = json.loads(json.dumps(config.to_diff_dict()))
    return meta.get("version") == CHECKPOINT_VERSION and meta.get("seed") == seed and meta.get("config") == wanted


def write_random_checkpoint(
    folder: str | Path,
    config: Idefics2Config | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shard_gb: float = 2.0,
    longest_edge: int = 980,
) -> Path:
    """Write (once) a random-init checkpoint of ``config`` (default: idefics2-8b) into ``folder``.

    A folder already holding the same version, config and seed is reused at once. The checkpoint
    is written next to ``folder`` and renamed into place, so an interrupted build never looks
    complete. Returns the folder.
    """
    config = config or idefics2_8b_config()
    folder = Path(folder).resolve()
    if is_complete(folder, config, seed):
        log.info("Random-init checkpoint: using %s", folder)
        return folder
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise FileExistsError(
            f"{folder} already holds files that are not a random-init checkpoint written here: they are kept, and "
            "nothing was written. Choose another folder for the checkpoint."
        )
    start = time.perf_counter()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Idefics2ForConditionalGeneration(config).state_dict().items()}
    value_bytes = torch.finfo(dtype).bits // 8
    shards = plan_shards(shapes, value_bytes, shard_gb * 1e9)
    total = sum(s.numel() for s in shapes.values())
    log.info(
        "Writing a random-init checkpoint: %.2f B parameters, %d shards, into %s", total / 1e9, len(shards), folder
    )
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # this pid's own partial folder, if a killed build left one
    tmp.mkdir(parents=True)
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    std = config.text_config.initializer_range
    weight_map = {}
    for index, names in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        shard = {name: draw(name, shapes[name], generator, std, dtype) for name in names}
        save_file(shard, tmp / file, metadata={"format": "pt"})
        del shard
        weight_map.update(dict.fromkeys(names, file))
        log.info("  shard %d/%d written (%.0f s)", index, len(shards), time.perf_counter() - start)
    index_json = {"metadata": {"total_size": total * value_bytes}, "weight_map": weight_map}
    # into this build's own partial folder, renamed into place once complete
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    config.save_pretrained(tmp)
    image_seq_len = config.perceiver_config.resampler_n_latents
    build_processor(image_seq_len=image_seq_len, longest_edge=longest_edge).save_pretrained(tmp)
    marker = {
        "version": CHECKPOINT_VERSION,
        "seed": seed,
        "parameters": total,
        "build_s": round(time.perf_counter() - start, 1),
        "config": config.to_diff_dict(),
    }
    (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    shutil.rmtree(folder, ignore_errors=True)  # an older checkpoint of ours (its marker is checked above), or nothing
    tmp.rename(folder)
    log.info("Random-init checkpoint written to %s in %.0f s", folder, time.perf_counter() - start)
    return folder
