"""A child started with `ending_with_parent` does not outlive its parent, even a killed one."""

import os
import signal
import subprocess
import sys
import time

from tasks.stage import REPO_ROOT

PARENT = """
import subprocess, sys, time
from tasks.children import ending_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True,
                         preexec_fn=ending_with_parent())
print(child.pid, flush=True)
time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_child_in_a_session_of_its_own_ends_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.send_signal(signal.SIGKILL)  # no handler runs: only the kernel can tell the child
    parent.wait()
    deadline = time.time() + 20
    while alive(child) and time.time() < deadline:
        time.sleep(0.1)
    if alive(child):
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its killed parent")


HOLDER = """
import subprocess, sys, time
from pathlib import Path
from tasks.children import ending_with_parent
from tasks.stage import file_lock, held_locks
with file_lock(Path(sys.argv[1])):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True,
                             pass_fds=held_locks())
    print(child.pid, flush=True)
    time.sleep(300)
"""


def test_a_child_given_the_held_locks_keeps_them_after_its_parent_is_killed(tmp_path):
    """As torchrun keeps a training stage's lock until it has stopped its ranks."""
    import fcntl

    lock = tmp_path / ".fp.lock"
    parent = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO_ROOT)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        os.kill(child, signal.SIGKILL)
        while alive(child):
            time.sleep(0.05)
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the child has gone
    assert held
