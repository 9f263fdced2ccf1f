"""One signal policy for a command's whole life: SIGTERM and SIGINT stop it honestly in any phase.

``StopPolicy.install()`` runs first thing in every command (train, evaluate, export), before
anything slow. From then on:

- during start-up (until the first phase begins: imports, Hydra's composition), a signal is held
  and raised as the first phase begins; a second one ends the process at once with the line (an
  exception raised inside an import would leave modules half-initialised and print their traceback);
- outside a deferred block, SIGTERM (``docker stop``, a scheduler's cancel) or SIGINT (Ctrl-C)
  raises ``Interrupted`` at once, naming the phase the command was in;
- inside ``deferred()`` (the fit), a signal only raises a flag: the ranks agree on it at the next
  optimizer-step boundary, save ``last.ckpt`` and stop (``training/callbacks.py``); a second signal
  stops at once.

``Interrupted`` derives from ``BaseException``, as ``KeyboardInterrupt`` does, so ``except Exception``
blocks let it through. Each command catches it once, prints one line (the phase, what on disk is
complete, the command that continues) and exits 128 + the signal: 143 for SIGTERM, 130 for SIGINT.
Lightning's own SIGTERM handling (which ends a validation with exit 0) is switched off on our
Trainers, so it never competes with this one.

Signal handlers belong to the process, so the policy installed last is the one in force
(``active()``); a command installs one and removes it when it ends.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_active: StopPolicy | None = None  # the process's handlers are global: so is the policy that set them
_exiting = False  # set by ``exiting()``: the process is on its way out after a stop


class Interrupted(BaseException):
    """A signal stopped the command; ``str()`` is the one line the user sees."""

    def __init__(self, signum: int, phase: str, done: str = "", command: str = "") -> None:
        self.signum, self.phase, self.done, self.command = signum, phase, done, command
        super().__init__(self.line())

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self) -> str:
        text = f"Stopped by {self.name} during {self.phase}"
        if self.done:
            text += f"; {self.done}"
        if self.command:
            text += f". Continue with: {self.command}"
        return text + "."


class StopPolicy:
    """Where the command is (``phase``), what it has completed on disk (``done``) and the command
    that continues it (``command``): the three parts of the line a stop prints.

    Args:
        command: the command's name, for the first phase (``train``, ``evaluate``, ``export``).
    """

    def __init__(self, command: str) -> None:
        self.phase = f"{command} start-up"
        self.done = "nothing was written yet"
        self.command = ""
        self.signum: int | None = None
        self._deferred = 0
        self._previous: dict[int, Any] = {}
        self._on_signal: list[Callable[[int], None]] = []
        self._rehearse: tuple[str, int] | None = None
        self._starting = True  # until the first phase: see the module's docstring
        self.stopping = False  # a stop is under way: further signals change nothing

    def rehearse(self, spec: str | None) -> None:
        """``PHASE`` or ``PHASE:SIGINT``: send this process the signal (SIGTERM by default) when it enters
        that phase, to rehearse a stop there (``debug.stop_at``; the fault tier uses it)."""
        if spec:
            phase, _, name = spec.partition(":")
            self._rehearse = (phase, int(getattr(signal, name or "SIGTERM")))

    # ---------------------------------------------------------------- lifetime
    def install(self) -> StopPolicy:
        """Take SIGTERM and SIGINT for this policy (from the main thread; elsewhere it does nothing)."""
        global _active
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        _active = self
        return self

    def uninstall(self) -> None:
        global _active
        for signum, handler in self._previous.items():
            if not _exiting:  # after a stop the process stays deaf until it ends (``exiting``)
                signal.signal(signum, handler)
        self._previous.clear()
        if _active is self:
            _active = None

    def __enter__(self) -> StopPolicy:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    # ---------------------------------------------------------------- what the line says
    @contextmanager
    def phase_of(self, name: str, key: str | None = None) -> Iterator[None]:
        """The command is in phase ``name`` (``key``: its short name, for ``rehearse``) while the block runs."""
        if self._starting:
            self._starting = False
            if self.signum is not None:  # held since start-up
                raise self.interrupted()
        before, self.phase = self.phase, name
        if self._rehearse is not None and self._rehearse[0] in (name, key):
            os.kill(os.getpid(), self._rehearse[1])  # delivered before the next bytecode: inside the phase
        try:
            yield
        finally:
            self.phase = before

    def completed(self, done: str, command: str | None = None) -> None:
        """What is complete on disk now, and (when it changes) the command that continues from there."""
        self.done = done
        if command is not None:
            self.command = command

    def on_signal(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(signum)`` on each signal (the launcher of child ranks forwards it to them)."""
        self._on_signal.append(callback)

    # ---------------------------------------------------------------- the handler
    @contextmanager
    def deferred(self) -> Iterator[None]:
        """While the block runs, a first signal only raises the flag (``signum``); a second stops at once."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1

    def interrupted(self, signum: int | None = None) -> Interrupted:
        """The exception for a stop now, in the current phase (later signals are then ignored)."""
        self.stopping = True
        return Interrupted(signum or self.signum or signal.SIGTERM, self.phase, self.done, self.command)

    def _handle(self, signum: int, frame: object) -> None:
        if self.stopping:
            return  # already on its way out (saving the stop's checkpoint, writing its line): let it finish
        first = self.signum is None
        self.signum = signum
        if self._starting:
            if first:
                return  # held: raised as the first phase begins
            os.write(2, f"{self.interrupted(signum)}\n".encode())
            os._exit(128 + signum)  # asked twice during imports: now, without a half-imported traceback
        for callback in self._on_signal:
            callback(signum)
        if self._deferred and first:
            log.warning(
                "%s received: stopping after this step (%s again stops at once)",
                signal.Signals(signum).name,
                "Ctrl-C" if signum == signal.SIGINT else "the signal",
            )
            return
        raise self.interrupted(signum)


def exiting() -> None:
    """The process ends now, after a stop: SIGTERM and SIGINT change nothing from here on.

    A second Ctrl-C sent just after the first one's stop line would otherwise land after a policy put
    the earlier handlers back, or while the interpreter shuts down (Python restores the default
    handlers then), and kill the process with the signal instead of our exit code. Ignoring them at
    the OS level holds until the process is gone; every entry point calls this before it exits after
    ``Interrupted``.
    """
    global _exiting
    _exiting = True
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def active() -> StopPolicy | None:
    """The policy in force in this process, if a command installed one."""
    return _active
