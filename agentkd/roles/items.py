"""Structured items: an item is its fields (premise/hypothesis, question/options, or task.input_fields).

One rendering, used everywhere an item is text: the student's prompt, every role's data block, the
dedup index and the item's id. A single-field item is its value; a structured one is one line per field,
"name: value", and a list field (multiple choice's options) a "name:" line then one "a) option" line per
entry, lettered like the task's labels:

    premise: Ann has 3 apples.              question: Which of these is a fruit?
    hypothesis: Ann has no apples.          options:
                                            a) dog
                                            b) pear

The generator writes a structured item as a JSON object of its fields; `parse_item` checks it against
the schema (every field, nothing else, strings, 2..len(labels) distinct options) and rejects it with a
reason otherwise, never an exception. Seeds and held-out files hold the same fields, one JSON object a
line; held-out rows add their gold label under "label".
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentkd.config import ConfigError, TaskSection
from agentkd.roles.generator import Generated, check_instruction, parse_generated
from agentkd.roles.json_reply import MAX_REPLY_CHARS, find_json

LIST_FIELDS = frozenset({"options"})  # multiple choice's options: a list of strings
MIN_OPTIONS = 2
MAX_FIELD_CHARS = 2_000


@dataclass(frozen=True)
class ItemSchema:
    fields: tuple[str, ...]
    letters: tuple[str, ...] = ()  # option labels, for a schema with an options field

    @property
    def structured(self) -> bool:
        """A plain instruction item keeps Lion's {"instruction": ...} generator format."""
        return self.fields != ("instruction",)

    def list_field(self, name: str) -> bool:
        return name in LIST_FIELDS and bool(self.letters)


def item_schema(task: TaskSection) -> ItemSchema:
    letters: tuple[str, ...] = ()
    if task.kind == "multiple_choice":
        from agentkd.roles.explainer import MC_DEFAULT_LABELS

        letters = tuple(label.strip().lower() for label in task.labels if label.strip()) or MC_DEFAULT_LABELS
    return ItemSchema(tuple(task.input_fields), letters)


def render(fields: Mapping[str, Any], schema: ItemSchema) -> str:
    if not schema.structured or len(schema.fields) == 1 and not schema.list_field(schema.fields[0]):
        return str(fields[schema.fields[0]])
    lines = []
    for name in schema.fields:
        value = fields[name]
        if schema.list_field(name):
            lines.append(f"{name}:")
            lines += [f"{letter}) {option}" for letter, option in zip(schema.letters, value)]
        else:
            lines.append(f"{name}: {value}")
    return "\n".join(lines)


def check_fields(value: Any, schema: ItemSchema) -> tuple[dict[str, Any] | None, str | None]:
    """(fields, None) when `value` is an item of the schema, else (None, why not)."""
    if not isinstance(value, dict):
        return None, f"expected one JSON object with fields {', '.join(schema.fields)}, got {type(value).__name__}"
    keys = {k.strip().lower() if isinstance(k, str) else k: v for k, v in value.items()}
    missing = [f for f in schema.fields if f not in keys]
    if missing:
        return None, f"missing field {missing[0]!r}"
    extra = sorted(str(k) for k in keys if k not in schema.fields)
    if extra:
        return None, f"unexpected field {extra[0]!r}"
    out: dict[str, Any] = {}
    for name in schema.fields:
        raw = keys[name]
        if schema.list_field(name):
            if not isinstance(raw, list) or not all(isinstance(o, str) and o.strip() for o in raw):
                return None, f"field {name!r} is not a list of non-empty strings"
            options = [" ".join(o.split()) for o in raw]
            if not MIN_OPTIONS <= len(options) <= len(schema.letters):
                return None, f"field {name!r} has {len(options)} options (expected {MIN_OPTIONS} to {len(schema.letters)})"
            if len({o.casefold() for o in options}) != len(options):
                return None, f"field {name!r} repeats an option"
            out[name] = options
        else:
            if not isinstance(raw, str) or not raw.strip():
                return None, f"field {name!r} is not a non-empty string"
            if "\n" in raw.strip():
                return None, f"field {name!r} spans several lines"
            out[name] = raw.strip()
        if len(json.dumps(out[name])) > MAX_FIELD_CHARS:
            return None, f"field {name!r} is too long (over {MAX_FIELD_CHARS} chars)"
    return out, None


@dataclass(frozen=True)
class GeneratedItem:
    fields: dict[str, Any] | None
    text: str | None  # the rendered item (what dedup and every prompt see)
    ok: bool
    reason: str | None

    @property
    def instruction(self) -> str | None:  # the name the loop's single-field path uses
        return self.text


def parse_item(reply: Any, finish_reason: str | None, schema: ItemSchema) -> GeneratedItem:
    """The generator's new item, checked against the schema and Lion's filters on its rendered text."""
    if not schema.structured:
        plain: Generated = parse_generated(reply, finish_reason)
        fields = {"instruction": plain.instruction} if plain.ok else None
        return GeneratedItem(fields, plain.instruction, plain.ok, plain.reason)
    if finish_reason == "length":
        return _rejected("truncated (finish_reason=length)")
    if not isinstance(reply, str) or not reply.strip():
        return _rejected("empty reply" if isinstance(reply, str) else f"reply is not text: {type(reply).__name__}")
    if len(reply) > MAX_REPLY_CHARS:
        return _rejected(f"reply too long ({len(reply)} chars)")
    found, value = find_json(reply)
    if not found:
        return _rejected("no JSON object in the reply")
    fields, why = check_fields(value, schema)
    if fields is None:
        return _rejected(why or "not an item")
    text = render(fields, schema)
    for name in schema.fields:  # each text field passes the instruction filters' echo and character checks
        for part in fields[name] if schema.list_field(name) else [fields[name]]:
            if "\x00" in part:
                return _rejected(f"field {name!r} contains a NUL character")
    checked = check_instruction(text)
    if not checked.ok:
        return _rejected(checked.reason or "rejected")
    return GeneratedItem(fields, text, True, None)


def item_json_schema(schema: ItemSchema) -> dict[str, Any]:
    """JSON schema for structured generator output of one item, strict-mode shaped."""
    properties: dict[str, Any] = {}
    for name in schema.fields:
        properties[name] = ({"type": "array", "items": {"type": "string"}, "minItems": MIN_OPTIONS,
                             "maxItems": len(schema.letters)} if schema.list_field(name) else {"type": "string"})
    return {"type": "object", "properties": properties, "required": list(schema.fields),
            "additionalProperties": False}


def item_format(schema: ItemSchema) -> str:
    """What the generator prompt's item_format block shows: the JSON shape of one item."""
    shape = {name: [f"<option {letter}>" for letter in schema.letters[:3]] + ["..."] if schema.list_field(name)
             else f"<{name}>" for name in schema.fields}
    note = (f" ({MIN_OPTIONS} to {len(schema.letters)} options, exactly one of them right)"
            if any(schema.list_field(n) for n in schema.fields) else "")
    return json.dumps(shape) + note


def fields_of_row(row: Mapping[str, Any], schema: ItemSchema, where: str) -> dict[str, Any]:
    """An input file row's fields, checked (a ConfigError naming `where`, the file and line, if not)."""
    fields, why = check_fields({k: v for k, v in row.items() if k in schema.fields}, schema)
    if fields is None:
        raise ConfigError(f"{where}: {why} (task.input_fields: {', '.join(schema.fields)})")
    return fields


def _rejected(reason: str) -> GeneratedItem:
    return GeneratedItem(None, None, False, reason)
