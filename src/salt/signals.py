"""Signal handling, in one place: handlers for a ``with`` block, restored after it.

Four users share `Catch`:

* the training loop's stop request (`stop_request`): SIGTERM, SIGUSR1, SIGUSR2 and SIGINT
  (Slurm's cancel, pre-timeout signals, Ctrl-C) only set a flag; the loop saves at the next
  step boundary, then `Catch.pass_on` lets the replaced handler act too (under submitit it
  requeues the job). A second Ctrl-C raises KeyboardInterrupt at once (the loop turns it into
  one line saying what was kept);
* the process that spawns DDP ranks on one node: it records the stop signals and waits for
  the ranks, which got them too; the ranks start with Ctrl-C ignored (`ctrl_c_ignored`) until
  their interpreter is ready for it (`ctrl_c_interrupts`);
* data staging: a signal aborts the copy at once (``act``), except inside `Catch.held`
  sections; the copies are removed, then the signal goes to the handler it replaced, so the
  process ends as it would have without staging;
* the sample writer's command line: the signal is recorded; the writer stops between blocks.

Handlers can only be installed from the main thread; elsewhere a `Catch` installs nothing and
catches nothing. This module imports nothing of salt, so every layer may use it; it is the only
module that installs signal handlers (tests/test_layering.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

__all__ = [
    "ALWAYS",
    "IF_DEFAULT",
    "STOP_SIGNALS",
    "UNLESS_IGNORED",
    "Catch",
    "ctrl_c_ignored",
    "ctrl_c_interrupts",
    "ignore_ctrl_c",
    "lost_interrupts_quiet",
    "stop_request",
]

# When a `Catch` takes a signal over, given the handler installed before it:
ALWAYS = "always"  # whatever is installed
UNLESS_IGNORED = "unless ignored"  # not when ignored on purpose (nohup) or set outside Python
IF_DEFAULT = "if default"  # only when nobody handles it (the default action: terminate)
_WHEN = (ALWAYS, UNLESS_IGNORED, IF_DEFAULT)

# The training loop's stop request: Slurm's cancel, pre-timeout signals (USR1/USR2), Ctrl-C.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")

Handler = Callable[[int, Any], Any] | int | None  # as `signal.getsignal` returns them


class Catch:
    """Handlers for ``signals`` while a ``with`` block runs; what arrived is in `caught`.

    ``signals``: signal names (taken over `ALWAYS`) or ``{name: when}`` with `ALWAYS`,
    `UNLESS_IGNORED` or `IF_DEFAULT`; names this platform lacks are skipped. Each signal is
    recorded in `caught`, then:

    * ``interrupt_twice=True``: a SIGINT after any caught signal raises KeyboardInterrupt
      (a second Ctrl-C stops now) and is not recorded, but sets `again`: a KeyboardInterrupt
      raised in a callback that ignores exceptions (a weakref's, a ``__del__``) is lost, so
      the caller also checks `again` where it can stop (see `lost_interrupts_quiet`);
    * ``act(signum)``: an immediate action (it may raise), called once, for the first signal
      caught; inside `held` sections it waits until the outermost one ends. A forked child
      that inherited the handler does not act: it ends by the signal's default action, as it
      would have without the handler.

    On exit each handler is restored, unless the block installed its own in the meantime.
    A `Catch` may be entered again (not nested); entering clears `caught`.
    """

    def __init__(
        self,
        signals: Iterable[str] | Mapping[str, str],
        *,
        interrupt_twice: bool = False,
        act: Callable[[int], None] | None = None,
    ) -> None:
        when = dict(signals) if isinstance(signals, Mapping) else dict.fromkeys(signals, ALWAYS)
        bad = {name: w for name, w in when.items() if w not in _WHEN}
        if bad:
            raise ValueError(f"Catch: expected one of {_WHEN} for each signal, got {bad}")
        self._when = when
        self._interrupt_twice = interrupt_twice
        self._act = act
        self.caught: list[int] = []
        self._replaced: dict[int, Handler] = {}  # what we replaced, kept after a release
        self._installed: set[int] = set()
        self._held = 0
        self._acted = False
        self._pid = os.getpid()
        self.again = False  # a second Ctrl-C came (interrupt_twice)

    @property
    def first(self) -> int | None:
        """The first signal caught (None: none)."""
        return self.caught[0] if self.caught else None

    @property
    def last(self) -> int | None:
        """The latest signal caught (None: none)."""
        return self.caught[-1] if self.caught else None

    def __enter__(self) -> Catch:
        self.caught, self._replaced, self._installed = [], {}, set()
        self._held, self._acted, self._pid, self.again = 0, False, os.getpid(), False
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for name, when in self._when.items():
            num = getattr(signal, name, None)
            if num is None:
                continue
            current = signal.getsignal(num)
            if when == UNLESS_IGNORED and current in (signal.SIG_IGN, None):
                continue
            if when == IF_DEFAULT and current != signal.SIG_DFL:
                continue
            self._replaced[num] = signal.signal(num, self._handle)
            self._installed.add(num)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release(*self._installed)

    def release(self, *signums: int) -> None:
        """Give these signals back to the handlers they had (before the block ends)."""
        for num in signums:
            if num not in self._installed:
                continue
            self._installed.discard(num)
            if signal.getsignal(num) == self._handle:  # unless the block installed its own
                signal.signal(num, self._replaced[num])

    def release_handled(self) -> None:
        """Give back the signals that somebody handled: keep only those whose default action
        (terminate without clean-up) this `Catch` stands in for."""
        self.release(*(n for n in self._installed if self._replaced[n] != signal.SIG_DFL))

    def _handle(self, signum: int, frame: Any) -> None:
        if self._act is not None and os.getpid() != self._pid:
            signal.signal(signum, signal.SIG_DFL)  # a forked child: as without us
            signal.raise_signal(signum)
            return
        if self._interrupt_twice and self.caught and signum == signal.SIGINT:
            self.again = True
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.caught.append(signum)
        if self._act is not None and self._held == 0 and not self._acted:
            self._acted = True
            self._act(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A section that must not be cut short: ``act`` waits until it ends (so a second
        Ctrl-C cannot leave half a directory behind); then acts on the first signal caught."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if self._act is not None and self.caught and not self._acted and self._held == 0:
            self._acted = True
            self._act(self.caught[0])

    def pass_on(self, signum: int, *, default_action: bool = False) -> None:
        """Let the handler this `Catch` replaced for ``signum`` (else the one installed now)
        act on it too: a Python handler is called (what it raises propagates, e.g.
        KeyboardInterrupt or submitit's exit after a requeue); the default action, with
        ``default_action=True``, ends the process by the signal after flushing stdout and
        stderr; an ignored signal stays ignored."""
        handler = self._replaced.get(signum, signal.getsignal(signum))
        if handler == signal.SIG_DFL:
            if default_action:
                sys.stdout.flush()
                sys.stderr.flush()
                signal.raise_signal(signum)  # the default action: terminate
        elif callable(handler):
            try:
                handler(signum, None)
            except BaseException as err:
                raise err from None  # no "during handling" noise


@contextlib.contextmanager
def ctrl_c_ignored() -> Iterator[None]:
    """Ctrl-C ignored while the block runs (from the main thread; elsewhere nothing changes).
    Processes started in it begin with Ctrl-C ignored: an ignored signal survives exec, and a
    Python interpreter that starts with SIGINT ignored installs no KeyboardInterrupt for it,
    until it calls `ctrl_c_interrupts`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def ctrl_c_interrupts() -> None:
    """Ctrl-C raises KeyboardInterrupt again (Python's own handler), e.g. in a process started
    with it ignored (`ctrl_c_ignored`)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def ignore_ctrl_c() -> None:
    """Ctrl-C ignored from now on (from the main thread): the command is ending and has said
    what it kept; one more would turn its exit into a traceback."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def lost_interrupts_quiet() -> Iterator[None]:
    """No "Exception ignored in ... KeyboardInterrupt" traceback while the block runs: Python
    prints one when a Ctrl-C's KeyboardInterrupt lands in a callback that cannot raise (a
    weakref's); the block acts on the Ctrl-C itself (`Catch.again`)."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def stop_request() -> Catch:
    """The training loop's stop request: `STOP_SIGNALS` set a flag (`Catch.last`), a second
    Ctrl-C raises KeyboardInterrupt; after saving, `Catch.pass_on` the signal."""
    return Catch(STOP_SIGNALS, interrupt_twice=True)
