"""Whether runs ran alike: the parts of a record's `env` that change what a run computes, compared.

The same configuration on another processor, thread count or torch build sums in another order; MX
rounding turns those last bits into other codes, and through GPTQ that moves perplexity by a seed std
or more (README, "Thread count"; 3.5 of its seed stds for one learned run). A run id hashes the
configuration, not where it ran, so two arms compared seed by seed, or the seeds averaged into one
table row, may come from different machines. These functions say where they did.
latmix.experiment.environment writes `env`; pure Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

NUMERIC_ENVIRONMENT = ("device", "cpu", "cpu_capability", "threads", "torch")
# Why a report names such a difference, in the words every report uses (measured: README, "Thread count").
ENVIRONMENT_EFFECT = "processor, thread count and torch build alone can move a quantized run by more than a seed std"


def environment_differences(a: Mapping[int, Mapping], b: Mapping[int, Mapping]) -> list[str]:
    """How the environments of A's and B's runs (each `env` by seed) differ at the seeds both ran, one
    entry per differing setting: ['threads 1 vs 2 at seeds 0, 1']. A setting a record lacks (it
    predates it) is not compared; [] means every pair ran alike."""
    differing: dict[tuple[str, str, str], list[int]] = {}
    for seed in sorted(set(a) & set(b)):
        env_a, env_b = a[seed] or {}, b[seed] or {}
        for key in NUMERIC_ENVIRONMENT:
            if key in env_a and key in env_b and env_a[key] != env_b[key]:
                differing.setdefault((key, str(env_a[key]), str(env_b[key])), []).append(seed)
    return [f"{key} {value_a} vs {value_b} at {_seeds(seeds)}"
            for (key, value_a, value_b), seeds in differing.items()]


def environment_spread(envs: Iterable[Mapping]) -> list[str]:
    """The settings on which a group of runs' environments disagree, with the values seen:
    ['threads 1, 2']; [] when they all ran alike (settings a record lacks are not compared)."""
    seen: dict[str, set[str]] = {}
    for env in envs:
        for key in NUMERIC_ENVIRONMENT:
            if key in (env or {}):
                seen.setdefault(key, set()).add(str(env[key]))
    return [f"{key} {', '.join(sorted(values))}" for key, values in seen.items() if len(values) > 1]


def _seeds(seeds: list[int]) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
