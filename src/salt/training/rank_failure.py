"""When a DDP collective fails: which rank it waited for, in one line.

Every collective of a run (salt's helpers in `salt.training.distributed`, DDP's gradient
all-reduce in each training step) runs inside `collective(what)`. The process group's timeout
(``trainer.ddp_timeout_s``) ends a wait for a rank that is stuck or dead, and a rank that
exits closes its connections; torch then only says that a receive timed out or that a peer
closed the connection. To name the rank, every rank whose collective failed leaves a note in
the rendezvous store and looks a few seconds for the others' notes: a rank without one was
not waiting in a collective (stuck elsewhere, or dead). The lowest rank with a note reports,
the others end quietly; their notes also tell ranks that wait in different collectives (a bug)
from ranks that wait for a missing one.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from salt.errors import RankTimeoutError

NOTE_KEY = "salt/collective-failed/{}"
# How long a failed rank looks for the others' notes (at most the timeout itself): ranks
# waiting in the same collective time out within about the same second.
NOTES_WAIT_S = 5.0
_COMM_ERROR = re.compile(r"gloo|nccl|connection (closed|reset)|timed out|broken pipe", re.I)


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run a collective (``what`` names it for the message, e.g. "the validation sums"); a
    failure of the process group becomes `RankTimeoutError` naming the rank waited for."""
    try:
        yield
    except RankTimeoutError:
        raise
    except RuntimeError as err:  # torch's DistError and gloo's errors are RuntimeErrors
        if not (dist.is_available() and dist.is_initialized()) or not _is_comm_error(err):
            raise  # not the process group's failure (e.g. a shape error in the model)
        raise diagnose(what, err) from err


def _is_comm_error(err: BaseException) -> bool:
    return isinstance(err, getattr(dist, "DistError", ())) or bool(_COMM_ERROR.search(str(err)))


def _store() -> Any:
    """The rendezvous store of the default process group (None if this torch hides it)."""
    get = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return get() if get is not None else None
    except (RuntimeError, ValueError):
        return None


def _store_answers(store: Any) -> bool:
    """Whether the store's host still listens (its process is alive, maybe stopped). Asked
    with a plain socket: torch's store client logs a multi-line C++ warning when the host is
    gone."""
    while hasattr(store, "underlying_store"):  # PrefixStore
        store = store.underlying_store
    host, port = getattr(store, "host", None), getattr(store, "port", None)
    if host is None or port is None:
        return True  # not a TCPStore: its own calls will tell
    try:
        socket.create_connection((host, port), timeout=2.0).close()
    except OSError:
        return False
    return True


def _exchange_notes(
    store: Any, rank: int, world: int, what: str, wait_s: float
) -> dict[int, str] | None:
    """``{rank: the collective it failed in}`` for every rank that left a note, this one
    included; None when the store does not answer (its host, rank 0, is stuck or gone). The
    exchange runs in a thread: a store whose host is stopped accepts connections but never
    answers, and torch's store timeout does not end every call."""
    if not _store_answers(store):
        return None
    notes: dict[int, str] = {}
    done = threading.Event()

    def exchange() -> None:
        store.set(NOTE_KEY.format(rank), what)
        deadline = time.monotonic() + wait_s
        while True:
            for r in range(world):
                if r not in notes and store.check([NOTE_KEY.format(r)]):
                    notes[r] = store.get(NOTE_KEY.format(r)).decode()
            if len(notes) == world or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        done.set()

    def guarded() -> None:
        with contextlib.suppress(Exception):  # the store is gone: `done` stays unset
            exchange()

    with _native_stderr_silenced():
        threading.Thread(target=guarded, name="salt-collective-notes", daemon=True).start()
        answered = done.wait(wait_s + 2.0)
    return dict(notes) if answered else None


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null: torch's store client logs a C++ warning with a stack
    trace for each call to a store whose host has just gone, which is what the notes find out
    (this process only waits meanwhile: nothing else of it is lost)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _timeout_key(seconds: float) -> str:
    minutes = f" ({seconds / 60:g} min)" if seconds >= 120 else ""
    return f"trainer.ddp_timeout_s={seconds:g}{minutes}"


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def diagnose(what: str, err: BaseException) -> RankTimeoutError:
    """The one-line error for this rank's failed collective ``what``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch_said = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    store = _store()
    if store is None:
        return RankTimeoutError(rank, f"{what} failed: {torch_said}")
    # the process group's timeout (init_process_group gives it to its store)
    timeout = store.timeout.total_seconds()
    notes = _exchange_notes(store, rank, world, what, min(NOTES_WAIT_S, timeout))
    if notes is None:
        return RankTimeoutError(
            0,
            f"{what} failed and the rendezvous store that rank 0 holds does not answer: rank 0 "
            "is stuck or gone (see its output); the run stops here, its checkpoints are kept",
        )
    quiet = rank != min(notes)  # the lowest rank with a note speaks for all
    missing = [r for r in range(world) if r not in notes]
    if missing:
        who, it = _ranks(missing), ("it is" if len(missing) == 1 else "they are")
        if "timed out" in str(err).lower():
            how = f"did not arrive in {what} within {_timeout_key(timeout)}: {it} stuck or dead"
        else:
            how = f"left during {what} (the connection closed): {it} ended or crashed"
        return RankTimeoutError(
            missing[0],
            f"{who} {how} (see the output of {who}); the run stops here, its checkpoints are kept",
            reported=quiet,
        )
    if len(set(notes.values())) == 1:
        return RankTimeoutError(rank, f"every rank failed in {what}: {torch_said}", reported=quiet)
    places = "; ".join(f"rank {r}: {w}" for r, w in sorted(notes.items()))
    return RankTimeoutError(
        rank,
        f"the ranks waited in different collectives ({places}): a salt bug, please report it "
        "with the output of debug=true",
        reported=quiet,
    )
