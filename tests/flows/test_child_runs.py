"""The pipeline's MLflow child runs (a stage's, the registration's) end as their work did:
FINISHED, FAILED on an error, KILLED on a Ctrl-C or a cancellation, never left RUNNING."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
from prefect.exceptions import TerminationSignal

from flows.pipeline import PipelineRun
from tasks.config import load_config
from tasks.tracking import Tracker


@pytest.fixture(scope="module")
def tracker(tmp_path_factory) -> Tracker:
    """One store for the module's tests: creating a SQLite store runs all of MLflow's migrations."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        return Tracker(tmp_path_factory.mktemp("ws"))


@pytest.mark.parametrize("raised, status", [
    (None, "FINISHED"),
    (RuntimeError("the store went away"), "FAILED"),
    (KeyboardInterrupt(), "KILLED"),
    (TerminationSignal(15), "KILLED"),
])
def test_a_child_run_ends_as_its_block_did(tracker, raised, status):
    run = PipelineRun(config=load_config("tiny"), root=tracker.root, tracker=tracker,
                      parent_id=tracker.start_run("build-llm"))
    with pytest.raises(type(raised)) if raised else nullcontext():
        with run.child_run("register", tags={"preset": "tiny"}) as child:
            assert tracker.client.get_run(child).info.status == "RUNNING"
            if raised:
                raise raised
    ended = tracker.client.get_run(child)
    assert ended.info.status == status
    assert ended.data.tags["mlflow.parentRunId"] == run.parent_id and ended.data.tags["preset"] == "tiny"
    assert run.child_runs == {"register": child}
