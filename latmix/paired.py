"""Two methods compared seed for seed on perplexity, and item for item on the zero-shot tasks (the
records' eval.task_items).

Perplexity: a seed draws the calibration sequences, the random signs and the initial maps, so two
methods' runs at one seed share them, and the spread between seeds is not part of their difference
there. The differences at the seeds both ran, their mean ± std, at how many seeds A is below B, and
the sign-flip p of those differences (`seed_sign_flip_p`) say whether a change holds seed by seed or
is carried by one of them.

Tasks: a task average over a few hundred items has a standard error of a point or more, so two methods'
averages that differ by half a point say little when they are set side by side. But both methods
answer the same items, and most items they answer alike: only the items one method gets right and
the other does not carry the difference. Pairing them gives the difference its own, much narrower,
uncertainty.

For each task, d_i is method A's answer minus method B's on item i (1, 0 or -1), averaged over the
seeds both ran. The difference in accuracy is the mean of d_i, and the row for all tasks is the mean of
the tasks' differences (the difference of the tables' task average, "avg"). Its 95% interval resamples
the items of every task with replacement (the percentile bootstrap). Its p-value flips the sign of each
d_i at random: under "A and B answer alike but for chance" every sign is equally likely. Both draw from
a fixed generator, so the same records give the same table. The items are resampled, not the seeds:
the interval says how sure the difference is on items like these, for the seeds that ran.

Pure numpy: imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from latmix.metrics import headline_accuracy

ALL_TASKS = "(all tasks)"


class PairingError(ValueError):
    """Two sets of runs that cannot be compared item for item; the message says why."""


@dataclass(frozen=True)
class PairedRow:
    """One task (or ALL_TASKS): accuracies in percent, A minus B, and how sure that difference is."""

    task: str
    items: int
    seeds: int
    accuracy_a: float
    accuracy_b: float
    delta: float
    low: float
    high: float
    only_a: int  # (item, seed) pairs A answered right and B wrong
    only_b: int
    p_value: float


def _task_items(rec: Mapping) -> Mapping[str, Mapping[str, str]]:
    return rec.get("eval", {}).get("task_items", {})


def answers(rec: Mapping, task: str) -> tuple[str, np.ndarray]:
    """A record's answers to one task as (the items' digest, bool per item) for its headline metric,
    the one the tables average."""
    entry = _task_items(rec).get(task)
    if entry is None:
        raise PairingError(f"run {rec['run_id']} has no per-item answers for {task}")
    return entry["docs"], np.frombuffer(headline_accuracy(entry).encode(), dtype=np.uint8) == ord("1")


def common_tasks(records: list[Mapping]) -> list[str]:
    """The tasks every record answered item by item, in the first record's order."""
    per_record = [set(_task_items(rec)) for rec in records]
    return [task for task in _task_items(records[0]) if all(task in tasks for tasks in per_record)]


def _item_differences(a: list[Mapping], b: list[Mapping], task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A's answers, B's answers) as seeds x items, and d_i: A minus B per item, mean over the seeds."""
    digests, rows_a, rows_b = set(), [], []
    for rows, records in ((rows_a, a), (rows_b, b)):
        for rec in records:
            docs, correct = answers(rec, task)
            digests.add((docs, correct.size))
            rows.append(correct)
    if len(digests) != 1:
        raise PairingError(
            f"{task}: the runs did not answer the same items (their eval.limit or task data differ); "
            "compare runs evaluated alike"
        )
    answers_a, answers_b = np.stack(rows_a), np.stack(rows_b)
    return answers_a, answers_b, (answers_a.astype(float) - answers_b).mean(axis=0)


def _p_value(observed: float, flipped: np.ndarray) -> float:
    """Two-sided: the share of sign-flipped differences at least as far from 0 as the observed one."""
    tolerance = 1e-12
    return float((1 + np.count_nonzero(np.abs(flipped) >= abs(observed) - tolerance)) / (1 + flipped.size))


EXACT_FLIPS_UP_TO = 16  # seeds; 2^16 sign patterns, beyond that as many drawn at random


def seed_sign_flip_p(differences: np.ndarray, seed: int = 0) -> float:
    """Two-sided p-value of paired per-seed differences (method minus base, one per seed) under "the
    change does nothing, each difference's sign is chance": the share of the 2^n sign patterns whose
    mean is at least as far from 0 as the observed mean. Exact up to EXACT_FLIPS_UP_TO seeds. With n
    seeds it is never below 2 / 2^n (0.0625 at 5 seeds, all of one sign)."""
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        raise ValueError("no paired difference to test")
    observed = abs(d.mean())
    if d.size <= EXACT_FLIPS_UP_TO:
        patterns = np.arange(2 ** d.size)[:, None] >> np.arange(d.size) & 1
        flipped = (d * np.where(patterns == 1, -1.0, 1.0)).mean(axis=1)
        return float(np.count_nonzero(np.abs(flipped) >= observed - 1e-12) / flipped.size)
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(2 ** EXACT_FLIPS_UP_TO, d.size))
    return _p_value(float(d.mean()), (d * signs).mean(axis=1))


@dataclass(frozen=True)
class _Part:
    """One task's (or all tasks') paired numbers as fractions, with their resampled and sign-flipped draws."""

    items: int
    accuracy_a: float
    accuracy_b: float
    delta: float
    resampled: np.ndarray
    flipped: np.ndarray
    only_a: int
    only_b: int

    def row(self, task: str, seeds: int) -> PairedRow:
        low, high = np.percentile(self.resampled, [2.5, 97.5])
        return PairedRow(
            task, self.items, seeds, 100 * float(self.accuracy_a), 100 * float(self.accuracy_b),
            100 * float(self.delta), 100 * float(low), 100 * float(high), self.only_a, self.only_b,
            _p_value(float(self.delta), self.flipped),
        )


def paired_rows(
    a: Mapping[int, Mapping], b: Mapping[int, Mapping], resamples: int = 10_000, seed: int = 0
) -> list[PairedRow]:
    """Method A's records against method B's, by seed (only seeds both ran): one row per task both
    answered item by item in every record, then the ALL_TASKS row."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise PairingError(f"no seed was run by both (A: {sorted(a)}, B: {sorted(b)})")
    records_a, records_b = [a[s] for s in seeds], [b[s] for s in seeds]
    tasks = common_tasks(records_a + records_b)
    if not tasks:
        raise PairingError("the runs share no task answered item by item (records written before "
                           "eval.task_items existed have none: run them again with force=true)")
    rng = np.random.default_rng(seed)
    rows, parts = [], []
    for task in tasks:
        answers_a, answers_b, d = _item_differences(records_a, records_b, task)
        part = _Part(
            items=d.size, accuracy_a=answers_a.mean(), accuracy_b=answers_b.mean(), delta=d.mean(),
            resampled=d[rng.integers(d.size, size=(resamples, d.size))].mean(axis=1),
            flipped=(d * rng.choice((-1.0, 1.0), size=(resamples, d.size))).mean(axis=1),
            only_a=int((answers_a & ~answers_b).sum()), only_b=int((answers_b & ~answers_a).sum()),
        )
        parts.append(part)
        rows.append(part.row(task, len(seeds)))
    overall = _Part(
        items=sum(p.items for p in parts),
        accuracy_a=np.mean([p.accuracy_a for p in parts]), accuracy_b=np.mean([p.accuracy_b for p in parts]),
        delta=np.mean([p.delta for p in parts]),
        resampled=np.mean([p.resampled for p in parts], axis=0), flipped=np.mean([p.flipped for p in parts], axis=0),
        only_a=sum(p.only_a for p in parts), only_b=sum(p.only_b for p in parts),
    )
    return [*rows, overall.row(ALL_TASKS, len(seeds))]


@dataclass(frozen=True)
class PairedPerplexity:
    """One perplexity text: A's and B's perplexity at each seed both ran, and what their differences say."""

    text: str
    seeds: tuple[int, ...]
    a: tuple[float, ...]
    b: tuple[float, ...]

    @property
    def differences(self) -> np.ndarray:
        """A minus B, one per seed."""
        return np.subtract(self.a, self.b)

    @property
    def lower(self) -> int:
        """At how many seeds A's perplexity is below B's."""
        return int(np.count_nonzero(self.differences < 0))

    @property
    def p_value(self) -> float:
        return seed_sign_flip_p(self.differences)


def _perplexities(rec: Mapping) -> Mapping[str, float]:
    return rec.get("metrics", {}).get("ppl") or {}


def paired_perplexities(a: Mapping[int, Mapping], b: Mapping[int, Mapping]) -> list[PairedPerplexity]:
    """Method A's records against method B's, by seed (only seeds both ran): one entry per perplexity text
    that every one of those records measured, in A's first record's order."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise PairingError(f"no seed was run by both (A: {sorted(a)}, B: {sorted(b)})")
    records = [a[s] for s in seeds] + [b[s] for s in seeds]
    texts = [text for text in _perplexities(records[0]) if all(text in _perplexities(rec) for rec in records)]
    if not texts:
        raise PairingError("the runs share no perplexity text (their eval.ppl_datasets differ); "
                           "compare runs evaluated alike")
    return [
        PairedPerplexity(text, seeds, tuple(float(_perplexities(a[s])[text]) for s in seeds),
                         tuple(float(_perplexities(b[s])[text]) for s in seeds))
        for text in texts
    ]
