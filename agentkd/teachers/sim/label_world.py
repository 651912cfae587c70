"""The simulated teacher's label world: NLI and multiple-choice items whose label the sim can check.

Beside the arithmetic world (world.py), for the label tasks zero-shot rationale distillation is about
(arXiv 2403.15886: ANLI and CommonsenseQA). Every item comes from a fixed template, so `solve_nli` /
`solve_mc` parse any rendered item this module writes and compute its one right label.

NLI: a premise of one or two "<Name> has <n> <things>." sentences and a hypothesis of one kind
    some        "<X> has some <things>."          entailment if the premise gives X those things
    none        "<X> has no <things>."            contradiction if it does
    likes       "<X> likes <things>."             always neutral (having says nothing of liking)
    exact       "<X> has exactly <k> <things>."   entailment iff k = n, else contradiction
    more_than   "<X> has more than <k> <things>." entailment iff n > k, else contradiction
    fewer_than  "<X> has fewer than <k> <things>." entailment iff n < k, else contradiction
    and any kind but likes is neutral when the premise says nothing about X's <things>.
Multiple choice: 3-5 options, one right, of a kind
    category    "Which of these is a <category>?"  one option of the category
    largest / smallest   "Which number is the largest?"
    sum         "What is <a> plus <b>?"             (the rare kind)

Items are rendered as agentkd renders fields (agentkd/roles/items.py): "premise: ...\\nhypothesis: ..." and
"question: ...\\noptions:\\na) ...\\nb) ...". The sim's roles over them: the explainer answers a label and
a one-sentence reason in varied phrasings and synonyms (so the explainer's parser earns its keep), wrong
at sim.error_rate; the labeler the label line only; the generator a new item of the seed's structure as
a JSON object of its fields (hard and plain prompts: the same kind and size; the easy prompt: a rarer
kind); the answerer a reason ending "The answer is <label>."; the referee scores answers by their label.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

NAMES = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo", "Ivy", "Jack", "Kim", "Leo")
THINGS = ("apples", "pens", "books", "stickers", "coins", "marbles", "cards", "shells", "cookies", "stamps")
NLI_LABELS = ("entailment", "neutral", "contradiction")
MC_LETTERS = ("a", "b", "c", "d", "e")

# kind -> sampling weight; the rarer kinds are what the easy generator reaches for.
NLI_KINDS: dict[str, float] = {"some": 0.22, "none": 0.22, "likes": 0.16, "exact": 0.2, "more_than": 0.1,
                               "fewer_than": 0.1}
MC_KINDS: dict[str, float] = {"category": 0.45, "largest": 0.2, "smallest": 0.2, "sum": 0.15}
CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "pear", "plum", "grape", "mango", "lemon", "cherry", "peach"),
    "animal": ("dog", "cat", "horse", "goat", "mouse", "tiger", "rabbit", "sheep"),
    "tool": ("hammer", "saw", "drill", "wrench", "chisel", "shovel", "ladder", "rake"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "brown", "pink"),
    "vehicle": ("car", "bus", "truck", "bicycle", "train", "boat", "tractor", "scooter"),
}

_FACT = re.compile(r"([A-Z][a-z]+) has (\d+) ([a-z]+)\.")
_HYPOTHESES: dict[str, re.Pattern[str]] = {
    "some": re.compile(r"^([A-Z][a-z]+) has some ([a-z]+)\.$"),
    "none": re.compile(r"^([A-Z][a-z]+) has no ([a-z]+)\.$"),
    "likes": re.compile(r"^([A-Z][a-z]+) likes ([a-z]+)\.$"),
    "exact": re.compile(r"^([A-Z][a-z]+) has exactly (\d+) ([a-z]+)\.$"),
    "more_than": re.compile(r"^([A-Z][a-z]+) has more than (\d+) ([a-z]+)\.$"),
    "fewer_than": re.compile(r"^([A-Z][a-z]+) has fewer than (\d+) ([a-z]+)\.$"),
}
_FIELD_LINE = re.compile(r"^\s*(premise|hypothesis|question)\s*:\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)
_OPTION_LINE = re.compile(r"^\s*([a-e])\)\s*(.+?)\s*$", re.MULTILINE)
_QUESTIONS = {
    "category": re.compile(r"^Which of these is an? ([a-z]+)\?$"),
    "largest": re.compile(r"^Which number is the largest\?$"),
    "smallest": re.compile(r"^Which number is the smallest\?$"),
    "sum": re.compile(r"^What is (\d+) plus (\d+)\?$"),
}


@dataclass(frozen=True)
class LabelItem:
    """A label-world item: its fields (what agentkd stores and renders), right label, kind and size."""

    fields: dict
    label: str
    kind: str
    size: int  # NLI: premise sentences; MC: number of options
    digits: int

    @property
    def text(self) -> str:
        return render(self.fields)


def render(fields: dict) -> str:
    """The same text agentkd/roles/items.py renders for these fields."""
    lines = []
    for name, value in fields.items():
        if isinstance(value, list):
            lines.append(f"{name}:")
            lines += [f"{letter}) {option}" for letter, option in zip(MC_LETTERS, value)]
        else:
            lines.append(f"{name}: {value}")
    return "\n".join(lines)


# ---------------------------------------------------------------- NLI


def _count(rng: random.Random, digits: int) -> int:
    return rng.randint(1, 9) if digits == 1 else rng.randint(10, 99)


def make_nli(rng: random.Random, kind: str, sentences: int, digits: int) -> LabelItem:
    names = rng.sample(NAMES, 3)
    facts = [(names[0], _count(rng, digits), rng.choice(THINGS))]
    if sentences == 2:
        facts.append((names[1], _count(rng, digits), rng.choice(THINGS)))
    who, n, thing = rng.choice(facts)
    if kind != "likes" and rng.random() < 0.25:  # a hypothesis the premise says nothing about
        known = {(w, t) for w, _, t in facts}
        who, thing = (names[2], thing) if rng.random() < 0.5 else (who, rng.choice(
            [t for t in THINGS if (who, t) not in known]))
    k = n if kind == "exact" and rng.random() < 0.5 else max(0, n + rng.choice((-3, -2, -1, 1, 2, 3)))
    hypothesis = {
        "some": f"{who} has some {thing}.", "none": f"{who} has no {thing}.", "likes": f"{who} likes {thing}.",
        "exact": f"{who} has exactly {k} {thing}.", "more_than": f"{who} has more than {k} {thing}.",
        "fewer_than": f"{who} has fewer than {k} {thing}.",
    }[kind]
    fields = {"premise": " ".join(f"{w} has {c} {t}." for w, c, t in facts), "hypothesis": hypothesis}
    solved = solve_nli(render(fields))
    assert solved is not None  # every template above is one solve_nli reads
    return solved


@dataclass(frozen=True)
class NliReading:
    facts: dict  # (name, things) -> count
    kind: str
    who: str
    thing: str
    k: int | None


def read_nli(text: str) -> NliReading | None:
    fields = {m.group(1).lower(): m.group(2) for m in _FIELD_LINE.finditer(text)}
    if set(fields) != {"premise", "hypothesis"}:
        return None
    premise = fields["premise"]
    facts = {(m.group(1), m.group(3)): int(m.group(2)) for m in _FACT.finditer(premise)}
    if not facts or _FACT.sub("", premise).strip():
        return None
    for kind, pattern in _HYPOTHESES.items():
        m = pattern.match(fields["hypothesis"])
        if m:
            if kind in ("exact", "more_than", "fewer_than"):
                return NliReading(facts, kind, m.group(1), m.group(3), int(m.group(2)))
            return NliReading(facts, kind, m.group(1), m.group(2), None)
    return None


def solve_nli(text: str) -> LabelItem | None:
    reading = read_nli(text)
    if reading is None:
        return None
    n = reading.facts.get((reading.who, reading.thing))
    if reading.kind == "likes" or n is None:
        label = "neutral"
    elif reading.kind == "some":
        label = "entailment" if n > 0 else "contradiction"
    elif reading.kind == "none":
        label = "contradiction" if n > 0 else "entailment"
    else:
        k = reading.k
        holds = {"exact": n == k, "more_than": n > k, "fewer_than": n < k}[reading.kind]
        label = "entailment" if holds else "contradiction"
    fields = {m.group(1).lower(): m.group(2) for m in _FIELD_LINE.finditer(text)}
    digits = max(len(str(c)) for c in reading.facts.values())
    return LabelItem({"premise": fields["premise"], "hypothesis": fields["hypothesis"]}, label, reading.kind,
                     len(reading.facts), digits)


def _nli_reason(reading: NliReading, label: str, rng: random.Random) -> str:
    """One sentence for `label` (right or, at the error rate, wrong), in one of several wordings."""
    who, thing = reading.who, reading.thing
    n = reading.facts.get((who, thing))
    said = rng.choice(("The premise says", "According to the premise,", "We are told that"))
    if label == "neutral":
        if reading.kind == "likes":
            return rng.choice((f"Having {thing} says nothing about whether {who} likes them.",
                               f"{said} what {who} owns, but not whether {who} likes {thing}."))
        return rng.choice((f"The premise says nothing about how many {thing} {who} has, so it cannot be checked.",
                           f"Nothing in the premise tells how many {thing} {who} has, either way."))
    if n is None or reading.kind == "likes":  # a wrong label for an item the premise cannot decide
        return f"The hypothesis about {who} and {thing} is taken to {'follow' if label == 'entailment' else 'clash'} with the premise."
    if reading.kind in ("some", "none"):
        fits = "fits" if label == "entailment" else "rules out"
        return f"{said} {who} has {n} {thing}, which {fits} the claim that {who} has {reading.kind} {thing}."
    relation = {"exact": "equal to", "more_than": "more than", "fewer_than": "fewer than"}[reading.kind]
    truth = "is" if label == "entailment" else "is not"
    return f"{said} {who} has {n} {thing}, and {n} {truth} {relation} {reading.k}."


# Surface forms of each label (every one is in the explainer parser's NLI synonym map).
NLI_SURFACES: dict[str, tuple[str, ...]] = {
    "entailment": ("entailment", "Entailment", "entails", "true", "yes", "follows", "ENTAILMENT"),
    "contradiction": ("contradiction", "Contradiction", "contradicts", "false", "no", "contradictory"),
    "neutral": ("neutral", "Neutral", "inconclusive", "uncertain", "cannot be determined", "unknown"),
}


# ---------------------------------------------------------------- multiple choice


def make_mc(rng: random.Random, kind: str, options: int, digits: int) -> LabelItem:
    if kind == "category":
        category = rng.choice(sorted(CATEGORIES))
        right = rng.choice(CATEGORIES[category])
        others = [w for c, words in CATEGORIES.items() if c != category for w in words]
        choices = [right, *rng.sample(others, options - 1)]
        article = "an" if category[0] in "aeiou" else "a"
        question = f"Which of these is {article} {category}?"
    elif kind in ("largest", "smallest"):
        low, high = (1, 9) if digits == 1 else (10, 99)
        numbers = rng.sample(range(low, high + 1), options)
        right = str(max(numbers) if kind == "largest" else min(numbers))
        choices = [str(x) for x in numbers]
        question = f"Which number is the {kind}?"
    elif kind == "sum":
        a, b = _count(rng, digits), _count(rng, digits)
        total = a + b
        wrong = rng.sample([total + d for d in (-3, -2, -1, 1, 2, 3, 10) if total + d >= 0], options - 1)
        right, choices = str(total), [str(total), *map(str, wrong)]
        question = f"What is {a} plus {b}?"
    else:
        raise ValueError(f"unknown multiple-choice kind {kind!r}")
    rng.shuffle(choices)
    solved = solve_mc(render({"question": question, "options": choices}))
    assert solved is not None and solved.fields["options"][MC_LETTERS.index(solved.label)] == right
    return solved


def read_mc(text: str) -> tuple[str, list[str]] | None:
    fields = {m.group(1).lower(): m.group(2) for m in _FIELD_LINE.finditer(text)}
    if "question" not in fields or not re.search(r"^\s*options\s*:\s*$", text, re.IGNORECASE | re.MULTILINE):
        return None
    options = [m.group(2) for m in _OPTION_LINE.finditer(text)]
    return (fields["question"], options) if 2 <= len(options) <= len(MC_LETTERS) else None


def solve_mc(text: str) -> LabelItem | None:
    read = read_mc(text)
    if read is None:
        return None
    question, options = read
    for kind, pattern in _QUESTIONS.items():
        m = pattern.match(question)
        if not m:
            continue
        if kind == "category":
            members = CATEGORIES.get(m.group(1), ())
            right = [i for i, o in enumerate(options) if o in members]
        elif kind == "sum":
            right = [i for i, o in enumerate(options) if o == str(int(m.group(1)) + int(m.group(2)))]
        else:
            numbers = [int(o) if o.isdigit() else None for o in options]
            if None in numbers:
                return None
            best = max(numbers) if kind == "largest" else min(numbers)
            right = [i for i, x in enumerate(numbers) if x == best]
        if len(right) != 1:
            return None  # no option, or several, is right: not a well-formed item
        digits = max((len(o) for o in options if o.isdigit()), default=1)
        return LabelItem({"question": question, "options": options}, MC_LETTERS[right[0]], kind, len(options),
                         min(digits, 2))
    return None


def _mc_reason(item: LabelItem, letter: str, rng: random.Random) -> str:
    options = item.fields["options"]
    chosen = options[MC_LETTERS.index(letter)]
    question = item.fields["question"]
    if item.kind == "category":
        category = _QUESTIONS["category"].match(question).group(1)  # type: ignore[union-attr]
        return rng.choice((f"Of the options only {chosen} is a kind of {category}, the others are not.",
                           f"{chosen.capitalize()} is a {category}, while none of the other options is one."))
    if item.kind in ("largest", "smallest"):
        word = "larger" if item.kind == "largest" else "smaller"
        return f"The number {chosen} is {word} than every other option listed here."
    a, b = _QUESTIONS["sum"].match(question).groups()  # type: ignore[union-attr]
    return f"Adding {a} and {b} gives {chosen}, which is the option to pick."


# ---------------------------------------------------------------- the roles


def solve(text: str) -> LabelItem | None:
    """The label-world item a rendered text is, or None (then it is no label-world item)."""
    return solve_nli(text) or solve_mc(text)


def sample_items(task: str, n: int, *, seed: int, sizes: tuple[int, int] = (1, 2),
                 digits: tuple[int, int] = (1, 1)) -> list[LabelItem]:
    """n distinct items of the task ("nli" or "multiple_choice"), drawn by kind weight (deterministic)."""
    rng = random.Random(f"label-world:{task}:{seed}")
    kinds = NLI_KINDS if task == "nli" else MC_KINDS
    out: dict[str, LabelItem] = {}
    for _ in range(n * 50):
        if len(out) == n:
            break
        kind = rng.choices(list(kinds), list(kinds.values()))[0]
        d = rng.randint(*digits)
        if task == "nli":
            item = make_nli(rng, kind, rng.randint(*sizes), d)
        else:
            item = make_mc(rng, kind, rng.randint(3, 5), d)
        out.setdefault(item.text, item)
    return list(out.values())


def _wrong(item: LabelItem, rng: random.Random) -> str:
    labels = NLI_LABELS if "premise" in item.fields else MC_LETTERS[: len(item.fields["options"])]
    return rng.choice([lbl for lbl in labels if lbl != item.label])


def _teacher_label(text: str, rng: random.Random, error_rate: float) -> tuple[LabelItem, str, bool, str] | None:
    """The item, the teacher's label (wrong at error_rate), whether it is NLI, and a one-sentence reason."""
    item = solve(text)
    if item is None:
        return None
    label = _wrong(item, rng) if rng.random() < error_rate else item.label
    nli = "premise" in item.fields
    reason = _nli_reason(read_nli(text), label, rng) if nli else _mc_reason(item, label, rng)  # type: ignore[arg-type]
    return item, label, nli, reason


def explain(text: str, *, json_mode: bool, with_reason: bool, rng: random.Random, error_rate: float) -> str | None:
    """The explainer's (or, without a reason, the labeler's) reply to a label-world item; None if it is none."""
    found = _teacher_label(text, rng, error_rate)
    if found is None:
        return None
    item, label, nli, reason = found
    if json_mode:
        key = rng.choice(("rationale", "rationale", "reason"))
        shown = rng.choice((label, label.capitalize())) if nli else label
        return json.dumps({"label": shown, key: reason} if with_reason else {"label": shown})
    if nli:
        surface = rng.choice(NLI_SURFACES[label])
    else:
        index = MC_LETTERS.index(label)
        numeric = any(o.isdigit() for o in item.fields["options"])  # then "3" is an option's text, not its number
        surface = rng.choice((label, f"({label})", f"option {label}", item.fields["options"][index],
                              *(() if numeric else (str(index + 1),))))
    if not with_reason:
        return rng.choice((f"Label: {surface}", f"Answer: {surface}", f"**Label:** {surface}"))
    lowered = reason[0].lower() + reason[1:]
    forms = (
        f"Label: {surface}\nReason: {reason}",
        f"Answer: {surface}\nExplanation: {reason}",
        f"**Label:** {surface}\n**Reason:** {reason}",
        f"The answer is {surface} because {lowered}",
    )
    if nli:  # a reply that opens with the label itself (MC option text could carry its own punctuation)
        forms += (f"{surface[0].upper()}{surface[1:]}. {reason}",)
    return rng.choice(forms)


def answer(text: str, *, json_mode: bool, rng: random.Random, error_rate: float) -> str | None:
    """The answerer on a label-world item: a reason, then "The answer is <label>."."""
    found = _teacher_label(text, rng, error_rate)
    if found is None:
        return None
    _, label, _, reason = found
    out = f"{reason} The answer is {label}."
    return json.dumps({"answer": out}) if json_mode else out


_ANSWER_LABEL = re.compile(r"the answer is\s*:?\s*\(?([a-z]+)\)?", re.IGNORECASE)


def answer_label(item: LabelItem, answer_text: str) -> str | None:
    """The label an answer gives: "The answer is X", or an answer that is exactly a label."""
    labels = NLI_LABELS if "premise" in item.fields else MC_LETTERS[: len(item.fields["options"])]
    found = _ANSWER_LABEL.findall(answer_text)
    raw = found[-1] if found else answer_text
    raw = raw.strip().strip(".").lower()
    return raw if raw in labels else None


def referee(blocks: dict[str, str], rng: random.Random, error_rate: float) -> str | None:
    """Scores two answers to a label-world item by whether each gives its right label."""
    item = solve(blocks.get("instruction", ""))
    if item is None:
        return None
    found = [answer_label(item, blocks["answer_a"]), answer_label(item, blocks["answer_b"])]
    verdicts: list[bool | None] = [None if f is None else f == item.label for f in found]
    if rng.random() < error_rate:
        flip = rng.randrange(2)
        verdicts[flip] = not verdicts[flip] if verdicts[flip] is not None else None
    scores = [rng.randint(4, 6) if v is None else rng.randint(8, 10) if v else rng.randint(1, 4) for v in verdicts]

    def says(name: str, f: str | None, v: bool | None) -> str:
        return f"Answer {name} gives no label" if f is None else f"Answer {name} says {f}, which is {'right' if v else 'wrong'}"

    comparison = f"{says('A', found[0], verdicts[0])}; {says('B', found[1], verdicts[1])}."
    return json.dumps({"comparison": comparison, "score_a": scores[0], "score_b": scores[1]})


def generate(seed_text: str, *, easy: bool, rng: random.Random) -> dict | None:
    """A new item (its fields) of the seed's structure: the seed's kind and size, or a rarer kind."""
    seed = solve(seed_text)
    if seed is None:
        return None
    nli = "premise" in seed.fields
    kinds = NLI_KINDS if nli else MC_KINDS
    kind = seed.kind
    if easy:
        rarer = [k for k, w in kinds.items() if w <= kinds[seed.kind] and k != seed.kind] or \
                [k for k in kinds if k != seed.kind]
        kind = rng.choice(rarer)
    for _ in range(20):
        new = make_nli(rng, kind, seed.size, seed.digits) if nli else make_mc(rng, kind, seed.size, seed.digits)
        if new.text != seed.text:
            break
    return new.fields


def bad_generations(fields: dict) -> tuple[str, ...]:
    """Generator replies that are no item: a list, a missing field, a field of the wrong type, an echo."""
    first = next(iter(fields))
    missing = {k: v for k, v in fields.items() if k != first}
    wrong_type = {**fields, first: [fields[first]]}
    return (json.dumps([fields, fields]), json.dumps(missing), json.dumps(wrong_type),
            f"Here is a new instruction: {json.dumps(fields)}")
