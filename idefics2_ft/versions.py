"""Fail loudly on library versions outside the ranges this release declares: a transformers range once ignored Idefics2's images without a word.

The ranges are the package's own requirements (pyproject.toml, as installed: ``importlib.metadata``),
so the guard and pip never disagree. Their lower bounds are what ``make test-min`` runs on.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

# The libraries whose behaviour the training depends on (a transformers release once silently
# ignored Idefics2's images); the others are checked by pip alone.
GUARDED = ("torch", "transformers", "peft", "lightning", "bitsandbytes")


def declared_requirements() -> list[str]:
    """The requirement strings of idefics2-ft: from the installed metadata, else the checkout's pyproject."""
    try:
        return list(requires("idefics2-ft") or [])
    except PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"]) if pyproject.is_file() else []


def check_versions() -> None:
    """Raise RuntimeError naming each guarded package outside its declared range, with the fix."""
    problems = []
    for text in declared_requirements():
        req = Requirement(text)
        if req.marker is not None or req.name not in GUARDED:  # extras carry a marker
            continue
        installed = Version(version(req.name))
        if not req.specifier.contains(installed, prereleases=True):
            problems.append(
                f"{req.name} {installed} (idefics2-ft needs {req.name}{req.specifier}): pip install '{req}'"
            )
    if problems:
        raise RuntimeError(
            "Library versions outside the tested ranges; Idefics2 has silently ignored images in some transformers "
            "releases, so idefics2-ft refuses to guess:\n  " + "\n  ".join(problems)
        )
