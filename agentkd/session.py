"""Everything a command needs to talk to teachers: the run folder, store, budget, gateway, prompts.

When the config names the simulated teacher and no base_url, the sim is started in-process on
loopback for the duration of the session (it is a stand-in, never a real teacher).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from rich.console import Console

from agentkd.batches import batch_runner
from agentkd.gateway.budget import Budget
from agentkd.config import RunConfig, dump_config
from agentkd.gateway.core import Gateway
from agentkd.gateway.ledger import resume_note
from agentkd.roles.replies import ReplyCheck
from agentkd.roles.requests import RolePrompts
from agentkd.run_status import RunStatus
from agentkd.store.writer import Store
from agentkd.teachers import build_teachers, endpoints


@dataclass
class TeacherSession:
    config: RunConfig
    store: Store
    gateway: Gateway
    prompts: RolePrompts
    status: RunStatus  # runs/<name>/status.json, kept current for `agentkd status`


def uses_embedded_sim(config: RunConfig) -> bool:
    providers = {config.teacher.provider} | {r.provider for r in config.roles.values() if r.provider}
    return "sim" in providers and not config.teacher.base_url


@asynccontextmanager
async def teacher_session(config: RunConfig, console: Console | None = None, *, command: str = "run",
                          role: str | None = None) -> AsyncIterator[TeacherSession]:
    """`console`: where a resumed run says that an earlier session was interrupted, and what it counts.
    `command` and `role`: what status.json says is running."""
    prompts = RolePrompts(config)  # bad prompt files fail before anything is opened
    sim = None
    sim_url = None
    if uses_embedded_sim(config):
        from agentkd.teachers.sim import SimTeacher

        sim = SimTeacher(config.sim, seed=config.sim.seed if config.sim.seed is not None else config.run.seed)
        sim_url = await sim.start()
    try:
        endpoints(config, sim_url)  # endpoint config errors surface before the store is opened
        run_dir = config.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "config.json")
        store = Store(run_dir / "agentkd.duckdb")
        try:
            teachers = build_teachers(config, sim_url)
            budget = Budget(usd=config.budget.usd, tokens=config.budget.tokens, price_of=config.price)
            gateway = Gateway(teachers=teachers, store=store, budget=budget, limits=config.limits,
                              seed=config.run.seed)
            say = (lambda line: console.print(line, highlight=False)) if console is not None else None
            gateway.batches = batch_runner(config, gateway, sim_url, say)
            gateway.tokenizer_hash = config.teacher.tokenizer_hash
            await gateway.start()
            gateway.reply_check = ReplyCheck(config.fail_fast, model_of=lambda r: config.role(r).model)
            note = resume_note(gateway.prior)
            if note is not None and console is not None:
                console.print(note, highlight=False)
            # Only once the store is ours: a second process refused by the lock leaves the file alone.
            status = RunStatus(run_dir, gateway, run=config.run.name, command=command, role=role,
                               iterations=config.loop.iterations if command == "run" else None)
            ended: BaseException | None = None
            try:
                await status.start()
                yield TeacherSession(config, store, gateway, prompts, status)
            except BaseException as err:
                ended = err
                raise
            finally:
                await gateway.aclose()
                try:
                    await status.close(ended)
                except OSError:
                    pass  # the session's own outcome matters more than its status file
        finally:
            await store.close()
    finally:
        if sim is not None:
            await sim.stop()
