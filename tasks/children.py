"""Child processes that end with the process that started them, and orphans that a
process adopts (Linux, prctl).

A child started in a session of its own gets no signal when its parent dies, even of
SIGKILL (the out-of-memory killer, `kill -9`): it would go on running, unseen, holding
what its parent's locks were meant to guard. With PR_SET_PDEATHSIG the kernel sends it
SIGTERM when the thread that started it ends, as it does when the process dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PR_SET_CHILD_SUBREAPER = 36


def _prctl() -> Callable[..., int] | None:
    """libc's prctl on Linux, else None."""
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def adopt_orphans() -> None:
    """Make this process the parent of its descendants whose parent dies (Linux), so that
    it can stop them: a child in a session of its own would otherwise go on under init."""
    if (prctl := _prctl()) is not None:
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def ending_with_parent() -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen` from this thread: the child is sent SIGTERM
    when the thread (or the process) dies, and exits at once if that happened before it
    could ask. Elsewhere than on Linux it only makes that check."""
    parent = os.getpid()
    prctl = _prctl()  # looked up here: between fork and exec the child should only call it

    def end_with_parent() -> None:  # runs in the child, between fork and exec
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return end_with_parent
