"""The command line as Hydra users expect it: help that lists the recipes and groups, ``--cfg job``,
``--info``, a recipe of one's own through ``hydra.searchpath``, and the ``idefics2-ft`` dispatcher."""

from __future__ import annotations

import subprocess
import sys

from idefics2_ft.cli import COMMANDS, main
from idefics2_ft.config import CONF_DIR
from tests.helpers import ROOT


def train_py(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_recipe_and_group_option_and_no_schema():
    out = train_py("--help")
    assert out.returncode == 0
    for recipe in (CONF_DIR / "recipe").glob("*.yaml"):
        assert f"  {recipe.stem} " in out.stdout
    for group in ("data", "model", "peft", "logger", "strategy"):
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        line = next(line for line in out.stdout.splitlines() if line.strip().startswith(f"{group}="))
        assert sorted(o.strip() for o in line.split("=", 1)[1].split(",")) == options
    assert "_schema" not in out.stdout  # Hydra's own help lists the structured schemas as options
    assert "hydra.searchpath=[file://DIR]" in out.stdout and "--cfg job" in out.stdout


def test_cfg_job_and_info_work_as_in_any_hydra_app(tmp_path):
    out = train_py("recipe=docvqa_qlora", "peft.r=32", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "name: docvqa_qlora" in out.stdout and "r: 32" in out.stdout
    assert not (tmp_path / "outputs").exists()  # printing the config makes no run folder
    info = train_py("--info", "searchpath", cwd=tmp_path)
    assert info.returncode == 0 and str(CONF_DIR) in info.stdout


def test_a_recipe_of_ones_own_outside_the_package(tmp_path):
    mine = tmp_path / "my_conf" / "recipe"
    mine.mkdir(parents=True)
    (mine / "my_docs.yaml").write_text(
        "# @package _global_\n# DocVQA with a wider adapter\ndefaults:\n  - docvqa_qlora\nname: my_docs\npeft:\n  r: 64\n"
    )
    out = train_py("recipe=my_docs", "hydra.searchpath=[file://my_conf]", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "name: my_docs" in out.stdout and "r: 64" in out.stdout
    assert "name_or_path: HuggingFaceM4/idefics2-8b" in out.stdout  # the rest comes from docvqa_qlora


def test_the_dispatcher_lists_commands_and_refuses_an_unknown_one(capsys):
    assert main([]) == 0
    said = capsys.readouterr().out
    assert all(f"  {name} " in said for name in COMMANDS)
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err
    assert main(["prefetch", "recipe=easyvqa_tiny"]) == 0  # the demo needs nothing from the Hub
    assert "nothing to fetch" in capsys.readouterr().out
