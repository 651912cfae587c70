"""The simulated teacher over real loopback HTTP, driven by the official openai and anthropic SDKs."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import weakref

import aiohttp
import anthropic
import openai
import pytest

from agentkd.config import SimSection
from agentkd.teachers.sim import Generation, SimTeacher, sim_in_thread
from agentkd.teachers.sim.protocol import BadRequest
from agentkd.teachers.sim.ratelimit import RateLimiter, duration
from agentkd.teachers.sim.world import final_number, sample_problems, solve

PROBLEM = sample_problems(1, seed=11, steps=(2, 2), digits=(2, 2))[0]
USER = [{"role": "user", "content": PROBLEM.text}]


def block(name: str, value: str) -> str:
    return f'<data name="{name}">\n{value}\n</data>'


@pytest.fixture
async def sim_factory():
    started = []

    async def make(**settings):
        teacher = SimTeacher(SimSection(error_rate=0.0, **settings), seed=1)
        await teacher.start()
        started.append(teacher)
        return teacher

    yield make
    for teacher in started:
        await teacher.stop()


@pytest.fixture
async def sim(sim_factory):
    return await sim_factory()


_CLIENTS: "weakref.WeakKeyDictionary[SimTeacher, openai.AsyncOpenAI]" = weakref.WeakKeyDictionary()


def oai(sim, **kw):
    if not kw:  # building an SDK client costs ~20 ms: reuse the default one per server
        if sim not in _CLIENTS:
            _CLIENTS[sim] = oai(sim, api_key="x")
        return _CLIENTS[sim]
    return openai.AsyncOpenAI(base_url=sim.base_url + "/v1", api_key=kw.pop("api_key", "x"), max_retries=0, **kw)


def claude(sim, **kw):
    return anthropic.AsyncAnthropic(base_url=sim.base_url, api_key=kw.pop("api_key", "x"), max_retries=0, **kw)


async def chat(sim, **kw):
    params = {"model": "sim-teacher-1", "messages": USER, "temperature": 0, **kw}
    return await oai(sim).chat.completions.create(**params)


# --- OpenAI wire format ------------------------------------------------------------------------------


async def test_openai_chat_completion_answers_the_problem(sim):
    reply = await chat(sim)
    text = reply.choices[0].message.content
    assert final_number(text) == PROBLEM.answer and text.count(" = ") == 2
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details.cached_tokens == 0


async def test_temperature_zero_is_deterministic_and_positive_varies(sim):
    first, second = await chat(sim), await chat(sim)
    assert first.choices[0].message.content == second.choices[0].message.content
    warm = {(await chat(sim, temperature=1.0)).choices[0].message.content for _ in range(12)}
    assert len(warm) > 1


async def test_logprobs_cover_the_output_tokens(sim):
    reply = await chat(sim, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    assert len(content) == reply.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 5 and token.logprob <= 0
        assert token.token in {t.token for t in token.top_logprobs}
        assert bytes(token.bytes).decode() == token.token
        assert sum(pow(2.718281828, t.logprob) for t in token.top_logprobs) <= 1.0


async def test_too_many_top_logprobs_is_a_400(sim):
    with pytest.raises(openai.BadRequestError):
        await chat(sim, logprobs=True, top_logprobs=21)


async def test_json_schema_reply_is_json(sim):
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    reply = await chat(sim, response_format=schema)
    assert final_number(json.loads(reply.choices[0].message.content)["answer"]) == PROBLEM.answer


async def test_max_tokens_truncates_with_finish_reason_length(sim):
    reply = await chat(sim, max_completion_tokens=4)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4


async def test_models_endpoint(sim):
    models = await oai(sim).models.list()
    assert [m.id for m in models.data] == ["sim-teacher-1"]


# --- Anthropic wire format ---------------------------------------------------------------------------


async def test_anthropic_messages_create(sim):
    reply = await claude(sim).messages.create(
        model="sim-teacher-1", max_tokens=200, messages=USER,
        system=[{"type": "text", "text": "You are careful."}], extra_body={"temperature": 0},
    )
    assert reply.type == "message" and reply.role == "assistant" and reply.stop_reason == "end_turn"
    assert final_number(reply.content[0].text) == PROBLEM.answer
    assert reply.usage.output_tokens > 0 and reply.usage.cache_read_input_tokens == 0
    short = await claude(sim).messages.create(model="sim-teacher-1", max_tokens=3, messages=USER)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


async def test_anthropic_without_max_tokens_is_a_400(sim):
    async with aiohttp.ClientSession() as session:
        async with session.post(sim.base_url + "/v1/messages", json={"model": "m", "messages": USER}) as resp:
            body = await resp.json()
    assert resp.status == 400 and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and "max_tokens" in body["error"]["message"]


# --- auth --------------------------------------------------------------------------------------------


async def test_wrong_key_is_401_without_echoing_it(sim_factory):
    sim = await sim_factory(require_api_key="sk-right")
    with pytest.raises(openai.AuthenticationError) as err:
        await oai(sim, api_key="sk-wrong-secret").chat.completions.create(model="m", messages=USER)
    assert "sk-wrong-secret" not in err.value.response.text
    with pytest.raises(anthropic.AuthenticationError) as err2:
        await claude(sim, api_key="sk-wrong-secret").messages.create(model="m", max_tokens=5, messages=USER)
    assert "sk-wrong-secret" not in err2.value.response.text
    assert err2.value.body["error"]["type"] == "authentication_error"
    await oai(sim, api_key="sk-right").chat.completions.create(model="m", messages=USER)
    await claude(sim, api_key="sk-right").messages.create(model="m", max_tokens=5, messages=USER)


# --- rate limits -------------------------------------------------------------------------------------


async def test_rpm_exceeded_gives_429_with_retry_after(sim_factory):
    sim = await sim_factory(rpm=60)  # capacity: one request, refilled once per second
    first = await oai(sim).chat.completions.with_raw_response.create(model="m", messages=USER)
    assert first.headers["x-ratelimit-limit-requests"] == "60"
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    assert first.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    with pytest.raises(openai.RateLimitError) as err:
        await oai(sim).chat.completions.create(model="m", messages=USER)
    headers = err.value.response.headers
    assert headers["retry-after"] == "1" and 0 < int(headers["retry-after-ms"]) <= 1000
    assert err.value.body["code"] == "rate_limit_exceeded"
    with pytest.raises(anthropic.RateLimitError) as err2:
        await claude(sim).messages.create(model="m", max_tokens=5, messages=USER)
    assert err2.value.body["error"]["type"] == "rate_limit_error"
    stats = sim.stats()
    assert stats["billed_requests"] == 1 and stats["status_counts"] == {"200": 1, "429": 2}


async def test_tpm_counts_prompt_plus_max_tokens(sim_factory):
    sim = await sim_factory(tpm=600)  # 10 tokens/s: one 200-max-token request empties the bucket
    await chat(sim, max_tokens=200)
    with pytest.raises(openai.RateLimitError) as err:
        await chat(sim, max_tokens=200)
    assert err.value.body["type"] == "tokens" and int(err.value.response.headers["retry-after"]) >= 20
    with pytest.raises(openai.BadRequestError):
        await chat(sim, max_tokens=1000)  # can never fit a 600 tokens/min limit


def test_bucket_admits_the_ceiling_plus_one_second_burst():
    now = [0.0]
    limiter = RateLimiter(rpm=600, tpm=None, clock=lambda: now[0])
    admitted = 0
    while now[0] < 3.0:  # a client hammering every millisecond for 3 s
        admitted += limiter.admit(10).ok
        now[0] += 0.001
    assert 10 + 30 - 1 <= admitted <= 10 + 30 + 1


async def test_admitted_rate_over_time_stays_at_the_ceiling(sim_factory):
    sim = await sim_factory(rpm=1200)  # 20/s, burst 20
    window, ok = 1.5, 0
    start = time.monotonic()
    async with aiohttp.ClientSession() as session:
        body = {"model": "m", "messages": USER}

        async def hammer():
            nonlocal ok
            while time.monotonic() - start < window:
                async with session.post(sim.base_url + "/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    ok += resp.status == 200
                    if resp.status == 429:
                        await asyncio.sleep(0.005)

        await asyncio.gather(*(hammer() for _ in range(8)))
    elapsed = time.monotonic() - start
    assert ok <= 20 + 20 * elapsed + 1  # never above the ceiling (burst + rate), however hard it is hit
    assert ok >= (20 + 20 * window) / 2  # and not a broken-closed limiter (loose: CI machines are busy)


def test_reset_durations_are_openai_style():
    assert duration(0.12) == "120ms" and duration(1) == "1s" and duration(360) == "6m0s"


# --- scripted faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, openai.BadRequestError), (401, openai.AuthenticationError), (404, openai.NotFoundError),
        (422, openai.UnprocessableEntityError), (500, openai.InternalServerError),
        (503, openai.InternalServerError), (529, openai.InternalServerError),
    ],
)
async def test_scripted_status_reaches_the_openai_client(sim, status, error):
    sim.script([{"status": status}])
    with pytest.raises(error) as err:
        await chat(sim)
    assert err.value.status_code == status
    assert (await chat(sim)).choices  # the script is used up: the next request is normal


@pytest.mark.parametrize(
    ("status", "kind"),
    [(500, "api_error"), (529, "overloaded_error"), (400, "invalid_request_error"), (404, "not_found_error")],
)
async def test_scripted_status_in_anthropic_shape(sim, status, kind):
    sim.script([{"status": status}])
    with pytest.raises(anthropic.APIStatusError) as err:
        await claude(sim).messages.create(model="m", max_tokens=5, messages=USER)
    assert err.value.status_code == status and err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == kind


async def test_scripted_429_headers_are_verbatim(sim):
    sim.script([{"status": 429, "headers": {"retry-after": "3", "retry-after-ms": "junk"}},
                {"status": 500, "headers": {"x-should-retry": "false"}}])
    with pytest.raises(openai.RateLimitError) as err:
        await chat(sim)
    assert err.value.response.headers["retry-after"] == "3"
    assert err.value.response.headers["retry-after-ms"] == "junk"
    with pytest.raises(openai.InternalServerError) as err2:
        await chat(sim)
    assert err2.value.response.headers["x-should-retry"] == "false"


async def test_scripted_quota_errors(sim):
    sim.script([{"status": 429, "code": "insufficient_quota"}] * 2)
    with pytest.raises(openai.RateLimitError) as err:
        await chat(sim)
    assert err.value.body["code"] == "insufficient_quota" and err.value.body["type"] == "insufficient_quota"
    with pytest.raises(anthropic.BadRequestError) as err2:
        await claude(sim).messages.create(model="m", max_tokens=5, messages=USER)
    assert "credit balance" in err2.value.body["error"]["message"]


async def test_scripted_drop_is_a_connection_error_and_billed(sim):
    sim.script([{"kind": "drop"}])
    with pytest.raises(openai.APIConnectionError):
        await chat(sim)
    assert sim.stats()["billed_requests"] == 1


async def test_stats_count_the_requests_in_flight(sim):
    """/_stats says how many model requests are being answered (a crash test compares its ledger to it)."""
    sim.script([{"kind": "slow", "seconds": 0.5}])
    call = asyncio.create_task(chat(sim))
    for _ in range(200):
        if sim.stats()["in_flight"]:
            break
        await asyncio.sleep(0.005)
    assert sim.stats()["in_flight"] == 1 and sim.stats()["requests"] == 1
    await call
    assert sim.stats()["in_flight"] == 0


async def test_scripted_truncated_body_fails_to_decode(sim):
    sim.script([{"kind": "truncated"}])
    with pytest.raises((json.JSONDecodeError, openai.APIResponseValidationError)):
        await chat(sim)


async def test_scripted_slow_reply_times_the_client_out(sim):
    sim.script([{"kind": "slow", "seconds": 0.5}])
    with pytest.raises(openai.APITimeoutError):
        await oai(sim, timeout=0.1).chat.completions.create(model="m", messages=USER)


async def test_scripted_html_no_usage_no_choices_and_length(sim):
    sim.script([{"kind": "html"}, {"kind": "no_usage"}, {"kind": "no_choices"}, {"kind": "length"}])
    raw = await oai(sim).chat.completions.with_raw_response.create(model="m", messages=USER)
    assert raw.headers["content-type"].startswith("text/html")
    assert (await chat(sim)).usage is None
    assert (await chat(sim)).choices == []
    cut = await chat(sim)
    assert cut.choices[0].finish_reason == "length" and final_number(cut.choices[0].message.content) is None


async def test_bad_script_is_a_400(sim):
    async with aiohttp.ClientSession() as session:
        async with session.post(sim.base_url + "/_script", json={"faults": [{"status": 418}]}) as resp:
            assert resp.status == 400


async def test_random_fault_rates_apply(sim_factory):
    sim = await sim_factory(fault_529=1.0)
    with pytest.raises(openai.InternalServerError):
        await chat(sim)


# --- ledger ------------------------------------------------------------------------------------------


async def test_ledger_counts_received_billed_and_repeats(sim):
    sim.script([{"status": 500}])
    with pytest.raises(openai.InternalServerError):
        await chat(sim)
    first, _ = await chat(sim), await chat(sim)
    await chat(sim, temperature=0.5)
    stats = sim.stats()
    assert stats["requests"] == 4 and stats["billed_requests"] == 3
    assert stats["status_counts"] == {"500": 1, "200": 3}
    assert sorted(stats["billed_by_key"].values()) == [1, 2]
    assert stats["billed_input_tokens"] == 3 * first.usage.prompt_tokens
    async with aiohttp.ClientSession() as session:
        async with session.get(sim.base_url + "/_stats") as resp:
            assert (await resp.json()) == stats
        async with session.post(sim.base_url + "/_reset") as resp:
            assert resp.status == 200
    assert sim.stats()["requests"] == 0 and sim.stats()["billed_by_key"] == {}


# --- roles -------------------------------------------------------------------------------------------


async def ask(sim, user: str, system: str = "", **kw) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    reply = await oai(sim).chat.completions.create(model="m", messages=messages, temperature=0, **kw)
    return reply.choices[0].message.content


async def test_referee_scores_the_correct_answer_higher(sim):
    right, wrong = f"The answer is {PROBLEM.answer}.", f"The answer is {PROBLEM.answer + 1}."
    user = "Judge.\n" + "\n".join([block("instruction", PROBLEM.text), block("answer_a", wrong), block("answer_b", right)])
    verdict = json.loads(await ask(sim, user))
    assert set(verdict) == {"comparison", "score_a", "score_b"}
    assert 1 <= verdict["score_a"] <= 4 and 8 <= verdict["score_b"] <= 10


async def test_generator_hard_keeps_kind_and_easy_goes_rarer(sim):
    seed = sample_problems(1, seed=5, kinds=["add"], steps=(2, 2), digits=(2, 2))[0]
    hard = solve(json.loads(await ask(sim, "Write one.\n" + block("seed_instruction", seed.text)))["instruction"])
    assert hard is not None and hard.text != seed.text
    assert (hard.kind, hard.steps, hard.digits) == ("add", 2, 2)
    easy_prompt = "Write one about a rarer topic.\n" + block("seed_instruction", seed.text)
    easy = solve(json.loads(await ask(sim, easy_prompt))["instruction"])
    assert easy is not None and easy.kind in {"more_than", "fewer_than", "subtract"}
    invented = json.loads(await ask(sim, block("seed_instruction", "Write a poem.")))
    assert solve(invented["instruction"]) is not None


async def test_explainer_labels_and_explains(sim):
    user = "Give a label and a reason.\n" + block("input", PROBLEM.text) + "\n" + block("labels", "a whole number")
    text = await ask(sim, user)
    label_line, reason_line = text.split("\n")
    assert label_line == f"Label: {PROBLEM.answer}" and reason_line.startswith("Reason: ")
    # A prompt that asks for the label only (prompts/labeler.md) gets the label line only.
    label_only = "Give the label.\n" + block("input", PROBLEM.text) + "\n" + block("labels", "a whole number")
    assert await ask(sim, label_only) == f"Label: {PROBLEM.answer}"
    as_json = json.loads(await ask(sim, user, response_format={"type": "json_object"}))
    assert as_json["label"] == str(PROBLEM.answer) and len(as_json["rationale"].split()) >= 5
    given = await ask(sim, user + "\n" + block("label", str(PROBLEM.answer)))
    assert given.startswith("Reason: ") and "\n" not in given


async def test_answerer_reads_the_instruction_block_and_system(sim):
    text = await ask(sim, "Answer it.\n" + block("instruction", PROBLEM.text), system="Be careful.")
    assert final_number(text) == PROBLEM.answer
    assert (await ask(sim, "Tell me a joke.")).endswith("The answer is 0.")


async def test_error_rate_gives_wrong_final_numbers(sim_factory):
    sim = await sim_factory()
    sim.settings = SimSection(error_rate=1.0)
    problems = sample_problems(5, seed=9)
    finals = [final_number(await ask(sim, p.text)) for p in problems]
    assert all(f is not None and f != p.answer for f, p in zip(finals, problems))


# --- a plugged-in responder (a model the caller holds) -----------------------------------------------


def _item(token: str, logprob: float) -> dict:
    tops = [{"token": token, "logprob": logprob, "bytes": list(token.encode())},
            {"token": " x", "logprob": -2.0, "bytes": [32, 120]}, {"token": " y", "logprob": -3.0, "bytes": [32, 121]}]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": tops}


async def test_responder_replaces_the_rule_based_reply_and_its_logprobs():
    seen = []

    async def respond(req):
        seen.append(req)
        return Generation("4 + 3", cut=False, tokens=[_item("4", -0.1), _item(" +", -0.2), _item(" 3", -0.3)],
                          prompt_tokens=7)

    sim = SimTeacher(SimSection(), seed=1, responder=respond)
    await sim.start()
    try:
        reply = await oai(sim).chat.completions.create(model="m", messages=USER, temperature=0.7, logprobs=True,
                                                       top_logprobs=2)
    finally:
        await sim.stop()
    assert seen[0].temperature == 0.7 and seen[0].user == PROBLEM.text and seen[0].top_logprobs == 2
    choice = reply.choices[0]
    assert choice.message.content == "4 + 3" and choice.finish_reason == "stop"
    assert [t.token for t in choice.logprobs.content] == ["4", " +", " 3"]
    assert [t.logprob for t in choice.logprobs.content] == [-0.1, -0.2, -0.3]
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)  # cut to what was asked
    assert reply.usage.completion_tokens == 3 and reply.usage.prompt_tokens == 7
    assert sim.stats()["billed_output_tokens"] == 3 and sim.stats()["billed_input_tokens"] == 7


async def test_responder_bad_request_is_a_400_and_length_fault_halves_its_tokens():
    async def respond(req):
        if req.json_mode:
            raise BadRequest("response_format: not supported by this teacher.")
        return Generation("4 + 3", cut=False, tokens=[_item("4", -0.1), _item(" +", -0.2), _item(" 3", -0.3),
                                                      _item(".", -0.1)])

    sim = SimTeacher(SimSection(), seed=1, responder=respond)
    await sim.start()
    try:
        with pytest.raises(openai.BadRequestError, match="not supported"):
            await chat(sim, response_format={"type": "json_object"})
        sim.script([{"kind": "length"}])
        cut = await chat(sim)
    finally:
        await sim.stop()
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content == "4 +"
    assert cut.usage.completion_tokens == 2
    assert sim.stats()["billed_requests"] == 1  # the 400 is not billed


# --- thread runner and standalone server ----------------------------------------------------------


def test_sim_in_thread_serves_sync_clients():
    with sim_in_thread(SimSection(error_rate=0.0)) as handle:
        client = openai.OpenAI(base_url=handle.base_url + "/v1", api_key="x", max_retries=0)
        handle.script([{"status": 503}])
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=USER)
        reply = client.chat.completions.create(model="m", messages=USER, temperature=0)
        assert final_number(reply.choices[0].message.content) == PROBLEM.answer
        assert handle.stats()["requests"] == 2
        handle.reset()
        assert handle.stats()["requests"] == 0


def test_module_serves_until_interrupted():
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkd.teachers.sim", "--port", "0"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("simulated teacher listening on http://127.0.0.1:")
        base_url = line.rsplit(" ", 1)[1].strip()
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
        assert client.models.list().data[0].id == "sim-teacher-1"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
