"""The package's architecture holds: no import cycle, arrows only downward, documented names exist.

Imports are read from the source (``ast``), function-local ones included: a cycle closed inside a
function is still a cycle, it only fails later.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "idefics2_ft"

# The layers, lowest first. A room (a first-level module or folder of the package) imports only
# rooms of lower layers; arrows inside a layer are forbidden unless listed in SIDEWAYS. The
# architecture page (docs/architecture.md) lists the same layers, one line each (tested below).
LAYERS = [
    (
        "foundations",
        {
            *("config", "data", "models", "metrics", "presets"),
            *("versions", "ranks", "hardware", "console", "stops", "run_folder"),
        },
    ),
    ("components", {"training", "planning", "reporting", "hub", "demo"}),
    ("tasks", {"tasks"}),
    ("entry points", {"cli"}),
]
LAYER_OF = {room: i for i, (_, rooms) in enumerate(LAYERS) for room in rooms}
SIDEWAYS: set[tuple[str, str]] = {
    # validate lists the data keys' problems with the rest, and the data room owns them (data/checks.py)
    ("config", "data"),
    # an evaluation preset rewrites a data row as its harness asks it, and reads options as its metric does
    ("presets", "data"),
    ("presets", "metrics"),
}  # (from, to) arrows allowed inside a layer
MAX_DEPTH = 4  # entry points -> tasks -> components -> foundations
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path], name: str | None = None) -> set[str]:
    """The package modules that ``path`` (module ``name``) imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    name = name or module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import idefics2_ft.data.collator as c` and the like
                target = target.rpartition(".")[0]
            if target.startswith("idefics2_ft") and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_graph_reader_sees_a_cycle_through_a_function_local_import(tmp_path):
    # the checker itself: a cycle closed inside a function is found
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import idefics2_ft.b\n")
    b.write_text("def f():\n    from idefics2_ft import a\n")
    modules = {"idefics2_ft.a": a, "idefics2_ft.b": b}
    graph = {"idefics2_ft.a": {"idefics2_ft.b"}, "idefics2_ft.b": imports_of(b, modules, "idefics2_ft.b")}
    assert cycles(graph) == [["idefics2_ft.a", "idefics2_ft.b"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_every_room_has_a_layer():
    rooms = {room(m) for m in package_modules()} - {None}
    assert rooms <= set(LAYER_OF), f"rooms without a layer in LAYERS: {sorted(rooms - set(LAYER_OF))}"


def room_graph(graph: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
    """Which rooms import which (a room's imports of itself left out)."""
    rooms: dict[str, set[str]] = {}
    for module, targets in (graph or import_graph()).items():
        if room(module) is None:
            continue  # the top-level __init__ re-exports lazily, by name
        rooms.setdefault(room(module), set()).update(
            room(t) for t in targets if room(t) is not None and room(t) != room(module)
        )
    return rooms


def depth(rooms: dict[str, set[str]]) -> int:
    """The longest chain of rooms, counted in rooms (a room that imports none is 1 deep); an allowed
    sideways arrow (``SIDEWAYS``) stays in its layer, so it adds no depth."""
    memo: dict[str, int] = {}

    def step(a: str, b: str) -> int:
        return 0 if (a, b) in SIDEWAYS else 1

    def of(r: str) -> int:
        if r not in memo:
            memo[r] = max((step(r, t) + of(t) for t in rooms.get(r, ())), default=1)
        return memo[r]

    return max(of(r) for r in rooms)


def test_imports_only_point_down():
    wrong = [
        f"{a} -> {b}"
        for a, targets in room_graph().items()
        for b in targets
        if LAYER_OF[b] > LAYER_OF[a] or (LAYER_OF[b] == LAYER_OF[a] and (a, b) not in SIDEWAYS)
    ]
    assert wrong == []


def test_imports_are_at_most_four_rooms_deep():
    assert depth(room_graph()) <= MAX_DEPTH


def test_the_depth_counts_a_chain_of_rooms():
    assert depth({"cli": {"tasks"}, "tasks": {"training"}, "training": {"models"}, "models": set()}) == 4
    assert depth({"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"e"}, "e": set()}) == 5
    # an allowed sideways arrow (config -> data) keeps the chain in its layer
    assert depth({"tasks": {"training"}, "training": {"config"}, "config": {"data"}, "data": set()}) == 3


def test_the_library_never_imports_the_demo():
    allowed = {"demo", *LAYERS[-1][1]}  # only the demo itself and the entry points (which register it)
    offenders = [
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        for t in targets
        if room(t) == "demo" and room(m) not in allowed
    ]
    assert offenders == []


def test_the_architecture_page_lists_the_layers_as_the_test_holds_them():
    section = ARCHITECTURE.read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if re.match(r"^\d+\. ", line)]
    assert len(lines) == len(LAYERS)
    for line, (_, rooms) in zip(lines, LAYERS, strict=True):
        named = set(re.findall(r"`(\w+)`", line.split(":", 1)[0]))
        assert named == rooms, line


def test_the_core_never_compares_a_model_name_with_the_demos():
    """``model.name_or_path`` reaches the demo's base only through the stand-in registry."""
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in PACKAGE.rglob("*.py")
        if "demo" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"""[=!]=\s*["']tiny["']|["']tiny["']\s*[=!]=""", line)
    ]
    assert offenders == []


# ---------------------------------------------------------------- documented names
DOTTED = re.compile(r"\bidefics2_ft(?:\.\w+)+")
FROM_IMPORT = re.compile(r"from\s+(idefics2_ft(?:\.\w+)*)\s+import\s+(?:\(([^)]*)\)|([\w ,]+))")


def documented_names() -> set[str]:
    """Every ``idefics2_ft...`` name in the README, docs/ and scripts/: dotted paths and ``from X import a, b``."""
    texts = [(ROOT / "README.md").read_text()]
    texts += [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    texts += [p.read_text() for p in sorted((ROOT / "scripts").rglob("*.py"))]
    texts += [(ROOT / "train.py").read_text()]
    names: set[str] = set()
    for text in texts:
        names.update(DOTTED.findall(text))
        for module, grouped, inline in FROM_IMPORT.findall(text):
            for item in (grouped or inline).replace("\n", " ").split(","):
                item = item.split(" as ")[0].strip()
                if item:
                    names.add(f"{module}.{item}")
    return names


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_documented_names_exist():
    names = documented_names()
    assert "idefics2_ft.data.Idefics2Collator" in names  # the reader finds what the README names
    missing = sorted(n for n in names if not resolves(n))
    assert missing == []


def test_the_name_checker_catches_a_missing_name():
    assert resolves("idefics2_ft.data.Idefics2Collator")
    assert not resolves("idefics2_ft.data.NoSuchCollator")
    assert not resolves("idefics2_ft.no_such_room.thing")


@pytest.mark.parametrize(
    "package",
    [
        "idefics2_ft",
        "idefics2_ft.config",
        "idefics2_ft.data",
        "idefics2_ft.models",
        "idefics2_ft.training",
        "idefics2_ft.demo",
    ],
)
def test_public_names_import_from_the_package(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


def test_the_layout_table_matches_the_folders():
    """Every path the architecture page's layout table names exists, and every module of the package is in it."""
    table = ARCHITECTURE.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed: set[Path] = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        paths = re.findall(r"`([^`]+)`", first_cell)
        folder = Path(paths[0]).parent if not paths[0].endswith("/") else Path(paths[0])
        for i, p in enumerate(paths):
            path = Path(p) if i == 0 or "/" in p else folder / p  # `a/b.py`, `c.py` = a/b.py, a/c.py
            assert (ROOT / path).exists(), f"the layout table names {path}, which does not exist"
            listed.add(path)
    for module in PACKAGE.rglob("*.py"):
        rel = module.relative_to(ROOT)
        covered = rel in listed or any(parent in listed for parent in rel.parents) or rel.name == "__init__.py"
        assert covered, f"{rel} is in no row of the layout table in docs/architecture.md"
