"""objective=dpo's mistakes are refused before anything loads, each naming the key and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from idefics2_ft.config import ConfigError
from idefics2_ft.run_folder import RunFolderError, starting_adapter
from idefics2_ft.tasks.train import check_adapter_base, validate_all
from idefics2_ft.training.preference_module import reference_of
from tests.helpers import compose_config

ROOT = Path(__file__).resolve().parents[2]


def problems_of(tmp_path, *overrides: str) -> str:
    cfg = compose_config(["objective=dpo", f"run_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ConfigError) as err:
        validate_all(cfg)
    return str(err.value)


def test_the_default_dpo_config_passes_and_its_reference_is_the_base_or_the_adapter(tmp_path):
    cfg = compose_config(["objective=dpo", f"run_dir={tmp_path}"])
    validate_all(cfg)
    assert reference_of(cfg.objective, None) == "base" and reference_of(cfg.objective, "RUN") == "adapter"
    simpo = compose_config(["objective=dpo", "objective.loss=[simpo]", f"run_dir={tmp_path}"])
    assert reference_of(simpo.objective, "RUN") == "none"  # reference-free: no pass paid for nothing


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["objective.beta=0"], "objective.beta=0.0: must be above 0"),
        (["objective.beta=-0.1"], "objective.beta=-0.1: must be above 0"),
        (["objective.loss=[sigmod]"], "'sigmod' is not a preference loss. Did you mean 'sigmoid'?"),
        (["objective.loss=[simpo]", "objective.reference=base"], "simpo are reference-free, but a reference is set"),
        (["objective.loss=[sigmoid]", "objective.reference=none"], "sigmoid compare the policy with a reference"),
        (["objective.loss=[sigmoid,simpo]"], "combine losses of one kind"),
        (["objective.reference=adapter"], "objective.reference=adapter needs the adapter the run starts from"),
        (["objective.loss=[sigmoid,sft]", "objective.loss_weights=[1.0]"], "one weight per loss"),
        (["peft=full"], "objective=dpo with peft=full"),
    ],
)
def test_a_bad_objective_is_refused_with_its_fix(tmp_path, overrides, says):
    assert says in problems_of(tmp_path, *overrides)


def test_every_problem_is_listed_at_once_with_the_rest_of_the_config(tmp_path):
    said = problems_of(tmp_path, "objective.beta=0", "optim.lr=0")
    assert "objective.beta=0.0" in said and "optim.lr=0" in said


def test_model_adapter_names_an_unfinished_run_and_how_to_finish_it(tmp_path):
    run = tmp_path / "sft"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: sft\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(RunFolderError, match=r"model.adapter=.*holds no trained adapter: the run did not finish"):
        starting_adapter(str(run))
    with pytest.raises(RunFolderError, match="no such folder"):
        starting_adapter(str(tmp_path / "nowhere"))
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/bases/a"}))
    assert starting_adapter(str(run)) == run / "adapter"
    assert starting_adapter(str(run / "adapter")) == run / "adapter"
    check_adapter_base(run / "adapter", "/bases/a")
    with pytest.raises(ConfigError, match=r"was trained on /bases/a, and this run loads /bases/b"):
        check_adapter_base(run / "adapter", "/bases/b")


def test_a_bad_objective_on_the_command_line_exits_2_before_loading(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "objective=dpo", "objective.beta=0", f"run_dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 2, (done.stdout + done.stderr)[-2000:]
    assert "objective.beta=0.0: must be above 0" in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()
