"""The one writer of output folders and files: atomic, and never over something it did not write.

Every command that writes a folder a user names (``export.out_dir``, ``evaluate out_dir=``) or that
a run keeps (``adapter/``, ``metrics.json``) writes through here:

- ``claim_output`` decides *before any work* whether a target may be written. A folder that exists
  is replaced only when a marker file (``.idefics2-ft-output.json``) says it is an earlier output of
  the same kind from the same run; an empty folder is used; anything else is refused, naming the
  path, what is there, and the fix. With a run folder given, the run folder itself, a folder that
  contains it, and the places where the run keeps its own files are refused too.
- ``Output.writing()`` yields a temporary sibling folder (``.NAME.partial-PID``), and only once the
  block ends without an exception is the folder marked complete and renamed into place. An
  interrupted write (an error, a signal, ``kill -9``) leaves no folder at the target; a later write
  removes the partial folders that dead processes left (they carry the marker, never anything else).
- ``atomic_write_text`` writes one file through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = ".idefics2-ft-output.json"  # {"kind", "owner", "complete", "pid", "written"}
PARTIAL = ".partial-"  # .NAME.partial-PID: a write in progress, or one a kill cut short
LISTED = 5  # entries named in a refusal


class OutputRefused(ValueError):
    """A target that may not be written: the message names the path, what is there, and the fix."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:  # the temporary file: ours, replaced over path below
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # our own temporary file, never the target
        raise


def read_marker(folder: Path) -> dict | None:
    """The marker of an output folder, or None (no marker, or one that does not parse)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


@dataclass(frozen=True)
class Output:
    """A target that ``claim_output`` accepted. ``replaces`` is True when an earlier output of the
    same kind and run is there (it is replaced once the new one is complete)."""

    path: Path
    kind: str
    owner: str
    replaces: bool
    run_dir: str | None = None  # the run folder it was written from (a copy of a run is another writer)

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """A temporary folder to write into; renamed over ``path`` when the block ends without an exception.

        Raises:
            OutputRefused: the target changed since it was claimed (another process wrote there).
        """
        remove_dead_partials(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.parent / f".{self.path.name}{PARTIAL}{os.getpid()}"
        if tmp.exists():  # our own pid's leftover (a pid reused after a kill): it carries our marker
            _remove_ours(tmp)
        tmp.mkdir()
        marker = {"kind": self.kind, "owner": self.owner, "complete": False, "pid": os.getpid()}
        atomic_write_text(tmp / MARKER, json.dumps(marker))
        try:
            yield tmp
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.name != MARKER)
            done = {**marker, "complete": True, "written": _now(), "run_dir": self.run_dir, "files": files}
            atomic_write_text(tmp / MARKER, json.dumps(done))
            self._swap_in(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # the partial folder this call created
            raise

    def _swap_in(self, tmp: Path) -> None:
        """Rename ``tmp`` over the target: an earlier output of ours (or an empty folder) is moved aside first."""
        old = None
        if self.path.exists():
            if not self.replaces and any(self.path.iterdir()):
                raise OutputRefused(
                    f"{self.path} was filled by something else while this {self.kind} was written: nothing replaced; "
                    f"the new {self.kind} is discarded."
                )
            old = self.path.parent / f".{self.path.name}{PARTIAL}old-{os.getpid()}"
            try:
                os.rename(self.path, old)
            except OSError as err:  # a mount point (EBUSY) or the like: claim_output refuses those first
                raise OutputRefused(
                    f"{self.path} cannot be replaced ({err.strerror}): the new {self.kind} is discarded. Give a "
                    f"subfolder of it instead, such as {self.path / self.kind}."
                ) from None
        os.rename(tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # the earlier output of this kind and run, or an empty folder
            if self.replaces:
                log.info("Replaced the earlier %s of this run in %s", self.kind, self.path)


def remove_dead_partials(target: Path) -> list[Path]:
    """Remove the partial folders of ``target`` that a dead process left (each carries our marker)."""
    removed = []
    for path in target.parent.glob(f".{target.name}{PARTIAL}*") if target.parent.is_dir() else ():
        pid = path.name.rsplit("-", 1)[-1]
        moved_aside = path.name.endswith(f"{PARTIAL}old-{pid}")  # an earlier output, renamed by _swap_in
        if not moved_aside and not (path.is_dir() and read_marker(path) is not None):
            continue  # not ours to remove
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # a write in progress in another process
        _remove_ours(path)
        removed.append(path)
    if removed:
        log.warning("Removed %d partial output folder(s) a stopped write left behind: %s", len(removed), removed)
    return removed


def _remove_ours(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:LISTED])
    return shown + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")


def _added_files(folder: Path, marker: dict) -> str:
    """The files in an earlier output that its writer did not write (its marker lists what it wrote),
    named for a refusal; empty when there are none (or the marker predates the list)."""
    if "files" not in marker:
        return ""
    written = set(marker["files"])
    added = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name != MARKER and str(p.relative_to(folder)) not in written
    )
    return ", ".join(added[:LISTED]) + (f" and {len(added) - LISTED} more" if len(added) > LISTED else "")


def claim_output(
    path: str | Path,
    kind: str,
    owner: str | tuple[str, ...],
    key: str,
    run_root: str | Path | None = None,
    run_own: Iterable[str] = (),
    legacy: Callable[[Path], bool] | None = None,
) -> Output:
    """Check, before any work, that ``path`` may receive an output of ``kind`` written for ``owner``.

    Args:
        path: the target folder.
        kind: what is written (``export``, ``evaluation``, ...): an output of another kind is never replaced.
        owner: the run it is written for (its identity; several: the first is written, any is accepted):
            another run's output is never replaced.
        key: the setting that names the target, for the fix (``export.out_dir``).
        run_root: the run folder, when the output belongs to one.
        run_own: the names of the run's own files and folders in ``run_root`` (``checkpoints``, ...).
        legacy: a test for an earlier output of this kind written before markers existed.

    Returns:
        The accepted target.

    Raises:
        OutputRefused: naming the path, what is there, and the fix.
    """
    path = Path(path)
    where = path.resolve()
    owners = (owner,) if isinstance(owner, str) else tuple(owner)
    if run_root is not None:
        root = Path(run_root).resolve()
        if where == root:
            raise OutputRefused(
                f"{key}={path} is the run folder itself: writing the {kind} there would replace the run "
                f"(checkpoints, config, metrics). Nothing was written; choose a folder of its own, such as "
                f"{Path(run_root) / kind}."
            )
        if root in where.parents:
            part = where.relative_to(root).parts[0]
            if part in set(run_own) or part.startswith("config.resume-"):
                raise OutputRefused(
                    f"{key}={path} lies in {part}, where the run keeps its own files: writing the {kind} there "
                    f"would replace them. Nothing was written; choose a folder of its own, such as "
                    f"{Path(run_root) / kind}."
                )
        elif where in root.parents:
            raise OutputRefused(
                f"{key}={path} contains the run folder {run_root}: writing the {kind} there would replace the run. "
                f"Nothing was written; choose a folder of its own, such as {Path(run_root) / kind}."
            )
    replaces = False
    this_run = str(Path(run_root).resolve()) if run_root is not None else None
    if where.exists() or path.is_symlink():
        if not where.is_dir():
            raise OutputRefused(
                f"{key}={path} is a file, not a folder: nothing was written; choose a folder for the {kind}."
            )
        if os.path.ismount(where):
            raise OutputRefused(
                f"{key}={path} is a mount point: a folder that cannot be renamed into place. Nothing was written; "
                f"give a subfolder of it, such as {path / kind}."
            )
        marker = read_marker(where)
        outside = this_run is not None and Path(this_run) not in where.parents
        copied = (
            outside
            and marker is not None
            and marker.get("owner") in owners
            and marker.get("run_dir") not in (None, this_run)
        )
        if marker is not None and marker.get("kind") == kind and marker.get("owner") in owners and not copied:
            extras = _added_files(where, marker)
            if extras:
                raise OutputRefused(
                    f"{key}={path} holds the earlier {kind} of this run and files it did not write ({extras}): "
                    f"nothing was written, and they are kept. Move them away, or choose another {key}."
                )
            replaces = True
        elif copied:
            raise OutputRefused(
                f"{key}={path} holds the {marker.get('kind')} written from {marker.get('run_dir')}, a copy of this "
                f"run that has gone its own way: it is not replaced. Nothing was written; choose another {key}."
            )
        elif marker is not None and marker.get("complete"):
            whose = "this run" if marker.get("owner") in owners else f"another run ({marker.get('owner')})"
            raise OutputRefused(
                f"{key}={path} holds the {marker.get('kind')} of {whose}: it is not replaced by this {kind}. "
                f"Nothing was written; choose another {key}, or remove that folder yourself."
            )
        elif any(where.iterdir()):
            if legacy is not None and legacy(where):
                replaces = True
            else:
                raise OutputRefused(
                    f"{key}={path} already holds files that are not an earlier {kind} of this run "
                    f"({_listing(where)}): nothing was written, and they are kept. Choose another {key} "
                    "(a new or empty folder), or move those files away."
                )
    writable = next((p for p in [where, *where.parents] if p.exists()), None)
    if writable is not None and not os.access(writable, os.W_OK | os.X_OK):
        raise OutputRefused(
            f"{key}={path}: {writable} is not writable (a read-only run folder or snapshot?). Nothing was written; "
            f"set {key} to a folder you can write."
        )
    return Output(where, kind, owners[0], replaces, this_run)


def claim_output_file(path: str | Path, kind: str, key: str) -> Path:
    """Check, before any work, that the single file ``path`` may receive an output of ``kind``: a new
    file, or one this command wrote before (a JSON object whose ``written_by`` is ``kind``).

    Raises:
        OutputRefused: the file exists and is something else, or is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputRefused(f"{key}={path} is a folder: give a file name for the {kind}.")
    if path.exists():
        try:
            ours = json.loads(path.read_text(encoding="utf-8")).get("written_by") == kind
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OutputRefused(
                f"{key}={path} already exists and is not an earlier {kind}: it is kept, and nothing was written. "
                f"Choose another {key}, or remove that file yourself."
            )
    return path
