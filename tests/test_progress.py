"""Progress lines for loops outside Lightning: on a scripted clock, not on sleeps."""

from __future__ import annotations

import logging

from segflow import progress


def test_a_line_every_interval_with_rate_and_eta(monkeypatch, caplog):
    clock = iter(float(t) for t in [0, 10, 20, 31, 40, 62, 70, 80])  # start, then one reading per image
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO):
        items = list(progress.logged(range(7), 7, "evaluate", logging.getLogger("t"), every_s=30))
    assert items == list(range(7))
    lines = [r.getMessage() for r in caplog.records]
    # 3 images at 31 s (0.097/s, 4 left: 41 s), 5 at 62 s (2 left: 25 s); none at the end
    assert lines == ["evaluate: 3/7 images, 0.10 images/s, ETA 41s", "evaluate: 5/7 images, 0.08 images/s, ETA 25s"]


def test_a_short_loop_says_nothing(caplog):
    with caplog.at_level(logging.INFO):
        assert list(progress.logged([1, 2], 2, "predict", logging.getLogger("t"))) == [1, 2]
    assert not caplog.records
