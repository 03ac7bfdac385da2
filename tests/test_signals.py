"""salt.signals.Catch in this process (the real signals to real processes are in
test_staging.py, test_sample.py and test_train.py)."""

from __future__ import annotations

import os
import signal
import threading
import weakref
from collections.abc import Iterator

import pytest

from salt.signals import (
    ALWAYS,
    IF_DEFAULT,
    UNLESS_IGNORED,
    Catch,
    lost_interrupts_quiet,
    stop_request,
)


@pytest.fixture(autouse=True)
def _handlers() -> Iterator[None]:
    nums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
    before = {n: signal.getsignal(n) for n in nums}
    yield
    for n, h in before.items():
        signal.signal(n, h)


def test_records_and_restores() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    with Catch(("SIGUSR1", "SIGUSR2")) as caught:
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert caught.caught == [signal.SIGUSR2, signal.SIGUSR1]
        assert (caught.first, caught.last) == (signal.SIGUSR2, signal.SIGUSR1)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    with caught:  # entered again: nothing caught yet
        assert caught.first is None


def test_when_to_take_a_signal_over() -> None:
    def mine(signum: int, frame: object) -> None:
        pass

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, mine)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    when = {"SIGTERM": UNLESS_IGNORED, "SIGHUP": UNLESS_IGNORED, "SIGUSR1": IF_DEFAULT}
    with Catch({**when, "SIGUSR2": IF_DEFAULT, "SIGINT": ALWAYS}) as caught:
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR1) is mine
        taken = [signal.SIGHUP, signal.SIGUSR2, signal.SIGINT]
        assert all(signal.getsignal(n) == caught._handle for n in taken)
        caught.release_handled()  # SIGINT had Python's handler: given back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGHUP) == caught._handle
        signal.signal(signal.SIGUSR2, mine)  # the block's own handler stays
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGUSR2) is mine
    with pytest.raises(ValueError, match="SIGTERM"):
        Catch({"SIGTERM": "sometimes"})


def test_a_second_interrupt_raises() -> None:
    with stop_request() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.last == signal.SIGUSR2
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.caught == [signal.SIGUSR2]  # the second Ctrl-C is not recorded
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.last == signal.SIGTERM


def test_a_second_interrupt_lost_in_a_callback_is_still_seen(capsys) -> None:
    """Python drops an exception raised in a weakref's callback (with a printed traceback): a
    second Ctrl-C's KeyboardInterrupt that lands there is lost. `again` keeps it, quietly."""

    class Thing:
        pass

    def callback(_: object) -> None:  # where a Ctrl-C's KeyboardInterrupt can land
        os.kill(os.getpid(), signal.SIGINT)

    with stop_request() as stop, lost_interrupts_quiet():
        os.kill(os.getpid(), signal.SIGINT)  # the first: a stop request
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing  # the callback runs, the second Ctrl-C's KeyboardInterrupt is lost in it
        assert ref() is None
        assert stop.again and stop.caught == [signal.SIGINT]
    assert "KeyboardInterrupt" not in capsys.readouterr().err


def test_act_once_and_not_inside_held_sections() -> None:
    acted: list[int] = []

    def act(signum: int) -> None:
        acted.append(signum)
        raise RuntimeError(f"stop {signum}")

    with Catch(("SIGUSR1", "SIGUSR2"), act=act) as caught:
        with pytest.raises(RuntimeError, match=str(int(signal.SIGUSR1))):  # noqa: SIM117
            with caught.held(), caught.held():
                os.kill(os.getpid(), signal.SIGUSR1)
                os.kill(os.getpid(), signal.SIGUSR2)
                assert acted == []
        assert acted == [signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGUSR2)  # recorded, no second action
        assert acted == [signal.SIGUSR1]
        assert caught.caught == [signal.SIGUSR1, signal.SIGUSR2, signal.SIGUSR2]


def test_pass_on_to_the_replaced_handler() -> None:
    seen: list[int] = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    with Catch(("SIGUSR1", "SIGUSR2")) as caught:
        caught.pass_on(signal.SIGUSR1)
        caught.pass_on(signal.SIGUSR2, default_action=True)  # ignored stays ignored
    assert seen == [signal.SIGUSR1]
    with pytest.raises(KeyboardInterrupt), Catch(("SIGINT",)) as caught:
        caught.pass_on(signal.SIGINT)  # Python's handler: KeyboardInterrupt


def test_outside_the_main_thread_nothing_is_installed() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    seen: list[object] = []

    def run() -> None:
        with Catch(("SIGUSR1",)) as caught:
            seen.append(signal.getsignal(signal.SIGUSR1))
            seen.append(caught.first)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [before, None]
