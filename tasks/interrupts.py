"""How a Ctrl-C (SIGINT) reaches the pipeline's code: held over a store call, and never lost
in training.

Python runs a signal's handler, which raises KeyboardInterrupt, in whatever Python code the
main thread runs next. Two places need more than that:

- A store call cut short by it can leave SQLite's write lock held (see
  `tasks.tracking._Uninterrupted`): `interrupts_held` defers the Ctrl-C to the call's end.
- Raised inside a weakref callback or a finalizer, the exception is dropped ("Exception
  ignored in ..."), as by any code that swallows errors: the run goes on as if the Ctrl-C
  never came. While torch.compile builds the fused kernels, its caches drop entries through
  `WeakValueDictionary` callbacks, and a Ctrl-C sent then was lost in 4 of about 27 tries
  (once with that message, the other times without any).
  `interrupts_counted` counts the Ctrl-Cs that arrive during training; after each step the
  trainer's loop, which a raised KeyboardInterrupt would have left, calls `raise_if_dropped`
  (`Trainer.after_step`, set by `tasks.training.train_into`).

Both act only where Python's own handler (or the counting one) is in place, on the main
thread: a handler set by the program, or SIG_IGN, stays as it is.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _ours_to_replace() -> bool:
    handler = signal.getsignal(signal.SIGINT)
    return threading.current_thread() is threading.main_thread() and (
        handler is signal.default_int_handler or isinstance(handler, _Counting))


class _Counting:
    """A SIGINT handler that raises KeyboardInterrupt, as Python's does, and counts."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1
        raise KeyboardInterrupt

    def raise_if_dropped(self) -> None:
        """Raise the KeyboardInterrupt of a Ctrl-C that came and was dropped: code that runs
        after one only if its exception did not get through."""
        if self.count:
            self.count = 0
            raise KeyboardInterrupt


@contextmanager
def interrupts_counted() -> Iterator[_Counting]:
    """Within the block, Ctrl-Cs raise KeyboardInterrupt as usual and are counted: the
    yielded handler's `raise_if_dropped` raises one that was lost (module docstring). Where
    the handler is not Python's own, nothing is counted and `raise_if_dropped` never raises."""
    counting = _Counting()
    if not _ours_to_replace():
        yield counting
        return
    previous = signal.signal(signal.SIGINT, counting)
    try:
        yield counting
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Within the block, a Ctrl-C is held and raised as KeyboardInterrupt at its end; a
    second one raises at once."""
    if not _ours_to_replace():
        yield
        return
    held: list[int] = []
    restoring = False

    def hold(signum: int, frame: object) -> None:
        if held and not restoring:
            raise KeyboardInterrupt
        held.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        restoring = True  # a signal pending now is run by the restore: it must not cut it short
        signal.signal(signal.SIGINT, previous)
        if held:  # also when the block raised: a caller that handles its error still sees the Ctrl-C
            raise KeyboardInterrupt
