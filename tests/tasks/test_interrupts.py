"""Ctrl-C in the pipeline's code: held over a store call, and never lost in training."""

import signal
import weakref
from contextlib import contextmanager

import pytest

from tasks.interrupts import interrupts_counted, interrupts_held


@contextmanager
def own_handler():
    """A SIGINT handler of the program's own, recording the signals it gets."""
    seen = []
    signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_interrupts_held_until_the_block_ends_and_a_second_one_at_once():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            done.append("after the first")
    assert done == ["after the first"]
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            done.append("after the second")
    assert done == ["after the first"]
    with pytest.raises(KeyboardInterrupt) as caught:  # an error of the block, which a caller would handle,
        with interrupts_held():                        # does not swallow the Ctrl-C
            signal.raise_signal(signal.SIGINT)
            raise ValueError("already exists")
    assert isinstance(caught.value.__context__, ValueError)
    with own_handler() as seen, interrupts_held():
        signal.raise_signal(signal.SIGINT)
        assert seen == [signal.SIGINT]  # left in charge


class Thing:
    pass


def ctrl_c_in_a_callback() -> None:
    """A Ctrl-C whose handler runs inside a weakref callback, where Python drops the
    KeyboardInterrupt it raises ("Exception ignored in ...") and goes on."""
    thing = Thing()
    ref = weakref.ref(thing, lambda ref: signal.raise_signal(signal.SIGINT))  # noqa: F841 (kept alive)
    del thing


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_dropped_in_a_callback_is_raised_after_the_step():
    steps = []
    with pytest.raises(KeyboardInterrupt), interrupts_counted() as interrupts:
        for step in range(3):
            if step == 1:
                ctrl_c_in_a_callback()
            steps.append(step)  # the step goes on: its exception was dropped
            interrupts.raise_if_dropped()
    assert steps == [0, 1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_counted_ctrl_cs_raise_as_usual_and_a_held_one_at_the_end_of_its_block():
    with interrupts_counted() as interrupts:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        done = []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_held():
                signal.raise_signal(signal.SIGINT)
                done.append("the call finished")
        assert done == ["the call finished"]
        assert signal.getsignal(signal.SIGINT) is interrupts  # the hold gave the counting handler back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_of_the_programs_own_is_left_in_charge():
    with own_handler() as seen, interrupts_counted() as interrupts:
        signal.raise_signal(signal.SIGINT)
        interrupts.raise_if_dropped()  # nothing was counted
        assert seen == [signal.SIGINT]
