"""Shared fixtures: the offline Idefics2 processor, a tiny-run config, test images (helpers: tests/helpers.py);
the tables of cases, whole when pytest-xdist runs the tests in two processes (`make test-faults`)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from idefics2_ft.models import build_processor
from tests.helpers import ROOT, TINY_RUN, CaseTable, compose_config


@pytest.fixture
def tiny_run_cfg(tmp_path, tiny_cache):
    def make(*extra: str, run_dir: Path | None = None):
        overrides = [
            *TINY_RUN,
            f"model.tiny.cache_dir={tiny_cache}",
            f"run_dir={run_dir or tmp_path / 'run'}",
            "name=test",
        ]
        return compose_config(overrides + list(extra))

    return make


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_base")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_cache):
    """One tiny run trained once for the session, for the tests that only read it (they write
    their evaluations and exports into folders of their own or beside it): ``(run_dir, metrics)``."""
    from idefics2_ft.tasks.train import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    overrides = [*TINY_RUN, f"model.tiny.cache_dir={tiny_cache}", f"run_dir={run_dir}", "name=t"]
    overrides += ["trainer.max_steps=6", "optim.lr=5e-3", "eval.before_training=true"]
    return run_dir, train(compose_config(overrides))


@pytest.fixture(scope="session")
def processor():
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return build_processor(image_seq_len=4, longest_edge=64)


@pytest.fixture
def red():
    return Image.new("RGB", (64, 64), (255, 0, 0))


@pytest.fixture
def blue():
    return Image.new("RGB", (48, 64), (0, 0, 255))


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skip them (with the reason) where there is none. A module that writes
    its own table from a plain list ``TABLE`` (not a ``CaseTable``) runs on one pytest-xdist worker
    (``--dist loadgroup``), so that its table holds every case."""
    import torch

    for item in items:
        table = getattr(getattr(item, "module", None), "TABLE", None)
        if isinstance(table, list) and not isinstance(table, CaseTable):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- tables of cases (CaseTable)
@pytest.fixture(autouse=True)
def _case_table_rows(request):
    """The rows this test added to each CaseTable go with its report (to the controlling process
    under pytest-xdist), with the test's place in the collection for the order."""
    before = {name: len(table) for name, table in CaseTable.tables.items()}
    yield
    for name, table in CaseTable.tables.items():
        rows = [[str(cell) for cell in row] for row in table[before.get(name, 0) :]]
        if rows:
            order = request.session.items.index(request.node)
            request.node.user_properties.append(("case_table", [name, list(table.columns), order, rows]))


_CASE_ROWS: dict[str, tuple[list[str], list[tuple[int, list[list[str]]]]]] = {}


def pytest_runtest_logreport(report):
    if report.when != "teardown":
        return
    for key, value in report.user_properties:
        if key == "case_table":
            name, columns, order, rows = value
            _CASE_ROWS.setdefault(name, (columns, []))[1].append((order, rows))


def pytest_sessionfinish(session):
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller writes the tables
        return
    for name, (columns, parts) in _CASE_ROWS.items():
        out = ROOT / "outputs" / name
        out.parent.mkdir(exist_ok=True)
        out.write_text(CaseTable.markdown(columns, [row for _, rows in sorted(parts) for row in rows]))
