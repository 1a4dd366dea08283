"""Task-accuracy conventions of the papers, torch-free: what a table's "acc" and "avg6"/"avg8" mean.

Shared by evaluation (which writes them into the record) and tables (which read them back).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# QuaRot / FlatQuant: six tasks, acc_norm where the task has it, else acc.
AVG6_TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "lambada_openai")
# SpinQuant: eight commonsense tasks.
AVG8_TASKS = ("boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def headline_accuracy(scores: Mapping[str, float]) -> float | None:
    """acc_norm where the task reports it, else acc (the QuaRot/FlatQuant convention)."""
    return scores.get("acc_norm", scores.get("acc"))


def task_average(tasks: Mapping[str, Mapping[str, float]], names: Sequence[str]) -> float | None:
    """Mean headline accuracy over `names`; None unless every one of them was evaluated."""
    values = [headline_accuracy(tasks[name]) for name in names if name in tasks]
    if len(values) != len(names) or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def averages(tasks: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    every = [headline_accuracy(scores) for scores in tasks.values()]
    every = [v for v in every if v is not None]
    return {
        "avg6": task_average(tasks, AVG6_TASKS),
        "avg8": task_average(tasks, AVG8_TASKS),
        "mean": sum(every) / len(every) if every else None,
    }
