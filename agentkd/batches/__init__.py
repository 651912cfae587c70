"""Provider batch APIs under the gateway's cache, store and budget (runner.py), their durable record
(records.py) and the OpenAI / Anthropic adapters (providers.py). A batch request takes the gateway's
cache, store and budget path; batches know nothing of roles.

Must not import: agentkd.roles, agentkd.session, agentkd.workpool, agentkd.run_status, agentkd.lion,
agentkd.training, agentkd.cli, agentkd.teach, agentkd.estimate, agentkd.inference, agentkd.watch.
"""

from __future__ import annotations

from collections.abc import Callable

from agentkd.config import RunConfig, resolve_api_key


class BatchesPending(Exception):
    """batch.wait = false: every batch is submitted; the run exits (code 5) and the same command, run
    again, collects the results. Nothing is lost or bought twice meanwhile."""


def batch_runner(config: RunConfig, gateway, sim_base_url: str | None, say: Callable[[str], None] | None):
    """The session's batch runner: one batch adapter per provider in use; keys read here, as for online."""
    from agentkd.batches.providers import batch_api
    from agentkd.batches.runner import BatchRunner
    from agentkd.teachers import endpoints

    apis = {provider: batch_api(provider, url, resolve_api_key(key_env, provider=provider))
            for provider, (url, key_env) in endpoints(config, sim_base_url).items()}
    runner = BatchRunner(gateway, apis, config.batch, say=say)
    runner.collecting = any(config.role(role).mode == "batch" for role in ("answerer", "explainer", "referee",
                                                                           "generator"))
    return runner
