"""run_all: a deferred item goes to the back of the line and is answered later; its slot is free meanwhile."""

from __future__ import annotations

import asyncio

from agentkd.teachers.base import RateLimited, TeacherReply, TeacherRequest
from agentkd.workpool import MAX_DEFERRALS, run_all
from tests.gateway_fakes import ScriptedTeacher
from tests.test_gateway import make_gateway, request


class DeferringTeacher(ScriptedTeacher):
    """Asks for a wait past limits.max_wait_s the first `times` times it sees a question."""

    def __init__(self, deferred: dict[str, int], wait_ms: int = 20) -> None:
        super().__init__()
        self.wait_ms = wait_ms
        self.deferred = dict(deferred)
        self.times: list[tuple[str, float]] = []  # (question, event-loop time it arrived)

    async def complete(self, request: TeacherRequest, *, timeout_s: float) -> TeacherReply:
        text = request.messages[-1]["content"]
        self.times.append((text, asyncio.get_running_loop().time()))
        if self.deferred.get(text, 0) > 0:
            self.deferred[text] -= 1
            self.calls.append(request)
            raise RateLimited("HTTP 429", status=429, headers={"retry-after-ms": str(self.wait_ms)})
        return await super().complete(request, timeout_s=timeout_s)


def asked(teacher: ScriptedTeacher) -> list[str]:
    return [r.messages[-1]["content"] for r in teacher.calls]


async def run(tmp_path, teacher, texts):
    # max_wait_s below the wait asked for: the item is deferred (a real wait on the event loop's clock).
    gateway, store, _ = await make_gateway(tmp_path, teacher, max_concurrency=1, max_wait_s=0.001)

    async def handle(text: str) -> str:
        return (await gateway.complete(request(text))).text

    try:
        return await asyncio.wait_for(run_all(texts, handle, gateway=gateway, label="t", concurrency=1,
                                              show_progress=False), timeout=20)
    finally:
        await gateway.aclose()
        await store.close()


async def test_a_deferred_item_is_requeued_behind_the_others_and_answered(tmp_path):
    teacher = DeferringTeacher({"b": 1}, wait_ms=400)
    outcome = await run(tmp_path, teacher, ["a", "b", "c", "d"])
    assert outcome.results == {i: f"answer to {t}" for i, t in enumerate("abcd")}
    assert outcome.deferred == 1 and outcome.failed == {}
    # b's slot went to the items behind it; b came back after them, once its wait was over.
    assert asked(teacher).count("b") == 2 and asked(teacher)[-1] == "b"
    first, second = [t for text, t in teacher.times if text == "b"]
    assert second - first >= 0.4 - 1e-3  # not before the 400 ms it was asked to wait (a lower bound only)


async def test_an_item_deferred_past_max_deferrals_is_skipped_and_the_rest_answered(tmp_path):
    teacher = DeferringTeacher({"b": MAX_DEFERRALS + 5})
    outcome = await run(tmp_path, teacher, ["a", "b", "c"])
    assert outcome.failed == {1: "RateLimited"} and sorted(outcome.results) == [0, 2]
    assert outcome.deferred == MAX_DEFERRALS + 1 and asked(teacher).count("b") == MAX_DEFERRALS + 1
