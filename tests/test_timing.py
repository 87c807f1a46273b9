"""``stopwatch``: stage seconds into a dict, also when the block raises."""

from __future__ import annotations

import pytest

from emorph_deploy.timing import stopwatch


def test_stopwatch_records_in_order_and_on_error():
    times: dict[str, float] = {}
    with stopwatch(times, "total"):
        with stopwatch(times, "a"):
            pass
        with pytest.raises(ValueError), stopwatch(times, "b"):
            raise ValueError("stage failed")
    assert list(times) == ["a", "b", "total"]
    assert all(t >= 0.0 for t in times.values()) and times["total"] >= times["a"] + times["b"]
