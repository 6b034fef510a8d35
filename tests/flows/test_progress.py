"""Training progress in the flow log: the first step, every 5%, and a slow run at least once a minute."""

from __future__ import annotations

import pytest

from flows import pipeline


@pytest.fixture
def progress(monkeypatch):
    """A TrainingProgress whose clock is set by hand and whose log lines are kept."""
    clock, lines = [1000.0], []
    logger = type("Logger", (), {"info": staticmethod(lines.append)})
    monkeypatch.setattr(pipeline, "get_run_logger", lambda: logger)
    monkeypatch.setattr(pipeline, "create_progress_artifact", lambda **_: "artifact")
    monkeypatch.setattr(pipeline, "update_progress_artifact", lambda *_, **__: None)
    monkeypatch.setattr(pipeline.time, "monotonic", lambda: clock[0])

    def make(total):
        tracker = pipeline.TrainingProgress("pretrain", total)
        return tracker, clock, lines

    return make


def test_first_step_every_5_percent_and_the_time_left(progress):
    tracker, clock, lines = progress(100)
    for step in range(1, 101):
        tracker(step, {"loss": 2.0})
        clock[0] += 2.0  # two seconds a step
    assert [line.split(":")[0] for line in lines] == [f"pretrain step {s}/100" for s in (1, *range(5, 101, 5))]
    assert lines[0] == "pretrain step 1/100: loss 2"
    assert lines[1] == "pretrain step 5/100: loss 2, about 3 min left"  # 95 steps at 2 s
    assert lines[-1] == "pretrain step 100/100: loss 2"


def test_a_slow_run_is_heard_from_every_minute_and_resumed_runs_count_from_their_start(progress):
    tracker, clock, lines = progress(5000)
    for step in range(201, 206):  # resumed at step 200; 4 minutes a step
        tracker(step, {"loss": 9.5})
        clock[0] += 240.0
    assert lines == ["pretrain step 201/5000: loss 9.5", *(
        f"pretrain step {step}/5000: loss 9.5, about {pipeline.duration((5000 - step) * 240.0)} left"
        for step in range(202, 206)
    )]
    assert pipeline.duration((5000 - 202) * 240.0) == "13 d 8 h"


@pytest.mark.parametrize("seconds, shown", [(40, "40 s"), (600, "10 min"), (3 * 3600 + 300, "3 h 5 min"),
                                            (3 * 3600 - 1, "3 h 0 min"), (50 * 3600, "2 d 2 h")])
def test_duration(seconds, shown):
    assert pipeline.duration(seconds) == shown
