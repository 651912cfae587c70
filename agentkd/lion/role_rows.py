"""What the referee's and the generator's results are stored as: the rows the loop and `agentkd teach`
both write, so the same SQL reads a loop run and a teach run.

referee    two `judgments` rows (one per order, the reply's scores as teacher/student) and a `verdicts`
           row; teach stores them at iteration 0 (no student iteration of this run was judged).
generator  one `instructions` row per new instruction id, with its source (the prompt, see
           selection.py), parent, call and the filter's verdict: pool 'train', or 'rejected' with the
           reason (and ROUGE-L to its nearest pool instruction for a near-duplicate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentkd.lion.dedup import InstructionIndex, instruction_id
from agentkd.roles.items import GeneratedItem
from agentkd.lion.pools import Stored
from agentkd.roles.calls import JudgedPair


def judgment_rows(pair: JudgedPair, iid: str, iteration: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The referee's two judgments and its verdict on instruction `iid`, as `judgments` rows and a `verdicts` row."""
    first, second = pair.teacher_first, pair.student_first  # in student_first the student is answer A
    judgments = [
        {"instruction_id": iid, "iteration": iteration, "order": "teacher_first", "teacher_score": first.score_a,
         "student_score": first.score_b, "parsed_ok": first.ok, "reason": first.reason, "call_key": pair.keys[0]},
        {"instruction_id": iid, "iteration": iteration, "order": "student_first", "teacher_score": second.score_b,
         "student_score": second.score_a, "parsed_ok": second.ok, "reason": second.reason, "call_key": pair.keys[1]},
    ]
    v = pair.verdict
    verdict = {"instruction_id": iid, "iteration": iteration, "teacher_score": v.teacher_score,
               "student_score": v.student_score, "label": v.label, "order_disagreement": v.order_disagreement}
    return judgments, verdict


@dataclass(frozen=True)
class Decision:
    """The filter's verdict on one generated instruction, and the row to store (None: already stored)."""

    accepted: bool
    reason: str | None
    rouge_nearest: float | None
    row: dict[str, Any] | None


class GeneratedIntake:
    """Decides each generated instruction once, against every pool instruction and the earlier ones.

    `index` holds the texts a new instruction must not near-duplicate; `stored` is what the store held
    when the stage began. An id the store already holds gets no second row: it is what an earlier try
    of the same stage decided (same parent and iteration: that decision again, so a resumed stage
    counts what it accepted), else a copy of an instruction already pooled (rejected, ROUGE-L 1.0) or
    of one already rejected (that rejection). An id met twice in one stage is decided at its first.
    """

    def __init__(self, index: InstructionIndex, stored: dict[str, Stored]) -> None:
        self.index = index
        self.stored = stored
        self.decided: dict[str, Decision] = {}

    def decide(self, generated: GeneratedItem, *, parent_id: str, source: str, iteration: int, call_key: str | None,
               fallback_id: str, fields: str | None = None) -> Decision:
        """`fields`: a structured item's fields as JSON text (items.py), stored with an accepted one."""
        text = generated.instruction
        iid = instruction_id(str(text) if generated.ok or text else fallback_id)
        earlier = self.decided.get(iid)
        if earlier is not None:
            return self._copy_of(earlier)
        row = {"id": iid, "text": text or "", "source": source, "parent_id": parent_id, "iteration": iteration,
               "call_key": call_key}
        stored = self.stored.get(iid)
        if stored is not None:
            decision = self._stored_decision(stored, parent_id, iteration)
        elif not generated.ok:
            decision = Decision(False, generated.reason, None, {**row, "pool": "rejected",
                                                                 "rejected_reason": generated.reason})
        else:
            is_new, score = self.index.add_if_new(text)
            reason = None if is_new else f"near-duplicate (ROUGE-L {score:.2f})"
            rouge = None if is_new else round(score, 4)  # exact only for candidates above the threshold
            decision = Decision(is_new, reason, rouge, {**row, "pool": "train" if is_new else "rejected",
                                                         "rouge_nearest": rouge, "rejected_reason": reason,
                                                         "fields": fields})
        self.decided[iid] = decision
        return decision

    @staticmethod
    def _stored_decision(stored: Stored, parent_id: str, iteration: int) -> Decision:
        if stored.pool == "rejected":
            return Decision(False, stored.rejected_reason, stored.rouge_nearest, None)
        if stored.pool == "train" and stored.parent_id == parent_id and stored.iteration == iteration:
            return Decision(True, None, None, None)
        return Decision(False, "near-duplicate (ROUGE-L 1.00)", 1.0, None)

    @staticmethod
    def _copy_of(earlier: Decision) -> Decision:
        if earlier.accepted:
            return Decision(False, "near-duplicate (ROUGE-L 1.00)", 1.0, None)
        return Decision(False, earlier.reason, earlier.rouge_nearest, None)

    def accepted_ids(self) -> set[str]:
        return {iid for iid, d in self.decided.items() if d.accepted}
