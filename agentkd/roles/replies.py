"""Fail fast: a role whose results cannot be used stops the run before more budget goes to it.

Per role and stage (a stage of one iteration; a `teach` is one stage), results are counted as the role calls return them
(roles/calls.py): the referee's judgment of each order after its one re-ask (no scores: unusable,
and the pair is unscored), the explainer's and the generator's replies (no usable label, rationale
or instruction). Stored replies served again on a resume count like new ones, so a resumed run with
the same teacher stops again at once, for free.

Once `fail_fast.min_results` results are in, the run stops when the unusable share is above
`fail_fast.max_share` beyond chance: the lower end of its one-sided 95% Wilson interval is above it.
A teacher that fails every time is stopped at exactly min_results (20 of 20: bound 0.88; for the
referee, 10 pairs and 40 calls); one whose results fail a third of the time, which a run tolerates,
is practically never stopped by noise (simulated: 0.08% of stages at 15% of pairs unusable in both
orders and 20% in one, 40 pairs a stage). Counting each reply instead, re-asks included, would stop
that referee in about one stage in nine, and a plain "share > 50% after 20 replies" in nearly one in two.

Also here: the parse-failure share of every role's stored replies, for `agentkd report` and
`agentkd status`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentkd.config import FailFastSection, TaskSection
from agentkd.roles.explainer import parse_explanation, parse_rationale, task_definition
from agentkd.roles.items import item_schema, parse_item
from agentkd.roles.referee import parse_judgment

Z_ONE_SIDED_95 = 1.645
SAMPLES_KEPT = 3  # unusable replies kept per role and stage, to show in the stop message
SAMPLE_CHARS = 300


def wilson_lower(failures: int, n: int, z: float = Z_ONE_SIDED_95) -> float:
    """Lower end of the Wilson score interval for a share of failures out of n."""
    if n == 0:
        return 0.0
    p = failures / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


@dataclass
class Tally:
    results: int = 0
    unusable: int = 0
    samples: list[tuple[str | None, str]] = field(default_factory=list)  # (why, the raw reply)

    @property
    def share(self) -> float:
        return self.unusable / self.results if self.results else 0.0


class UnusableReplies(Exception):
    """A role's results are unusable beyond the fail_fast threshold: the run stops (exit 5)."""

    def __init__(self, role: str, stage: str, model: str, tally: Tally, bound: float, max_share: float) -> None:
        self.role, self.stage, self.model = role, stage, model
        self.tally, self.bound, self.max_share = tally, bound, max_share
        super().__init__(f"{tally.unusable} of the first {tally.results} {role} results in stage {stage} "
                         f"were unusable ({tally.share:.0%}, model {model})")

    def report(self) -> str:
        """The stop message. Replies are teacher output: shown as JSON strings, so no byte of them is
        read as markup or as a terminal control sequence."""
        t = self.tally
        lines = [
            f"stopped: {self}. The share is above fail_fast.max_share ({self.max_share:.0%}) beyond chance "
            f"(lower 95% bound {self.bound:.0%}), so no more budget goes to this role.",
            f"First unusable {self.role} replies (as received):",
        ]
        for number, (why, reply) in enumerate(t.samples, start=1):
            lines.append(f"  {number}. {json.dumps(reply, ensure_ascii=False)}"
                         + (f"  ({why})" if why else ""))
        lines.append(f"Everything answered so far is stored. Check that model {self.model} can do the "
                     f"{self.role} role (roles.{self.role}.model, roles.{self.role}.prompt), or raise "
                     f"fail_fast.max_share; then re-run the same command (stored replies are not bought again).")
        return "\n".join(lines)


class ReplyCheck:
    """Counts each role's results in the current stage and raises UnusableReplies past the threshold."""

    def __init__(self, section: FailFastSection, model_of: Callable[[str], str]) -> None:
        self.section = section
        self.model_of = model_of  # role -> the model that plays it
        self.stage = ""  # set by whoever runs the stages (loop, teach)
        self.tallies: dict[tuple[str, str], Tally] = {}

    def record(self, role: str, usable: bool, reply: str | None, why: str | None = None) -> None:
        tally = self.tallies.setdefault((role, self.stage), Tally())
        tally.results += 1
        if not usable:
            tally.unusable += 1
            if len(tally.samples) < SAMPLES_KEPT:
                tally.samples.append((why, (reply or "")[:SAMPLE_CHARS]))
        if tally.results < self.section.min_results or self.section.max_share >= 1:
            return
        bound = wilson_lower(tally.unusable, tally.results)
        if bound > self.section.max_share:
            raise UnusableReplies(role, self.stage, self.model_of(role), tally, bound, self.section.max_share)

    def shares(self) -> dict[str, dict[str, Any]]:
        """For status.json: "role/stage" -> results, unusable, share."""
        return {f"{role}/{stage}": {"results": t.results, "unusable": t.unusable, "share": round(t.share, 4)}
                for (role, stage), t in self.tallies.items()}


# ---- parse failures of stored replies ------------------------------------------------------------
# prompt (the part of calls.prompt_version before ":") -> role; the answerer's replies have no parse.
_PROMPT_ROLES = {"referee": "referee", "explainer": "explainer", "labeler": "explainer",
                 "explainer_given_label": "explainer",
                 **{f"generator_{p}{s}": "generator" for p in ("hard", "easy", "plain") for s in ("", "_item")}}

_STORED_REPLIES_SQL = """
SELECT prompt_version, role, response_text, finish_reason FROM calls
WHERE status = 'ok' AND split_part(prompt_version, ':', 1) IN ({prompts})
QUALIFY row_number() OVER (PARTITION BY key ORDER BY created_at) = 1
"""


def reply_parses(prompt: str, text: str | None, finish_reason: str | None, task, items) -> bool:
    """Whether one stored reply of a parsed role is usable, by the parser the run itself applies (a
    multiple-choice item's options are not stored with the call: its explainer reply is read without them)."""
    role = _PROMPT_ROLES[prompt]
    if role == "referee":
        return parse_judgment(text).ok
    if role == "generator":
        return parse_item(text, finish_reason, items).ok
    if prompt == "explainer_given_label":
        return parse_rationale(text, "", task).ok  # ok iff a rationale was found; the label is given
    return parse_explanation(text, task).ok


def parse_failures(store, task: TaskSection | None = None) -> list[dict[str, Any]]:
    """Per role (eval's referee calls apart): replies stored, and how many did not parse."""
    task = task or TaskSection()
    definition, items = task_definition(task), item_schema(task)
    placeholders = ", ".join(f"'{p}'" for p in _PROMPT_ROLES)
    counts: dict[tuple[str, str], list[int]] = {}
    for prompt_version, booked, text, finish_reason in store.query(_STORED_REPLIES_SQL.format(prompts=placeholders)):
        prompt = prompt_version.split(":", 1)[0]
        key = (_PROMPT_ROLES[prompt], "eval" if booked == "eval" else "")
        tally = counts.setdefault(key, [0, 0])
        tally[0] += 1
        tally[1] += not reply_parses(prompt, text, finish_reason, definition, items)
    return [{"role": role + (" (eval)" if where else ""), "replies": n, "failures": k, "share": k / n}
            for (role, where), (n, k) in sorted(counts.items())]
