"""Compute nodes without internet: the pre-flight fails in seconds with the fix, and a run after
``prefetch`` reads the cache only.

The Hub is played by a local server (``fake_hub.py``) that serves the tiny base as the model repo
``local/tiny-idefics2``; "no network" is an endpoint where nothing listens.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.fake_hub import FakeHub
from tests.helpers import IDEFICS2_FT, ROOT, TINY_RUN

REPO = "local/tiny-idefics2"


def dead_endpoint() -> str:
    """A local port with nothing listening: connections are refused at once, as on a closed node."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def env_for(hf_home, endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    return {**env, "HF_HOME": str(hf_home), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


def run(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return out, time.perf_counter() - started


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    """The tiny base (no stage 1) saved as a model folder, as a Hub repo would hold it."""
    from idefics2_ft.demo import ensure_tiny_base
    from tests.helpers import compose_config

    cache = tmp_path_factory.mktemp("tiny_base")
    cfg = compose_config([*TINY_RUN, f"model.tiny.cache_dir={cache}", "run_dir=unused"])
    return ensure_tiny_base(cfg)


def train_args(run_dir, *extra: str) -> list[str]:
    model = [o for o in TINY_RUN if not o.startswith("model.tiny.")]
    return [
        str(ROOT / "train.py"),
        *model,
        f"model.name_or_path={REPO}",
        f"run_dir={run_dir}",
        "trainer.max_steps=2",
        *extra,
    ]


def test_without_network_and_cache_the_run_fails_in_seconds_naming_the_fix(tmp_path):
    out, seconds = run(train_args(tmp_path / "run"), env_for(tmp_path / "hf", dead_endpoint()))
    said = out.stdout + out.stderr
    assert out.returncode == 2, said[-2000:]
    assert seconds < 60  # the import of torch and transformers is most of it
    assert "Traceback" not in said
    assert f"model {REPO}: everything (not in the cache)" in said
    command = next(line.strip() for line in said.splitlines() if line.strip().startswith("idefics2-ft prefetch"))
    assert f"model.name_or_path={REPO}" in command.split()  # the same overrides: the same needs
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder


def test_offline_flag_fails_at_once_too(tmp_path):
    env = env_for(tmp_path / "hf", "https://huggingface.co", HF_HUB_OFFLINE="1")
    out, _ = run(train_args(tmp_path / "run"), env)
    said = out.stdout + out.stderr
    assert out.returncode == 2, said[-2000:]
    assert "(HF_HUB_OFFLINE=1)" in said and "idefics2-ft prefetch" in said


def test_prefetch_then_a_run_without_network_reads_the_cache_only(tmp_path, tiny_repo):
    hf_home = tmp_path / "hf"
    with FakeHub({REPO: tiny_repo}) as hub:
        out, _ = run([IDEFICS2_FT, "prefetch", f"model.name_or_path={REPO}"], env_for(hf_home, hub.url))
        assert out.returncode == 0, out.stderr[-2000:]
        assert "everything is in the cache" in out.stdout
        assert any("/resolve/" in r and r.endswith("model.safetensors") for r in hub.requests)
        served = len(hub.requests)
    snapshot = next((hf_home / "hub" / "models--local--tiny-idefics2" / "snapshots").iterdir())
    assert (snapshot / "model.safetensors").is_file() and (snapshot / "config.json").is_file()

    # the node: the endpoint is gone, and no offline variable is set: the pre-flight finds out and goes offline
    run_dir = tmp_path / "run"
    out, _ = run(train_args(run_dir), env_for(hf_home, dead_endpoint()))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Hub: offline" in out.stdout and f"model {REPO} from the cache" in out.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 2
    assert json.loads((run_dir / "base_model.json").read_text())  # the base is recorded as for any run
    assert len(hub.requests) == served  # the server is down; nothing else was asked of it

    # and with HF_HUB_OFFLINE=1 set, as docs/scaling-out.md says for the nodes
    out, _ = run(train_args(tmp_path / "run2"), env_for(hf_home, dead_endpoint(), HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_prepared_dataset_is_found_where_datasets_keeps_it(tmp_path, monkeypatch):
    """DocVQA prepared by ``datasets`` lies in <cache>/HuggingFaceM4___document_vqa/<config>/<version>/<hash>."""
    import datasets

    from idefics2_ft.hub import Need, cached_dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    need = Need("dataset", "HuggingFaceM4/DocumentVQA", splits=("train", "validation"))
    assert cached_dataset(need) == ["train", "validation"]
    prepared = tmp_path / "HuggingFaceM4___document_vqa" / "default" / "0.0.0" / "0123abcd"
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text(json.dumps({"splits": {"train": {"num_examples": 39463}}}))
    assert cached_dataset(need) == ["validation"]
