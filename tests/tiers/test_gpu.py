"""CUDA paths (tier `gpu`: `make test-gpu`, skipped without a GPU): bf16 QLoRA with paged 8-bit AdamW."""

import csv

import pytest
import torch

from idefics2_ft.tasks.train import train


@pytest.mark.gpu
def test_tiny_qlora_trains_on_cuda_in_bf16(tiny_run_cfg, tmp_path):
    cfg = tiny_run_cfg("trainer.accelerator=gpu", "model.dtype=auto", "trainer.precision=auto", "optim.optimizer=auto")
    metrics = train(cfg)
    assert metrics["train/steps"] == 4 and metrics["val/n_questions"] == 12
    assert torch.cuda.max_memory_allocated() > 0
    assert metrics["hardware"].startswith("1 x ")  # describe_run names the GPU
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"perf/peak_memory_gb", "perf/mfu", "perf/tokens_per_s"} <= logged


@pytest.mark.gpu
def test_flash_attention_2_when_installed(tiny_run_cfg):
    pytest.importorskip("flash_attn")
    cfg = tiny_run_cfg("trainer.accelerator=gpu", "model.dtype=bfloat16", "model.attn_implementation=flash_attention_2")
    assert train(cfg)["train/steps"] == 4
