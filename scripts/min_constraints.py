"""Print pip constraints that pin every dependency in pyproject.toml to its declared lower bound.

    python scripts/min_constraints.py [EXTRA ...] > min.txt
    pip install -c min.txt -e ".[dev]"

`make test-min` runs the fast tier on exactly these versions, so that a lower bound in
pyproject.toml is a version the code was seen to work with. A dependency with no lower bound is an
error: it would let pip pick anything.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")


def lower_bounds(extras: list[str], pyproject: Path = PYPROJECT) -> dict[str, str]:
    """``{package: lowest version}`` for the dependencies and the named extras.

    Raises:
        ValueError: a requirement without ``>=`` (or ``==``), or an unknown extra.
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise ValueError(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    requirements = list(project["dependencies"]) + [r for extra in extras for r in optional[extra]]
    bounds: dict[str, str] = {}
    for requirement in requirements:
        name, spec = REQUIREMENT.match(requirement).groups()
        low = re.search(r"(?:>=|==)\s*([^,\s]+)", spec)
        if low is None:
            raise ValueError(
                f"{requirement!r} in pyproject.toml has no lower bound (>=): add the lowest version that works"
            )
        bounds[name.lower()] = low.group(1)
    return bounds


def main(argv: list[str]) -> int:
    try:
        bounds = lower_bounds(argv)
    except ValueError as err:
        sys.stderr.write(f"min_constraints: {err}\n")
        return 2
    sys.stdout.write("".join(f"{name}=={version}\n" for name, version in bounds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
