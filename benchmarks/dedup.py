"""Near-duplicate filter: 10,000 candidate instructions against a 50,000-instruction pool (Lion's ROUGE-L > 0.7).

Pool and candidates mix arithmetic word problems (20%) from the sim's world (agentkd.teachers.sim.world,
or a local stand-in of the same shape while that module is absent: the run says which) with templated
English instructions whose topics and context sentences draw on a Zipf-weighted 20,000-word vocabulary; 10% of the candidates are pool instructions with one word changed (true near-duplicates).
Each candidate goes through InstructionIndex.add_if_new, so accepted ones join the pool, as in Lion.
Baseline in the same run: naive all-pairs ROUGE-L with the textbook O(la * lb) LCS table, timed on a sample
and extrapolated. Last line: a JSON object with "seconds" (target < 60 on 2 cores).
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import time

from agentkd.lion.dedup import InstructionIndex, tokens

POOL = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
CANDIDATES = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
NAIVE_SAMPLE = 20_000

VERBS = ["Write", "Explain", "Summarise", "Describe", "List", "Compare", "Outline", "Draft", "Suggest",
         "Create", "Analyse", "Plan", "Design", "Review", "Translate", "Evaluate", "Argue", "Classify"]
FORMS = ["a short essay on", "three key facts about", "a step-by-step guide to", "a haiku about",
         "the main arguments for and against", "a beginner's introduction to", "a one-paragraph summary of",
         "five interview questions about", "a lesson plan covering", "common misconceptions about",
         "a product description for", "the history of", "a tweet announcing", "a checklist for",
         "an analogy that explains", "the pros and cons of", "a limerick about", "a quiz on"]
TOPICS = ["photosynthesis", "the French Revolution", "compound interest", "black holes", "remote work",
          "sourdough baking", "quantum entanglement", "the water cycle", "machine learning", "urban gardening",
          "the Roman Empire", "climate adaptation", "public speaking", "plate tectonics", "jazz improvisation",
          "vaccines", "supply chains", "the stock market", "marathon training", "ancient Egypt",
          "renewable energy", "sleep hygiene", "chess openings", "coral reefs", "cryptography",
          "the printing press", "volcanoes", "impressionist painting", "bird migration", "electric cars",
          "game theory", "meditation", "the immune system", "tea ceremonies", "the Silk Road", "origami",
          "3D printing", "honeybees", "the Cold War", "probability", "minimalism", "glaciers",
          "open-source software", "the periodic table", "podcasting", "desert ecosystems", "Shakespeare",
          "budgeting", "typography", "rainforests", "the Internet", "nuclear fusion", "wine making"]
AUDIENCES = ["", "for a ten-year-old", "for a busy executive", "for first-year students", "in plain English",
             "for a technical audience", "in under 100 words", "with a real-world example", "for a newsletter",
             "using a friendly tone", "for someone learning English", "with citations", "as a dialogue"]
EXTRAS = ["", "Keep it concise.", "Use bullet points.", "Avoid jargon.", "End with a question.",
          "Include one surprising fact.", "Mention a common mistake.", "Add a short conclusion."]
NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Maya", "Ivan", "Zoe", "Ravi", "Ella", "Kofi", "Nina"]
ITEMS = ["apples", "marbles", "books", "stickers", "coins", "pencils", "cookies", "shells", "cards", "stamps"]


SYLLABLES = ["ka", "lo", "mi", "ter", "an", "vo", "ril", "sen", "du", "pa", "chi", "mor", "el", "tu", "bra",
             "no", "gi", "sto", "we", "fen", "ly", "qua", "zo", "ri", "ben", "ox", "ha", "ul", "de", "ny"]
FUNCTION = ["the", "a", "of", "and", "to", "in", "for", "with", "on", "that", "is", "about", "how", "what"]


def make_vocab(rng: random.Random, size: int) -> list[str]:
    """Pseudo-words standing in for content words; drawn Zipf-like, so some are common, most rare."""
    words = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(size * 2)})
    rng.shuffle(words)
    return words[:size]


VOCAB = make_vocab(random.Random(1), 20_000)
CUM_WEIGHTS = list(itertools.accumulate(1 / (rank + 1) ** 1.05 for rank in range(len(VOCAB))))


def context(rng: random.Random) -> str:
    n = rng.randint(4, 14)
    words = [rng.choice(FUNCTION) if rng.random() < 0.35 else w for w in rng.choices(VOCAB, cum_weights=CUM_WEIGHTS, k=n)]
    return " ".join(words).capitalize() + "."


def english(rng: random.Random) -> str:
    topic = rng.choice(TOPICS) if rng.random() < 0.3 else " ".join(rng.choices(VOCAB, cum_weights=CUM_WEIGHTS, k=2))
    parts = [rng.choice(VERBS), rng.choice(FORMS), topic, rng.choice(AUDIENCES) + ".", rng.choice(EXTRAS)]
    if rng.random() < 0.7:
        parts.insert(0, context(rng))
    return " ".join(p for p in parts if p and p != ".").replace(" .", ".")


def local_problem(rng: random.Random) -> str:
    """Stand-in for the sim world's word problems (same flavour: 1-2 steps, 1-2 digit numbers)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(1, 9)
    steps = [f"{name} has {a} {item}.", rng.choice([f"{name} buys {b} more.", f"{name} gives away {b}.",
             f"A friend gives {name} {b} {item}."])]
    if rng.random() < 0.5:
        steps.append(rng.choice([f"Then {name} doubles them.", f"Then {name} loses {c}.",
                                 f"Then {name} shares them equally among {c} friends."]))
    return " ".join(steps) + f" How many {item} does {name} have now?"


def arithmetic(n: int, seed: int) -> tuple[list[str], str]:
    try:
        from agentkd.teachers.sim.world import sample_problems
    except ImportError:
        rng = random.Random(seed)
        return [local_problem(rng) for _ in range(n)], "local stand-in (agentkd.teachers.sim.world absent)"
    return [p.text for p in sample_problems(n, seed)], "agentkd.teachers.sim.world.sample_problems"


def near_duplicate(text: str, rng: random.Random) -> str:
    words = text.split()
    i = rng.randrange(len(words))
    words[i] = rng.choice(["really", "quite", "new", "simple", "the", "very", "clear"])
    return " ".join(words)


def naive_rouge(a: list[str], b: list[str]) -> float:
    """Textbook ROUGE-L: full LCS table, as rouge_score computes it."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        row, prev = table[i], table[i - 1]
        for j, y in enumerate(b, 1):
            row[j] = prev[j - 1] + 1 if x == y else max(prev[j], row[j - 1])
    lcs = table[-1][-1]
    return 2 * lcs / (len(a) + len(b)) if lcs else 0.0


def main() -> None:
    rng = random.Random(0)
    n_arith = POOL // 5 + CANDIDATES // 5
    problems, source = arithmetic(n_arith, seed=0)
    rng.shuffle(problems)
    pool = problems[: POOL // 5] + [english(rng) for _ in range(POOL - POOL // 5)]
    rng.shuffle(pool)
    fresh = problems[POOL // 5 :] + [english(rng) for _ in range(CANDIDATES)]
    rng.shuffle(fresh)
    planted = CANDIDATES // 10
    labelled = [(near_duplicate(rng.choice(pool), rng), True) for _ in range(planted)]
    labelled += [(text, False) for text in fresh[: CANDIDATES - planted]]
    rng.shuffle(labelled)
    candidates = [text for text, _ in labelled]
    print(f"arithmetic source: {source}")
    print(f"pool {len(pool):,}  candidates {len(candidates):,} (planted near-duplicates {planted:,})")

    start = time.perf_counter()
    index = InstructionIndex(0.7, pool)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    duplicates = 0
    planted_caught = 0
    for text, is_planted in labelled:
        added, _ = index.add_if_new(text)
        if not added:
            duplicates += 1
            planted_caught += is_planted
    filter_s = time.perf_counter() - start
    print(f"index build: {build_s:.2f} s   filter: {filter_s:.2f} s "
          f"({filter_s / len(candidates) * 1e3:.2f} ms per candidate)")
    print(f"duplicates found: {duplicates:,} (planted caught: {planted_caught:,} of {planted:,}); "
          f"final pool {len(index):,}")

    pairs = [(tokens(rng.choice(candidates)), tokens(rng.choice(pool))) for _ in range(NAIVE_SAMPLE)]
    start = time.perf_counter()
    for a, b in pairs:
        naive_rouge(a, b)
    per_pair = (time.perf_counter() - start) / NAIVE_SAMPLE
    naive_total = per_pair * len(candidates) * (len(pool) + len(candidates) / 2)
    print(f"naive all-pairs baseline: {per_pair * 1e6:.1f} us per pair x "
          f"{len(candidates) * len(pool):,}+ pairs = ~{naive_total:,.0f} s (~{naive_total / 3600:.1f} h), "
          f"speed-up ~{naive_total / (build_s + filter_s):,.0f}x")
    print(json.dumps({
        "seconds": round(build_s + filter_s, 2), "build_seconds": round(build_s, 2),
        "filter_seconds": round(filter_s, 2), "candidates": len(candidates), "pool": len(pool),
        "duplicates": duplicates, "planted": planted, "planted_caught": planted_caught,
        "naive_seconds_estimate": round(naive_total), "arithmetic_source": source,
    }))


if __name__ == "__main__":
    main()
