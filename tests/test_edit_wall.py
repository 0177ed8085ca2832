"""`benchmarks/edit_wall.py`: per-edit wall time from a store's commit times, on made-up records."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("edit_wall", Path(__file__).parents[1] / "benchmarks" / "edit_wall.py")
edit_wall = importlib.util.module_from_spec(spec)
spec.loader.exec_module(edit_wall)


def records(times: list[float]) -> list[dict]:
    return [{"id": i, "time": t, "seconds": 0.5, "steps": 10 + i, "loss": 0.01, "converged": i != 3,
             **({"restarted": True} if i == 2 else {})} for i, t in enumerate(times)]


def test_wall_is_the_gap_between_commits_after_the_first_timed_edit():
    # edit 1's gap (100 s) holds an evaluation; timing from edit 1 on leaves it out
    stats = edit_wall.edit_wall(records([0.0, 100.0, 101.0, 103.0, 104.0]), first=1)
    assert stats["edits_timed"] == 3
    assert stats["wall_seconds_per_edit_mean"] == pytest.approx((1 + 2 + 1) / 3)
    assert stats["overhead_seconds_median"] == pytest.approx(0.5)
    assert stats["steps_mean"] == pytest.approx((12 + 13 + 14) / 3)
    assert (stats["unconverged_edits"], stats["restarted_edits"]) == (1, 1)
    assert edit_wall.edit_wall(records([0.0, 100.0, 101.0]), first=0)["wall_seconds_per_edit_mean"] == pytest.approx(50.5)


def test_no_edit_after_the_first_timed_one_is_an_error():
    with pytest.raises(SystemExit, match="no edits"):
        edit_wall.edit_wall(records([0.0, 1.0]), first=1)
