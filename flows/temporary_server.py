"""Prefect's temporary API server, started so that Ctrl-C stops the run and not the server.

Without PREFECT_API_URL, Prefect starts a local API server in a child process the first time
a flow needs it. A terminal's Ctrl-C goes to the whole foreground process group, so that
server used to stop at the same moment as the run, and Prefect then spent minutes retrying
to record the interrupted run on it. Started here first, the server gets a session of its
own, so the interrupt reaches the run only: Prefect records the crash, the MLflow runs are
marked, and the server is stopped at exit as before. On Linux the kernel also stops it
should this process die without exiting (SIGKILL, a closed terminal), since it no longer
shares the terminal's process group.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from flows import prefect_database
from tasks.children import ending_with_parent

SQLITE = "sqlite+aiosqlite:///"


def start(meanwhile: Sequence[str] = ()) -> None:
    """Start the server Prefect would start itself, detached from this terminal's signals.

    Prefect keeps one temporary server per process (`SubprocessASGIServer()`), so the flow
    run finds this one already running. A new SQLite database starts as a copy of a migrated
    one (`flows.prefect_database`).

    The server needs ~3 s to answer, in a process of its own; the modules named in
    `meanwhile` (the flows, with torch and MLflow: ~2.5 s) are imported on a second thread
    while this one waits for it. That thread starts once the server's process exists (a
    process is best forked with one thread running), and the server is started from this
    thread, since its end-with-parent signal is tied to the thread that started it.
    """
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.server.api.server import SubprocessASGIServer, subprocess_server_logger

    ensure_logging_setup()  # the announcement below is Prefect's log line, before any flow ran
    url = os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL", "")
    if url.startswith(SQLITE):
        prefect_database.seed(Path(url.removeprefix(SQLITE)))

    imports = _Imports(meanwhile)
    announcement = _Announcement()
    subprocess_server_logger.addFilter(announcement)
    try:
        with _detached_children(after_start=imports.start):
            SubprocessASGIServer().start()
    finally:
        subprocess_server_logger.removeFilter(announcement)
    imports.wait()


class _Imports:
    """Modules imported on a thread of their own; `wait` joins it (starting it first if no
    one did) and raises what an import raised."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = modules
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, name="tinyseek-imports", daemon=True)

    def start(self) -> None:
        if self.thread.ident is None:
            self.thread.start()

    def _run(self) -> None:
        try:
            for name in self.modules:
                importlib.import_module(name)
        except Exception as exc:
            self.error = exc

    def wait(self) -> None:
        self.start()
        self.thread.join()
        if self.error is not None:
            raise self.error


class _Announcement(logging.Filter):
    """Prefect announces its temporary server with a pointer to its own docs for running a
    dedicated one; here that is `tinyseek up`, so the line says so instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Starting temporary server on "):
            address = record.msg.splitlines()[0].removeprefix("Starting temporary server on ")
            record.msg, record.args = (f"Starting temporary server on {address} (no UI; `tinyseek up` starts "
                                       "Prefect's and MLflow's servers with their UIs)"), ()
        return True


@contextlib.contextmanager
def _detached_children(after_start: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Within the block, `subprocess.Popen` called from this thread starts each child in a new
    session, ended by SIGTERM when this thread dies (Linux), and calls `after_start` once the
    child exists. Other threads' children are started as usual."""
    starter = threading.get_ident()
    end_with_parent = ending_with_parent()

    original = subprocess.Popen

    class Detached(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            mine = threading.get_ident() == starter
            if mine:
                kwargs.update(start_new_session=True, preexec_fn=end_with_parent)
            super().__init__(*args, **kwargs)
            if mine:
                after_start()

    subprocess.Popen = Detached  # type: ignore[misc]
    try:
        yield
    finally:
        subprocess.Popen = original  # type: ignore[misc]
