"""objective=dpo killed with SIGKILL after a checkpoint, then resumed (`make test-faults`): the resumed
run ends with the uninterrupted run's policy adapter, and the reference is built again from
model.adapter (a checkpoint holds the policy's trainable weights only). A row of outputs/fault_table.md.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idefics2_ft.demo import formats
from tests.helpers import assert_same_adapters, training_tolerance
from tests.tiers.test_faults import TABLE, adapter, base_overrides, run, train_py

pytestmark = pytest.mark.faults

# the resumed process writes the reference adapter it trains against, as it starts training
RECORD_REFERENCE = """
import os, runpy, sys
from safetensors.torch import save_file
from idefics2_ft.training.preference_module import PreferenceModule

start = PreferenceModule.on_train_start
def on_train_start(self):
    start(self)
    reference = {k: v.detach().clone().contiguous() for k, v in self.model.named_parameters() if ".reference." in k}
    save_file(reference, os.environ["REFERENCE_OUT"], metadata={"step": str(self.global_step)})
PreferenceModule.on_train_start = on_train_start
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A finished SFT run (LoRA dropout on, so the DPO policy draws from the RNG) and its tiny base."""
    root = tmp_path_factory.mktemp("dpo_faults")
    cache, run_dir = root / "tiny_base", root / "sft"
    rc, out, _ = run(*base_overrides(cache, run_dir, "trainer.max_steps=3", "optim.lr=5e-3", "peft.dropout=0.1"))
    assert rc == 0, out[-2000:]
    return cache, run_dir, formats.write_trl_pairs(root / "pairs", rows=12)


def dpo_overrides(sft, run_dir: Path, *extra: str) -> list[str]:
    cache, sft_dir, pairs = sft
    return base_overrides(
        cache, run_dir, "objective=dpo", f"model.adapter={sft_dir}", "data=hub", f"data.path={pairs}",
        "data.val_split=test", "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=1", "eval.at_end=false",
        *extra,
    )  # fmt: skip


def test_a_dpo_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_policy(sft, tmp_path):
    _, sft_dir, _ = sft
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    rc, out, _ = run(*dpo_overrides(sft, straight))
    assert rc == 0, out[-2000:]

    last = killed / "checkpoints" / "last.ckpt"
    proc = train_py(*dpo_overrides(sft, killed))
    while proc.poll() is None and not (last.is_file() and torch.load(last, weights_only=False)["global_step"] >= 2):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    state = torch.load(last, weights_only=False)
    step = state["global_step"]
    assert 2 <= step < 6 and not (killed / "adapter").exists()
    # the checkpoint holds the policy's weights only: the frozen reference is not in it
    assert state["state_dict"] and all(".default." in k for k in state["state_dict"])
    assert not any("reference" in k for k in state["trainable_names"])

    env = {"REFERENCE_OUT": str(tmp_path / "reference.safetensors")}
    wrapper = tmp_path / "record_reference.py"
    wrapper.write_text(RECORD_REFERENCE)
    rc, out, _ = run(*dpo_overrides(sft, killed, "resume=true"), env=env, wrapper=str(wrapper))
    assert rc == 0, out[-2000:]
    assert f"Step {step}: loss" in out and "as resumed" in out
    # the reference it resumed against is model.adapter's adapter, built again from that folder
    reference = load_file(tmp_path / "reference.safetensors")
    started = adapter(sft_dir)
    assert {k.replace(".reference.", ".") for k in reference} == set(started)
    assert all(torch.equal(v, started[k.replace(".reference.", ".")]) for k, v in reference.items())
    assert_same_adapters(straight, killed)
    # the DPO steps moved the policy off the SFT adapter it copied by more than the tolerance: a bug could show
    moved = max(float((adapter(killed)[k] - started[k]).abs().max()) for k in started)
    assert moved > 10 * training_tolerance(lr=1e-3, steps=6)
    TABLE.append(
        (
            f"objective=dpo killed -9 after the checkpoint of step {step}",
            "resume=true continues; the reference is built again from model.adapter (not in last.ckpt)",
            "-",
            "yes (policy adapter equal to the uninterrupted run's)",
        )
    )
