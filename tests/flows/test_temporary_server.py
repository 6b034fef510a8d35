"""The pieces of the temporary server's start: which children are detached, and the imports
made while it boots (the server itself is exercised by every CLI run in tests/flows)."""

import os
import subprocess
import sys
import threading

import pytest

from flows.temporary_server import _detached_children, _Imports


def test_only_the_starting_threads_children_are_detached_and_announced():
    started, original = [], subprocess.Popen
    with _detached_children(after_start=lambda: started.append("child")):
        mine = subprocess.Popen(["sleep", "5"])
        theirs = []
        other = threading.Thread(target=lambda: theirs.append(subprocess.Popen(["sleep", "5"])))
        other.start()
        other.join()
    try:
        assert os.getsid(mine.pid) == mine.pid  # a session of its own: a terminal's Ctrl-C does not reach it
        assert os.getsid(theirs[0].pid) == os.getsid(0)
        assert started == ["child"]
        assert subprocess.Popen is original  # the patch ends with the block
    finally:
        for child in (mine, *theirs):
            child.kill()
            child.wait()


def test_imports_made_meanwhile_are_there_after_wait_and_their_errors_raised_there(monkeypatch, tmp_path):
    (tmp_path / "meanwhile_ok.py").write_text("VALUE = 1\n")
    (tmp_path / "meanwhile_broken.py").write_text("raise ImportError('needs a package that is missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    imports = _Imports(["meanwhile_ok"])
    imports.start()
    imports.wait()
    assert sys.modules["meanwhile_ok"].VALUE == 1
    unstarted = _Imports(["meanwhile_broken"])  # no server process was started: wait imports itself
    with pytest.raises(ImportError, match="needs a package that is missing"):
        unstarted.wait()
