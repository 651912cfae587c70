"""What each role reads from a `teach`/`estimate --input` JSONL row: one table, shown by `teach --help`,
named in every missing-field error, and checked the same way by both commands.

Fields not listed here are carried to the output row unchanged. A label task with structured items
(task.input_fields, e.g. premise + hypothesis, or question + options) may give those fields instead of
`instruction`: the instruction is then the item rendered exactly as the loop renders it (items.render),
and a multiple-choice row's options reach the explainer's labels block and its parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentkd.config import ConfigError, TaskSection
from agentkd.datasets import read_jsonl


@dataclass(frozen=True)
class RoleInput:
    required: tuple[tuple[str, str], ...]  # (JSONL field, what it holds)
    optional: tuple[tuple[str, str], ...] = ()

    def summary(self, role: str) -> str:
        optional = f"; optional: {', '.join(name for name, _ in self.optional)}" if self.optional else ""
        return (f"--role {role} rows need: {', '.join(name for name, _ in self.required)}{optional} "
                f"(every role's fields: agentkd teach --help)")


ROLE_INPUTS: dict[str, RoleInput] = {
    "answerer": RoleInput(required=(("instruction", "the task the teacher answers"),)),
    "explainer": RoleInput(
        required=(("instruction", "the text to label ([task] sets the labels; or task.input_fields)"),),
        optional=(("label", "a gold label: the teacher writes the rationale for it instead of choosing one"),),
    ),
    "referee": RoleInput(required=(
        ("instruction", "the task both answers respond to"),
        ("teacher_answer", "the reference answer (judged in both orders)"),
        ("student_answer", "the answer compared with it"),
    )),
    "generator": RoleInput(
        required=(("instruction", "the seed a new instruction is written from"),),
        optional=(("mode", "hard | easy | plain: this row's generator prompt (default: --mode)"),),
    ),
}


def fields_help() -> str:
    """The `teach --help` epilog: every role's required and optional fields."""
    lines = ["input fields per role (JSONL, one object per line; other fields are copied to the output):"]
    for role, spec in ROLE_INPUTS.items():
        lines.append(f"  {role}:")
        lines += [f"    {name:<15} required: {what}" for name, what in spec.required]
        lines += [f"    {name:<15} optional: {what}" for name, what in spec.optional]
    return "\n".join(lines)


def check_rationale_rate(rate: float) -> None:
    if not 0.0 <= rate <= 1.0:  # NaN fails this too
        raise ConfigError(f"--rationale-rate {rate}: must be between 0 and 1")


def read_role_rows(path: Path, role: str, *, rationale_rate: float,
                   task: TaskSection | None = None) -> list[dict[str, Any]]:
    """The input rows of `teach`/`estimate --role role`, every line checked before anything is sent;
    both commands call this, so they accept and refuse the same input. With a structured `task`, a row
    without `instruction` gets it rendered from its task.input_fields (checked, naming file and line)."""
    check_rationale_rate(rationale_rate)
    spec = ROLE_INPUTS[role]
    prepare = _instruction_from_fields(task) if task is not None else None
    return read_jsonl(path, [name for name, _ in spec.required], fields_hint=spec.summary(role), prepare=prepare)


def _instruction_from_fields(task: TaskSection):
    from agentkd.roles.items import fields_of_row, item_schema, render

    schema = item_schema(task)
    if not schema.structured:
        return None

    def prepare(row: dict[str, Any], where: str) -> dict[str, Any]:
        if not any(name in row for name in schema.fields if name != "instruction"):
            return row  # a plain instruction row (a missing one is reported with the other missing fields)
        fields = fields_of_row(row, schema, where)  # given any of them, all must be right (options included)
        if isinstance(row.get("instruction"), str) and row["instruction"].strip():
            return row
        return {**row, "instruction": render(fields, schema)}

    return prepare


def row_options(row: dict[str, Any], task_kind: str) -> list[str] | None:
    """A multiple-choice row's options (checked by read_role_rows with the task's input fields), for the
    explainer's labels block and parser; None for any other row."""
    options = row.get("options")
    return [str(o) for o in options] if task_kind == "multiple_choice" and isinstance(options, list) else None
