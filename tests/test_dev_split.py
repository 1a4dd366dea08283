"""scripts/dev_split.py: a dev split of the calibration text, by whole lines, the dev part last."""

from __future__ import annotations

import pytest
from conftest import load_script

dev_split = load_script("dev_split")


def test_the_shipped_text_splits_into_the_readme_line_counts_and_nothing_is_lost():
    text = (dev_split.ROOT / "data" / "text" / "calibration.txt").read_text(encoding="utf-8")
    train, dev = dev_split.split_lines(text, 0.15)
    assert (train.count("\n"), dev.count("\n")) == (5558, 981)
    assert train + dev == text


def test_the_dev_part_is_the_last_lines():
    train, dev = dev_split.split_lines("a\nb\nc\nd\n", 0.25)
    assert (train, dev) == ("a\nb\nc\n", "d\n")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_a_fraction_outside_zero_to_one_is_refused_with_what_to_change(fraction):
    with pytest.raises(SystemExit, match="--dev-fraction must lie strictly between 0 and 1"):
        dev_split.split_lines("a\nb\n", fraction)


def test_a_text_too_short_to_split_is_refused():
    with pytest.raises(SystemExit, match="cannot be split"):
        dev_split.split_lines("one line\n", 0.5)
