"""Build, once, what the real-size runs read: a random-init idefics2-8b checkpoint and rendered documents.

    python scripts/build_8b.py [--cache DIR] [--text-layers N] [--train N] [--val N]

Writes into the cache (``$IDEFICS2_FT_CACHE``, default ``~/.cache/idefics2-ft``; never the repository):
  idefics2-8b-random/    the published architecture, random weights, sharded bf16 safetensors, processor
  idefics2-8b-random-L2/ the same with 2 decoder layers (``--text-layers 2``; for dry-runs)
  docvqa-like/           DocVQA-like pages (980-px forms) with questions, as the ``jsonl`` source reads them
A second call finds them and returns in seconds. The last lines printed are the paths, then the
``train.py`` overrides that use them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from idefics2_ft.data.synthetic import write_docs
from idefics2_ft.models.random_checkpoint import default_cache_dir, write_random_checkpoint
from idefics2_ft.models.reference import idefics2_8b_config

# The pages of the 8B runs: documents at the processor's longest edge, portrait and landscape.
DOC_SIZES = ((760, 980), (980, 700), (700, 980), (980, 560))


def build(
    cache: Path, text_layers: int | None = None, n_train: int = 4, n_val: int = 2
) -> tuple[Path, dict[str, Path]]:
    config = idefics2_8b_config()
    name = "idefics2-8b-random"
    if text_layers is not None:
        config.text_config.num_hidden_layers = text_layers
        name += f"-L{text_layers}"
    checkpoint = write_random_checkpoint(cache / name, config)
    docs_dir = cache / "docvqa-like"
    docs = {"train": docs_dir / "train.jsonl", "val": docs_dir / "val.jsonl"}
    if not all(
        p.is_file() and sum(1 for _ in p.open()) == n for p, n in zip(docs.values(), (n_train, n_val), strict=True)
    ):
        docs = write_docs(docs_dir, n_train, n_val, seed=0, sizes=DOC_SIZES)
    return checkpoint, docs


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=default_cache_dir(), help="default: %(default)s")
    parser.add_argument("--text-layers", type=int, default=None, help="decoder layers (default: the 8B's 32)")
    parser.add_argument("--train", type=int, default=4, help="training pages (default: %(default)s)")
    parser.add_argument("--val", type=int, default=2, help="validation pages (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    checkpoint, docs = build(args.cache, args.text_layers, args.train, args.val)
    print(f"checkpoint: {checkpoint}")
    print(f"documents:  {docs['train']} ({args.train}), {docs['val']} ({args.val})")
    print(
        f"overrides:  model.name_or_path={checkpoint} data=jsonl data.metric=anls "
        f"data.train_file={docs['train']} data.val_file={docs['val']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
