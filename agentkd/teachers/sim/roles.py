"""What the simulated teacher says: recognise the role from the prompt's data blocks, then answer in the world.

Contract (prompts/README.md): values arrive as `<data name="NAME">\\n...\\n</data>` blocks. The block names
present pick the role: answer_a + answer_b -> referee; seed_instruction -> generator (a rarer kind when
the text outside the blocks says "rarer", as prompts/generator_easy.md does; else, for the hard and the
plain prompt alike, a new problem of the seed's kind, steps and digits); input + labels (+ label) ->
explainer (label only when the prompt outside the blocks asks for no reason, like prompts/labeler.md;
worked examples outside the blocks, as in prompts/explainer_6shot.md, change nothing); otherwise
answerer, whose instruction is the `instruction` block or, without blocks, the whole last user message.
A block that holds an item of the label world (label_world.py: NLI and multiple choice) is answered there,
in each role; anything else in the arithmetic world.

Output faults (SimSection.referee_unparseable_rate, referee_one_order_rate, generator_bad_rate,
explainer_no_label_rate): replies that are no usable data, each form one that its parser must reject.
Whether a reply is faulted is a hash of its data blocks, not a draw: the same prompt is faulted alike in
every run, on a re-ask and whatever the order of concurrent requests.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass

from agentkd.config import SimSection
from agentkd.teachers.sim import label_world
from agentkd.teachers.sim.world import (
    KINDS,
    Problem,
    final_number,
    make_problem,
    parse_steps,
    rarer_kind,
    slipped_answer,
    solve,
    worked_answer,
)

_BLOCK = re.compile(r'<data name="(?P<name>[A-Za-z_][A-Za-z0-9_]*)">\n?(?P<body>.*?)\n?</data>', re.DOTALL)
_RARER = re.compile(r"\brarer\b", re.IGNORECASE)
_REASON = re.compile(r"\breason\b", re.IGNORECASE)
# Sim tokens: words and single punctuation marks. Deterministic and cheap; not any real tokenizer.
_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def token_pieces(text: str) -> list[str]:
    """The text cut into sim tokens, each carrying the whitespace before it, so the pieces join to text."""
    pieces: list[str] = []
    start = 0
    for match in _TOKEN.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text) and pieces:
        pieces[-1] += text[start:]
    return pieces


def truncate(text: str, max_tokens: int) -> tuple[str, bool]:
    """text cut after max_tokens sim tokens, and whether it was cut."""
    ends = [m.end() for m in _TOKEN.finditer(text)]
    if len(ends) <= max_tokens:
        return text, False
    return (text[: ends[max_tokens - 1]] if max_tokens > 0 else ""), True


def data_blocks(text: str) -> tuple[dict[str, str], str]:
    """(block name -> value, the text outside all blocks)."""
    blocks = {m["name"]: m["body"] for m in _BLOCK.finditer(text)}
    return blocks, _BLOCK.sub(" ", text)


@dataclass(frozen=True)
class Reply:
    role: str
    text: str


def reply(
    system: str, user: str, *, json_mode: bool, rng: random.Random, phrasing: random.Random | None,
    error_rate: float, prose_rate: float = 0.0, output_faults: SimSection | None = None,
) -> Reply:
    """The sim teacher's reply. rng decides errors and new problems; phrasing (None: canonical) the wording;
    output_faults (the [sim] section) the shares of unusable replies."""
    blocks, outside = data_blocks(user)
    system_blocks, system_outside = data_blocks(system)
    blocks = {**system_blocks, **blocks}
    outside = f"{system_outside}\n{outside}"
    faults = output_faults or NO_OUTPUT_FAULTS
    if "answer_a" in blocks and "answer_b" in blocks:
        if _referee_faulted(blocks, faults):
            return Reply("referee", _pick(UNPARSEABLE_JUDGMENTS, "form", *blocks.values()))
        labelled = label_world.referee(blocks, rng, error_rate)  # None: not a label-world item
        return Reply("referee", labelled if labelled is not None else _referee(blocks, rng, error_rate, prose_rate))
    if "seed_instruction" in blocks:
        easy = bool(_RARER.search(outside))
        item = label_world.generate(blocks["seed_instruction"], easy=easy, rng=rng)
        text = json.dumps(item) if item is not None else _generator(blocks["seed_instruction"], easy, rng)
        if faults.generator_bad_rate and _share("generator", user) < faults.generator_bad_rate:
            bad = label_world.bad_generations(item) if item is not None else bad_generations(
                json.loads(text)["instruction"])
            text = _pick(bad, "form", user)
        return Reply("generator", text)
    if "input" in blocks and "labels" in blocks:
        if "label" in blocks:
            return Reply("explainer_given_label", _explain_given(blocks, json_mode, phrasing))
        if faults.explainer_no_label_rate and _share("explainer", blocks["input"]) < faults.explainer_no_label_rate:
            return Reply("explainer", json.dumps({"rationale": NO_LABEL_REASON}) if json_mode
                         else f"Reason: {NO_LABEL_REASON}")
        with_reason = bool(_REASON.search(outside))
        labelled = label_world.explain(blocks["input"], json_mode=json_mode, with_reason=with_reason, rng=rng,
                                       error_rate=error_rate)
        if labelled is not None:
            return Reply("explainer", labelled)
        text = _explain(blocks["input"], json_mode, rng, phrasing, error_rate)
        if not with_reason and not json_mode:
            text = text.split("\n", 1)[0]  # a label-only prompt gets only the label line, as a model would
        return Reply("explainer", text)
    instruction = blocks.get("instruction", user if not blocks else "")
    labelled = label_world.answer(instruction, json_mode=json_mode, rng=rng, error_rate=error_rate)
    if labelled is not None:
        return Reply("answerer", labelled)
    return Reply("answerer", _answer(instruction, json_mode, rng, phrasing, error_rate))


NO_OUTPUT_FAULTS = SimSection()
# Referee replies with no usable pair of scores: prose without numbers, JSON with unusable values, NaN,
# the wrong scale and out of range.
UNPARSEABLE_JUDGMENTS = (
    "Both answers have their merits; I would rather not put a number on either of them.",
    '{"comparison": "The answers reach different numbers.", "score_a": "eight-ish", "score_b": null}',
    "Score A: NaN\nScore B: NaN",
    "Score A: 8/100\nScore B: 11",
)
NO_LABEL_REASON = "I am not sure which quantity the question asks for, so I will not commit to one."


def bad_generations(instruction: str) -> tuple[str, ...]:
    """Generator replies that are not one instruction object: a list, an object without the field, a
    field that is not a string, and the prompt's own label echoed."""
    return (json.dumps([instruction, instruction]), json.dumps({"question": instruction}),
            json.dumps({"instruction": [instruction]}), f"Here is a new instruction: {instruction}")


def _share(*parts: str) -> float:
    """A stable draw in [0, 1) from the texts (sha256): the same prompt gets the same fault."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _pick(options: tuple[str, ...], *parts: str) -> str:
    return options[int(_share(*parts) * len(options))]


def _referee_faulted(blocks: dict[str, str], faults: SimSection) -> bool:
    """Unusable in this order: by the per-reply share, or as the one missing order of a faulted pair (the
    pair is the instruction with its two answers in either order; the order with the lesser answer first
    is the one that fails)."""
    instruction, a, b = blocks.get("instruction", ""), blocks["answer_a"], blocks["answer_b"]
    if faults.referee_unparseable_rate and _share("referee", instruction, a, b) < faults.referee_unparseable_rate:
        return True
    return bool(faults.referee_one_order_rate) and a <= b and (
        _share("one order", instruction, *sorted((a, b))) < faults.referee_one_order_rate)


def _answer(instruction: str, json_mode: bool, rng: random.Random, phrasing: random.Random | None,
            error_rate: float) -> str:
    problem = solve(instruction.strip())
    if problem is None:
        text = "I can only work through arithmetic word problems of a simple kind. The answer is 0."
    else:
        final = slipped_answer(problem, rng) if rng.random() < error_rate else None
        text = worked_answer(problem, phrasing, final=final)
    return json.dumps({"answer": text}) if json_mode else text


def _reason(problem: Problem, label: int, phrasing: random.Random | None) -> str:
    parsed = parse_steps(problem.text)
    equations = [s.equation() for s in parsed[1]] if parsed else []
    if parsed and label != problem.answer:
        last = parsed[1][-1]
        equations[-1] = f"{last.left} {last.symbol} {last.right} = {label}"
    chain = ", then ".join(equations)
    openers = ("Working through the steps", "Following the problem", "Step by step")
    opener = openers[0] if phrasing is None else phrasing.choice(openers)
    return f"{opener}, {chain}, so the result is {label}."


def explanation(text: str, rng: random.Random, phrasing: random.Random | None, error_rate: float = 0.0) -> str:
    """The explainer's plain-text reply to a problem: "Label: N\nReason: <one sentence>"."""
    return _explain(text, False, rng, phrasing, error_rate)


def _explain(text: str, json_mode: bool, rng: random.Random, phrasing: random.Random | None,
             error_rate: float) -> str:
    problem = solve(text.strip())
    if problem is None:
        label, reason = 0, "The input is not an arithmetic word problem, so no quantity can be computed."
    else:
        label = slipped_answer(problem, rng) if rng.random() < error_rate else problem.answer
        reason = _reason(problem, label, phrasing)
    if json_mode:
        return json.dumps({"label": str(label), "rationale": reason})
    return f"Label: {label}\nReason: {reason}"


def _explain_given(blocks: dict[str, str], json_mode: bool, phrasing: random.Random | None) -> str:
    problem = solve(blocks["input"].strip())
    label_text = blocks["label"].strip()
    if problem is None:
        reason = f"The given label {label_text} is the value the input asks for."
    else:
        label = final_number(f"The answer is {label_text}")
        reason = _reason(problem, label if label is not None else problem.answer, phrasing)
    return json.dumps({"rationale": reason}) if json_mode else f"Reason: {reason}"


def _score(correct: bool | None, rng: random.Random) -> int:
    if correct is None:
        return rng.randint(4, 6)
    return rng.randint(8, 10) if correct else rng.randint(1, 4)


def _referee(blocks: dict[str, str], rng: random.Random, error_rate: float, prose_rate: float) -> str:
    problem = solve(blocks["instruction"].strip()) if "instruction" in blocks else None
    finals = [final_number(blocks["answer_a"]), final_number(blocks["answer_b"])]
    if problem is None:
        verdicts: list[bool | None] = [None, None]
    else:
        verdicts = [f == problem.answer for f in finals]
    if problem is not None and rng.random() < error_rate:
        flip = rng.randrange(2)  # misjudge one answer: the referee's own error
        verdicts[flip] = not verdicts[flip]
    score_a, score_b = _score(verdicts[0], rng), _score(verdicts[1], rng)
    comparison = _comparison(verdicts, finals)
    text = json.dumps({"comparison": comparison, "score_a": score_a, "score_b": score_b})
    if rng.random() < prose_rate:
        text = f"Here is my assessment of the two answers.\n{text}"
    return text


def _comparison(verdicts: list[bool | None], finals: list[int | None]) -> str:
    def describe(label: str, verdict: bool | None, final: int | None) -> str:
        ends = f"ends with {final}" if final is not None else "gives no final number"
        if verdict is None:
            return f"Answer {label} {ends}"
        return f"Answer {label} {ends}, which is {'correct' if verdict else 'wrong'}"

    return f"{describe('A', verdicts[0], finals[0])}; {describe('B', verdicts[1], finals[1])}."


def _generator(seed_text: str, easy: bool, rng: random.Random) -> str:
    seed = solve(seed_text.strip())
    for _ in range(20):
        if seed is None:
            kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
            new = make_problem(rng, kind, rng.randint(1, 2), rng.randint(1, 2))
        else:
            kind = rarer_kind(seed.kind, rng) if easy else seed.kind
            new = make_problem(rng, kind, seed.steps, seed.digits)
        if seed is None or new.text != seed.text:
            break
    return json.dumps({"instruction": new.text})
