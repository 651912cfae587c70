"""Prompt templates: load a `## system` / `## user` file, render values as inert data blocks.

Format and contract: prompts/README.md. Rendering is one regex pass over the template text; values are
inserted verbatim (never re-scanned, never str.format), each inside `<data name="...">` ... `</data>`,
with anything that could open or close a data block neutralised, so teacher text stays data.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from agentkd.roles.lookalikes import find_folded
from agentkd.shipped import shipped_dir

# Placeholders each built-in prompt may use ("?" marks optional ones). A custom template given for a
# prompt may use any subset of these names, never others: the caller only has these values.
PROMPT_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "answerer": ("instruction",),
    "explainer": ("input", "labels"),
    "labeler": ("input", "labels"),
    "explainer_given_label": ("input", "labels", "label"),
    "referee": ("instruction", "answer_a", "answer_b"),
    "generator_hard": ("seed_instruction", "?failed_answer", "?referee_comparison"),
    "generator_easy": ("seed_instruction",),
    "generator_plain": ("seed_instruction",),
    # The same three for structured items (label tasks): the reply is a JSON object of item_format's fields.
    "generator_hard_item": ("seed_instruction", "?failed_answer", "?referee_comparison", "item_format"),
    "generator_easy_item": ("seed_instruction", "item_format"),
    "generator_plain_item": ("seed_instruction", "item_format"),
}
# Shipped files that are not a prompt's built-in but an alternative a role's `prompt` may select:
# file stem -> the prompt it stands in for (e.g. `[roles.explainer] prompt = "prompts/explainer_6shot.md"`).
ALTERNATIVE_PROMPTS: dict[str, str] = {"explainer_6shot": "explainer"}

# One alternation, one pass. An optional placeholder alone on its line is matched with its line, so an
# omitted block leaves no blank line behind.
_PLACEHOLDER = re.compile(
    r"(?P<line>^(?P<indent>[ \t]*)\{\{\?(?P<lname>[A-Za-z_][A-Za-z0-9_]*)\}\}[ \t]*(?:\n|\Z))"
    r"|\{\{(?P<opt>\?)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}\}",
    re.MULTILINE,
)
# `<data`, `</data`, `< / DATA` ... (on the folded text): a backslash after "<" makes it inert.
_DELIMITER = re.compile(r"<(?=\s*/?\s*data\b)", re.IGNORECASE)
_HEADER = re.compile(r"^## (system|user)[ \t]*$", re.MULTILINE)


class TemplateError(Exception):
    """A template file is malformed, or rendering lacks a required value. Names the file."""


def builtin_prompts_dir() -> Path:
    """prompts/ at the repository root (a source checkout or an editable install), else the copy a
    wheel carries as package data (agentkd/prompts)."""
    return shipped_dir("prompts")


def neutralise(value: str) -> str:
    """Make a value unable to open or close a data block, or to look as if it did: a backslash after the "<"
    (`</data>` -> `<\\/data>`, `<data` -> `<\\data`) or after what reads as one once lookalikes are folded
    (lookalikes.py: `＜/data＞` -> `＜\\/data＞`, `&lt;/dаta&gt;` -> `&lt;\\/dаta&gt;`)."""
    cuts = find_folded(_DELIMITER, value)
    if not cuts:
        return value
    parts, last = [], 0
    for cut in cuts:
        parts += [value[last:cut], "\\"]
        last = cut
    parts.append(value[last:])
    return "".join(parts)


def data_block(name: str, value: str) -> str:
    return f'<data name="{name}">\n{neutralise(value)}\n</data>'


@dataclass(frozen=True)
class Template:
    name: str
    path: Path
    version: str  # sha256 of the file's bytes, first 12 hex chars
    system: str
    user: str
    required: frozenset[str]
    optional: frozenset[str]

    def render(self, values: Mapping[str, str | None]) -> list[dict[str, str]]:
        """OpenAI-style messages [system, user]. Values not used by this template are ignored."""
        for name in sorted(self.required):
            if values.get(name) is None:
                raise TemplateError(f"{self.path}: no value for required placeholder {{{{{name}}}}}")
        for name in sorted(self.required | self.optional):
            value = values.get(name)
            if value is not None and not isinstance(value, str):
                raise TemplateError(
                    f"{self.path}: placeholder {{{{{name}}}}} needs a str, got {type(value).__name__}"
                )
        return [
            {"role": "system", "content": _substitute(self.system, values)},
            {"role": "user", "content": _substitute(self.user, values)},
        ]


def _substitute(text: str, values: Mapping[str, str | None]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group("line") is not None:
            value = values.get(match.group("lname"))
            if value is None:
                return ""
            end = "\n" if match.group("line").endswith("\n") else ""
            return match.group("indent") + data_block(match.group("lname"), value) + end
        value = values.get(match.group("name"))
        return "" if value is None else data_block(match.group("name"), value)

    return _PLACEHOLDER.sub(replace, text)


def parse_template(text: str, *, name: str, path: Path) -> Template:
    """Split a template's text into its two sections and collect its placeholders."""
    headers = list(_HEADER.finditer(text))
    if [h.group(1) for h in headers] != ["system", "user"]:
        raise TemplateError(f"{path}: needs exactly one '## system' then one '## user' header line")
    if text[: headers[0].start()].strip():
        raise TemplateError(f"{path}: text before the '## system' header")
    system = text[headers[0].end() : headers[1].start()].strip("\n")
    user = text[headers[1].end() :].strip("\n")
    required: set[str] = set()
    optional: set[str] = set()
    for match in _PLACEHOLDER.finditer(text):
        if match.group("lname") is not None or match.group("opt"):
            optional.add(match.group("lname") or match.group("name"))
        else:
            required.add(match.group("name"))
    both = required & optional
    if both:
        raise TemplateError(f"{path}: placeholder {sorted(both)[0]!r} is both required and optional")
    return Template(
        name=name,
        path=path,
        version=hashlib.sha256(text.encode("utf-8")).hexdigest()[:12],
        system=system,
        user=user,
        required=frozenset(required),
        optional=frozenset(optional),
    )


def load_template(prompt: str, path: str | Path | None = None) -> Template:
    """Load the built-in template for `prompt` (a PROMPT_PLACEHOLDERS key), or the file at `path`.

    A file given for a prompt is checked against that prompt's placeholders: it may use fewer, not others,
    and may not make an optional one required.
    """
    if prompt not in PROMPT_PLACEHOLDERS:
        raise TemplateError(f"unknown prompt {prompt!r}; known: {', '.join(PROMPT_PLACEHOLDERS)}")
    file = Path(path) if path is not None else builtin_prompts_dir() / f"{prompt}.md"
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        hint = "" if path is not None else " (the built-in prompts are missing from this install; pass a path)"
        raise TemplateError(f"{file}: template file not found{hint}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TemplateError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    template = parse_template(text.replace("\r\n", "\n"), name=prompt, path=file)
    # The version hashes the bytes as stored, so a line-ending change is a new version too.
    template = replace(template, version=hashlib.sha256(raw).hexdigest()[:12])
    allowed = {p.lstrip("?") for p in PROMPT_PLACEHOLDERS[prompt]}
    allowed_optional = {p[1:] for p in PROMPT_PLACEHOLDERS[prompt] if p.startswith("?")}
    for name in sorted(template.required | template.optional):
        if name not in allowed:
            raise TemplateError(
                f"{file}: placeholder {{{{{name}}}}} is not one the {prompt} prompt provides "
                f"({', '.join(sorted(allowed))})"
            )
    for name in sorted(template.required & allowed_optional):
        raise TemplateError(f"{file}: {{{{{name}}}}} may be absent for {prompt}; write it as {{{{?{name}}}}}")
    return template
