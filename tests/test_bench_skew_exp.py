"""scripts/bench_skew_exp.py: its table (no timing is asserted: timings never go in tests)."""

from __future__ import annotations

from conftest import load_script

bench_skew_exp = load_script("bench_skew_exp")


def test_one_row_per_size_with_positive_timings_and_agreeing_gradients():
    rows = bench_skew_exp.bench([8, 24], repeats=1, scale=0.5, device="cpu")
    assert [row[0] for row in rows] == [8, 24]
    for row in rows:
        assert len(row) == len(bench_skew_exp.HEADER)
        assert all(seconds > 0 for seconds in row[1:6])
        assert row[6] < 1e-4  # the two backward passes compute one gradient (float32)
