"""Typed run configuration: TOML file + `--set a.b=c` overrides -> RunConfig.

This module is the only home of defaults. Every section is a pydantic model with extra="forbid", so a
misspelt key is an error that names the key and the file, not a silently ignored setting. Secrets are
never part of the config: a config names the environment variable that holds the key (api_key_env),
and `resolve_api_key` reads it at the moment a teacher is built.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agentkd.shipped import resolve_shipped


class ConfigError(Exception):
    """Bad configuration or input; the CLI maps it to exit code 2. The message names the key and file."""


class Section(BaseModel):
    # allow_inf_nan=False: TOML reads 1e400 as inf, and an infinite budget or a NaN rate is no setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


ProviderName = Literal["openai", "anthropic", "openai_compatible", "sim"]
RoleName = Literal["answerer", "explainer", "referee", "generator"]
ObjectiveName = Literal["sft", "rationale", "posterior_kd", "proxy_kd"]


class RunSection(Section):
    name: str = Field("run", description="Run name; output goes to <dir>/<name>/.")
    dir: str = Field("runs", description="Parent directory of run folders.")
    seed: int = Field(0, description="Seed for sampling, training and the simulated teacher.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return value


class SimSection(Section):
    """The simulated teacher (a stand-in, never a real teacher). Used when teacher.provider = "sim"."""

    host: str = Field("127.0.0.1", description="Loopback address only.")
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    rpm: int | None = Field(None, gt=0, description="Requests/min limit the sim enforces (None: none).")
    tpm: int | None = Field(None, gt=0, description="Tokens/min limit (prompt + max_tokens), None: none.")
    latency_ms: float = Field(0.0, ge=0, description="Mean response latency.")
    latency_jitter: float = Field(0.0, ge=0, le=1, description="Relative spread of the latency.")
    error_rate: float = Field(0.1, ge=0, le=1, description="Share of answers with a wrong final number.")
    fault_500: float = Field(0.0, ge=0, le=1, description="Share of requests answered 500.")
    fault_503: float = Field(0.0, ge=0, le=1, description="Share of requests answered 503.")
    fault_529: float = Field(0.0, ge=0, le=1, description="Share of requests answered 529 (Anthropic's overloaded).")
    fault_slow_read: float = Field(0.0, ge=0, le=1, description="Share of replies delayed slow_read_s.")
    slow_read_s: float = Field(30.0, ge=0, description="Delay of a slow-read reply.")
    fault_drop: float = Field(0.0, ge=0, le=1, description="Share of connections dropped mid-body.")
    fault_truncated: float = Field(0.0, ge=0, le=1, description="Share of 200s with truncated JSON.")
    require_api_key: str | None = Field(
        None, description="If set, the sim answers 401 unless this key is sent (for auth tests)."
    )
    seed: int | None = Field(None, description="Sim RNG seed; None uses run.seed.")
    referee_prose_rate: float = Field(
        0.0, ge=0, le=1, description="Share of referee replies with prose before the JSON (parser tests)."
    )
    # Teacher output that is no usable data (RELIABILITY.md 21-23). Each is decided by a hash of the
    # prompt's data blocks, so a prompt is faulted alike in every run and on a re-ask.
    referee_unparseable_rate: float = Field(
        0.0, ge=0, le=1, description="Share of referee replies with no usable scores (either order)."
    )
    referee_one_order_rate: float = Field(
        0.0, ge=0, le=1, description="Share of judged pairs whose referee reply is unusable in exactly one order."
    )
    generator_bad_rate: float = Field(
        0.0, ge=0, le=1, description="Share of generator replies that are not one instruction object."
    )
    explainer_no_label_rate: float = Field(
        0.0, ge=0, le=1, description="Share of explainer replies without a label."
    )
    # Batch APIs (teachers/sim/batches.py). A batch's requests finish at moments spread over
    # batch_hours, its window is 24 h; both run at batch_time_scale wall-clock seconds per second.
    batch_time_scale: float = Field(
        1e-3, gt=0, description="Wall-clock seconds per simulated second of batch processing (1: real time)."
    )
    batch_hours: float = Field(0.5, gt=0, description="Simulated hours a batch takes to finish every request.")
    batch_faults: list[str] = Field(
        default_factory=list,
        description='One per created batch, in order: "ok", "expire:<share done>", "fail" (OpenAI: the batch '
        'fails validation; Anthropic: every request errors), "drop_create" (the batch is created, the '
        'create response is cut off), "cancel:<share done>", "hold" (the batch runs nothing until it is '
        'cancelled).',
    )


class TeacherSection(Section):
    provider: ProviderName = Field(
        "sim", description="Teacher API: openai, anthropic, openai_compatible (vLLM, Ollama...) or sim (the offline stand-in)."
    )
    model: str = Field(
        "sim-teacher-1", description="Teacher model name as the provider spells it; [prices.<model>] prices it."
    )
    base_url: str | None = Field(None, description="Endpoint for openai_compatible (vLLM, Ollama...).")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (never the key)."
    )
    top_logprobs: int = Field(0, ge=0, le=20, description="Ask for top-k logprobs (0: off).")
    structured_output: bool = Field(True, description="Use JSON schema output where the provider has it.")
    transport: Literal["aiohttp", "sdk"] = Field(
        "aiohttp", description="aiohttp (fast, default) or the official SDK clients."
    )
    mode: Literal["online", "batch"] = Field(
        "online", description="online: one HTTP call per request; batch: the provider's batch API (50% price, hours)."
    )
    tokenizer_hash: str | None = Field(
        None, description="The teacher's tokenizer, when known (e.g. a local model's vocab hash): recorded with "
        "its logprobs, so training can tell whether they fit the student.",
    )
    prompt_cache: bool = Field(
        False, description="Ask for prompt-prefix caching: OpenAI prompt_cache_key (one per prompt template), "
        "Anthropic cache_control on the system prompt (the fixed part every role prompt puts first).",
    )


class RoleOverride(Section):
    """One role's settings where they differ from [teacher] and the role's defaults; <role> is answerer,
    explainer, referee or generator (`[roles.referee] model = "..."`)."""

    provider: ProviderName | None = Field(None, description="This role's provider, when not the teacher's.")
    model: str | None = Field(None, description="This role's model, when not the teacher's.")
    base_url: str | None = Field(None, description="Endpoint, when the role uses another provider.")
    api_key_env: str | None = Field(None, description="Key variable, when the role uses another provider.")
    temperature: float | None = Field(
        None, ge=0, le=2, description="Sampling temperature (default per role: answerer 0.7, explainer 0, referee 0.2, generator 1)."
    )
    max_tokens: int | None = Field(
        None, gt=0, description="Output cap per call, also what the budget reserves (default: answerer 512, explainer 256, referee 512, generator 256)."
    )
    prompt: str | None = Field(None, description="Path of a prompt template replacing the built-in.")
    mode: Literal["online", "batch"] | None = Field(None, description="This role's mode (None: teacher.mode).")


# Per-role defaults from the papers (Lion: teacher 0.7, referee 0.2, generator 1.0).
ROLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "answerer": {"temperature": 0.7, "max_tokens": 512},
    "explainer": {"temperature": 0.0, "max_tokens": 256},
    "referee": {"temperature": 0.2, "max_tokens": 512},
    "generator": {"temperature": 1.0, "max_tokens": 256},
}


class LimitsSection(Section):
    rpm: int | None = Field(None, gt=0, description="Requests/min ceiling (None: learn from headers).")
    tpm: int | None = Field(None, gt=0, description="Total tokens/min ceiling.")
    input_tpm: int | None = Field(None, gt=0, description="Input tokens/min ceiling.")
    output_tpm: int | None = Field(None, gt=0, description="Output tokens/min ceiling.")
    max_concurrency: int = Field(32, gt=0, description="Most requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="Per-attempt timeout.")
    max_attempts: int = Field(6, ge=1, description="Attempts per request, first one included.")
    backoff_base_s: float = Field(0.5, gt=0, description="First retry backoff; doubles per attempt (full jitter).")
    backoff_max_s: float = Field(30.0, gt=0, description="Cap on one retry backoff.")
    max_wait_s: float = Field(
        120.0, gt=0, description="A Retry-After longer than this defers the item instead of waiting."
    )


class BudgetSection(Section):
    usd: float | None = Field(None, ge=0, description="Hard cap in USD (None: no USD cap).")
    tokens: int | None = Field(None, ge=0, description="Hard cap in input+output tokens.")


class BatchSection(Section):
    """Batch mode (teacher.mode / roles.<r>.mode = "batch"): how requests become provider batches."""

    collect_s: float = Field(
        0.5, gt=0, description="A chunk is submitted once no new request has come for this long (or it is full)."
    )
    max_requests: int | None = Field(
        None, gt=0, description="Requests per batch (None: the provider's limit, 50,000 OpenAI, 100,000 Anthropic)."
    )
    max_bytes: int | None = Field(
        None, gt=0, description="Bytes per batch file (None: the provider's limit, 200 MB OpenAI, 256 MB Anthropic)."
    )
    poll_s: float = Field(5.0, gt=0, description="First wait between status polls.")
    poll_max_s: float = Field(300.0, gt=0, description="Polls back off to at most this.")
    max_resubmits: int = Field(3, ge=0, description="Times an expired, cancelled or errored request is re-queued.")
    wait: bool = Field(
        True, description="False: exit once every batch is submitted (resume later with the same command)."
    )


class PriceSection(Section):
    """The price of one model (`[prices."gpt-4o-mini"]`): required for every model in use when budget.usd
    is set; the sim teacher's nominal price is built in."""

    input_per_mtok: float = Field(ge=0, description="USD per million input tokens.")
    output_per_mtok: float = Field(ge=0, description="USD per million output tokens.")
    cached_input_per_mtok: float | None = Field(
        None, ge=0, description="USD per million cached input tokens read (Anthropic: 0.1x input; None: the input price)."
    )
    cache_write_per_mtok: float | None = Field(
        None, ge=0, description="USD per million tokens written to the prompt cache (Anthropic 5-minute: 1.25x "
        "input; None: the input price)."
    )
    batch_discount: float = Field(
        0.5, ge=0, lt=1, description="Share off every token in batch mode (OpenAI and Anthropic: 50%)."
    )


class TaskSection(Section):
    """What the student learns to answer, and how a held-out answer is checked.

    kind = "arithmetic" (the sim's world): an item is one `instruction`, the teacher answers in free
    text, and an answer is right when its final number is the expected `answer`. The label tasks: "nli"
    (items: premise, hypothesis; labels: entailment, neutral, contradiction), "multiple_choice"
    (question, options; a to e) and "custom" (your task.input_fields and task.labels). task.labels
    replaces a built-in label set. In a label task the explainer's label is the teacher's answer (a reply
    whose label is outside the set is a parse failure), and a held-out answer is right when the label it
    gives (a synonym, an option's text or number) is the gold `label`.
    """

    kind: Literal["arithmetic", "nli", "multiple_choice", "custom"] = Field(
        "arithmetic", description="What the explainer labels: arithmetic (a whole number), nli, multiple_choice, or custom (task.labels)."
    )
    labels: list[str] = Field(default_factory=list, description="Label set (custom/nli).")
    synonyms: dict[str, str] = Field(default_factory=dict, description="Extra synonym -> label map.")
    input_fields: list[str] = Field(
        default_factory=lambda: ["instruction"],
        description="An item's fields (seed/held-out JSONL keys, rendered into every prompt). Default: "
        "premise, hypothesis for nli; question, options for multiple_choice; instruction otherwise.",
    )
    min_rationale_words: int = Field(
        5, ge=1, description="Explainer rationales shorter than this count as missing (2403.15886: 5)."
    )

    @model_validator(mode="before")
    @classmethod
    def _fields_of_the_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and "input_fields" not in data and data.get("kind") in TASK_FIELDS:
            return {**data, "input_fields": list(TASK_FIELDS[data["kind"]])}
        return data

    @field_validator("input_fields")
    @classmethod
    def _plain_names(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value) or not all(v.isidentifier() for v in value):
            raise ValueError("must be distinct field names (letters, digits, _), at least one")
        return value

    @property
    def has_labels(self) -> bool:
        """A label task: the teacher's answer is a label (the explainer's), not free text."""
        return self.kind != "arithmetic"


TASK_FIELDS: dict[str, tuple[str, ...]] = {"nli": ("premise", "hypothesis"), "multiple_choice": ("question", "options")}


class StudentSection(Section):
    spec: str = Field("students/tiny.toml", description="Path of a students/*.toml spec.")


class LoraSection(Section):
    enabled: bool = Field(False, description="Train a LoRA adapter instead of all weights.")
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names LoRA wraps (a student spec's lora_targets overrides this)."
    )


class TrainSection(Section):
    objective: ObjectiveName = Field(
        "sft", description="sft (imitate answers), rationale (label + rationale multi-task), posterior_kd or proxy_kd (need a proxy)."
    )
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (constant after warm-up).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(50, ge=0, description="Linear learning-rate warm-up steps.")
    epochs: float = Field(
        3.0, gt=0, description="Passes over the examples per training call (max_seconds/max_steps stop it sooner)."
    )
    max_seconds: float | None = Field(None, gt=0, description="Wall-clock cap per training call.")
    max_steps: int | None = Field(
        None, gt=0, description="Cap on optimiser steps per training call: a budget that does not depend on machine load."
    )
    batch_size: int = Field(
        32, gt=0, description="Sequences per micro-batch and process (per optimiser step with one process and no accumulation)."
    )
    max_len: int = Field(
        128, gt=0, description="Most tokens per training sequence (prompt + answer); longer ones are cut."
    )
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    max_new_tokens: int = Field(48, gt=0, description="Decoding cap for student answers.")
    cpu_threads: int | None = Field(
        None, gt=0, description="torch threads on CPU (None: torch's default). Tiny students run fastest on 1."
    )
    student_temperature: float = Field(0.7, ge=0, description="Lion: the student answers at 0.7.")
    lora: LoraSection = Field(default_factory=LoraSection)
    # rationale (2403.15886): L = a * CE(label) + (1 - a) * CE(rationale)
    rationale_alpha: float = Field(
        0.5, ge=0, le=1, description="rationale: weight a of the label loss, 1 - a on the rationale (2403.15886)."
    )
    # posterior_kd (agentkd formulation of 2401.07013 v1)
    kd_lambda: float = Field(1.0, ge=0, description="posterior_kd/proxy_kd: weight of the KL term added to the NLL.")
    ngram_n: int = Field(3, ge=1, description="posterior_kd: order of the n-gram prior over teacher answers.")
    prior_eps: float = Field(
        0.1, ge=0, le=1, description="posterior_kd: mass of the n-gram prior next to the teacher's token in p0."
    )
    ngram_add_k: float = Field(0.1, gt=0, description="posterior_kd: add-k smoothing of the n-gram prior.")
    dirichlet_alpha: float = Field(
        1.0, ge=0, description="posterior_kd: weight of p0 (teacher token + prior) in the posterior."
    )
    dirichlet_beta: float = Field(1.0, ge=0, description="posterior_kd: weight of the proxy's q in the posterior.")
    logprob_gamma: float = Field(
        1.0, ge=0, description="posterior_kd: weight of the provider's top logprobs in the posterior (0: unused)."
    )
    top_k: int = Field(16, gt=0, description="posterior_kd: the proxy q's top ids in each position's support.")
    prior_top_k: int = Field(8, gt=0, description="posterior_kd: the n-gram prior's top ids in each position's support.")
    target_chunk_logits: int = Field(
        2**24, gt=0, description="Most logits (positions x V) held at once while building KD targets: bounds memory."
    )
    posterior_q: Literal["proxy", "self"] = Field(
        "proxy",
        description="posterior_kd evidence q: the run's trained proxy (the method), or \"self\": the student "
        "frozen as it is before this call (self-distillation; an explicit option, never the default).",
    )
    # proxy_kd (2401.07013 v2); the proxy is also posterior_kd's q
    proxy_spec: str | None = Field(None, description="students/*.toml of the proxy (same tokenizer).")
    proxy_split: list[float] = Field(
        default_factory=lambda: [0.10, 0.45, 0.45],
        description="Stable per-example roles by a hash of the instruction: proxy warm-up, proxy alignment, "
        "student KD (Proxy-KD's 10/45/45). The student learns NLL from every answer, KD only on the last role.",
    )
    align_rounds: int = Field(2, ge=0, description="proxy: rounds of NLL + DPO alignment after the SFT warm-up.")
    dpo_beta: float = Field(0.1, gt=0, description="proxy: DPO beta.")
    proxy_top_k: int = Field(10, gt=0, description="proxy_kd: the proxy's top ids kept per position in the KD target.")
    proxy_epochs: float = Field(1.0, gt=0, description="Epochs of each proxy stage (warm-up, each round).")
    proxy_max_seconds: float | None = Field(None, gt=0, description="Wall-clock cap per proxy stage.")
    proxy_max_steps: int | None = Field(None, gt=0, description="Cap on optimiser steps per proxy stage.")
    proxy_eval_size: int = Field(
        200, gt=0, description="KD-role teacher answers (never trained on by the proxy) its quality is scored on."
    )
    proxy_temperature: float = Field(0.7, ge=0, description="Proxy sampling temperature for DPO negatives.")
    log_every: int = Field(10, gt=0, description="Steps between log_metric calls.")
    # precision, memory and processes (train.py, optimise.py, launch.py)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on CUDA (policy, reference and KD targets alike), fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory.")
    effective_batch: int | None = Field(
        None, gt=0, description="Examples per optimiser step over all processes (Lion: 128), reached by gradient "
        "accumulation; None: batch_size x processes. batch_size is per process and micro-batch.",
    )
    target_shard_rows: int = Field(
        1024, gt=0, description="posterior/proxy KD: rows per target shard on disk (runs/<name>/targets/<iteration>/).",
    )
    num_processes: int = Field(
        1, ge=1, description="> 1: the loop runs its train and proxy stages as a launched subprocess of this many "
        "processes (DDP); 1: in the loop's own process.",
    )
    launcher: Literal["accelerate", "torchrun"] = Field(
        "accelerate", description="What runs the train and proxy stages when num_processes > 1: accelerate launch or torchrun."
    )
    launcher_args: list[str] = Field(
        default_factory=list, description="Extra launcher arguments, e.g. [\"--gpu_ids\", \"0,1\"].",
    )
    fsdp: bool = Field(
        False, description="More than one process: shard the student with torch FSDP2 (each decoder layer, then "
        "the root; bf16 compute with fp32 gradient reduction on CUDA) instead of DDP, and gather it whole for the "
        "checkpoint. One process: no effect. The proxy is not sharded.",
    )


    @model_validator(mode="after")
    def _posterior_needs_a_proxy(self) -> TrainSection:
        if self.objective in ("posterior_kd", "proxy_kd") and self.proxy_spec is None and not (
            self.objective == "posterior_kd" and self.posterior_q == "self"
        ):
            hint = ' (or train.posterior_q = "self" for self-distillation)' if self.objective == "posterior_kd" else ""
            raise ValueError(f"{self.objective} needs a trained proxy: set train.proxy_spec to a students/*.toml "
                             f"larger than the student, on its tokenizer{hint}")
        return self


class LoopSection(Section):
    """The Lion loop (`agentkd run`), and the two data sets it starts from.

    loop.seeds is a JSONL file of your seed items, no answers needed: one `instruction` per row for
    task.kind = "arithmetic", the fields of task.input_fields for a label task (other fields are
    ignored). The teacher answers them in iteration 1, they are the first Train Pool, and the generator
    writes new items from them. loop.heldout is the JSONL set the student is scored on before training
    and after every iteration: the same fields, plus the gold answer where you know it (`answer` for
    arithmetic, `label` for a label task). Accuracy counts the rows that have one; the referee's
    capability ratio uses loop.eval_judge_sample of them. A held-out item that is also a seed is dropped
    from the held-out set. Either file left unset is drawn from the simulated teacher's worlds
    (loop.seed_count / loop.heldout_count arithmetic problems, or nli / multiple_choice items), which fit
    only the sim teacher: set both for a real one.
    """

    iterations: int = Field(3, ge=1, description="Lion iterations (imitate -> discriminate -> generate).")
    selection: Literal["lion", "random"] = Field(
        "lion", description="Generator seeds: Lion's judged hard/easy ones, or drawn uniformly from the Cache "
        "Pool with a plain prompt and no referee (the random-expansion baseline)."
    )
    seeds: str | None = Field(None, description="JSONL of seed items (the fields of task.input_fields).")
    seed_count: int = Field(200, gt=0, description="Seeds drawn from the sim's world if seeds is None.")
    heldout: str | None = Field(
        None, description="JSONL held-out set: the item's fields and its gold answer ('label' for label tasks, "
        "'answer' for arithmetic); None: drawn from the sim world for the sim teacher, else split off the seeds.")
    heldout_count: int = Field(
        200, gt=0, description="Held-out problems drawn from the sim's world when loop.heldout is None, or "
        "split off the seeds (at most a fifth of them) for another teacher."
    )
    world_steps: list[int] = Field(default_factory=lambda: [1, 2], description="Sim world: steps range.")
    world_digits: list[int] = Field(default_factory=lambda: [1, 2], description="Sim world: digits range.")
    eval_judge_sample: int = Field(
        50, ge=0, description="Held-out items judged by the referee per iteration (capability ratio)."
    )
    tau: float = Field(1.0, ge=0, description="Hard iff teacher_score - student_score >= tau.")
    new_per_iteration: int = Field(200, gt=0, description="New instructions the generator is asked for per iteration.")
    hard_fraction: float = Field(
        0.5, ge=0, le=1, description="Share of generator draws from hard seeds (the rest from easy ones)."
    )
    judge_sample: int | Literal["all"] = Field(200, description="Cache Pool items judged per iteration.")
    rouge_max: float = Field(
        0.7, gt=0, le=1, description="A new instruction with ROUGE-L above this against any known one is a duplicate."
    )
    rationale_rate: float = Field(1.0, ge=0, le=1, description="XR: share of rows asked for rationales.")
    imitate_on: Literal["train_pool", "cache_pool"] = Field(
        "train_pool",
        description="Train each iteration on the Train Pool (Lion: only the new instructions) or on the "
        "whole Cache Pool answered so far (steadier for small students).",
    )
    targeted_generation: bool = Field(
        False, description="Show the hard generator the student's failure (beyond the paper)."
    )
    discriminate: Literal["referee", "label"] | None = Field(
        None, description="Hard/easy by the referee (Lion), or, for label tasks, hard iff the student's label "
        "differs from the teacher's (no referee call). None: label for label tasks, referee otherwise.",
    )

    @model_validator(mode="after")
    def _targeted_needs_lion(self) -> LoopSection:
        if self.targeted_generation and self.selection == "random":
            raise ValueError("loop.targeted_generation needs loop.selection = \"lion\" (random selection judges "
                             "nothing, so there is no failure to show)")
        return self


class FailFastSection(Section):
    """A teacher that cannot do a role stops the run (exit 5) before it spends the budget on replies
    that cannot be used. Checked per role and stage; agentkd/roles/replies.py."""

    min_results: int = Field(
        20, ge=1, description="Results of a role in a stage (referee: judged orders) before the check starts."
    )
    max_share: float = Field(
        0.5, gt=0, le=1, description="Stop when the share of unusable results (parse failures, unscored "
        "verdicts) is above this beyond chance (one-sided 95% Wilson bound); 1 turns the check off."
    )


class RunConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    teacher: TeacherSection = Field(default_factory=TeacherSection)
    roles: dict[RoleName, RoleOverride] = Field(default_factory=dict)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    budget: BudgetSection = Field(default_factory=BudgetSection)
    batch: BatchSection = Field(default_factory=BatchSection)
    prices: dict[str, PriceSection] = Field(default_factory=dict)
    task: TaskSection = Field(default_factory=TaskSection)
    student: StudentSection = Field(default_factory=StudentSection)
    train: TrainSection = Field(default_factory=TrainSection)
    loop: LoopSection = Field(default_factory=LoopSection)
    fail_fast: FailFastSection = Field(default_factory=FailFastSection)
    sim: SimSection = Field(default_factory=SimSection)

    # Where the config came from: relative paths (seeds, student spec) resolve against it.
    source: str | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _label_discrimination_needs_labels(self) -> RunConfig:
        if self.loop.discriminate == "label" and not self.task.has_labels:
            raise ValueError('loop.discriminate = "label" needs a label task (task.kind nli, multiple_choice or '
                             'custom); arithmetic answers are judged by the referee')
        return self

    @property
    def discriminate(self) -> str:
        """How the loop tells hard from easy: loop.discriminate, or its default for the task."""
        return self.loop.discriminate or ("label" if self.task.has_labels else "referee")

    @model_validator(mode="after")
    def _prices_known(self) -> RunConfig:
        if self.budget.usd is None:
            return self
        for model in self.models_in_use():
            if model not in self.prices and not _is_sim_model(self, model):
                raise ValueError(
                    f"prices.{model}: no price for model {model!r} and budget.usd is set; add "
                    f"[prices.\"{model}\"] input_per_mtok/output_per_mtok, or use a tokens-only budget"
                )
        return self

    def models_in_use(self) -> list[str]:
        models = [self.teacher.model]
        models += [r.model for r in self.roles.values() if r.model]
        return sorted(set(models))

    @property
    def run_dir(self) -> Path:
        return self.resolve_path(self.run.dir) / self.run.name

    def resolve_path(self, value: str) -> Path:
        """Relative paths in a config are taken from the current directory, like any CLI argument; a
        `students/...` or `prompts/...` path not found there is the shipped file (shipped.py)."""
        return resolve_shipped(value)

    def role(self, role: str) -> ResolvedRole:
        override = self.roles.get(role, RoleOverride())  # type: ignore[call-overload]
        defaults = ROLE_DEFAULTS[role]
        return ResolvedRole(
            role=role,
            provider=override.provider or self.teacher.provider,
            model=override.model or self.teacher.model,
            temperature=override.temperature if override.temperature is not None else defaults["temperature"],
            max_tokens=override.max_tokens or defaults["max_tokens"],
            prompt=override.prompt,
            mode=override.mode or self.teacher.mode,
        )

    def price(self, model: str) -> PriceSection:
        if model in self.prices:
            return self.prices[model]
        if _is_sim_model(self, model):
            return SIM_PRICE
        raise ConfigError(f"prices.{model}: no price configured for model {model!r}")

    def public_dict(self) -> dict[str, Any]:
        """The config as stored in runs/<name>/config.json: no secrets are in it by construction."""
        return self.model_dump(mode="json")


class ResolvedRole(Section):
    role: str
    provider: ProviderName
    model: str
    temperature: float
    max_tokens: int
    prompt: str | None
    mode: Literal["online", "batch"] = "online"


# The sim "charges" like a small paid model so cost figures in the quickstart are meaningful.
SIM_PRICE = PriceSection(input_per_mtok=0.15, output_per_mtok=0.60, cached_input_per_mtok=0.075)


def _is_sim_model(config: RunConfig, model: str) -> bool:
    return config.teacher.provider == "sim" or model.startswith("sim-")


def resolve_api_key(env_var: str | None, *, provider: str, where: str = "teacher.api_key_env") -> str | None:
    """Read, strip and validate the API key named by env_var (the config key `where`). The key itself
    never enters a message."""
    if provider == "sim" and env_var is None:
        return None
    if env_var is None:
        if provider == "openai_compatible":
            return None  # local servers (vLLM, Ollama) often need none
        raise ConfigError(f"{where}: provider {provider!r} needs the name of an env var")
    raw = os.environ.get(env_var)
    if raw is None:
        raise ConfigError(f"{where}: environment variable {env_var} is not set")
    key = raw.strip()
    if not key:
        raise ConfigError(f"{where}: environment variable {env_var} is empty")
    if any(ch.isspace() for ch in key) or not key.isprintable():
        raise ConfigError(f"{where}: environment variable {env_var} holds whitespace inside the key")
    return key


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value); the value is read as TOML if it parses, else as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set budget.usd=5")
    key, _, raw = item.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_user_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of a file the user named; a missing, unreadable or non-regular path (a directory,
    a FIFO that would block, a device) is a ConfigError naming it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{path}: is a directory; give the {what} file")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path}: not a regular file (a FIFO, socket or device); give the {what} as a file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a TOML run config (or a run's config.json); every failure is a ConfigError naming the file
    and the key, or the `--set` override that set it."""
    path = Path(path)
    text = read_user_file(path, "config file")
    try:
        # a run's own config.json (what the run stored; launched training reads it) or TOML
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON: {err}") from None
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, source=str(path), overrides=overrides or [])


def config_from_dict(data: dict[str, Any], source: str = "<dict>", overrides: list[str] = ()) -> RunConfig:
    try:
        return RunConfig.model_validate({**data, "source": source})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, overrides=overrides)) from None


def format_validation_error(err: ValidationError, source: str, *, overrides: list[str] = ()) -> str:
    """One line per problem, under the file it came from or the `--set` item that set the key."""
    set_by = {".".join(parse_override(item)[0]): item for item in overrides}
    from_file, from_set = [], []
    for problem in err.errors():
        loc = [str(p) for p in problem["loc"]]
        key = ".".join(loc) or "(top level)"
        message = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"]
        item = next((set_by[".".join(loc[:n])] for n in range(len(loc), 0, -1) if ".".join(loc[:n]) in set_by), None)
        if item is None:
            from_file.append(f"  {key}: {message}")
        else:
            from_set.append(f"  --set {item}: {key}: {message}")
    # A whole-config check (loc ()) can fail from the file and the overrides together: name both.
    joint = overrides and any(line.startswith("  (top level)") for line in from_file)
    also = f" with {', '.join('--set ' + item for item in overrides)}" if joint else ""
    lines = [f"{source}{also}: invalid config", *from_file] if from_file else []
    if from_set:
        lines += ["invalid --set override" + ("s" if len(from_set) > 1 else ""), *from_set]
    return "\n".join(lines)


def dump_config(config: RunConfig, path: Path) -> None:
    path.write_text(json.dumps(config.public_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
