"""latmix/environment.py: where runs ran differently, for pairing arms and averaging seeds."""

from __future__ import annotations

from latmix.environment import environment_differences, environment_spread

XEON = {"device": "cpu", "cpu": "Xeon", "cpu_capability": "AVX512", "threads": 1, "torch": "2.13.0+cpu"}


def test_arms_that_ran_alike_differ_in_nothing():
    assert environment_differences({0: XEON, 1: XEON}, {0: dict(XEON), 1: dict(XEON)}) == []


def test_each_differing_setting_is_named_once_with_the_seeds_it_differs_at():
    a = {0: XEON, 1: XEON, 2: XEON}
    b = {0: {**XEON, "threads": 2}, 1: {**XEON, "threads": 2}, 2: {**XEON, "cpu": "EPYC", "cpu_capability": "AVX2"}}
    assert environment_differences(a, b) == [
        "threads 1 vs 2 at seeds 0, 1", "cpu Xeon vs EPYC at seed 2", "cpu_capability AVX512 vs AVX2 at seed 2"]


def test_only_the_seeds_both_ran_and_the_settings_both_recorded_are_compared():
    a = {0: XEON, 5: {**XEON, "threads": 8}}
    b = {0: {"torch": "2.13.0+cpu", "python": "3.12"}, 1: {**XEON, "threads": 4}}  # an older record, another seed
    assert environment_differences(a, b) == []
    assert environment_differences({0: XEON}, {0: None}) == []


def test_a_group_of_runs_names_the_settings_it_disagrees_on_with_the_values_seen():
    runs = [XEON, {**XEON, "threads": 2}, {**XEON, "torch": "2.12.0+cpu"}, {"threads": 2}, {}]
    assert environment_spread(runs) == ["threads 1, 2", "torch 2.12.0+cpu, 2.13.0+cpu"]
    assert environment_spread([XEON, dict(XEON), {"python": "3.11"}]) == []
