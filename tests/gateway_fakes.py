"""A scripted Teacher at the adapter seam (the Teacher protocol), a recording clock and sleep.

The gateway's own code runs for real; only the provider behind the seam is scripted, as httpx's
MockTransport scripts a server behind a real client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from agentkd.teachers.base import TeacherError, TeacherReply, TeacherRequest


class FakeClock:
    """Monotonic time that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


class ScriptedTeacher:
    """Replays a script of outcomes (a TeacherError to raise, or a reply), then answers normally."""

    provider = "sim"

    def __init__(self, script: list[TeacherError | TeacherReply | Callable] | None = None,
                 *, delay: Callable[[], float] | None = None, usage: tuple[int, int] = (20, 10)) -> None:
        self.script = list(script or [])
        self.calls: list[TeacherRequest] = []
        self.delay = delay
        self.usage = usage

    async def complete(self, request: TeacherRequest, *, timeout_s: float) -> TeacherReply:
        self.calls.append(request)
        if self.delay is not None:
            await asyncio.sleep(self.delay())
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, TeacherError):
                raise step
            if isinstance(step, TeacherReply):
                return step
        return TeacherReply(text=f"answer to {request.messages[-1]['content']}", finish_reason="stop",
                            input_tokens=self.usage[0], output_tokens=self.usage[1])

    async def sent(self, n: int = 1, *, timeout_s: float = 5.0) -> None:
        """Wait until `n` requests have reached this teacher (the first one waits for the store's first
        cover block, whose commit may take longer than a fixed sleep on a loaded machine)."""
        for _ in range(int(timeout_s / 0.01)):
            if len(self.calls) >= n:
                return
            await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        pass
