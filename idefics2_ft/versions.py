"""Fail loudly on library versions this toolkit was not tested with (PITFALLS 13)."""

from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version

# (package, lowest tested, first untested major/minor) -- pyproject.toml holds the same ranges.
TESTED = (
    ("transformers", "5.23.0", "6"),
    ("peft", "0.21.2", "0.22"),
    ("lightning", "2.6.6", "2.7"),
)


def check_versions() -> None:
    """Raise RuntimeError naming each installed package outside its tested range, with the fix."""
    problems = []
    for package, low, high in TESTED:
        installed = Version(version(package))
        if not Version(low) <= installed < Version(high):
            problems.append(f"{package} {installed} (tested: >={low},<{high}): pip install '{package}>={low},<{high}'")
    if problems:
        raise RuntimeError(
            "Untested library versions; Idefics2 has silently ignored images in some transformers releases, "
            "so idefics2-ft refuses to guess:\n  " + "\n  ".join(problems)
        )
