"""Teacher adapters: build one per provider in use from the run config. base.py says what a call is;
wire.py (aiohttp) and sdk.py (the official SDKs) speak the providers' APIs; sim/ is the simulated
teacher. An adapter sends one request and returns one reply: budget, retries and records are the
gateway's.

Must not import: agentkd.gateway, agentkd.store, agentkd.roles, agentkd.batches, agentkd.session,
agentkd.workpool, agentkd.run_status, agentkd.lion, agentkd.training, agentkd.cli, agentkd.teach,
agentkd.estimate, agentkd.inference, agentkd.watch.
"""

from __future__ import annotations

from agentkd.config import ConfigError, RunConfig, resolve_api_key
from agentkd.teachers.base import Teacher

DEFAULT_BASE_URLS = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}


def endpoints(config: RunConfig, sim_base_url: str | None = None) -> dict[str, tuple[str, str | None]]:
    """provider -> (base_url, api_key_env) for the teacher and every role override."""
    found: dict[str, tuple[str, str | None]] = {}
    entries = [("teacher", config.teacher.provider, config.teacher.base_url, config.teacher.api_key_env)]
    entries += [(f"roles.{name}", r.provider, r.base_url, r.api_key_env)
                for name, r in config.roles.items() if r.provider and r.provider != config.teacher.provider]
    for where, provider, base_url, key_env in entries:
        if provider == "sim":
            base_url = base_url or sim_base_url
            if base_url is None:
                raise ConfigError(f"{where}: the simulated teacher is not running")
            base_url = base_url.rstrip("/") + "/v1" if not base_url.rstrip("/").endswith("/v1") else base_url
        elif provider == "openai_compatible" and not base_url:
            raise ConfigError(f"{config.source}: {where}.base_url is required for openai_compatible")
        url = base_url or DEFAULT_BASE_URLS[provider]
        if provider in found and found[provider] != (url, key_env):
            raise ConfigError(f"{config.source}: {where}: provider {provider!r} is configured twice "
                              f"with different base_url/api_key_env")
        found[provider] = (url, key_env)
    return found


def build_teachers(config: RunConfig, sim_base_url: str | None = None) -> dict[str, Teacher]:
    """One adapter per provider; keys are read from the environment here and nowhere else."""
    from agentkd.teachers.sdk import AnthropicSDKTeacher, OpenAISDKTeacher
    from agentkd.teachers.wire import WireTeacher

    teachers: dict[str, Teacher] = {}
    for provider, (url, key_env) in endpoints(config, sim_base_url).items():
        try:
            api_key = resolve_api_key(key_env, provider=provider, where=_key_setting(config, provider))
        except ConfigError as err:
            raise ConfigError(f"{config.source}: {err}") from None  # which file to fix, as for any config error
        wire = "anthropic" if provider == "anthropic" else "openai"
        if config.teacher.transport == "sdk":
            if wire == "anthropic":
                teachers[provider] = AnthropicSDKTeacher(base_url=url, api_key=api_key)
            else:
                teachers[provider] = OpenAISDKTeacher(provider=provider, base_url=url, api_key=api_key)
        else:
            teachers[provider] = WireTeacher(provider=provider, wire=wire, base_url=url, api_key=api_key,
                                             max_connections=config.limits.max_concurrency)
    return teachers


def _key_setting(config: RunConfig, provider: str) -> str:
    """The config key that names this provider's key variable: the teacher's, or a role override's."""
    if provider == config.teacher.provider:
        return "teacher.api_key_env"
    role = next(name for name, r in config.roles.items() if r.provider == provider)
    return f"roles.{role}.api_key_env"
