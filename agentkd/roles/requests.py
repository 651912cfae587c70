"""Role calls as TeacherRequests: template + the role's provider/model/temperature + output schema.

One object per run config. Each method renders one prompt (teacher text goes in as data blocks) and
returns the request the gateway sends; the prompt's content hash is part of the request key, so an
edited prompt is never answered from a stale cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from agentkd.config import ConfigError, RunConfig
from agentkd.roles.items import item_format, item_json_schema, item_schema
from agentkd.roles.explainer import TaskDefinition, explanation_schema, rationale_schema, task_definition
from agentkd.roles.generator import generated_schema
from agentkd.roles.referee import judgment_schema
from agentkd.roles.template import Template, TemplateError, load_template
from agentkd.shipped import resolve_shipped
from agentkd.teachers.base import TeacherRequest

# role -> the prompts it sends; a role's `prompt` override names a file (its first prompt) or a folder
# holding <prompt>.md files.
ROLE_PROMPTS: dict[str, tuple[str, ...]] = {
    "answerer": ("answerer",),
    "explainer": ("explainer", "labeler", "explainer_given_label"),
    "referee": ("referee",),
    "generator": ("generator_hard", "generator_easy", "generator_plain",
                  "generator_hard_item", "generator_easy_item", "generator_plain_item"),
}
# Generator prompts: Lion's two (hard seed -> same kind and difficulty, easy seed -> rarer), and the
# plain "another of the same kind" prompt of the random-expansion baseline (loop.selection = "random").
GeneratorPrompt = Literal["hard", "easy", "plain"]
# Providers whose API takes a JSON schema for the reply (OpenAI; vLLM and Ollama via the same field).
SCHEMA_PROVIDERS = {"openai", "openai_compatible", "sim"}


class RolePrompts:
    def __init__(self, config: RunConfig) -> None:
        self._config = config
        self.task: TaskDefinition = task_definition(config.task)
        self.items = item_schema(config.task)
        self.templates: dict[str, Template] = {}
        for role, prompts in ROLE_PROMPTS.items():
            override = config.roles.get(role)  # type: ignore[call-overload]
            for index, prompt in enumerate(prompts):
                self.templates[prompt] = _load(prompt, index, override.prompt if override else None,
                                               f"roles.{role}.prompt")

    def _request(self, role: str, prompt: str, values: dict[str, str | None], *,
                 schema: tuple[str, dict[str, Any]] | None = None, sample: int = 0,
                 top_logprobs: int = 0, tag: str | None = None) -> TeacherRequest:
        settings = self._config.role(role)
        template = self.templates[prompt]
        response_format = None
        if schema is not None and self._config.teacher.structured_output and settings.provider in SCHEMA_PROVIDERS:
            response_format = {"name": schema[0], "schema": schema[1], "strict": True}
        return TeacherRequest(
            role=tag or role, provider=settings.provider, model=settings.model,
            messages=tuple(template.render(values)), temperature=settings.temperature,
            max_tokens=settings.max_tokens, prompt_version=f"{prompt}:{template.version}",
            top_logprobs=top_logprobs, response_format=response_format, sample=sample, mode=settings.mode,
            prompt_cache=self._config.teacher.prompt_cache,
        )

    def answer(self, instruction: str, *, tag: str | None = None) -> TeacherRequest:
        """`tag` books the call under another name (e.g. "eval") in the store; the cache key ignores it."""
        return self._request("answerer", "answerer", {"instruction": instruction},
                             top_logprobs=self._config.teacher.top_logprobs, tag=tag)

    def explain(self, text: str, *, with_rationale: bool = True, options: list[str] | None = None,
                tag: str | None = None) -> TeacherRequest:
        """Zero-shot label + one-sentence reason (2403.15886); label only when with_rationale is False."""
        task = self.task.with_options(options) if options else self.task
        values = {"input": text, "labels": task.labels_text}
        if with_rationale:
            return self._request("explainer", "explainer", values, schema=("explanation", explanation_schema(task)),
                                 tag=tag)
        return self._request("explainer", "labeler", values, tag=tag)

    def explain_given_label(self, text: str, label: str) -> TeacherRequest:
        values = {"input": text, "labels": self.task.labels_text, "label": label}
        return self._request("explainer", "explainer_given_label", values, schema=("rationale", rationale_schema()))

    def judge(self, instruction: str, answer_a: str, answer_b: str, *, sample: int = 0,
              tag: str | None = None) -> TeacherRequest:
        values = {"instruction": instruction, "answer_a": answer_a, "answer_b": answer_b}
        return self._request("referee", "referee", values, schema=("judgment", judgment_schema()), sample=sample,
                             tag=tag)

    def generate(self, seed_instruction: str, *, prompt: GeneratorPrompt, failed_answer: str | None = None,
                 referee_comparison: str | None = None, sample: int = 0) -> TeacherRequest:
        """One generator request; only the hard prompt shows the student's failure (targeted generation)."""
        values: dict[str, str | None] = {"seed_instruction": seed_instruction}
        if prompt == "hard":
            values.update(failed_answer=failed_answer, referee_comparison=referee_comparison)
        if self.items.structured:  # a structured item comes back as a JSON object of its fields
            values["item_format"] = item_format(self.items)
            return self._request("generator", f"generator_{prompt}_item", values,
                                 schema=("item", item_json_schema(self.items)), sample=sample)
        return self._request("generator", f"generator_{prompt}", values, schema=("instruction", generated_schema()),
                             sample=sample)


def _load(prompt: str, index: int, override: str | None, key: str) -> Template:
    path: Path | None = None
    if override is not None:
        candidate = resolve_shipped(override)  # e.g. "prompts/explainer_6shot.md" from any directory
        if candidate.is_dir():
            path = candidate / f"{prompt}.md" if (candidate / f"{prompt}.md").exists() else None
        elif index == 0:
            path = candidate
    try:
        return load_template(prompt, path)
    except TemplateError as err:
        raise ConfigError(f"{key}: {err}") from None
