"""Process ids for the tests of what a killed process leaves behind."""

import subprocess
import sys


def dead_pid() -> int:
    """The id of a process that has run and exited (and been collected)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
