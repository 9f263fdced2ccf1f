"""The README and docs/ say only what works: every command, make target, script and page they name exists."""

from __future__ import annotations

import re

from idefics2_ft.cli import COMMANDS
from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def texts() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in PAGES}


def test_every_idefics2_ft_command_named_exists():
    named = {(page, m) for page, text in texts().items() for m in re.findall(r"idefics2-ft ([a-z]+)\b", text)}
    assert {m for _, m in named} & set(COMMANDS)  # the reader finds them
    unknown = sorted((page, m) for page, m in named if m not in COMMANDS and m not in ("command",))
    assert unknown == []


def test_every_make_target_named_exists():
    targets = set(re.findall(r"^([a-z0-9-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = {(page, m) for page, text in texts().items() for m in re.findall(r"`make ([a-z0-9-]+)", text)}
    assert sorted((page, m) for page, m in named if m not in targets) == []


def test_every_script_and_path_named_exists():
    paths = {
        (page, p)
        for page, text in texts().items()
        for p in re.findall(r"`((?:scripts|tests|idefics2_ft|docs)/[\w./-]+\.(?:py|md|sh|yaml|png))", text)
    }
    missing = sorted(
        (page, p) for page, p in paths if not (ROOT / p).exists() and "NAME" not in p
    )  # NAME: a placeholder
    assert missing == []


def test_every_link_to_a_page_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text()):
            if not (page.parent / target).resolve().is_file():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
