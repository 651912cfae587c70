"""Explainer role (arXiv 2403.15886): one zero-shot prompt -> "Label: ..." + "Reason: ...", parsed here.

Per-task label patterns with synonym maps; the rationale is the text after the label (or after
"Reason:" / "because"); echoed prefixes are stripped; a rationale under min_rationale_words words counts
as missing. Parsing never raises on teacher text: a failure is an Explanation with ok=False and a reason.
ok means "has a usable label"; a row with ok=True and rationale=None trains the label task only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from agentkd.config import ConfigError, TaskSection
from agentkd.roles.json_reply import MAX_REPLY_CHARS, find_json, strip_fences

MAX_RATIONALE_CHARS = 2_000
MAX_NUMBER_CHARS = 40  # a label with more digits is garbage (and int() refuses > 4,300 digits)

NLI_LABELS = ("entailment", "neutral", "contradiction")
NLI_SYNONYMS: dict[str, str] = {
    "entails": "entailment", "entailed": "entailment", "true": "entailment", "valid": "entailment",
    "yes": "entailment", "follows": "entailment", "implied": "entailment",
    "contradicts": "contradiction", "contradictory": "contradiction", "contradicted": "contradiction",
    "false": "contradiction", "no": "contradiction",
    "inconclusive": "neutral", "uncertain": "neutral", "unknown": "neutral", "maybe": "neutral",
    "undetermined": "neutral", "not enough information": "neutral", "cannot be determined": "neutral",
    "can't tell": "neutral", "cannot tell": "neutral", "it is not possible to tell": "neutral",
}
MC_DEFAULT_LABELS = ("a", "b", "c", "d", "e")

_EDGE = " \t\n*_`\"'“”‘’.,;:!?()[]{}<>"
_NUMBER = re.compile(r"(?<![\w.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w,])")
_NEGATION = re.compile(r"\bnot\b|n't\b")
_LABEL_LINE = re.compile(
    r"^[ \t>#*-]*(?:final\s+)?(?:label|answer|prediction|classification)[ \t*]*[:=][ \t*]*(?P<rest>.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_REASON_LINE = re.compile(
    r"^[ \t>#*-]*(?:reason|rationale|explanation|justification)[ \t*]*[:=\-][ \t*]*(?P<rest>.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_ANSWER_IS = re.compile(r"(?:\bthe\s+)?\b(?:answer|label)\s+is\s*:?\s*(?P<rest>[^\n]+)", re.IGNORECASE)
# Where the label part of a line ends and an inline rationale may begin.
_LABEL_END = re.compile(r"(?<=\S)(?:\s+because\b|[.;,]\s|\s[-–—]\s|\s*\n)", re.IGNORECASE)
_ECHOED = re.compile(
    r"^(?:\s|[*_>#-])*(?:answer|explanation|label|reason|rationale|justification|because|since)\b\s*[:=,\-]?\s*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TaskDefinition:
    """What the explainer labels: the label set, surface forms that mean each label, and the prompt text."""

    kind: str
    labels: tuple[str, ...]  # canonical labels; () for arithmetic (any whole number)
    synonyms: Mapping[str, str] = field(default_factory=dict)  # lowercase surface form -> label
    labels_text: str = ""  # rendered into the prompt's labels block
    min_rationale_words: int = 5

    def with_options(self, options: Sequence[str]) -> TaskDefinition:
        """Multiple choice: the item's options. Its labels are the first len(options) letters, the labels
        block lists them with their text ("a) Paris"), and each option's text (and its number, unless some
        option's text is that number: for options 4, 3, 7 a reply "3" means the option 3) is accepted as
        its letter."""
        labels = self.labels[: len(options)]
        texts = {_norm(text): label for text, label in zip(options, labels) if _norm(text)}
        numbers = {str(i): label for i, label in enumerate(labels, start=1) if str(i) not in texts}
        synonyms = {k: v for k, v in self.synonyms.items() if v in labels and not k.isdigit()}
        listing = "\n".join(f"{label}) {text}" for label, text in zip(labels, options))
        return replace(self, labels=labels, synonyms={**synonyms, **numbers, **texts}, labels_text=listing)

    def canonical(self, raw: str) -> tuple[str | None, str | None]:
        """(label, None) or (None, why not) for the label part of a reply."""
        if self.kind == "arithmetic":
            return _whole_number(raw)
        surface = _norm(raw)
        if not surface:
            return None, "empty label"
        forms = self._forms()
        if surface in forms:
            return forms[surface], None
        if self.kind == "multiple_choice":
            marked = re.fullmatch(r"(?:option|choice|answer)\s+(\w+)", surface)
            if marked and marked.group(1) in forms:
                return forms[marked.group(1)], None
        if _NEGATION.search(surface):
            return None, f"negated label: {raw.strip()[:80]!r}"
        found = {forms[m.group(0)] for m in self._scanner().finditer(surface)}
        if len(found) == 1:
            return found.pop(), None
        if found:
            return None, f"ambiguous label ({', '.join(sorted(found))}): {raw.strip()[:80]!r}"
        return None, f"label not in the label set: {raw.strip()[:80]!r}"

    def _forms(self) -> dict[str, str]:
        return {**{label: label for label in self.labels}, **self.synonyms}

    def _scanner(self) -> re.Pattern[str]:
        # Whole-word occurrences of any label or synonym, longest first. Single letters and digits (the
        # multiple-choice letters) only count when marked, "b)" or "(b)", never as the article "a".
        forms = sorted((f for f in self._forms() if len(f) > 1), key=len, reverse=True)
        parts = [rf"(?<!\w){re.escape(f)}(?!\w)" for f in forms]
        short = [re.escape(f) for f in self._forms() if len(f) == 1]
        pattern = "|".join(parts)
        if short:
            letters = "|".join(short)
            pattern = (pattern + "|" if pattern else "") + rf"(?<=\()(?:{letters})(?=\))|(?<!\w)(?:{letters})(?=\))"
        return re.compile(pattern or r"(?!x)x")


def task_definition(section: TaskSection) -> TaskDefinition:
    """The built-in definition for section.kind, with the config's labels and synonyms applied."""
    labels = tuple(label.strip().lower() for label in section.labels if label.strip())
    own = {_norm(k): v.strip().lower() for k, v in section.synonyms.items()}
    words = section.min_rationale_words
    if section.kind == "arithmetic":
        return TaskDefinition("arithmetic", (), {}, "a whole number", words)
    if section.kind == "nli":
        labels = labels or NLI_LABELS
        synonyms = {k: v for k, v in NLI_SYNONYMS.items() if v in labels}
    elif section.kind == "multiple_choice":
        labels = labels or MC_DEFAULT_LABELS
        synonyms = {str(i): label for i, label in enumerate(labels, start=1)}
    else:
        if not labels:
            raise ConfigError("task.labels: task.kind = 'custom' needs a non-empty label set")
        synonyms = {}
    for key, target in own.items():
        if target not in labels:
            raise ConfigError(f"task.synonyms.{key}: maps to {target!r}, which is not in task.labels")
    return TaskDefinition(section.kind, labels, {**synonyms, **own}, ", ".join(labels), words)


@dataclass(frozen=True)
class Explanation:
    label: str | None
    rationale: str | None
    ok: bool  # a usable label was found
    reason: str | None  # why not ok, or why the rationale is missing


def parse_explanation(text: Any, task: TaskDefinition) -> Explanation:
    """Parse a zero-shot explainer reply (two lines "Label:" / "Reason:", JSON, or looser prose)."""
    if not isinstance(text, str) or not text.strip():
        return Explanation(None, None, False, "empty reply")
    if len(text) > MAX_REPLY_CHARS:
        return Explanation(None, None, False, f"reply too long ({len(text)} chars)")
    found, value = find_json(text)
    if found and isinstance(value, dict) and _key(value, "label") is not None:
        raw_label = _key(value, "label")
        if isinstance(raw_label, bool) or not isinstance(raw_label, (str, int, float)):
            return Explanation(None, None, False, f"JSON label is not a string: {type(raw_label).__name__}")
        label, why = task.canonical(str(raw_label))
        raw_reason = next((r for k in ("rationale", "reason", "explanation") if (r := _key(value, k))), None)
        return _finish(label, why, raw_reason if isinstance(raw_reason, str) else None, task)

    body = strip_fences(text).replace("**", "")
    reason_match = _REASON_LINE.search(body)
    label_match = _LABEL_LINE.search(body) or _ANSWER_IS.search(body)
    if label_match:
        rest = label_match.group("rest")
        cut = _LABEL_END.search(rest)
        raw_label, inline = (rest[: cut.start()], rest[cut.start() :]) if cut else (rest, "")
        label, why = task.canonical(raw_label)
        if reason_match:
            rationale = _reason_text(body, reason_match, label_match)
        else:
            rationale = inline + "\n" + body[label_match.end() :]
            if not _clean_rationale(rationale, task)[0]:  # reasoning written before the label line
                rationale = body[: label_match.start()] or rationale
        return _finish(label, why, rationale, task)

    # No label line: accept a reply that opens with exactly a label ("Entailment. The premise says...").
    first = body.lstrip().split("\n", 1)[0]
    cut = _LABEL_END.search(first)
    head = first[: cut.start()] if cut else first
    label, why = _exact(task, head)
    if label is None:
        return Explanation(None, None, False, "no label found")
    rest = body.lstrip()[len(head) :]
    rationale = _reason_text(body, reason_match, None) if reason_match else rest
    return _finish(label, why, rationale, task)


def parse_rationale(text: Any, label: str, task: TaskDefinition) -> Explanation:
    """Parse a rationalisation reply ("Reason: ..." for a given gold label): ok iff a rationale is found."""
    if not isinstance(text, str) or not text.strip():
        return Explanation(label, None, False, "empty reply")
    if len(text) > MAX_REPLY_CHARS:
        return Explanation(label, None, False, f"reply too long ({len(text)} chars)")
    found, value = find_json(text)
    if found and isinstance(value, dict):
        raw = next((r for k in ("rationale", "reason", "explanation") if (r := _key(value, k))), None)
        raw = raw if isinstance(raw, str) else ""
    else:
        body = strip_fences(text).replace("**", "")
        match = _REASON_LINE.search(body)
        raw = _reason_text(body, match, _LABEL_LINE.search(body)) if match else body
    rationale, why = _clean_rationale(raw, task)
    return Explanation(label, rationale, rationale is not None, why)


def explanation_schema(task: TaskDefinition) -> dict[str, Any]:
    """JSON schema for structured output of the explainer ({"label", "rationale"}), strict-mode shaped."""
    label: dict[str, Any] = {"type": "string"}
    if task.kind == "arithmetic":
        label["pattern"] = r"^-?[0-9]+$"
        label["description"] = "the answer as a whole number"
    elif task.labels:
        label["enum"] = list(task.labels)
    return {
        "type": "object",
        "properties": {"label": label, "rationale": {"type": "string", "description": "one sentence"}},
        "required": ["label", "rationale"],
        "additionalProperties": False,
    }


def rationale_schema() -> dict[str, Any]:
    """JSON schema for structured output of the rationalisation prompt ({"rationale"})."""
    return {
        "type": "object",
        "properties": {"rationale": {"type": "string", "description": "one sentence"}},
        "required": ["rationale"],
        "additionalProperties": False,
    }


def _finish(label: str | None, why: str | None, raw_rationale: str | None, task: TaskDefinition) -> Explanation:
    if label is None:
        return Explanation(None, None, False, why or "no label found")
    rationale, missing = _clean_rationale(raw_rationale or "", task)
    return Explanation(label, rationale, True, missing)


def _clean_rationale(raw: str, task: TaskDefinition) -> tuple[str | None, str | None]:
    text = raw.replace("**", "").strip()
    previous = None
    while previous != text:  # strip echoed prefixes, however many are stacked
        previous = text
        text = _ECHOED.sub("", text, count=1).lstrip(" \t\n:-,.;\"'“”").rstrip()
    text = " ".join(text.split())
    if not text:
        return None, "no rationale"
    if len(text) > MAX_RATIONALE_CHARS:
        return None, f"rationale too long ({len(text)} chars)"
    if len(text.split()) < task.min_rationale_words:
        return None, f"rationale under {task.min_rationale_words} words"
    return text, None


def _reason_text(body: str, reason: re.Match[str], label: re.Match[str] | None) -> str:
    end = len(body)
    if label is not None and label.start() > reason.start():
        end = label.start()
    return body[reason.start("rest") : end]


def _exact(task: TaskDefinition, raw: str) -> tuple[str | None, str | None]:
    """Only a reply part that is exactly a label (or one whole number) counts: no scanning of prose."""
    surface = _norm(raw)
    if task.kind == "arithmetic":
        return task.canonical(surface) if _NUMBER.fullmatch(surface) else (None, "no label found")
    forms = task._forms()
    return (forms[surface], None) if surface in forms else (None, "no label found")


def _whole_number(raw: str) -> tuple[str | None, str | None]:
    numbers = {m.group(0).replace(",", "") for m in _NUMBER.finditer(raw)}
    if not numbers:
        return None, f"no whole number in label: {raw.strip()[:80]!r}"
    if len(numbers) > 1:
        return None, f"ambiguous label (several numbers): {raw.strip()[:80]!r}"
    number = numbers.pop()
    if len(number) > MAX_NUMBER_CHARS:
        return None, f"number too long ({len(number)} chars)"
    if "." not in number:
        return str(int(number)), None
    value = float(number)
    if not value.is_integer():
        return None, f"label is not a whole number: {number!r}"
    return str(int(value)), None


def _norm(raw: str) -> str:
    return " ".join(raw.strip(_EDGE).lower().split()).strip(_EDGE)


def _key(obj: dict[str, Any], name: str) -> Any:
    for key, value in obj.items():
        if isinstance(key, str) and key.strip().lower() == name:
            return value
    return None
