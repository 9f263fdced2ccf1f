"""Download what a recipe needs into the Hugging Face cache, once, where there is internet.

    idefics2-ft prefetch recipe=docvqa_qlora [any train override]      # on a login node
    HF_HUB_OFFLINE=1 idefics2-ft train recipe=docvqa_qlora ...           # then on the compute nodes

Fetches the base model's weights, config and processor files at ``model.revision`` (nothing else of
the repository) and prepares every split the run reads with ``datasets``, into the cache that
``HF_HOME`` names; the nodes must see the same ``HF_HOME``. Then checks the cache the way
``train`` will and prints what it holds.
"""

from __future__ import annotations

import sys

from idefics2_ft.cli import compose_config
from idefics2_ft.hub import MODEL_PATTERNS, Need, cached_dataset, cached_model, needs


def fetch(need: Need) -> str:
    """Download one need into the cache; returns where it is."""
    if need.kind == "model":
        from huggingface_hub import snapshot_download

        return snapshot_download(need.repo_id, revision=need.revision, allow_patterns=MODEL_PATTERNS)
    import datasets

    # a stream is prefetched whole too: an offline node reads it with data.streaming=false
    for split in need.splits:
        datasets.load_dataset(need.repo_id, need.name, split=split)
    return datasets.config.HF_DATASETS_CACHE


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    cfg = compose_config(argv)
    wanted = needs(cfg)
    if not wanted:
        print(
            f"{cfg.name}: nothing to fetch (model.name_or_path={cfg.model.name_or_path}, data.source={cfg.data.source})."
        )
        return 0
    for need in wanted:
        print(f"fetching {need} ...", flush=True)
        try:
            print(f"  -> {fetch(need)}", flush=True)
        except Exception as err:  # no network, a wrong id or revision, a gated repo without a token
            print(f"prefetch failed on {need}: {type(err).__name__}: {str(err).splitlines()[0]}", file=sys.stderr)
            print(
                "prefetch needs the Hub: run it where there is internet (a login node), with HF_TOKEN for a gated repo.",
                file=sys.stderr,
            )
            return 1
    problems = []
    for need in wanted:
        missing = cached_model(need)[1] if need.kind == "model" else cached_dataset(need)  # a stream: as a dataset
        if missing:
            problems.append(f"{need}: still missing {missing}")
    if problems:
        print("prefetch failed:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"\n{cfg.name}: everything is in the cache. On nodes without internet, with the same HF_HOME:")
    print(f"  HF_HUB_OFFLINE=1 idefics2-ft train {' '.join(argv)}")
    return 0
