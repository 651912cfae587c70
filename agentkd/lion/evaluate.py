"""Held-out task accuracy where answers are checkable: the sim's arithmetic, or gold labels.

The other figure, Lion's capability ratio (sum of student scores / sum of teacher scores over both
referee orders), is computed by the loop's eval stage from the referee's verdicts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from agentkd.lion.pools import Item
from agentkd.roles.explainer import TaskDefinition
from agentkd.teachers.sim.world import final_number

_LAST_INT = re.compile(r"-?\d[\d,]*")


def answer_number(text: str) -> int | None:
    """The final number of an answer: 'The answer is N' if present, else the last integer in it."""
    found = final_number(text)
    if found is not None:
        return found
    numbers = _LAST_INT.findall(text)
    return int(numbers[-1].replace(",", "")) if numbers else None


def is_correct(expected: str, answer: str, task_kind: str) -> bool:
    if task_kind == "arithmetic":
        try:
            return answer_number(answer) == int(expected)
        except ValueError:
            return False
    return answer.strip().lower().rstrip(".") == expected.strip().lower()


def student_label(answer: str, item: Item, task: TaskDefinition) -> str | None:
    """The label a student's answer gives, read like a teacher's label (synonyms, a multiple-choice
    item's option text or number); None when it gives none, or several."""
    options = item.options
    label, _ = (task.with_options(options) if options else task).canonical(answer.split("\n", 1)[0])
    return label


def accuracy(items: Sequence[Item], answers: Mapping[str, str], task: TaskDefinition | str) -> float | None:
    """Share of held-out items answered correctly; None when no item has a known answer. Label tasks
    compare the answer's label (student_label) with the gold one."""
    checkable = [i for i in items if i.answer is not None and i.id in answers]
    if not checkable:
        return None
    if isinstance(task, str) or task.kind == "arithmetic":
        kind = task if isinstance(task, str) else task.kind
        return sum(is_correct(i.answer, answers[i.id], kind) for i in checkable) / len(checkable)
    return sum(student_label(answers[i.id], i, task) == i.answer for i in checkable) / len(checkable)
